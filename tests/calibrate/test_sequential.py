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
import pl_actsparse.calibrate as calibrate
from pl_actsparse.calibrate.blocks import find_block_list
from pl_actsparse.calibrate.cache import BoundaryCache
from pl_actsparse.calibrate.lockstep import calibrate_layers
from pl_actsparse.calibrate.sequential import calibrate_sequential
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.layer import sparsified_layers, sparsifier_state
from pl_actsparse.core.masking import current_token_mask
from pl_actsparse.errors import InvalidOptionError, NonFiniteActivationError
from tiny_models import tiny_llama, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = {TargetScope(types=[nn.Linear]): 0.5}
LOG = "pl_actsparse.calibrate.sequential"


def _calibrate(make, data, scope, fn, **kw):
    """``fn`` (a method) on a fresh model; ``kw`` holds CalibrationConfig fields and ``fn``'s own keywords."""
    model = make()
    prepare_activation_sparsity(model, scope)
    layers = list(sparsified_layers(model))
    fields = {k: kw.pop(k) for k in list(kw) if k in CalibrationConfig.__dataclass_fields__}
    stats = fn(model, layers, data, CalibrationConfig(progress=False, **fields), **kw)
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
    assert all(not sparsifier_state(m).observers for _, m in sparsified_layers(model))


def test_training_flags_are_restored():
    model = tiny_llama().train()
    model.layers[1].eval()
    prepare_activation_sparsity(model, ALL)
    calibrate_sequential(model, list(sparsified_layers(model)), token_batches(), CalibrationConfig(progress=False))
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
    """GPT-2's projections are Conv1D; with only nn.Linear targeted (lm_head) its blocks hold no
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
    calibrate_sequential(model, list(sparsified_layers(model)), data, CalibrationConfig(progress=False, token_mask=lambda b: masks[id(b)]))
    # every call ran under one of the batches' masks and each batch's mask was current (a block runs each batch
    # several times: once per dependency level it reaches, then to propagate)
    assert len(seen) >= 3 and all(t is not None for t in seen)
    want = {tuple(t.flatten().tolist()) for t in masks.values()}
    assert {tuple(t.flatten().tolist()) for t in seen} == want and len(want) == 3


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


class _ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, residual=None):
        residual = x if residual is None else x + residual
        return self.b(torch.relu(self.a(residual))), residual


class _TwoStreams(nn.Module):
    """Mamba-style blocks: ``block(h, residual) -> (h, residual)``, a second stream passed between blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(8, 16)
        self.layers = nn.ModuleList(_ResidualBlock() for _ in range(3))

    def forward(self, x):
        h, r = self.emb(x), None
        for layer in self.layers:
            h, r = layer(h, residual=r)
        return h + r


@pytest.mark.parametrize(
    "make, scope, why",
    [
        (lambda: torch.manual_seed(0) and nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), ALL, "no nn.ModuleList"),
        (_TwoStreams, {TargetScope(patterns=[r"layers\..*"]): 0.5}, "receives an output of block 0 other than the hidden states"),
        (lambda: _Scaled(use_mid=False), {TargetScope(patterns=[r"blocks\..*"]): 0.5}, "the input of block 1 is not the output of block 0"),
        (lambda: _Scaled(use_mid=True), ALL, "run between two blocks: ['mid']"),
    ],
    ids=["no-blocks", "second-stream", "not-chained", "layer-between-blocks"],
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
        sparsify_activations(model, data, ALL, calibration={"method": "sequential", "progress": False})
    assert type(model.head) is nn.Linear and torch.equal(model.head.weight, before)  # restored


# ---------------------------------------------------------------------------------------------------
# the api and the block finder


