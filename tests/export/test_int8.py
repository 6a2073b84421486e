"""Weight-only INT8 (pl_actsparse.core.int8) and the int8 sparse decode kernel (kernels/int8.py)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pl_actsparse import (
    TargetScope,
    activation_sparsity_report,
    load_activation_sparsity,
    remove_activation_sparsity,
    sparsify_activations,
)
from pl_actsparse.core.layer import is_sparsified
from pl_actsparse.kernels import cpu as kcpu
from pl_actsparse.kernels import int8_cpu as k8
from pl_actsparse.core.int8 import Int8WeightLinear, dequantize_weights_int8, quantize_weights_int8
from pl_actsparse.errors import NotSparsifiedError
from pl_actsparse.export.convert import export_for_inference
from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear
from tiny_models import SEED_RECIPE_PATTERNS, tiny_llama, token_batches

MODES = ["asym", "sym"]
GRANS = ["output", "input"]


def _recipe():
    return {TargetScope(patterns=p): s for p, s in SEED_RECIPE_PATTERNS.values()}


@pytest.fixture
def backend(int8_backend):  # tests/conftest.py
    return int8_backend


# ---------------------------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gran", GRANS)
def test_quantize_error_is_at_most_half_a_step(mode, gran):
    torch.manual_seed(0)
    w = torch.randn(40, 24) * torch.rand(40, 1) * 3
    w[3] = 0  # an all-zero output channel
    q, s, z = k8.quantize_weight_t(w, mode, gran)
    assert q.dtype == torch.int8 and q.shape == (24, 40) and q.is_contiguous()
    assert s.shape == ((1, 40) if gran == "output" else (24, 1))
    assert (z is None) == (mode == "sym")
    deq = k8.dequantize_weight_t(q, s, z).t()
    step = s.t() if gran == "output" else s.t().expand(40, 24)
    assert torch.all((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7)
    assert torch.all(deq[3] == 0)
    if mode == "sym":
        assert int(q.min()) >= -127


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        k8.quantize_weight_t(torch.randn(4, 4), "int4")
    with pytest.raises(ValueError, match="granularity"):
        k8.quantize_weight_t(torch.randn(4, 4), "sym", "group")
    with pytest.raises(ValueError, match="NaN"):
        k8.quantize_weight_t(torch.tensor([[1.0, float("nan")]]))


# ---------------------------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ntok", [1, 3])
def test_sparse_kernel_matches_dequantize_then_masked_dense(backend, mode, gran, dtype, ntok):
    torch.manual_seed(1)
    in_f, out_f = 203, 301  # odd sizes: SIMD tails and row-group remainders
    q, s, z = k8.quantize_weight_t(torch.randn(out_f, in_f), mode, gran)
    bias = torch.randn(out_f)
    x = torch.randn(2, ntok, in_f).to(dtype) if ntok > 1 else torch.randn(in_f).to(dtype)
    for t in [0.0, 0.67, -math.inf, math.inf]:
        thr = torch.tensor(t)
        ref = k8.int8_masked_linear(x, thr, q, s, z, bias)
        got = k8.int8_sparse_linear(x, thr, q, s, z, bias)
        assert got.dtype == dtype and got.shape == ref.shape
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max() + 1))
        if t == math.inf:
            torch.testing.assert_close(got.float(), bias.to(dtype).float().expand_as(got), rtol=0, atol=1e-2)


def test_sparse_kernel_large_layer_multithreaded(backend):
    # large enough for the C++ kernel to split columns over threads
    torch.manual_seed(2)
    q, s, z = k8.quantize_weight_t(torch.randn(1536, 1024))
    x = torch.randn(1, 1024)
    thr = torch.tensor(float(x.abs().quantile(0.5)))
    torch.testing.assert_close(
        k8.int8_sparse_linear(x, thr, q, s, z), k8.int8_masked_linear(x, thr, q, s, z), rtol=1e-4, atol=1e-3
    )


def test_kernel_keeps_nan_like_masked_fill(backend):
    q, s, z = k8.quantize_weight_t(torch.randn(8, 16))
    x = torch.zeros(1, 16)
    x[0, 3] = float("nan")
    assert torch.isnan(k8.int8_sparse_linear(x, torch.tensor(0.5), q, s, z)).all()


@pytest.mark.parametrize("gran", GRANS)
def test_dense_path_matches(gran):
    torch.manual_seed(3)
    q, s, z = k8.quantize_weight_t(torch.randn(70, 50), "asym", gran)
    x = torch.randn(4, 9, 50)
    ref = k8.int8_masked_linear(x, torch.tensor(-math.inf), q, s, z)
    torch.testing.assert_close(k8.int8_dense_linear(x, q, s, z), ref, rtol=1e-4, atol=1e-4)


def test_custom_op_has_fake_impl():
    q, s, z = k8.quantize_weight_t(torch.randn(6, 5))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3, 5))
        out = torch.ops.pl_actsparse.int8_sparse_linear(
            x, mode.from_tensor(torch.tensor(0.1)), mode.from_tensor(q), mode.from_tensor(s), mode.from_tensor(z), None
        )
    assert out.shape == (2, 3, 6)


# ---------------------------------------------------------------------------------------------- module


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gran", GRANS)
def test_int8_linear_forward_and_state_dict_round_trip(mode, gran):
    torch.manual_seed(4)
    lin = nn.Linear(12, 7)
    q8 = Int8WeightLinear.from_linear(lin, mode=mode, granularity=gran)
    assert isinstance(q8, nn.Linear) and q8.bias is lin.bias
    x = torch.randn(3, 12)
    torch.testing.assert_close(q8(x), nn.functional.linear(x, q8.weight, lin.bias))
    torch.testing.assert_close(q8(x), lin(x), rtol=0.05, atol=0.05)
    sd = q8.state_dict()
    assert set(sd) == {"qweight", "scale", "zero_point", "bias"} and sd["qweight"].dtype == torch.int8
    fresh = Int8WeightLinear(12, 7, mode=mode, granularity=gran)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), q8(x))
    # a checkpoint of the other granularity is adopted, a float checkpoint is quantized on load
    other = Int8WeightLinear(12, 7, mode=mode, granularity="input" if gran == "output" else "output")
    other.load_state_dict(sd)
    assert other.granularity == gran and torch.equal(other(x), q8(x))
    fresh.load_state_dict(lin.state_dict())
    assert torch.equal(fresh(x), q8(x))
    # bf16 input, gradient to the input and the bias
    xb = torch.randn(2, 12, dtype=torch.bfloat16)
    assert q8.to(torch.bfloat16)(xb).dtype == torch.bfloat16
    q8.float()
    xr = torch.randn(2, 12, requires_grad=True)
    q8(xr).sum().backward()
    assert xr.grad is not None and lin.bias.grad is not None


def test_quantize_model_report_and_dequantize(tiny):
    ref = copy.deepcopy(tiny)
    ids = token_batches(1)[0]
    report = quantize_weights_int8(tiny, TargetScope(patterns=[r".*_proj"]), mode="sym")
    names = [r.name for r in report.layers]
    assert len(names) == 3 * 7 and "lm_head" not in names
    assert all(isinstance(tiny.get_submodule(n), Int8WeightLinear) for n in names)
    assert report.int8_bytes < report.float_bytes / 3 and 0 < report.max_relative_error < 0.02
    assert "21 layers quantized" in str(report) and report.to_dict()["layers"][0]["mode"] == "sym"
    out = tiny(ids)
    torch.testing.assert_close(out, ref(ids), rtol=0.05, atol=0.05)
    again = quantize_weights_int8(tiny, TargetScope(patterns=[r".*_proj"]))
    assert not again.layers and len(again.skipped) == 21
    with pytest.raises(ValueError, match="matches no"):
        quantize_weights_int8(tiny, TargetScope(names=["nope"]))
    mod = tiny.layers[0].mlp.up_proj
    dequantize_weights_int8(tiny)
    assert type(mod) is nn.Linear and tiny.layers[0].mlp.up_proj is mod and isinstance(mod.weight, nn.Parameter)
    assert torch.equal(tiny(ids), out)


def _thresholds(model):
    return {n: float(m.activation_threshold) for n, m in model.named_modules() if is_sparsified(m)}


def test_quantize_then_sparsify_is_exact_and_removable(tiny, batches):
    quantize_weights_int8(tiny)
    # the same model with the dequantized float weights: calibration must give identical thresholds
    float_twin = dequantize_weights_int8(copy.deepcopy(tiny))
    up = tiny.layers[1].mlp.up_proj
    qbuf = up.qweight
    sparsify_activations(tiny, batches, _recipe(), calibration={"progress": False})
    sparsify_activations(float_twin, batches, _recipe(), calibration={"progress": False})
    assert _thresholds(tiny) == _thresholds(float_twin)
    assert tiny.layers[1].mlp.up_proj is up and isinstance(up, Int8WeightLinear) and is_sparsified(up)
    rep = activation_sparsity_report(tiny)
    assert len(rep.layers) == 9 and all(abs(r.calibration_sparsity - r.target) < 0.02 for r in rep.layers)
    ids = batches[0]
    torch.testing.assert_close(tiny(ids), float_twin(ids), rtol=1e-5, atol=1e-5)

    # checkpoint: a fresh float model, quantized, then the sparsity loaded
    buf = io.BytesIO()
    torch.save(tiny.state_dict(), buf)
    buf.seek(0)
    fresh = tiny_llama(seed=5)
    quantize_weights_int8(fresh)
    load_activation_sparsity(fresh, torch.load(buf, weights_only=True))
    assert _thresholds(fresh) == _thresholds(tiny)
    assert torch.equal(fresh(ids), tiny(ids))

    remove_activation_sparsity(tiny)
    assert type(up) is Int8WeightLinear and up.qweight is qbuf and not hasattr(up, "activation_threshold")


def test_sparsify_then_quantize_keeps_thresholds(tiny, batches):
    sparsify_activations(tiny, batches, _recipe(), calibration={"progress": False})
    before = _thresholds(tiny)
    down = tiny.layers[0].mlp.down_proj
    report = quantize_weights_int8(tiny, TargetScope(patterns=[".*mlp.*"]), mode="asym", granularity="input")
    assert all(r.sparsified for r in report.layers) and len(report.layers) == 9
    assert tiny.layers[0].mlp.down_proj is down and isinstance(down, Int8WeightLinear) and is_sparsified(down)
    assert _thresholds(tiny) == before
    x = torch.randn(5, down.in_features)
    xm = x * (x.abs() > down.activation_threshold)
    torch.testing.assert_close(down(x), nn.functional.linear(xm, down.weight))
    pickled = io.BytesIO()
    torch.save(tiny, pickled)  # the dynamic sparse int8 class pickles
    pickled.seek(0)
    clone = torch.load(pickled, weights_only=False)
    ids = batches[0]
    assert torch.equal(clone(ids), tiny(ids))
    remove_activation_sparsity(tiny)
    assert type(down) is Int8WeightLinear


def test_export_int8_matches_model(tiny, batches, backend):
    quantize_weights_int8(tiny)
    sparsify_activations(tiny, batches, {TargetScope(patterns=[r".*_proj"]): 0.5}, calibration={"progress": False})
    ids = batches[0][:1]
    ref = tiny(ids)
    refs = [tiny(ids[:, : i + 1])[:, -1] for i in range(3)]
    export_for_inference(tiny)
    layers = [m for m in tiny.modules() if isinstance(m, Int8SparseInferenceLinear)]
    assert len(layers) == 22  # 21 sparsified projections + the dense int8 lm_head
    assert sum(math.isinf(float(m.activation_threshold)) for m in layers) == 1
    torch.testing.assert_close(tiny(ids), ref, rtol=1e-4, atol=1e-4)  # 16 tokens: dense path
    for i in range(3):  # few tokens: the sparse kernel
        torch.testing.assert_close(tiny(ids[:, : i + 1])[:, -1], refs[i], rtol=1e-4, atol=1e-4)
    with pytest.raises(NotSparsifiedError, match="no sparsified layer or Int8WeightLinear"):
        export_for_inference(tiny)


def test_export_for_inference_keeps_int8_layers_int8(tiny, batches, backend):
    from pl_actsparse.export.linear import SparseInferenceLinear
    from pl_actsparse.export.convert import export_for_inference, exported_layers

    quantize_weights_int8(tiny, TargetScope(patterns=[r".*mlp.*"]))  # attention stays float
    sparsify_activations(tiny, batches, {TargetScope(patterns=[r".*_proj"]): 0.5}, calibration={"progress": False})
    ids = batches[0][:1]
    ref = tiny(ids)
    ref_last = tiny(ids[:, :2])[:, -1]
    qbuf = tiny.layers[0].mlp.up_proj.qweight
    export_for_inference(tiny)
    int8_layers = [m for m in tiny.modules() if isinstance(m, Int8SparseInferenceLinear)]
    float_layers = [m for m in tiny.modules() if isinstance(m, SparseInferenceLinear)]
    assert len(int8_layers) == 9 and len(float_layers) == 12  # 3 MLP + 4 attention projections x 3 blocks
    assert tiny.layers[0].mlp.up_proj.qweight_t is qbuf  # shared, not dequantized or copied
    assert not any(math.isinf(float(m.activation_threshold)) for m in int8_layers)
    listed = exported_layers(tiny)
    assert len(listed) == 21 and sum(e.dtype == torch.int8 for e in listed) == 9
    torch.testing.assert_close(tiny(ids), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tiny(ids[:, :2])[:, -1], ref_last, rtol=1e-4, atol=1e-4)


def test_callback_on_int8_model(tiny, batches):
    L = pytest.importorskip("lightning.pytorch")
    from pl_actsparse.lightning.callback import ActivationSparsityCallback

    class LM(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, ids):
            return self.net(ids)

        def validation_step(self, batch, idx):
            logits = self(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            self.log("val_loss", loss)

    quantize_weights_int8(tiny)
    lm = LM(tiny)
    cb = ActivationSparsityCallback(
        _recipe(), submodule="net", calibration_dataloader=batches, calibration={"progress": False}, verbose=False, log_per_layer=False
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[cb],
    )
    loader = torch.utils.data.DataLoader(torch.cat(batches), batch_size=2)
    metrics = trainer.validate(lm, dataloaders=loader, verbose=False)[0]
    up = tiny.layers[0].mlp.up_proj
    assert isinstance(up, Int8WeightLinear) and is_sparsified(up) and float(up.activation_threshold) > 0
    assert abs(metrics["actsparse/calibration/sparsity"] - metrics["actsparse/calibration/target"]) < 0.01
    assert 0.3 < metrics["actsparse/val/sparsity"] < 0.45


def test_auto_falls_back_to_torch_when_the_extension_cannot_load(monkeypatch):
    ext = k8.INT8_EXTENSION
    monkeypatch.setattr(ext, "load", lambda build=True: False)
    monkeypatch.setattr(ext, "loaded", False)
    monkeypatch.setattr(ext, "error", "simulated load failure")
    monkeypatch.setattr(ext, "warned", False)
    kcpu.set_backend("auto")
    try:
        assert k8.resolve_int8_backend() == "torch"
        q, s, z = k8.quantize_weight_t(torch.randn(9, 7))
        x = torch.randn(1, 7)
        with pytest.warns(RuntimeWarning, match="int8 C\\+\\+ CPU kernel is unavailable .*simulated load failure"):
            got = k8.int8_sparse_linear(x, torch.tensor(0.3), q, s, z)
        torch.testing.assert_close(got, k8.int8_masked_linear(x, torch.tensor(0.3), q, s, z), rtol=1e-5, atol=1e-5)
        kcpu.set_backend("cpp")
        with pytest.raises(RuntimeError, match="requested"):
            k8.resolve_int8_backend()
    finally:
        kcpu.set_backend(None)


# ------------------------------------------------------------------------ every layout shape (issue 13.6)

SHAPES = [(1, 9), (9, 1), (1, 1), (5, 3), (1, 300), (300, 1)]  # (in_features, out_features)


@pytest.mark.parametrize("in_f, out_f", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gran", GRANS)
def test_every_layout_shape_through_the_layer_and_the_kernels(backend, in_f, out_f, mode, gran):
    """1xN, Nx1 and 1x1 layers, both granularities and modes: the exported int8 layer (eager fast path,
    custom op, dense path) equals dequantize-then-masked-linear, and the layout helpers agree."""
    torch.manual_seed(in_f * 31 + out_f)
    lin = nn.Linear(in_f, out_f)
    q8 = Int8WeightLinear.from_linear(lin, mode=mode, granularity=gran)
    layer = Int8SparseInferenceLinear(q8)
    q, s, z = layer.qweight_t, layer.scale, layer.zero_point if mode == "asym" else None
    expected_gran = "output" if (in_f, out_f) == (1, 1) else gran  # a 1x1 layer's one scale reads either way
    assert k8.scale_granularity(q, s, z) == expected_gran
    rs, rz, cs, cz, b = k8.int8_kernel_args(q, s, z, layer.bias)
    if expected_gran == "input":
        assert rs.numel() == in_f and cs is None and cz is None and (rz is None) == (z is None)
    else:
        assert cs.numel() == out_f and rs is None and rz is None and (cz is None) == (z is None)
    assert b.numel() == out_f
    layer.activation_threshold.fill_(0.3)
    for lead in ((1,), (3,), (2, 1, 4)):
        x = torch.randn(*lead, in_f)
        ref = k8.int8_masked_linear(x, layer.activation_threshold, q, s, z, layer.bias)
        assert ref.shape == (*lead, out_f)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)  # sparse or dense path by token count
        torch.testing.assert_close(k8.int8_sparse_linear(x, layer.activation_threshold, q, s, z, layer.bias), ref,
                                   rtol=1e-5, atol=1e-5)
        xm = x.masked_fill(x.abs() <= 0.3, 0)
        torch.testing.assert_close(k8.int8_dense_linear(xm, q, s, z, layer.bias), ref, rtol=1e-5, atol=1e-5)
        # and the int8 layer stays within quantization error of the float layer
        bound = float(s.max()) / 2 * float(xm.abs().sum(-1).max()) + 1e-5  # each weight within half a step
        assert float((layer(x) - F.linear(xm, lin.weight, lin.bias)).detach().abs().max()) <= bound


def test_scale_granularity_rejects_other_shapes():
    q = torch.zeros(4, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"scale must have shape \[1, 3\] or \[4, 1\]"):
        k8.scale_granularity(q, torch.ones(3, 1))
    with pytest.raises(ValueError, match="zero_point must have the shape"):
        k8.scale_granularity(q, torch.ones(1, 3), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="2-D int8"):
        k8.scale_granularity(q.float(), torch.ones(1, 3))


# ------------------------------------------------------------------ degenerate channels (issue 11 item 5)

TINY = torch.finfo(torch.float32).tiny


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("kind", ["zero", "denormal", "below_127_tiny", "small_normal"])
def test_zero_and_denormal_channels_quantize_to_exact_zeros_with_a_valid_scale(mode, gran, kind):
    torch.manual_seed(7)
    w = torch.randn(6, 5)
    # 1e-37 is a normal fp32 number, but 1e-37 / 127 (the scale it would need) is not; 1e-35 / 255 is
    value = {"zero": 0.0, "denormal": 1e-44, "below_127_tiny": 1e-37, "small_normal": 1e-35}[kind]
    if gran == "output":
        w[2] = value  # output channel 2 ([out, in] row)
        w[4, ::2] = -value
    else:
        w[:, 1] = value  # input channel 1 ([out, in] column)
        w[::2, 3] = -value
    q, s, z = k8.quantize_weight_t(w, mode, gran)
    assert bool(torch.isfinite(s).all()) and bool((s >= TINY).all()), s  # a valid (normal) scale everywhere
    deq = k8.dequantize_weight_t(q, s, z).t()
    chans = [2] if gran == "output" else [1]
    for c in chans:
        cq = q[:, c] if gran == "output" else q[c]
        if kind == "small_normal":
            # a regular channel with a normal scale: error <= half a step
            sel = deq[c] if gran == "output" else deq[:, c]
            ref = w[c] if gran == "output" else w[:, c]
            assert float((sel - ref).abs().max()) <= float(s.view(-1)[c]) / 2 * 1.001
            continue
        assert int(cq.abs().max()) == 0  # codes exactly 0
        assert float(s.view(-1)[c]) == 1.0
        if z is not None:
            assert float(z.view(-1)[c]) == 0.0  # not -128: the kernel adds nothing for this channel
        sel = deq[c] if gran == "output" else deq[:, c]
        assert bool((sel == 0).all())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gran", GRANS)
def test_exported_output_is_as_accurate_with_a_zero_channel(backend, mode, gran):
    """The issue's case: asym + per-input scales + an all-zero input channel lost precision (6.9e-5 vs 3.6e-7)."""
    torch.manual_seed(11)
    in_f, out_f = 64, 48
    w = torch.randn(out_f, in_f)
    x = torch.randn(1, in_f) * 4

    def rel_error(weight):
        q, s, z = k8.quantize_weight_t(weight, mode, gran)
        ref = x.double() @ k8.dequantize_weight_t(q, s, z, torch.float64)
        got = k8.int8_sparse_linear(x, torch.tensor(-math.inf), q, s, z)
        return float((got.double() - ref).abs().max() / ref.abs().max())

    base = rel_error(w)
    w0 = w.clone()
    if gran == "input":
        w0[:, 5] = 0
        w0[:, 9] = 1e-44
    else:
        w0[5] = 0
        w0[9] = 1e-44
    with_zero = rel_error(w0)
    assert base <= 2e-6 and with_zero <= 2e-6, (base, with_zero)
    assert with_zero <= 4 * base + 1e-7


