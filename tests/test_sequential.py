"""Block-wise (sequential) calibration: bit-for-bit the thresholds of lockstep calibration, on custom, HF and
llama2.c models, with the cache in memory, on CPU or on disk; fallback (with a logged reason) where the model
does not fit the scheme; DDP ranks agree."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from pl_actsparse import TargetScope
from pl_actsparse.api import calibrate_activation_sparsity, prepare_activation_sparsity, sparsify_activations
from pl_actsparse.core import sequential
from pl_actsparse.core.calibration import calibrate_layers
from pl_actsparse.core.layer import sparsified_layers
from pl_actsparse.core.masking import current_token_mask
from pl_actsparse.core.sequential import calibrate_sequential, find_block_list
from pl_actsparse.errors import InvalidTargetError, NonFiniteActivationError
from tiny_models import tiny_llama, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = {TargetScope(types=[nn.Linear]): 0.5}
LOG = "pl_actsparse.core.sequential"


def _calibrate(make, data, scope, fn, **kw):
    model = make()
    prepare_activation_sparsity(model, scope)
    layers = list(sparsified_layers(model))
    stats = fn(model, layers, data, progress=False, **kw)
    return model, {n: m.activation_threshold.clone() for n, m in layers}, stats


def _assert_same(make, data, scope=ALL, **kw):
    """Sequential == lockstep, bit for bit: thresholds, zeroed counts and the histograms themselves."""
    _, want, want_stats = _calibrate(make, data, scope, calibrate_layers)
    _, got, got_stats = _calibrate(make, data, scope, calibrate_sequential, **kw)
    assert list(got) == list(want) and len(want) > 0
    bad = [n for n in want if not torch.equal(want[n], got[n])]
    assert bad == [], f"thresholds differ for {bad}"
    assert list(got_stats) == list(want_stats)
    for n, s in want_stats.items():
        assert got_stats[n].name == n
        assert got_stats[n].zeroed == s.zeroed and got_stats[n].dtype == s.dtype
        assert torch.equal(got_stats[n].coarse, s.coarse), n
    # and the thresholds are not trivial: half of every layer's elements are zeroed
    assert all(abs(s.achieved - 0.5) < 0.05 for s in want_stats.values())
    return got


# ---------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("offload", [None, "cpu", "disk"])
def test_tiny_llama_with_lm_head_matches_lockstep(offload, caplog):
    with caplog.at_level(logging.WARNING, logger=LOG):
        got = _assert_same(tiny_llama, token_batches(), offload=offload)
    assert "lm_head" in got and "layers.2.mlp.down_proj" in got  # a tail layer and block layers
    assert not [r for r in caplog.records if r.name == LOG]  # no fallback happened


def test_disk_offload_cleans_up_and_keeps_nothing_on_the_blocks(tmp_path):
    model, _, _ = _calibrate(tiny_llama, token_batches(), ALL, calibrate_sequential, offload="disk", offload_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert all("forward" not in b.__dict__ for b in model.layers)  # the stubs are gone
    assert all(not m._actsparse.observers for _, m in sparsified_layers(model))


def test_training_flags_are_restored():
    model = tiny_llama().train()
    model.layers[1].eval()
    prepare_activation_sparsity(model, ALL)
    calibrate_sequential(model, list(sparsified_layers(model)), token_batches(), progress=False)
    assert model.training and model.layers[0].training and not model.layers[1].training


@settings(max_examples=8, deadline=None)
@given(
    layers=st.integers(2, 3),
    dim=st.sampled_from([16, 32]),
    n=st.integers(1, 4),
    target=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    pattern=st.sampled_from([".*", ".*mlp.*", ".*(q_proj|lm_head)"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_parity_property(layers, dim, n, target, pattern, dtype):
    make = lambda: tiny_llama(layers=layers, dim=dim, hidden=dim + 16).to(dtype)  # noqa: E731
    data = token_batches(n=n, batch=2, seq=8)
    scope = {TargetScope(patterns=[pattern]): target}
    _, want, _ = _calibrate(make, data, scope, calibrate_layers)
    _, got, _ = _calibrate(make, data, scope, calibrate_sequential)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _hf(kind: str):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "qwen2":  # a sliding-window first layer and a full-attention second one: different masks per block
        cfg = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                       layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.MistralConfig(**common, sliding_window=4), transformers.MistralForCausalLM

    def make():
        torch.manual_seed(0)
        return cls(cfg).eval()

    return make


def _padded_batches(n=4, batch=2, seq=12):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(0, 128, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, : 2 + i] = 0  # left padding, a different amount per batch
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_hf_decoders_match_lockstep(kind):
    got = _assert_same(_hf(kind), _padded_batches())
    assert "lm_head" in got and "model.layers.1.mlp.down_proj" in got


def test_hf_llama_bf16_with_cache_objects_matches_lockstep():
    make = _hf("llama")
    data = [{"input_ids": b["input_ids"], "use_cache": True} for b in _padded_batches()]
    _assert_same(lambda: make().to(torch.bfloat16), data)


def test_gpt2_blocks_hold_no_linear_so_only_the_tail_is_checked(caplog):
    """GPT-2's projections are Conv1D, which is not sparsifiable yet (only nn.Linear): its blocks hold no
    targeted layer. Found automatically, the block list is rejected (with a logged reason); forced with
    ``blocks="transformer.h"``, the tail pass calibrates lm_head exactly as lockstep does."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)

    def make():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    data = _padded_batches()
    assert find_block_list(make(), ["lm_head"])[0] is None
    with caplog.at_level(logging.WARNING, logger=LOG):
        _assert_same(make, data)
    assert any("no nn.ModuleList holds the bulk" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOG):
        got = _assert_same(make, data, blocks="transformer.h")
    assert list(got) == ["lm_head"] and not caplog.records