def test_api_sequential_equals_lockstep_and_validates_options():
    data = token_batches()
    a, b = tiny_llama(), tiny_llama()
    sparsify_activations(a, data, ALL, calibration={"method": "lockstep", "progress": False})
    sparsify_activations(b, data, ALL, calibration={"method": "sequential", "offload": "cpu", "progress": False})
    ta, tb = dict(sparsified_layers(a)), dict(sparsified_layers(b))
    assert all(torch.equal(ta[n].activation_threshold, tb[n].activation_threshold) for n in ta)
    report = calibrate_activation_sparsity(b, data, calibration={"method": "sequential", "progress": False})
    assert all(torch.equal(ta[n].activation_threshold, tb[n].activation_threshold) for n in ta)
    assert report.statistics["lm_head"].name == "lm_head"
    c = tiny_llama()
    with pytest.raises(InvalidOptionError, match="CalibrationConfig.method must be one of 'auto', 'lockstep', 'sequential', got 'blockwise'"):
        sparsify_activations(c, data, ALL, calibration="blockwise")
    with pytest.raises(InvalidOptionError, match="CalibrationConfig.offload must be one of None, 'cpu', 'disk', got 'gpu'"):
        sparsify_activations(c, data, ALL, calibration={"offload": "gpu"})
    assert not list(sparsified_layers(c))  # validated before anything changed


