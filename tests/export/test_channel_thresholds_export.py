"""Exporting layers with a per-channel threshold (``activation_threshold`` of shape ``[in_features]``, written by
:func:`pl_actsparse.tuning.weight_aware.sparsify_activations_weight_aware`): the float and the int8 inference layers
use their sparse kernels on them and compute the reference forward ``F.linear(x.masked_fill(|x| <= t, 0), W, b)``."""

from __future__ import annotations

import copy
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pl_actsparse
import pl_actsparse.export.linear as linear_mod
from pl_actsparse import TargetScope, remove_activation_sparsity, sparsify_activations
from pl_actsparse.core.int8 import Int8WeightLinear, quantize_weights_int8
from pl_actsparse.errors import InvalidOptionError
from pl_actsparse.export.convert import export_for_inference, exported_layers
from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear
from pl_actsparse.export.linear import SparseInferenceLinear
from pl_actsparse.kernels import cpu
from pl_actsparse.kernels import int8_cpu as k8
from pl_actsparse.kernels.dispatch import prepack_unavailable
from pl_actsparse.tuning.weight_aware import sparsify_activations_weight_aware
from tiny_models import count_token_calls, tiny_hf_llama, tiny_llama

MLP = {TargetScope(patterns=[r".*mlp\..*_proj"]): 0.5}
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # as tests/export/test_inference.py
BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    not cpu.load_extension(build=os.environ.get("PL_ACTSPARSE_BUILD_EXT") == "1"), reason="C++ kernel not built"))]


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    cpu.set_backend(None)