try:
    from hypothesis import given, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @given(
        out_f=st.integers(1, 7),
        in_f=st.integers(1, 7),
        mode=st.sampled_from(MODES),
        gran=st.sampled_from(GRANS),
        seed=st.integers(0, 2**16),
        scale_exp=st.sampled_from([-45, -40, -38, -30, 0, 3]),
    )
    def test_quantizer_property_valid_scales_and_half_step_error(out_f, in_f, mode, gran, seed, scale_exp):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(out_f, in_f, generator=g) * (10.0 ** scale_exp)
        w[torch.rand(out_f, in_f, generator=g) < 0.3] = 0
        q, s, z = k8.quantize_weight_t(w, mode, gran)
        assert bool(torch.isfinite(s).all()) and bool((s >= TINY).all())
        if z is not None:
            assert bool((z >= -128).all()) and bool((z <= 127).all()) and bool((z == z.round()).all())
        deq = k8.dequantize_weight_t(q, s, z).t()
        step = s.t() if gran == "output" else s.t().expand(out_f, in_f)
        # degenerate channels (scale 1, all codes 0) lose at most their own magnitude (< 127 * tiny)
        bound = torch.maximum(step / 2 * (1 + 1e-5), torch.full_like(step, 128 * TINY))
        assert bool(((deq - w).abs() <= bound).all())