@pytest.mark.parametrize("min_bytes, chosen", [(0, "sequential"), (1 << 40, "lockstep")])
def test_auto_chooses_by_model_size(monkeypatch, min_bytes, chosen):
    calls = []
    real = calibrate.METHODS["sequential"]
    monkeypatch.setattr(calibrate, "AUTO_SEQUENTIAL_MIN_PARAM_BYTES", min_bytes)
    monkeypatch.setitem(calibrate.METHODS, "sequential", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llama()
    sparsify_activations(model, token_batches(), ALL, calibration={"progress": False})
    assert ("sequential" if calls else "lockstep") == chosen
    assert all(sparsifier_state(m).mode.value == "sparsifying" for _, m in sparsified_layers(model))


def test_auto_with_offload_chooses_sequential_at_any_size_and_warns_without_blocks(monkeypatch):
    calls = []
    real = calibrate.METHODS["sequential"]
    monkeypatch.setitem(calibrate.METHODS, "sequential", lambda *a, **k: calls.append(a[3].offload) or real(*a, **k))
    sparsify_activations(tiny_llama(), token_batches(), ALL, calibration={"offload": "cpu", "progress": False})
    assert calls == ["cpu"]  # a tiny model, far below AUTO_SEQUENTIAL_MIN_PARAM_BYTES
    flat = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # no block list
    with pytest.warns(UserWarning, match=r"calibration offload='disk' is not used: method='auto' chose lockstep, which keeps no cache \(.+\)"):
        sparsify_activations(flat, [torch.randn(4, 8)], ALL, calibration={"offload": "disk", "progress": False})
    assert calls == ["cpu"] and len(list(sparsified_layers(flat))) == 2


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
    with pytest.raises(InvalidOptionError, match="'nope'"):
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
    calibrate_sequential(model, list(sparsified_layers(model)), data[rank::2], CalibrationConfig(progress=False))
    torch.save({n: m.activation_threshold for n, m in sparsified_layers(model)}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# inside a block: dependency levels, one batch in flight


def test_levels_of_llama_and_gpt2_blocks():
    """q/k/v read the same normed input (level 0), o reads attention (1), gate/up the post-attention stream (2),
    down their product (3); GPT-2's Conv1D blocks have the same four levels. The attention sub-module is final
    from level 2 on, so its output is reused there."""
    transformers = pytest.importorskip("transformers")
    from pl_actsparse.calibrate.levels import plan_block

    model = _hf("llama")()
    prepare_activation_sparsity(model, ALL)
    block = model.model.layers[0]
    x = torch.randn(2, 5, 64)
    pos = model.model.rotary_emb(x, torch.arange(5)[None].expand(2, 5))
    plan = plan_block(block, [m for _, m in sparsified_layers(block)], (x,), {"position_embeddings": pos})
    assert plan.levels == (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    # the attention's output is o_proj's: from level 2 on it is computed from o_proj's kept input; the MLP's is
    # down_proj's, computed from down_proj's input in the propagation pass (when that input is small enough to keep)
    assert plan.reuse == (("mlp", 4, ("mlp.down_proj", 0)), ("self_attn", 2, ("self_attn.o_proj", 2)))

    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).eval()
    prepare_activation_sparsity(gpt2, {TargetScope(types=[Conv1D]): 0.5})
    block = gpt2.transformer.h[1]
    plan = plan_block(block, [m for _, m in sparsified_layers(block)], (torch.randn(2, 5, 32),), {})
    assert plan.levels == (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))
    assert plan.reuse == (("attn", 2, ("attn.c_proj", 2)), ("mlp", 4, ("mlp.c_proj", 0)))  # dropout is the identity in eval


def test_gpt2_conv1d_blocks_match_lockstep(caplog):
    """GPT-2 with every Conv1D projection and lm_head targeted: level by level, bit for bit lockstep's thresholds."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=32)

    def make():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    with caplog.at_level(logging.INFO, logger=LOG):
        got = _assert_same(make, _padded_batches(), {TargetScope(types=[Conv1D, nn.Linear]): 0.5})
    assert "transformer.h.2.mlp.c_proj" in got and "lm_head" in got
    assert not [r for r in caplog.records if "lockstep" in r.getMessage()]  # every block went level by level


class _InFlight:
    """Counts the block forwards running at the same time (lockstep runs one thread per batch)."""

    def __init__(self, blocks):
        import threading

        self.lock, self.now, self.most = threading.Lock(), 0, 0
        for b in blocks:
            b.register_forward_pre_hook(self.enter)
            b.register_forward_hook(self.exit, always_call=True)

    def enter(self, *_):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def exit(self, *_):
        with self.lock:
            self.now -= 1


@pytest.mark.parametrize("in_block, most", [("levels", 1), ("lockstep", 6)])
def test_one_batch_in_flight_inside_a_block(in_block, most):
    """Level by level, one calibration batch runs through a block at a time; with all batches in flight (the
    lockstep schedule inside the block) all six do. Both give lockstep's thresholds. (lm_head is left out: its
    tail pass runs every batch through the stubbed blocks at once, which costs no block computation.)"""
    blocks_only = {TargetScope(patterns=[r"layers\..*"]): 0.5}
    model = tiny_llama()
    prepare_activation_sparsity(model, blocks_only)
    counter = _InFlight(model.layers)
    calibrate_sequential(model, list(sparsified_layers(model)), token_batches(n=6), CalibrationConfig(progress=False, in_block=in_block))
    assert counter.most == most
    got = {n: m.activation_threshold.clone() for n, m in sparsified_layers(model)}
    _, want, _ = _calibrate(tiny_llama, token_batches(n=6), blocks_only, calibrate_layers)
    assert len(want) == 21
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_float32_fine_counts_outside_the_window_take_a_second_pass(monkeypatch):
    """A float32 threshold needs the fine counts of one coarse bin, kept for a window around the first batch's
    quantile. With a window of one bin and no margin, the final bin is usually elsewhere: a second pass over
    the level supplies its counts, and the thresholds stay bit for bit lockstep's."""
    from pl_actsparse.calibrate import levels

    monkeypatch.setattr(levels, "FINE_WINDOW_BINS", 1)
    monkeypatch.setattr(levels, "FINE_WINDOW_QUANTILE_MARGIN", 0.0)
    repasses = []
    real = levels._Accumulator.add

    def add(self, sel, hist):
        if self.repass_bin is not None:
            repasses.append(self.name)
        return real(self, sel, hist)

    monkeypatch.setattr(levels._Accumulator, "add", add)
    _assert_same(tiny_llama, token_batches(n=6, seq=24))
    assert repasses  # the second pass did happen


class _Routed(nn.Module):
    """A block with two experts: the second one runs only for batches flagged by their first element."""

    def __init__(self, dim=8):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))

    def forward(self, x, both):
        h = torch.relu(self.proj(x))
        out = self.experts[0](h)
        return x + (out + self.experts[1](h) if both else out)


class _RoutedModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_Routed() for _ in range(2))

    def forward(self, x):
        both = bool(x[0, 0] > 0)
        for b in self.blocks:
            x = b(x, both)
        return x


