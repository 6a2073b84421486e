"""rotate_activations: the function is kept, the residual stream lands in its principal axes, refusals change nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pl_actsparse import TargetScope, sparsify_activations
from pl_actsparse.errors import EmptyDatasetError, InvalidOptionError, UnsupportedModuleError
from pl_actsparse.tuning.rotation import rotate_activations, sparsest_rotation

QUIET = {"progress": False}
transformers = pytest.importorskip("transformers")


def _hf(kind: str = "llama", tie: bool = False, bias: bool = False, seed: int = 0, dtype=torch.float32):
    """A random 2-block HF decoder, GQA 4/2 heads, with random norm gains (so that folding them is tested)."""
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    config = {"llama": lambda: transformers.LlamaConfig(**common, attention_bias=bias, mlp_bias=bias),
              "qwen2": lambda: transformers.Qwen2Config(**common),
              "gemma": lambda: transformers.GemmaConfig(**common, head_dim=8)}[kind]()
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM, "gemma": transformers.GemmaForCausalLM}[kind]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    return model.to(dtype)


def _data(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


def _stream_tokens(model, data, final: bool = True) -> torch.Tensor:
    """The normalised residual stream at every decoder layer norm's input (and the final norm's), one row per token (fp64)."""
    acc = []
    hook = lambda _m, a: acc.append((a[0] / a[0].pow(2).mean(-1, keepdim=True).sqrt()).double().reshape(-1, a[0].shape[-1]))  # noqa: E731
    hs = [m.register_forward_pre_hook(hook) for n, m in model.named_modules() if n.endswith("layernorm") or (final and n == "model.norm")]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hs:
        h.remove()
    return torch.cat(acc)


def _stream_moment(model, data) -> torch.Tensor:
    """Second moment of the normalised residual stream at every norm's input (fp64)."""
    x = _stream_tokens(model, data)
    return x.T @ x


def _zeroed_energy(model, data, fraction: float) -> float:
    """Mean over tokens and the decoder layers' norms of the energy in each normalised token's smallest coordinates."""
    x = _stream_tokens(model, data, final=False)
    return float(x.pow(2).sort(-1).values[:, : round(fraction * x.shape[1])].sum(-1).mean())


def test_sparsest_rotation_finds_the_sparse_basis_of_mixed_sparse_codes():
    """Rows that are sparse in an unknown orthonormal basis (each token: 8 of 32 coordinates non-zero): turned from a
    random basis, the energy in each row's 24 smallest coordinates falls from ~0.29 of the total to almost nothing."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(8192, 32, generator=g) * (torch.rand(8192, 32, generator=g) < 0.25)
    mixing = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    x = (codes.double() @ mixing.T).float()
    energy = lambda y: float(y.pow(2).sort(-1).values[:, :24].sum(-1).mean() / y.pow(2).sum(-1).mean())  # noqa: E731
    r = sparsest_rotation(x, 0.75)
    assert r.dtype == torch.float64 and torch.allclose(r.T @ r, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert energy(x) > 0.25 and energy((x.double() @ r).float()) < 0.1 * energy(x)  # measured 0.293 -> 0.0095
    assert torch.equal(r, sparsest_rotation(x, 0.75))  # deterministic


def test_rotation_for_a_sparsity_keeps_the_function_and_zeroes_less_energy():
    model, data = _hf(tie=True), _data(6)
    with torch.no_grad():
        before = model(data[0]).logits
    pca = rotate_activations(_hf(tie=True), data, calibration=QUIET)
    turned = rotate_activations(model, data, calibration=QUIET, sparsity=0.5)
    with torch.no_grad():
        after = turned(data[0]).logits
    assert float((after - before).norm() / before.norm()) < 1e-4
    assert _zeroed_energy(turned, data, 0.5) < 0.95 * _zeroed_energy(pca, data, 0.5)


def test_rotation_for_a_sparsity_under_inference_mode_keeps_the_function():
    """sparsest_rotation learns with autograd: under torch.inference_mode (allowed for rotate_activations) it crashed with
    "element 0 of tensors does not require grad"."""
    model, data = _hf(), _data(2)
    with torch.no_grad():
        before = model(data[0]).logits
    with torch.inference_mode():
        after = rotate_activations(model, data, calibration=QUIET, sparsity=0.5)(data[0]).logits
    assert float((after - before).norm() / before.norm()) < 1e-4


def test_fewer_sampled_tokens_than_d_keep_the_principal_axes_with_a_warning():
    """One batch of 5 tokens: 20 sampled rows of rank <= 5 in d = 32, so the principal axes' last 27 coordinates are
    empty and the learned turn zeroed 15x more energy than they did (0.0125 against 0.0008); now the principal axes are
    kept, said by a warning, and the weights equal those of sparsity=None. Where the turn helps, it is taken."""
    data = [torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))]
    quiet = {"num_batches": 1, "progress": False}
    pca = rotate_activations(_hf(), data, calibration=quiet).state_dict()
    with pytest.warns(UserWarning, match=r"no less energy than the input axes on the 20 rows \(e.g. fewer rows than d = 32\)"):
        turned = rotate_activations(_hf(), data, calibration=quiet, sparsity=0.5).state_dict()
    assert all(torch.allclose(turned[n], pca[n], atol=1e-6) for n in pca)
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="the input axes kept"):
        assert torch.equal(sparsest_rotation(x * (torch.arange(32) < 5), 0.5), torch.eye(32, dtype=torch.float64))  # 27 empty axes


def test_sparsity_near_the_ends_zeroes_at_least_one_and_at_most_d_minus_1_coordinates():
    """round(0.01 * 32) = 0 and round(0.99 * 32) = 32 are taken as 1 and 31: the turn still lowers what they zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g) * (torch.rand(4096, 32, generator=g) < 0.25)
    x = (x.double() @ torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0].T).float()
    for s, k in ((0.01, 1), (0.99, 31)):
        energy = lambda y: float(y.pow(2).sort(-1).values[:, :k].sum(-1).mean())  # noqa: E731
        assert energy((x.double() @ sparsest_rotation(x, s)).float()) < 0.9 * energy(x)