@pytest.fixture(scope="module")
def stories():
    from pl_actsparse.demos.llama2c import Llama2cTokenizer
    from pl_actsparse.demos.tinystories import TokenWindows, load_stories

    windows = TokenWindows(load_stories(start=500, stop=520), Llama2cTokenizer.from_file(), seq_len=128)
    return [torch.stack([windows[j] for j in range(i, min(i + 4, len(windows)))]) for i in range(0, min(len(windows), 16), 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stories260k_matches_lockstep(stories, dtype):
    from pl_actsparse.demos.llama2c import load_llama2c_checkpoint

    scope = {TargetScope(patterns=[".*up_proj.*", ".*gate_proj.*", ".*down_proj.*", ".*o_proj.*"]): 0.5}
    got = _assert_same(lambda: load_llama2c_checkpoint(dtype=dtype), stories, scope)
    assert len(got) == 20


def test_token_mask_is_current_inside_the_blocks():
    """The mask of each batch (``token_mask`` evaluated on the original batch) is the current token mask while
    that batch's cached inputs run through a block, as it is during a lockstep forward."""
    model = tiny_llama()
    prepare_activation_sparsity(model, ALL)
    data = token_batches(n=3)
    masks = {id(b): torch.rand(b.shape, generator=torch.Generator().manual_seed(i)) > 0.3 for i, b in enumerate(data)}
    seen = []
    model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(current_token_mask()))
    calibrate_sequential(model, list(sparsified_layers(model)), data, progress=False, token_mask=lambda b: masks[id(b)])
    want = sorted(masks.values(), key=lambda t: t.flatten().tolist())
    got = sorted(seen, key=lambda t: t.flatten().tolist())
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------------
# fallback


class _Scaled(nn.Module):
    """Blocks that are not chained (the model changes the hidden states between two blocks), or a targeted layer
    that runs between two blocks."""

    def __init__(self, use_mid: bool):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
        self.mid = nn.Linear(8, 8)
        self.use_mid = use_mid

    def forward(self, x):
        aux = 0
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i == 0 and self.use_mid:  # a targeted layer between two blocks, off the chain
                aux = self.mid(x)
            elif i == 0:
                x = x * 2
        return x + aux


@pytest.mark.parametrize(
    "make, scope, why",
    [
        (lambda: torch.manual_seed(0) and nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), ALL, "no nn.ModuleList"),
        (lambda: _Scaled(use_mid=False), {TargetScope(patterns=[r"blocks\..*"]): 0.5}, "the input of block 1 is not the output of block 0"),
        (lambda: _Scaled(use_mid=True), ALL, "run between two blocks: ['mid']"),
    ],
    ids=["no-blocks", "not-chained", "layer-between-blocks"],
)
def test_fallback_logs_why_and_matches_lockstep(make, scope, why, caplog):
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger=LOG):
        _, want, _ = _calibrate(make, data, scope, calibrate_layers)
        _, got, _ = _calibrate(make, data, scope, calibrate_sequential)
    assert want.keys() == got.keys() and len(want) >= 2 and all(torch.equal(want[k], got[k]) for k in want)
    messages = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert len(messages) == 1 and "calibrating in lockstep instead" in messages[0] and why in messages[0], messages