class _Twice(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.proj(x) + self.proj(0.5 * x)  # a shared weight: two calls, neither depends on the other


@pytest.mark.parametrize(
    "make, why",
    [
        (_RoutedModel, "before every layer of a level was called"),
        (lambda: torch.manual_seed(0) and nn.Sequential(*[_Twice() for _ in range(2)]), "called more than once per block forward"),
    ],
    ids=["routed-experts", "layer-called-twice"],
)
def test_blocks_that_cannot_be_leveled_use_lockstep_and_say_why(make, why, caplog):
    """Routing that depends on the batch (the plan's batch calls both experts, a later batch one) and a layer
    called twice per forward are calibrated with every batch in the block at once, and the log says why;
    the thresholds are lockstep's."""

    class _Wrap(nn.Module):  # the blocks as an nn.ModuleList, as find_block_list expects
        def __init__(self):
            super().__init__()
            inner = make()
            self.blocks = inner.blocks if hasattr(inner, "blocks") else nn.ModuleList(inner)
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for i, d in enumerate(data):
        d[0, 0] = 1.0 if i % 2 == 0 else -1.0  # the plan's batch (0) calls both experts, batch 1 only one
    with caplog.at_level(logging.INFO, logger=LOG):
        _, want, want_stats = _calibrate(_Wrap, data, ALL, calibrate_layers)
        _, got, got_stats = _calibrate(_Wrap, data, ALL, calibrate_sequential, blocks="blocks")
    assert want.keys() == got.keys() and len(want) >= 2
    for k, s in want_stats.items():  # the same elements, and as many zeroed: the best reachable, half of them
        assert (got_stats[k].elements, got_stats[k].zeroed) == (s.elements, s.zeroed) and s.zeroed * 2 == s.elements
    if why == "before every layer of a level was called":
        assert all(torch.equal(want[k], got[k]) for k in want)  # layers called once: bit for bit
    # (a layer called twice is a fixed point found by a search whose path differs with the other blocks in the
    # pass: any threshold between the same two neighbouring inputs zeroes the same elements)
    messages = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert any("lockstep" in m and why in m for m in messages), messages
    assert not any("calibrating in lockstep instead" in m for m in messages)  # the block-wise scheme itself stayed


def test_eager_attention_weights_are_too_large_to_reuse(monkeypatch):
    """HF's eager attention also returns the attention weights, larger than the block input: its output is
    recomputed rather than kept (memory stays bounded), and the thresholds are still exact. With SDPA it is kept."""
    transformers = pytest.importorskip("transformers")
    kept = []
    real = BoundaryCache.keep
    monkeypatch.setattr(BoundaryCache, "keep", lambda self, b, name, out: kept.append(name) or real(self, b, name, out))
    make = _hf("llama")
    for impl, expect in [("eager", []), ("sdpa", ["self_attn"])]:
        kept.clear()

        def build(impl=impl):
            model = make()
            model.config._attn_implementation = impl
            return model

        _assert_same(build, _padded_batches())
        assert sorted(set(kept) - {"hidden"}) == expect, impl  # the block boundaries are kept the same way


def test_peft_lora_blocks_go_level_by_level_and_match_lockstep(caplog):
    """peft LoRA on every projection (random B, so the adapters change the outputs): the thresholded input of each
    adapted projection reaches the base layer and the adapter branches; level by level, bit for bit lockstep."""
    peft = pytest.importorskip("peft")
    from tiny_models import tiny_hf_llama

    def make():
        config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        return peft.get_peft_model(tiny_hf_llama(), config)

    scope = {TargetScope(patterns=[r".*_proj"]): 0.5}
    with caplog.at_level(logging.INFO, logger=LOG):
        got = _assert_same(make, token_batches(n=4), scope)
    assert len(got) == 14 and all(n.endswith("_proj.base_layer") or n.endswith("_proj") for n in got)
    assert not [r for r in caplog.records if "lockstep" in r.getMessage()]


def test_levels_are_found_under_inference_mode(caplog):
    """Called inside ``torch.inference_mode()`` (as serving code does), the plan's autograd forward still sees the
    dependencies: the blocks go level by level and the thresholds are lockstep's."""
    got = {}
    for fn in (calibrate_layers, calibrate_sequential):
        model = tiny_llama()  # built outside inference mode, as a served model is
        prepare_activation_sparsity(model, ALL)
        layers = list(sparsified_layers(model))
        with caplog.at_level(logging.INFO, logger=LOG), torch.inference_mode():
            fn(model, layers, token_batches(n=3), CalibrationConfig(progress=False))
        got[fn] = {n: m.activation_threshold.clone() for n, m in layers}
    want = got[calibrate_layers]
    assert len(want) == 22 and all(torch.equal(want[n], got[calibrate_sequential][n]) for n in want)
    assert not [r for r in caplog.records if "lockstep" in r.getMessage()]


class _HeadOnBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


@pytest.mark.parametrize("fn", [calibrate_layers, calibrate_sequential])
def test_inference_mode_with_a_head_reading_the_last_block(fn):
    """Under ``torch.inference_mode()`` the head's input is an inference tensor, which has no version counter:
    both methods calibrate it (they crashed in the histogram cache) and agree with a no-grad lockstep run."""
    data = [torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    _, want, _ = _calibrate(_HeadOnBlocks, data, ALL, calibrate_layers)
    model = _HeadOnBlocks()
    prepare_activation_sparsity(model, ALL)
    layers = list(sparsified_layers(model))
    with torch.inference_mode():
        fn(model, layers, data, CalibrationConfig(progress=False))
    assert len(want) == 3 and all(torch.equal(want[n], m.activation_threshold) for n, m in layers)


def test_in_block_option_is_validated():
    model = tiny_llama()
    prepare_activation_sparsity(model, ALL)
    with pytest.raises(InvalidOptionError, match="CalibrationConfig.in_block must be one of 'levels', 'lockstep', got 'threads'"):
        calibrate_sequential(model, list(sparsified_layers(model)), token_batches(), CalibrationConfig(in_block="threads"))


def test_ddp_ranks_agree_and_equal_one_process_on_the_union(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])])}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    _, single, _ = _calibrate(tiny_llama, token_batches(n=5), ALL, calibrate_layers)
    assert a.keys() == b.keys() == single.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], single[k]) for k in a)


