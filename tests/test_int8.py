"""Weight-only INT8 (pl_actsparse.core.int8) and the int8 sparse decode kernel (kernels/int8.py)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from pl_actsparse import (
    TargetScope,
    activation_sparsity_report,
    is_sparsified,
    load_activation_sparsity,
    remove_activation_sparsity,
    sparsify_activations,
)
from pl_actsparse.kernels import cpu as kcpu
from pl_actsparse.kernels import int8_cpu as k8
from pl_actsparse.core.int8 import (
    Int8SparseInferenceLinear,
    Int8WeightLinear,
    dequantize_weights_int8,
    export_int8_for_inference,
    quantize_weights_int8,
)
from tiny_models import SEED_RECIPE_PATTERNS, tiny_llama, token_batches

MODES = ["asym", "sym"]
GRANS = ["output", "input"]


def _recipe():
    return {TargetScope(patterns=p): s for p, s in SEED_RECIPE_PATTERNS.values()}


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    if request.param == "cpp" and not k8.load_int8_extension():
        pytest.skip(f"int8 C++ kernel unavailable: {k8.int8_extension_status().error}")
    kcpu.set_backend(request.param)
    yield request.param
    kcpu.set_backend(None)


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
    sparsify_activations(tiny, batches, _recipe(), progress=False)
    sparsify_activations(float_twin, batches, _recipe(), progress=False)
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
    sparsify_activations(tiny, batches, _recipe(), progress=False)
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
    sparsify_activations(tiny, batches, {TargetScope(patterns=[r".*_proj"]): 0.5}, progress=False)
    ids = batches[0][:1]
    ref = tiny(ids)
    refs = [tiny(ids[:, : i + 1])[:, -1] for i in range(3)]
    export_int8_for_inference(tiny)
    layers = [m for m in tiny.modules() if isinstance(m, Int8SparseInferenceLinear)]
    assert len(layers) == 22  # 21 sparsified projections + the dense int8 lm_head
    assert sum(math.isinf(float(m.activation_threshold)) for m in layers) == 1
    torch.testing.assert_close(tiny(ids), ref, rtol=1e-4, atol=1e-4)  # 16 tokens: dense path
    for i in range(3):  # few tokens: the sparse kernel
        torch.testing.assert_close(tiny(ids[:, : i + 1])[:, -1], refs[i], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no Int8WeightLinear"):
        export_int8_for_inference(tiny)


def test_export_for_inference_keeps_int8_layers_int8(tiny, batches, backend):
    from pl_actsparse.export.linear import SparseInferenceLinear, export_for_inference, exported_layers

    quantize_weights_int8(tiny, TargetScope(patterns=[r".*mlp.*"]))  # attention stays float
    sparsify_activations(tiny, batches, {TargetScope(patterns=[r".*_proj"]): 0.5}, progress=False)
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
        _recipe(), submodule="net", calibration_dataloader=batches, progress=False, verbose=False, log_per_layer=False
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