class _UsesEarlyBlock(nn.Module):
    """The head reads block 0's output as well as the last block's: the tail pass cannot reproduce it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        first = x = self.blocks[0](x)
        for b in self.blocks[1:]:
            x = b(x)
        return self.head(x + first)


def test_tail_reading_an_early_block_output_is_an_error_not_a_wrong_threshold():
    model = _UsesEarlyBlock()
    data = [torch.randn(4, 8) for _ in range(2)]
    before = model.head.weight.clone()
    with pytest.raises(NonFiniteActivationError, match="head"):
        sparsify_activations(model, data, ALL, calibration="sequential", progress=False)
    assert type(model.head) is nn.Linear and torch.equal(model.head.weight, before)  # restored


# ---------------------------------------------------------------------------------------------------
# the api and the block finder


def test_api_sequential_equals_lockstep_and_validates_options():
    data = token_batches()
    a, b = tiny_llama(), tiny_llama()
    sparsify_activations(a, data, ALL, calibration="lockstep", progress=False)
    sparsify_activations(b, data, ALL, calibration="sequential", offload="cpu", progress=False)
    ta, tb = dict(sparsified_layers(a)), dict(sparsified_layers(b))
    assert all(torch.equal(ta[n].activation_threshold, tb[n].activation_threshold) for n in ta)
    report = calibrate_activation_sparsity(b, data, calibration="sequential", progress=False)
    assert all(torch.equal(ta[n].activation_threshold, tb[n].activation_threshold) for n in ta)
    assert report.statistics["lm_head"].name == "lm_head"
    c = tiny_llama()
    with pytest.raises(InvalidTargetError, match="calibration must be one of 'auto', 'sequential', 'lockstep', got 'blockwise'"):
        sparsify_activations(c, data, ALL, calibration="blockwise")
    with pytest.raises(InvalidTargetError, match="offload must be one of None, 'cpu', 'disk', got 'gpu'"):
        sparsify_activations(c, data, ALL, offload="gpu")
    assert not list(sparsified_layers(c))  # validated before anything changed


@pytest.mark.parametrize("min_bytes, chosen", [(0, "sequential"), (1 << 40, "lockstep")])
def test_auto_chooses_by_model_size(monkeypatch, min_bytes, chosen):
    calls = []
    real = sequential.calibrate_sequential
    monkeypatch.setattr(sequential, "AUTO_SEQUENTIAL_MIN_PARAM_BYTES", min_bytes)
    monkeypatch.setattr(sequential, "calibrate_sequential", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llama()
    sparsify_activations(model, token_batches(), ALL, progress=False)
    assert ("sequential" if calls else "lockstep") == chosen
    assert all(m._actsparse.mode.value == "sparsifying" for _, m in sparsified_layers(model))


def test_find_block_list():
    assert find_block_list(tiny_llama())[0] == "layers"
    name, why = find_block_list(_hf("llama")())
    assert name == "model.layers" and "2 blocks" in why
    assert find_block_list(nn.Sequential(nn.Linear(2, 2)))[0] is None
    shared = nn.Linear(2, 2)
    holder = nn.Module()
    holder.blocks = nn.ModuleList([shared, shared, nn.Linear(2, 2)])
    name, why = find_block_list(holder)
    assert name is None and "same block object" in why
    with pytest.raises(InvalidTargetError, match="'nope'"):
        find_block_list(tiny_llama(), blocks="nope")


# ---------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes calibrate block by block on their own shards and agree


def _ddp_worker(rank: int, out: str, init: str) -> None:  # pragma: no cover - runs in the subprocesses
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    data = token_batches(n=5)
    model = tiny_llama()
    prepare_activation_sparsity(model, ALL)
    calibrate_sequential(model, list(sparsified_layers(model)), data[rank::2], progress=False)
    torch.save({n: m.activation_threshold for n, m in sparsified_layers(model)}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_ranks_agree_and_equal_one_process_on_the_union(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{Path(__file__).parent}"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    _, single, _ = _calibrate(tiny_llama, token_batches(n=5), ALL, calibrate_layers)
    assert a.keys() == b.keys() == single.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], single[k]) for k in a)


if __name__ == "__main__":  # pragma: no cover
    import torch.multiprocessing as mp

    init = "file://" + os.path.join(sys.argv[1], "rendezvous")
    mp.spawn(_ddp_worker, args=(sys.argv[1], init), nprocs=2, join=True)