def test_attention_output_is_computed_from_o_proj_input():
    """After o_proj's pass, the attention's output is o_proj applied to its kept input: q/k/v run in the passes of
    levels 0 and 1 only (before: 0, 1 and 2), and the thresholds stay lockstep's bit for bit."""
    make = _hf("llama")
    calls = []

    def build():
        model = make()
        model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda *_: calls.append("q"))
        model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda *_: calls.append("o"))
        return model

    _assert_same(build, _padded_batches(n=4))  # lockstep first (one q and one o call per batch), then sequential
    assert calls.count("q") == 4 + 2 * 4 and calls.count("o") == 4 + 2 * 4  # o: its own pass, then from its input


# ---------------------------------------------------------------------------------------------------
# allocation="auto": empirical-Fisher curves block by block


def _four_block_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


class _SavedPerBlock:
    """Autograd's saved tensors per block, alive until their graph is freed: how many blocks hold activations at once."""

    def __init__(self, blocks):
        self.now, self.alive, self.most = None, {}, 0
        for j, b in enumerate(blocks):
            b.register_forward_pre_hook(lambda *_, j=j: setattr(self, "now", j))
            b.register_forward_hook(lambda *_: setattr(self, "now", None))

    def pack(self, t):
        counter = self

        class Saved:
            def __init__(self, t, j):
                self.t, self.j = t, j
                counter.alive[j] = counter.alive.get(j, 0) + 1

            def __del__(self):
                counter.alive[self.j] -= 1

        if self.now is None:
            return t
        saved = Saved(t, self.now)
        self.most = max(self.most, sum(1 for v in self.alive.values() if v > 0))
        return saved

    @staticmethod
    def unpack(s):
        return s if isinstance(s, torch.Tensor) else s.t