def channel_linear(in_f=40, out_f=24, dtype=torch.float32, seed=0) -> nn.Linear:
    """An nn.Linear with a per-channel fp32 threshold buffer (NaN, +-inf entries included)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f).to(dtype)
    t = torch.rand(in_f, generator=g) * 1.2
    t[:3] = torch.tensor([math.nan, math.inf, -math.inf])
    lin.register_buffer("activation_threshold", t)
    return lin


def reference(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    xm = x.masked_fill(x.abs() <= lin.activation_threshold, 0)
    return F.linear(xm.double(), lin.weight.detach().double(), lin.bias.detach().double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("prefill", ["shared", "prepacked"])
def test_layer_with_a_per_channel_threshold_matches_the_reference(backend, dtype, prefill):
    cpu.set_backend(backend)
    lin = channel_linear(dtype=dtype)
    if prefill == "prepacked" and prepack_unavailable(dtype, torch.device("cpu")):
        pytest.skip(prepack_unavailable(dtype, torch.device("cpu")))
    layer = SparseInferenceLinear.from_linear(lin, max_sparse_tokens=3, prefill=prefill)
    assert layer.activation_threshold.shape == (40,)
    assert torch.equal(layer.activation_threshold.nan_to_num(), lin.activation_threshold.nan_to_num())
    assert "threshold=per-channel[40]" in repr(layer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape in [(40,), (1, 40), (3, 40), (2, 9, 40)]:  # sparse kernel up to 3 tokens, dense path above
            x = torch.randn(*shape, generator=g).to(dtype)
            y, ref = layer(x), reference(lin, x)
            assert y.dtype == dtype and y.shape == ref.shape
            assert float((y.double() - ref).abs().max() / ref.abs().max()) <= TOL[dtype], shape
    back = layer.to_linear()
    assert type(back) is nn.Linear and back.weight.dtype == dtype and torch.equal(back.weight, lin.weight)  # bit for bit
    assert back.bias is lin.bias or torch.equal(back.bias, lin.bias)


def test_state_dict_constructor_and_errors_of_a_per_channel_layer():
    lin = channel_linear()
    layer = SparseInferenceLinear.from_linear(lin)
    sd = layer.state_dict()
    assert sd["activation_threshold"].shape == (40,)
    fresh = SparseInferenceLinear(40, 24)  # a 0-dim threshold, reshaped to the loaded per-channel one
    fresh.load_state_dict(sd)
    x = torch.randn(2, 40)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(SparseInferenceLinear(40, 24, threshold=0.3).state_dict())  # and back to one value
    assert fresh.activation_threshold.shape == ()
    built = SparseInferenceLinear(40, 24, threshold=lin.activation_threshold)
    assert built.activation_threshold.shape == (40,) and built.sparsity_state["calibrated"] is False  # NaN/inf entries
    with pytest.raises(InvalidOptionError, match=r"must hold 1 or in_features=40 values, got shape \(7,\)"):
        SparseInferenceLinear(40, 24, threshold=torch.zeros(7))
    lin.activation_threshold = torch.zeros(7)
    with pytest.raises(InvalidOptionError, match=r"in_features=40 values, got shape \(7,\)"):
        SparseInferenceLinear.from_linear(lin)



@pytest.mark.parametrize("shape", [(24,), (40, 1), (1, 40), (41,)])
def test_a_saved_threshold_of_another_shape_is_refused_on_load(shape):
    """Only a 0-dim, [1] or [in_features] threshold loads into a sparsified or exported layer. The sparsified layer took
    any shape as it was: [out_features] failed only at the next call, and [in_features, 1] broadcast over the tokens
    of a call with in_features tokens (per-token thresholds, silently). Now torch names the size mismatch."""
    torch.manual_seed(0)
    net = sparsify_activations_weight_aware(nn.Sequential(nn.Linear(40, 24)), [torch.randn(64, 40)], {TargetScope(names=["0"]): 0.5},
                                            calibration={"progress": False})
    x = torch.randn(40, 40)  # as many tokens as input features
    with torch.no_grad():
        before = net(x)
    for model in (net, export_for_inference(copy.deepcopy(net))):
        sd = model.state_dict()
        saved = sd["0.activation_threshold"].clone()
        with pytest.raises(RuntimeError, match=r"size mismatch for 0\.activation_threshold"):
            model.load_state_dict({**sd, "0.activation_threshold": torch.full(shape, 0.1)})
        assert torch.equal(model[0].activation_threshold, saved)
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for good in [(), (1,), (40,)]:  # one value or one per input channel, either way round
        net.load_state_dict({**net.state_dict(), "0.activation_threshold": torch.full(good, 0.1)})
        with torch.no_grad():
            torch.testing.assert_close(net(x), F.linear(x.masked_fill(x.abs() <= 0.1, 0), net[0].weight, net[0].bias))


def _weight_aware_hf(dtype=torch.bfloat16):
    model = tiny_hf_llama(vocab=128, hidden=64, intermediate=172).to(dtype)
    calib = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sparsify_activations_weight_aware(model, calib, MLP, calibration={"progress": False})
    return model


@pytest.mark.parametrize("prefill", ["shared", "prepacked"])
def test_weight_aware_hf_llama_exports_to_the_sparse_kernel(monkeypatch, prefill):
    """A real third-party stack: a tiny transformers Llama in bf16 sparsified weight-aware (per-channel thresholds);
    after export its prefill (dense path) and decode steps (the sparse kernel, counted) give the same logits."""
    model = _weight_aware_hf()
    dense_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("up_proj")}
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        refs = [model(ids).logits.double(), model(ids[:, :1]).logits.double(), model(ids[:, :2]).logits.double()]
        export_for_inference(model, max_sparse_tokens=2, prefill=prefill)
        layers = [m for m in model.modules() if isinstance(m, SparseInferenceLinear)]
        assert len(layers) == 6 and all(m.activation_threshold.shape == (m.in_features,) for m in layers)
        assert [e.max_sparse_tokens for e in exported_layers(model)] == [2] * 6
        calls = count_token_calls(monkeypatch, linear_mod, "sparse_linear_cpu")
        gots = [model(ids).logits.double(), model(ids[:, :1]).logits.double(), model(ids[:, :2]).logits.double()]
    assert calls == [1] * 6 + [2] * 6  # the decode steps went through the sparse kernel, the prompt did not
    for got, ref in zip(gots, refs):
        assert float((got - ref).abs().max() / ref.abs().max()) <= 3e-2
    remove_activation_sparsity(model)
    for n, w in dense_weights.items():
        restored = model.get_submodule(n)
        assert type(restored) is nn.Linear and torch.equal(restored.weight, w)  # bit for bit


def test_compile_and_torch_export_of_per_channel_layers():
    model = tiny_llama()
    sparsify_activations_weight_aware(model, [torch.randint(0, 64, (2, 16)) for _ in range(2)], MLP,
                                      calibration={"progress": False})
    export_for_inference(model, max_sparse_tokens=4)
    assert model.layers[0].mlp.up_proj.activation_threshold.dim() == 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=1, max=64)
    ep = torch.export.export(model, (torch.randint(0, 64, (2, 8)),), dynamic_shapes=({0: batch, 1: seq},))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count("pl_actsparse.sparse_inference_linear.default") == 9
    for shape in [(1, 1), (1, 3), (2, 8)]:  # the sparse kernel and the dense path
        ids = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            want = model(ids)
            torch.testing.assert_close(ep.module()(ids), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled(ids), want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_weight_aware_int8_model_exports_to_the_int8_kernel(monkeypatch, backend):
    if backend == "cpp" and not k8.load_int8_extension():
        pytest.skip(f"int8 C++ kernel unavailable: {k8.int8_extension_status().error}")
    cpu.set_backend(backend)
    model = tiny_llama()
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sparsify_activations_weight_aware(model, batches, MLP, calibration={"progress": False})
    quantize_weights_int8(model)  # scored on the float weights (an int8 weight cannot be rescaled for the score), then int8
    down = model.layers[0].mlp.down_proj
    codes = down.qweight.clone()
    ids = batches[0][:1]
    with torch.no_grad():
        refs = [model(ids)] + [model(ids[:, : i + 1])[:, -1] for i in range(3)]
        export_for_inference(model)
        layer = model.layers[0].mlp.down_proj
        assert isinstance(layer, Int8SparseInferenceLinear) and layer.activation_threshold.shape == (48,)
        assert "threshold=per-channel[48]" in repr(layer)
        calls = count_token_calls(monkeypatch, k8, "int8_sparse_gemv_direct") if backend == "cpp" else None
        gots = [model(ids)] + [model(ids[:, : i + 1])[:, -1] for i in range(3)]  # 16 tokens dense, then 1-3 sparse
    for got, ref in zip(gots, refs):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    if calls is not None:
        assert calls == [1] * 22 + [2] * 22 + [3] * 22  # the 9 projections with a threshold + 13 dense int8, no prompt
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = Int8SparseInferenceLinear(Int8WeightLinear.from_linear(nn.Linear(48, 32, bias=False)))
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.activation_threshold, layer.activation_threshold)
    remove_activation_sparsity(model)
    assert type(model.layers[0].mlp.down_proj) is Int8WeightLinear
    assert torch.equal(model.layers[0].mlp.down_proj.qweight, codes)


def test_export_refuses_other_threshold_shapes_before_any_change():
    model = nn.Sequential(channel_linear(), nn.ReLU(), channel_linear(in_f=24, out_f=8))
    model[2].activation_threshold = torch.zeros(5)
    with pytest.raises(pl_actsparse.errors.UnsupportedModuleError,
                       match=r"activation_threshold of '2' has shape \(5,\); the kernels take 1 or in_features=24 values"):
        export_for_inference(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear  # nothing swapped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchao_int8_weights_with_a_per_channel_threshold(dtype):
    quantization = pytest.importorskip("torchao.quantization")
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).to(dtype)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    g = torch.Generator().manual_seed(3)
    sparsify_activations(model, [torch.randn(8, 64, generator=g).to(dtype)], {TargetScope(types=[nn.Linear]): 0.5},
                         calibration={"progress": False})
    for lin in (model[0], model[2]):  # one threshold per input channel, as weight-aware calibration leaves them
        lin._buffers["activation_threshold"] = torch.rand(lin.in_features, generator=g) * 0.8
    x = [torch.randn(n, 64, generator=g).to(dtype) for n in (1, 3, 40)]  # decode, few tokens, prefill
    with torch.no_grad():
        # layer by layer on the same inputs (end to end, one bf16 ulp in the first output can flip the second mask)
        cases = [(i, v if i == 0 else F.relu(model[0](v))) for v in x for i in (0, 2)]
        refs = [model[i](v) for i, v in cases]
        export_for_inference(model)
        assert isinstance(model[0], Int8SparseInferenceLinear) and model[2].activation_threshold.shape == (96,)
        for (i, v), ref in zip(cases, refs):
            got = model[i](v)
            assert got.dtype == dtype and float((got - ref).abs().max() / ref.abs().max()) <= TOL[dtype]


def test_cached_per_channel_threshold_follows_buffer_changes():
    layer = SparseInferenceLinear.from_linear(channel_linear())
    first = layer._threshold_for(torch.bfloat16)
    assert torch.equal(first.nan_to_num(), layer.activation_threshold.nan_to_num())  # fp32: compared as it is
    layer.activation_threshold.fill_(0.25)
    assert torch.equal(layer._threshold_for(torch.bfloat16), torch.full((40,), 0.25))
    layer.activation_threshold = torch.full((40,), 0.5, dtype=torch.float64)
    assert layer._threshold_for(torch.bfloat16).dtype == torch.float32