def test_a_layer_made_before_the_kernel_was_built_uses_it_once_loaded(monkeypatch):
    """Issue 13 item 11: an int8 layer constructed (or unpickled) while the kernel was not built recorded
    backend 'torch'; once the first call has built the kernel, decoding takes the kernel's fast path."""
    if not k8.load_int8_extension(build=False):
        pytest.skip(f"int8 C++ kernel not built: {k8.int8_extension_status().error}")
    torch.manual_seed(5)
    layer = Int8SparseInferenceLinear(Int8WeightLinear.from_linear(nn.Linear(24, 10)))
    layer.backend = "torch"  # what a layer made before the build holds
    restored = copy.deepcopy(layer)
    calls = []
    real = k8.int8_sparse_gemv_direct
    monkeypatch.setattr(k8, "int8_sparse_gemv_direct", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 24)
    y = restored(x)
    assert calls == [1]
    ref = k8.int8_masked_linear(x, restored.activation_threshold, restored.qweight_t, restored.scale,
                                restored.zero_point, restored.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_an_exported_int8_model_keeps_the_state_dict_keys_of_the_model_it_came_from(tiny, batches):
    """quantize_weights_int8 quantizes every Linear (here also layers left unsparsified); exporting gave those a -inf
    threshold that was saved, so the exported model's state dict had keys the int8 model lacks, and the int8 model's
    own state dict did not load into it (missing ``activation_threshold``)."""
    quantize_weights_int8(tiny)
    sparsify_activations(tiny, batches, {TargetScope(patterns=[r".*mlp.*"]): 0.5}, calibration={"progress": False})
    ids = batches[0][:1]
    reference = copy.deepcopy(tiny)
    export_for_inference(tiny)
    assert tiny.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        for name, buf in reference.named_buffers():
            if name.endswith("scale"):
                buf.mul_(1.5)
    tiny.load_state_dict(reference.state_dict())  # strict
    torch.testing.assert_close(tiny(ids), reference(ids), rtol=1e-4, atol=1e-4)
    unsparsified = [m for n, m in tiny.named_modules() if "attn" in n and isinstance(m, Int8SparseInferenceLinear)]
    assert len(unsparsified) == 12 and all(math.isinf(float(m.activation_threshold)) for m in unsparsified)
    fresh = Int8SparseInferenceLinear(Int8WeightLinear.from_linear(nn.Linear(32, 32)))  # not sparsified: no threshold key
    assert "activation_threshold" not in fresh.state_dict() and "_extra_state" not in fresh.state_dict()
    fresh.load_state_dict({**fresh.state_dict(), "activation_threshold": torch.tensor(0.5)})  # a sparsified layer's keys
    assert float(fresh.state_dict()["activation_threshold"]) == 0.5 and "_extra_state" in fresh.state_dict()


@pytest.mark.parametrize("inference_mode", [False, True])
def test_decode_follows_in_place_loads_of_bf16_scales(tiny, batches, backend, inference_mode):
    """The eager decode path caches the scales as fp32 vectors; keyed on the buffers' identity only, an in-place
    load of bf16 scales (a model moved with ``.to(torch.bfloat16)``; also under inference_mode, whose tensors keep
    no version counter) left it decoding with the old ones: a silent wrong result."""
    quantize_weights_int8(tiny, TargetScope(patterns=[r".*mlp.*"]))
    sparsify_activations(tiny, batches, {TargetScope(patterns=[r".*mlp.*"]): 0.5}, calibration={"progress": False})
    tiny.to(torch.bfloat16)
    changed = copy.deepcopy(tiny)
    with torch.no_grad():
        for name, buf in changed.named_buffers():
            if name.endswith(("scale", "zero_point")):
                buf.mul_(1.5)
    ids = batches[0][:1, :1]
    with torch.inference_mode() if inference_mode else torch.no_grad():  # no autograd: the eager decode path
        export_for_inference(tiny, max_sparse_tokens=8)
        before = tiny(ids)  # the cache is made
        tiny.load_state_dict(changed.state_dict())
        after = tiny(ids)
    torch.testing.assert_close(after, changed(ids), rtol=2e-2, atol=2e-2)
    assert (after - before).abs().max() > 0.1 * before.abs().max()  # the load changed the output