@pytest.mark.parametrize("kind,tie,bias", [("llama", False, False), ("llama", True, True), ("qwen2", False, False)])
def test_rotation_keeps_the_function_and_diagonalises_the_stream(kind, tie, bias):
    """Logits equal to fp32 rounding (tied head untied with a warning, biases of writers and values rotated,
    Qwen2's q/k/v biases kept); the norms' gains are 1; the stream's second moment becomes diagonal, largest first."""
    model, data = _hf(kind, tie, bias), _data()
    before = [model(x).logits for x in data]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert rotate_activations(model, data, calibration=QUIET) is model
    assert any("untied" in str(w.message) for w in caught) == tie
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    for x, y in zip(data, before):
        torch.testing.assert_close(model(x).logits, y, atol=2e-4, rtol=1e-4)
    assert all(bool((m.weight == 1).all()) for n, m in model.named_modules() if n.endswith("norm"))
    moment = _stream_moment(model, data)
    off = moment - torch.diag(moment.diagonal())
    assert float(off.abs().max()) < 1e-6 * float(moment.diagonal().max())
    assert bool((moment.diagonal()[:-1] >= moment.diagonal()[1:] - 1e-6).all())


def test_a_wrapping_module_is_found_through():
    """A LightningModule-like wrapper (``self.model = LlamaForCausalLM``) is rotated through: rotate it before fitting."""
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = _hf()

        def forward(self, input_ids):
            return self.model(input_ids).logits

    wrapper, data = Wrapper(), _data()
    before = wrapper.model(data[0]).logits
    rotate_activations(wrapper, data, calibration=QUIET)
    torch.testing.assert_close(wrapper.model(data[0]).logits, before, atol=2e-4, rtol=1e-4)
    assert float(wrapper.model.model.norm.weight.sum()) == 32


def test_rotated_model_saves_and_loads_with_transformers(tmp_path):
    model, data = _hf("llama", tie=True), _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rotate_activations(model, data, calibration=QUIET)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(data[0]).logits, model(data[0]).logits, atol=0, rtol=0)


def test_padding_does_not_count():
    """Padded positions (attention_mask 0) hold garbage tokens: the rotation equals that of the padding-free batches."""
    seqs = _data(2)
    padded = []
    for x in seqs:
        ids = torch.cat([x, torch.randint(0, 64, (2, 7))], 1)
        mask = torch.cat([torch.ones(2, 16, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long)], 1)
        padded.append({"input_ids": ids, "attention_mask": mask})
    a, b = _hf(), _hf()
    rotate_activations(a, seqs, calibration=QUIET)
    rotate_activations(b, padded, calibration=QUIET)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_bf16_model_within_tolerance_and_sparsifies():
    model, data = _hf(dtype=torch.bfloat16), _data()
    before = model(data[0]).logits.float()
    rotate_activations(model, data, calibration=QUIET)
    after = model(data[0]).logits.float()
    assert float((after - before).norm() / before.norm()) < 5e-2
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    sparsify_activations(model, data, {TargetScope(patterns=[r".*_proj"]): 0.5}, calibration=QUIET)