@pytest.mark.parametrize("offload", [None, "disk"])
def test_blockwise_fisher_curves_equal_the_whole_model_in_one_block_of_memory(offload):
    """Block by block (forward caching block inputs, loss at the head, backward block by block in reverse), the
    curves of all seven projections and lm_head equal the whole-model pass's (fp32, padded batches), and autograd
    holds the activations of one block at a time instead of all four."""
    from pl_actsparse.calibrate.allocation import fisher_curves, next_token_nll

    curves, most = {}, {}
    for method in ("lockstep", "sequential"):
        model = _four_block_llama()
        layers = [(n, m) for n, m in model.named_modules() if n.endswith("_proj") or n == "lm_head"]
        saved = _SavedPerBlock(model.model.layers)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            curves[method] = fisher_curves(model, layers, _padded_batches(), next_token_nll,
                                           CalibrationConfig(progress=False, method=method, offload=offload if method == "sequential" else None))
        most[method] = saved.most
    assert most == {"lockstep": 4, "sequential": 1}
    assert len(curves["sequential"]) == 4 * 7 + 1
    for name, want in curves["lockstep"].items():
        got = curves["sequential"][name]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert want[-1][1] > 0, name
        for (_, a), (_, b) in zip(want, got):
            assert b == pytest.approx(a, rel=1e-5, abs=1e-12), name


def test_allocation_auto_block_by_block_allocates_the_same_levels(caplog):
    """sparsify_activations(..., allocation="auto") with sequential calibration scores the layers block by block
    (no warning) and allocates the levels of the whole-model scoring; a model without a block list is scored
    whole, with a warning saying why."""
    scope = {TargetScope(patterns=[r".*_proj"]): 0.4}
    levels = {}
    for method in ("lockstep", "sequential"):
        with caplog.at_level(logging.WARNING, logger=LOG):
            model = sparsify_activations(_four_block_llama(), _padded_batches(), scope,
                                         calibration={"progress": False, "method": method}, allocation="auto")
        levels[method] = {n: sparsifier_state(m).target for n, m in sparsified_layers(model)}
    assert not [r for r in caplog.records if r.name == LOG]
    assert len(levels["lockstep"]) == 28 and len(set(levels["lockstep"].values())) > 3  # not uniform
    assert levels["sequential"] == pytest.approx(levels["lockstep"], abs=1e-9)

    from pl_actsparse.calibrate.allocation import fisher_curves, next_token_nll

    net = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 16))
    data = [torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    with caplog.at_level(logging.WARNING, logger=LOG):
        got = fisher_curves(net, layers, data, next_token_nll, CalibrationConfig(progress=False, method="sequential"))
    assert any("running the whole model" in r.getMessage() for r in caplog.records)
    assert got == fisher_curves(net, layers, data, next_token_nll, CalibrationConfig(progress=False, method="lockstep"))


def test_allocation_auto_follows_the_calibration_method_auto(monkeypatch):
    """With calibration method "auto", allocation="auto" scores block by block exactly when calibration goes so
    (pl_actsparse.calibrate.chosen_method: a block list and enough parameter bytes)."""
    import pl_actsparse.calibrate.allocation as allocation

    used = []
    real = allocation.sequential_input_gradients
    monkeypatch.setattr(allocation, "sequential_input_gradients", lambda *a: used.append(True) or real(*a))
    scope = {TargetScope(patterns=[r".*_proj"]): 0.4}
    for min_bytes, blockwise in [(1 << 40, False), (0, True)]:
        monkeypatch.setattr(calibrate, "AUTO_SEQUENTIAL_MIN_PARAM_BYTES", min_bytes)
        used.clear()
        model = _four_block_llama()
        assert calibrate.chosen_method(model, list(model.named_modules()), CalibrationConfig()) == ("sequential" if blockwise else "lockstep")
        sparsify_activations(model, _padded_batches(n=2), scope, calibration={"progress": False}, allocation="auto")
        assert used == ([True] if blockwise else [])


if __name__ == "__main__":  # pragma: no cover
    import torch.multiprocessing as mp

    init = "file://" + os.path.join(sys.argv[1], "rendezvous")
    mp.spawn(_ddp_worker, args=(sys.argv[1], init), nprocs=2, join=True)
