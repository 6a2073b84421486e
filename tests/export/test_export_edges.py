"""Exported layers at the edges (issue 13 items 4, 5, 7): dtypes and autocast, torch.export with dynamic
shapes, autograd, and removal back to plain modules."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pl_actsparse
from pl_actsparse import TargetScope, remove_activation_sparsity, sparsify_activations
from pl_actsparse.core.int8 import Int8WeightLinear, quantize_weights_int8
from pl_actsparse.export.convert import export_for_inference
from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear
from pl_actsparse.export.linear import SparseInferenceLinear
from tiny_models import tiny_hf_llama, tiny_llama

MLP = {TargetScope(patterns=[r".*mlp\..*"]): 0.5}


def _layer(dtype=torch.float32, threshold=0.5, out=24, inp=16, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out).to(dtype)
    sparsify_activations(nn.Sequential(lin), [torch.randn(4, inp, dtype=dtype)], {TargetScope(names=["0"]): 0.5}, calibration={"progress": False})
    lin.activation_threshold.fill_(threshold)
    return lin


def _reference(lin_weight, bias, x, t):
    return F.linear(x.masked_fill(x.abs() <= t, 0), lin_weight, bias)


# -- item 4: F.linear's dtype semantics ----------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 3, 40], ids=["decode", "few", "prefill"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_autocast_follows_f_linear(tokens, xdtype):
    lin = _layer()
    w, b, t = lin.weight.detach().clone(), lin.bias.detach().clone(), float(lin.activation_threshold)
    exp = SparseInferenceLinear.from_linear(lin, max_sparse_tokens=4)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(1)).to(xdtype)
    with torch.autocast("cpu", torch.bfloat16):
        ref = F.linear(x.masked_fill(x.abs() <= lin.activation_threshold, 0), w, b)  # what the sparsified layer does
        got = exp(x)
    assert ref.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # the mask is the one of the input's dtype: values exactly at the threshold are zeroed on every path
    x = torch.full((tokens, 16), t, dtype=xdtype)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(exp(x).float(), b.to(torch.bfloat16).float().expand(tokens, -1))


@pytest.mark.parametrize("tokens", [1, 40])
def test_mixed_dtypes_without_autocast_raise_like_f_linear(tokens):
    lin = _layer()
    exp = SparseInferenceLinear.from_linear(lin, max_sparse_tokens=4)
    x = torch.randn(tokens, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        F.linear(x, lin.weight)
    with pytest.raises(RuntimeError, match=r"input dtype torch.bfloat16 differs from the weight dtype torch.float32"):
        exp(x)


def test_exported_hf_model_decodes_under_autocast():
    model = tiny_hf_llama()
    g = torch.Generator().manual_seed(3)
    sparsify_activations(model, [torch.randint(0, 64, (2, 16), generator=g)], MLP, calibration={"progress": False})
    ids = torch.randint(0, 64, (1, 6), generator=g)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
        ref_logits = model(ids).logits
    export_for_inference(model, max_sparse_tokens=2)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got_logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == ref.shape == (1, 10)
    assert got_logits.dtype == ref_logits.dtype
    torch.testing.assert_close(got_logits.float(), ref_logits.float(), rtol=5e-2, atol=5e-2)


def test_int8_export_follows_autocast():
    lin = nn.Linear(16, 8)
    net = nn.Sequential(lin)
    quantize_weights_int8(net)
    exp = Int8SparseInferenceLinear(net[0])
    x = torch.randn(2, 16)
    with torch.autocast("cpu", torch.bfloat16):
        y = exp(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), net[0](x), rtol=2e-2, atol=2e-2)


# -- item 5: torch.export with dynamic batch and sequence ----------------------------------------------


def test_torch_export_with_dynamic_batch_and_sequence():
    model = tiny_llama()
    sparsify_activations(model, [torch.randint(0, 64, (2, 16)) for _ in range(2)], MLP, calibration={"progress": False})
    export_for_inference(model, max_sparse_tokens=4)
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=1, max=64)
    ep = torch.export.export(model, (torch.randint(0, 64, (2, 8)),), dynamic_shapes=({0: batch, 1: seq},))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]  # default grad mode: the op, not a linear
    assert ops.count("pl_actsparse.sparse_inference_linear.default") == 9  # 3 blocks x gate, up, down
    for shape in [(1, 1), (1, 3), (2, 8), (3, 40)]:  # the sparse kernel and the dense path, one graph
        ids = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(ids), model(ids), rtol=1e-5, atol=1e-5)


# -- item 7: autograd and removal ----------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 40])
def test_gradient_reaches_the_input_on_every_path(tokens):
    lin = _layer()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    exp = SparseInferenceLinear.from_linear(lin, max_sparse_tokens=4)
    x = torch.randn(tokens, 16, requires_grad=True)
    exp(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    _reference(w, b, x2, exp.activation_threshold).square().sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, x2.grad)
    assert float((x.grad == 0).float().mean()) > 0.2  # zeroed inputs get no gradient, as in the masked layer


@pytest.mark.parametrize("prefill", ["shared", "prepacked"])
def test_remove_activation_sparsity_restores_plain_modules_from_an_exported_model(prefill):
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    hooked = model.layers[0].mlp.up_proj
    hooked.weight.requires_grad_(False)
    hooked.custom_attribute = "kept"
    sparsify_activations(model, [torch.randint(0, 64, (2, 16)) for _ in range(2)], MLP, calibration={"progress": False})
    export_for_inference(model, prefill=prefill)
    assert isinstance(model.layers[0].mlp.up_proj, SparseInferenceLinear)
    remove_activation_sparsity(model)
    assert not any(isinstance(m, SparseInferenceLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    after = model.state_dict()
    assert after.keys() == dense.keys()
    assert all(torch.equal(after[k], v) for k, v in dense.items())  # bit for bit
    restored = model.layers[0].mlp.up_proj
    assert restored.custom_attribute == "kept" and not restored.weight.requires_grad
    assert model.layers[1].mlp.up_proj.weight.requires_grad
    ids = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(model(ids), tiny_llama()(ids), rtol=0, atol=0)


def test_remove_by_scope_on_an_exported_model_and_int8():
    model = tiny_llama()
    quantize_weights_int8(model, TargetScope(patterns=[r".*down_proj"]))
    codes = model.layers[0].mlp.down_proj.qweight.clone()
    sparsify_activations(model, [torch.randint(0, 64, (2, 16)) for _ in range(2)], MLP, calibration={"progress": False})
    export_for_inference(model)
    assert isinstance(model.layers[0].mlp.down_proj, Int8SparseInferenceLinear)
    remove_activation_sparsity(model, TargetScope(patterns=[r".*down_proj"]))
    down = model.layers[0].mlp.down_proj
    assert type(down) is Int8WeightLinear and torch.equal(down.qweight, codes)
    assert isinstance(model.layers[0].mlp.up_proj, SparseInferenceLinear)  # outside the scope: still exported
    with pytest.raises(pl_actsparse.errors.NotSparsifiedError):
        remove_activation_sparsity(model, TargetScope(patterns=[r".*nothing"]))
    remove_activation_sparsity(model)
    assert not any(isinstance(m, (SparseInferenceLinear, Int8SparseInferenceLinear)) for m in model.modules())
    assert math.isfinite(float(model(torch.randint(0, 64, (1, 3))).sum()))


# -- item 8: torchao int8 weights into the int8 sparse kernel -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchao_int8_weights_export_into_the_int8_kernel(dtype):
    quantization = pytest.importorskip("torchao.quantization")
    from pl_actsparse.core.layer import weight_nbytes

    model = tiny_hf_llama(hidden=64, intermediate=172).to(dtype)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig(),
                           filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and ".mlp." in fqn)
    up = model.model.layers[0].mlp.up_proj
    codes = up.weight.qdata.clone()
    assert weight_nbytes(up) == 172 * 64 + 172 * (4 + 1)  # int8 codes, fp32 scales, int8 zero points
    sparsify_activations(model, [torch.randint(0, 64, (2, 16)) for _ in range(2)], MLP, calibration={"progress": False})
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randint(0, 64, (1, n), generator=g) for n in (1, 3, 40)]  # decode, few tokens, prefill
    with torch.no_grad():
        refs = [model(ids).logits for ids in inputs]
        export_for_inference(model)
        new = model.model.layers[0].mlp.up_proj
        assert isinstance(new, Int8SparseInferenceLinear)
        assert torch.equal(new.qweight_t, codes.t())  # torchao's codes, read as they are
        assert weight_nbytes(new) == 172 * 64 + 2 * 172 * 4
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        for ids, ref in zip(inputs, refs):
            got = model(ids).logits
            assert got.dtype == ref.dtype
            torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_other_quantized_weights_refuse_export_by_name():
    class Odd(torch.Tensor):
        pass

    model = nn.Sequential(nn.Linear(8, 4))
    sparsify_activations(model, [torch.randn(2, 8)], {TargetScope(names=["0"]): 0.5}, calibration={"progress": False})
    model[0].weight = nn.Parameter(model[0].weight.detach().as_subclass(Odd))
    with pytest.raises(pl_actsparse.errors.UnsupportedModuleError, match=r"'0' has a .*Odd weight"):
        export_for_inference(model)
    assert not isinstance(model[0], SparseInferenceLinear)


def test_removal_gives_back_the_torchao_module_bit_for_bit():
    quantization = pytest.importorskip("torchao.quantization")
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    before = {n: (type(m.weight), m.weight.qdata.clone(), m.weight.scale.clone(), m.weight.zero_point.clone())
              for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
    sparsify_activations(model, [torch.randn(8, 64)], {TargetScope(types=[nn.Linear]): 0.5}, calibration={"progress": False})
    export_for_inference(model)
    assert isinstance(model[0], Int8SparseInferenceLinear)
    remove_activation_sparsity(model)
    for n, (cls, q, s, z) in before.items():
        w = model.get_submodule(n).weight
        assert type(model.get_submodule(n)) is nn.Linear and type(w) is cls
        assert torch.equal(w.qdata, q) and torch.equal(w.scale, s) and torch.equal(w.zero_point, z)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_gradient_reaches_the_input_of_an_exported_int8_layer():
    net = nn.Sequential(nn.Linear(16, 8))
    quantize_weights_int8(net)
    reference = net[0]
    exp = Int8SparseInferenceLinear(reference)
    for tokens in (1, 40):
        x = torch.randn(tokens, 16, requires_grad=True)
        exp(x).square().sum().backward()
        x2 = x.detach().clone().requires_grad_()
        reference(x2).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("t", [0.0, 0.37, 1e-30, float("-inf"), float("inf"), "per-channel"])
def test_zero_small_equals_the_masked_fill_in_values_and_gradients(dtype, t):
    from pl_actsparse.export.linear import zero_small

    torch.manual_seed(0)
    x = torch.randn(7, 6, dtype=dtype)
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = float("nan"), float("inf"), -0.0, 0.37
    thr = torch.rand(6) if t == "per-channel" else torch.tensor(t)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    got, want = zero_small(a, thr), b.masked_fill(b.abs() <= thr, 0)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    got.nan_to_num().sum().backward()
    want.nan_to_num().sum().backward()
    assert torch.equal(a.grad, b.grad)