@pytest.mark.parametrize("case", ["gemma", "sparsified", "gpt2", "peft_head"])
def test_refusals_change_nothing(case):
    """Gemma's ``1 + gain`` norm breaks the invariance: found on the first batch, every weight put back bit for bit
    (and the head tied again); a sparsified layer and a model of another shape are refused before any change."""
    data = _data()
    if case == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).eval()
    elif case == "peft_head":  # an adapter on the head: named, not "not a pre-norm decoder"
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(_hf(), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    else:
        model = _hf("gemma" if case == "gemma" else "llama", tie=case == "gemma")
        if case == "sparsified":
            sparsify_activations(model, data, {TargetScope(patterns=[r".*q_proj"]): 0.5}, calibration=QUIET)
    snap = {n: p.detach().clone() for n, p in model.state_dict().items()}
    match = {"gemma": "logits moved by .* not rotation-invariant", "sparsified": "q_proj.*rotate the float model first",
             "gpt2": "pre-norm decoder", "peft_head": "found lm_head: peft.*rotate the plain float model first"}[case]
    with pytest.raises(UnsupportedModuleError, match=match):
        rotate_activations(model, data, calibration=QUIET)
    for n, p in model.state_dict().items():
        assert torch.equal(p, snap[n]), n
    if case == "gemma":
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("kwargs,setup,error,match", [
    ({"tolerance": -1.0}, None, InvalidOptionError, "tolerance must be None or a finite number >= 0.*got -1.0"),
    ({"tolerance": float("nan")}, None, InvalidOptionError, "tolerance must be .* got nan"),
    ({"heads": 1}, None, InvalidOptionError, "heads must be True or False, got 1"),
    ({"sparsity": 0.0}, None, InvalidOptionError, r"sparsity must be None or a number in \(0, 1\) .*got 0.0"),
    ({"sparsity": True}, None, InvalidOptionError, "sparsity must be .* got True"),
    ({"sparsity": 1}, None, InvalidOptionError, "sparsity must be .* got 1$"),
    ({"sparsity": -0.5}, None, InvalidOptionError, "sparsity must be .* got -0.5"),
    ({"sparsity": "0.5"}, None, InvalidOptionError, "sparsity must be .* got '0.5'"),
    ({"sparsity": float("nan")}, None, InvalidOptionError, "sparsity must be .* got nan"),
    ({}, "padding", EmptyDatasetError, "kept no token of the 2 calibration batch"),
    ({}, "inference", InvalidOptionError, r"made under torch.inference_mode \(\['model.embed_tokens.weight'"),
])
def test_bad_options_and_no_real_token_change_nothing(kwargs, setup, error, match):
    """Bad options are refused before the forward; batches whose attention_mask is all 0 leave no statistics to
    rotate by (an error, not a rotation taken from nothing); a model built under inference_mode cannot be rewritten
    outside it (refused before untying the head, which was left untied by the RuntimeError before)."""
    with torch.inference_mode(setup == "inference"):
        model = _hf(tie=True)
    data = _data(2)
    if setup == "padding":
        data = [{"input_ids": x, "attention_mask": torch.zeros_like(x)} for x in data]
    snap = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(error, match=match):
        rotate_activations(model, data, calibration=QUIET, **kwargs)
    assert all(torch.equal(p, snap[n]) for n, p in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("offloaded", ["model.embed_tokens", "model.norm"])
def test_offloaded_embedding_or_norm_is_refused_before_any_change(tmp_path, offloaded):
    """accelerate disk offload keeps the weight on ``meta``: an UnsupportedModuleError naming it (not a
    NotImplementedError from copying a meta tensor), and the model computes what it did."""
    pytest.importorskip("accelerate")
    _hf().save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu", offloaded: "disk"}
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, device_map=device_map, offload_folder=str(tmp_path / "off")).eval()
    data = _data()
    before, snap = model(data[0]).logits, {n: p.clone() for n, p in model.state_dict().items() if p.device.type != "meta"}
    with pytest.raises(UnsupportedModuleError, match=f"'{offloaded}' .* offloaded \\(meta\\) or quantized"):
        rotate_activations(model, data, calibration=QUIET)
    assert all(torch.equal(p, snap[n]) for n, p in model.state_dict().items() if p.device.type != "meta")
    assert torch.equal(model(data[0]).logits, before)


def test_half_precision_tolerance_follows_the_weights_not_the_logits():
    """A bf16 model behind a forward that returns fp32 logits (a LightningModule's ``.float()``) is checked
    against the half-precision tolerance: rotated, not refused as not rotation-invariant."""
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = _hf(dtype=torch.bfloat16)

        def forward(self, input_ids):
            return self.model(input_ids).logits.float()

    wrapper, data = Wrapper(), _data()
    before = wrapper(data[0])
    rotate_activations(wrapper, data, calibration=QUIET)
    after = wrapper(data[0])
    assert float((after - before).norm() / before.norm()) < 5e-2
    assert float(wrapper.model.model.norm.weight.float().sum()) == 32


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_greedy_generation_is_unchanged(kind):
    """fp32, tied head: greedy decoding gives the same tokens on a few prompts after rotation."""
    if kind == "mistral":
        torch.manual_seed(0)
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)).eval()
    else:
        model = _hf(kind, tie=True)
    prompts = [torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    generate = lambda p: model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=12, do_sample=False, pad_token_id=0)  # noqa: E731
    before = [generate(p) for p in prompts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rotate_activations(model, _data(), calibration=QUIET)
    for p, b in zip(prompts, before):
        assert torch.equal(generate(p), b)


def test_rotation_lowers_the_loss_of_sparsification_on_stories260k():
    """All seven projections of the real model at 40% (uniform): the rotated model loses far less on held-out stories
    (docs/allocation.md: 4.70 -> 4.34 perplexity on stories 0-149)."""
    from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
    from pl_actsparse.demos.tinystories import TokenWindows, load_stories
    from pl_actsparse.tuning.objectives import CalibrationLoss

    tok = Llama2cTokenizer.from_file()
    w = TokenWindows(load_stories(start=500, stop=530), tok, seq_len=128)
    xs = [w[i] for i in range(len(w))]
    calib, held_out = [torch.stack(xs[:8]), torch.stack(xs[8:16])], [torch.stack(xs[16:24])]
    recipe, loss = {TargetScope(patterns=[r".*_proj"]): 0.4}, {}
    for rotated in (False, True):
        model = load_llama2c_checkpoint().eval()
        dense = CalibrationLoss(model, held_out, None, None)()
        if rotated:
            rotate_activations(model, calib, calibration=QUIET)
            assert CalibrationLoss(model, held_out, None, None)() == pytest.approx(dense, abs=1e-5)
            model.tie_weights()  # the head stays untied, and a llama2.c file written now keeps it
            assert model.lm_head.weight is not model.embed_tokens.weight and not model.config.shared_classifier
        sparsify_activations(model, calib, recipe, calibration=QUIET)
        loss[rotated] = CalibrationLoss(model, held_out, None, None)()
    assert loss[True] < loss[False] - 0.03


def test_deterministic():
    """Two rotations of the same model on the same data give bit-identical weights (eigenvector signs fixed)."""
    a, b = (rotate_activations(_hf(), _data(), calibration=QUIET).state_dict() for _ in range(2))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_calibration_method_and_offload_are_said_to_be_unused():
    """The rotation runs the whole model per batch: a sequential method or an offload in a shared config warns (not silent)."""
    model, data = _hf(), _data(2)
    with pytest.warns(UserWarning, match="method='sequential' and offload='cpu' are not used"):
        rotate_activations(model, data, calibration={"progress": False, "method": "sequential", "offload": "cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rotate_activations(_hf(), data, calibration=QUIET)  # the default config: no warning


def _ddp_worker(rank: int, out: str, init: str) -> None:  # pragma: no cover - runs in the subprocesses
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = rotate_activations(_hf(), _data(6)[rank::2], calibration=QUIET)
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    turned = rotate_activations(_hf(), _data(6)[rank::2], calibration=QUIET, sparsity=0.5)  # each rank samples its own tokens
    torch.save(turned.state_dict(), f"{out}/sparse{rank}.pt")
    from pl_actsparse.calibrate.distributed import Distributed

    rows = torch.full((3, rank + 1), float(rank)).t()  # a transposed (non-contiguous) input; rank 1 has one row more
    torch.save(Distributed(None, None).gather_(rows), f"{out}/gathered{rank}.pt")
    dist.destroy_process_group()


def test_two_ddp_ranks_agree_with_one_process_on_the_union(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), str(Path(__file__).resolve().parents[1])])}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    g0, g1 = (torch.load(tmp_path / f"gathered{r}.pt") for r in range(2))
    assert torch.equal(g0, torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3]))  # rank 0: every rank's rows, in rank order
    assert torch.equal(g1, torch.ones(2, 3))  # rank 1 keeps its own rows: it never holds the union
    sa, sb = (torch.load(tmp_path / f"sparse{r}.pt") for r in range(2))
    assert all(torch.equal(sa[n], sb[n]) for n in sa)  # rank 0's turn of the axes, on every rank
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    one = rotate_activations(_hf(), _data(6), calibration=QUIET).state_dict()
    for n in one:
        assert torch.equal(a[n], b[n]), n
        torch.testing.assert_close(a[n], one[n], atol=1e-5, rtol=1e-4, msg=n)


if __name__ == "__main__":  # pragma: no cover
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(sys.argv[1], "file://" + sys.argv[1] + "/rendezvous"), nprocs=2, join=True)

