"""Sparse inference: CPU kernels (custom op), SparseInferenceLinear's path choice, export_for_inference.

The C++ kernel is tested when it is already built (or when PL_ACTSPARSE_BUILD_EXT=1 asks to build it,
about a minute); everything else runs on the pure-PyTorch kernel.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pl_actsparse.export.linear as inf
from pl_actsparse.errors import InvalidOptionError
from pl_actsparse.export.convert import export_for_inference, exported_layers
from pl_actsparse.export.linear import SparseInferenceLinear, default_max_sparse_tokens, is_sparsified_linear
from pl_actsparse.kernels import cpu, dispatch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative to max |reference|: fp32 exact up to summation order; bf16/fp16 output rounding (+ inputs to the
# dense bf16 path are products of rounded numbers).
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _cpp_available() -> bool:
    return cpu.load_extension(build=os.environ.get("PL_ACTSPARSE_BUILD_EXT") == "1")


BACKENDS = [
    "torch",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(
            not _cpp_available(),
            reason="C++ kernel not built (set PL_ACTSPARSE_BUILD_EXT=1 to build it, about a minute)",
        ),
    ),
]


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    cpu.set_backend(None)


@pytest.fixture
def torch_backend():
    cpu.set_backend("torch")


def sparsified_linear(in_f: int, out_f: int, *, bias: bool = True, dtype=torch.float32, threshold: float = 0.5):
    """What the core library produces: an nn.Linear with a 0-dim fp32 ``activation_threshold`` buffer."""
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    lin.register_buffer("activation_threshold", torch.tensor(threshold, dtype=torch.float32))
    return lin


def reference(x, lin_weight, bias, threshold):
    """The sparsified layer's forward, with the product in float64."""
    xm = x.masked_fill(x.abs() <= threshold, 0)
    return F.linear(xm.double(), lin_weight.detach().double(), None if bias is None else bias.detach().double())


def assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-6)
    err = float((y.double() - ref).abs().max() / scale)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


# --------------------------------------------------------------------------------------------------------
# Kernel (custom op)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["1d", "2d", "3d"])
def test_kernel_matches_masked_dense(backend, dtype, bias, lead):
    cpu.set_backend(backend)
    torch.manual_seed(0)
    for in_f, out_f in [(37, 45), (256, 1024)]:  # odd sizes (tails); big enough for the threaded path
        w = torch.randn(out_f, in_f).to(dtype)
        b = torch.randn(out_f).to(dtype) if bias else None
        x = torch.randn(*lead, in_f).to(dtype)
        for thr in [0.6, -math.inf, math.inf]:
            t = torch.tensor(thr)
            y = cpu.sparse_linear(x, t, cpu.to_kernel_layout(w), b)
            assert_close(y, reference(x, w, b, t), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_avx512_and_avx2_paths_agree_with_the_reference(dtype):
    """The C++ kernel picks AVX-512 by CPU capability (isa=0); isa=1 forces the AVX2 path on the same build."""
    if not cpu.load_extension(build=True):
        pytest.skip(f"C++ kernel unavailable: {cpu.extension_status().error}")
    g = torch.Generator().manual_seed(0)
    for in_f, out_f in [(7, 13), (61, 45), (300, 530), (512, 2048)]:  # tails of 8/16 columns, < and > 16 rows
        wt = torch.randn(in_f, out_f, generator=g).to(dtype)
        x, t = torch.randn(1, in_f, generator=g).to(dtype), torch.tensor(0.6)
        ys = [torch.ops.pl_actsparse_ext.sparse_gemv(x, t, wt, None, 0, isa) for isa in (0, 1)]
        for y in ys:
            assert_close(y, reference(x, wt.t(), None, t), dtype)
        torch.testing.assert_close(ys[0].float(), ys[1].float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_threshold_compared_in_input_dtype(backend):
    # 1.005 rounds to the bf16 value 1.0078125, so the reference (x.abs() <= fp32 buffer, which promotes to
    # bf16) zeroes x = 1.0078125 too; a plain fp32 comparison would keep it.
    cpu.set_backend(backend)
    x = torch.tensor([1.0, 1.0078125, 1.015625, -1.0078125], dtype=torch.bfloat16)
    w = torch.eye(4, dtype=torch.bfloat16)
    t = torch.tensor(1.005, dtype=torch.float32)
    y = cpu.sparse_linear(x, t, cpu.to_kernel_layout(w))
    assert y.tolist() == [0.0, 0.0, 1.015625, 0.0]
    assert torch.equal(y, F.linear(x.masked_fill(x.abs() <= t, 0), w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_nan_and_empty_inputs(backend):
    cpu.set_backend(backend)
    w = torch.randn(6, 5)
    x = torch.tensor([0.1, float("nan"), 0.0, 2.0, -0.2])
    y = cpu.sparse_linear(x, torch.tensor(0.5), cpu.to_kernel_layout(w))
    assert torch.isnan(y).all()  # masked_fill(|x| <= t) keeps NaN, so does the kernel
    b = torch.randn(6)
    e = cpu.sparse_linear(torch.empty(0, 5), torch.tensor(0.5), cpu.to_kernel_layout(w), b)
    assert e.shape == (0, 6)
    z = cpu.sparse_linear(torch.zeros(2, 5), torch.tensor(0.5), cpu.to_kernel_layout(w), b)
    assert torch.equal(z, b.expand(2, 6))


def test_kernel_rejects_mismatches(torch_backend):
    wt = cpu.to_kernel_layout(torch.randn(6, 5))
    with pytest.raises(ValueError, match="5 features|features"):
        cpu.sparse_linear(torch.randn(4), torch.tensor(0.0), wt)
    with pytest.raises(TypeError, match="bfloat16"):
        cpu.sparse_linear(torch.randn(5, dtype=torch.bfloat16), torch.tensor(0.0), wt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    cpu.set_backend(backend)
    torch.manual_seed(0)
    wt = cpu.to_kernel_layout(torch.randn(24, 16))
    for args in [
        (torch.randn(16), torch.tensor(0.3), wt, torch.randn(24)),
        (torch.randn(2, 3, 16), torch.tensor(0.3), wt, None),
    ]:
        torch.library.opcheck(
            torch.ops.pl_actsparse.sparse_linear.default,
            args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )


def test_torch_compile_traces_the_custom_op():
    cpu.set_backend("torch")
    torch.manual_seed(0)
    layer = SparseInferenceLinear.from_linear(sparsified_linear(16, 24, threshold=0.4), max_sparse_tokens=2)
    traced: list = []

    def recording_backend(gm, example_inputs):
        traced.append({n.target for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    op = torch.ops.pl_actsparse.sparse_inference_linear.default
    for backend in (recording_backend, "aot_eager"):
        compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)
        for shape in [(16,), (1, 2, 16), (5, 16)]:  # sparse, sparse, dense path
            x = torch.randn(*shape)
            with torch.no_grad():
                assert torch.allclose(compiled(x), layer(x), atol=1e-5)
        torch._dynamo.reset()
    assert traced and all(op in ops for ops in traced)  # the layer is one op; it picks its path at run time


# --------------------------------------------------------------------------------------------------------
# Backend selection and the C++ fallback
# --------------------------------------------------------------------------------------------------------


def test_backend_setting_and_env(monkeypatch):
    with pytest.raises(ValueError, match="backend must be"):
        cpu.set_backend("cuda")  # type: ignore[arg-type]
    cpu.set_backend(None)
    monkeypatch.setenv("PL_ACTSPARSE_CPU_KERNEL", "torch")
    assert cpu.get_backend() == "torch" and cpu.resolve_backend() == "torch"
    monkeypatch.setenv("PL_ACTSPARSE_CPU_KERNEL", "bogus")
    with pytest.raises(ValueError, match="PL_ACTSPARSE_CPU_KERNEL"):
        cpu.get_backend()


@pytest.fixture
def fresh_extension_state(monkeypatch, tmp_path):
    """Pretend the extension was never loaded in this process and builds into an empty directory."""
    ext = cpu.EXTENSION
    saved = (ext.loaded, ext.error, ext.warned)
    ext.reset()
    monkeypatch.setenv("PL_ACTSPARSE_EXT_DIR", str(tmp_path))
    # the library may already be loaded into this process (a real build): pretend it is not registered
    monkeypatch.setattr(type(ext), "_op_registered", lambda self: False)
    yield ext
    ext.loaded, ext.error, ext.warned = saved


def test_auto_falls_back_to_torch_when_the_build_fails(monkeypatch, fresh_extension_state):
    import torch.utils.cpp_extension as cpp_extension

    def failing_build(*args, **kwargs):
        raise RuntimeError("simulated compiler error")

    monkeypatch.setattr(cpp_extension, "load_inline", failing_build)
    monkeypatch.setenv("CXX", "sh")  # a "compiler" on PATH, so that load_inline is reached
    cpu.set_backend("auto")
    w, x = torch.randn(12, 8), torch.randn(8)
    with pytest.warns(RuntimeWarning, match="simulated compiler error"):
        y = cpu.sparse_linear(x, torch.tensor(0.5), cpu.to_kernel_layout(w))
    assert_close(y, reference(x, w, None, torch.tensor(0.5)), torch.float32)
    assert cpu.resolve_backend() == "torch"
    status = cpu.extension_status()
    assert not status.loaded and "simulated compiler error" in status.error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        cpu.sparse_linear(x, torch.tensor(0.5), cpu.to_kernel_layout(w))
    cpu.set_backend("cpp")
    with pytest.raises(RuntimeError, match="backend='cpp'"):
        cpu.sparse_linear(x, torch.tensor(0.5), cpu.to_kernel_layout(w))


def test_no_compiler_is_reported_without_building(monkeypatch, fresh_extension_state):
    monkeypatch.setenv("CXX", "no-such-compiler-pl-actsparse")
    assert cpu.load_extension(build=False) is False  # nothing built in the empty directory
    assert cpu.extension_status().error == "not built yet"
    assert cpu.load_extension(build=True) is False
    assert "no C++ compiler" in cpu.extension_status().error
    cpu.set_backend("auto")
    assert cpu.resolve_backend() == "torch"


# --------------------------------------------------------------------------------------------------------
# SparseInferenceLinear: layout, path choice, dense path
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_both_paths_match_reference(torch_backend, dtype, bias):
    torch.manual_seed(0)
    lin = sparsified_linear(40, 72, bias=bias, dtype=dtype, threshold=0.7)
    layer = SparseInferenceLinear.from_linear(lin, max_sparse_tokens=3)
    for shape in [(40,), (3, 40), (1, 3, 40), (4, 40), (2, 5, 40)]:
        x = torch.randn(*shape).to(dtype)
        ref = reference(x, lin.weight, lin.bias, lin.activation_threshold)
        assert_close(layer(x), ref, dtype)
        assert_close(layer.dense_forward(x), ref, dtype)


def test_crossover_selects_the_path_by_token_count(torch_backend):
    layer = SparseInferenceLinear.from_linear(sparsified_linear(8, 16), max_sparse_tokens=3)
    cls = SparseInferenceLinear
    with (
        mock.patch.object(cls, "sparse_forward", autospec=True, side_effect=cls.sparse_forward) as sparse,
        mock.patch.object(cls, "dense_forward", autospec=True, side_effect=cls.dense_forward) as dense,
    ):
        cases = [((8,), "sparse"), ((3, 8), "sparse"), ((1, 3, 8), "sparse"), ((4, 8), "dense"), ((2, 2, 8), "dense")]
        for shape, path in cases:
            sparse.reset_mock()
            dense.reset_mock()
            layer(torch.randn(*shape))
            assert (sparse.call_count, dense.call_count) == ((1, 0) if path == "sparse" else (0, 1)), shape
        layer.max_sparse_tokens = 0  # always dense
        sparse.reset_mock()
        layer(torch.randn(8))
        assert sparse.call_count == 0


def test_default_crossover_comes_from_the_table_when_asked(monkeypatch, torch_backend):
    monkeypatch.setenv("PL_ACTSPARSE_MAX_SPARSE_TOKENS", "table")  # the AVX2 measurements, nothing measured
    dispatch.clear_profile_memo()  # the environment is read when a dtype is first needed
    monkeypatch.setitem(cpu.DEFAULT_MAX_SPARSE_TOKENS, ("torch", torch.bfloat16), 5)
    monkeypatch.setitem(cpu.MIN_SPARSE_WEIGHT_BYTES, "torch", 8 * 16 * 2)  # fp32 (512 bytes) is big enough
    layer = SparseInferenceLinear.from_linear(sparsified_linear(8, 16))
    assert layer.backend == "torch" and layer.max_sparse_tokens is None
    assert layer.sparse_token_limit(torch.float32) == cpu.DEFAULT_MAX_SPARSE_TOKENS[("torch", None)]
    assert layer.sparse_token_limit(torch.bfloat16) == 5 == default_max_sparse_tokens(torch.bfloat16, "torch")
    monkeypatch.setitem(cpu.MIN_SPARSE_WEIGHT_BYTES, "torch", 8 * 16 * 4 + 1)  # now too small: always dense
    assert layer.sparse_token_limit(torch.float32) == 0
    for bad in (-1, "8", True):  # one check (export.linear.check_export_options) for the layers and export_for_inference
        with pytest.raises(InvalidOptionError, match=f"max_sparse_tokens must be an int >= 0.*got {bad!r}"):
            SparseInferenceLinear.from_linear(sparsified_linear(8, 16), max_sparse_tokens=bad)
    with pytest.raises(InvalidOptionError, match=r"prefill must be one of \('shared', 'prepacked'\), got 'packed'"):
        SparseInferenceLinear.from_linear(sparsified_linear(8, 16), prefill="packed")
    dispatch.clear_profile_memo()


def test_layer_from_plain_linear_is_rejected():
    with pytest.raises(ValueError, match="not sparsified"):
        SparseInferenceLinear.from_linear(nn.Linear(4, 4))


def test_layer_state_dict_roundtrip_and_dense_checkpoint(torch_backend):
    lin = sparsified_linear(8, 16, threshold=0.3)
    layer = SparseInferenceLinear.from_linear(lin)
    # saved in the nn.Linear layout (issue 13 item 3): the keys and values of the sparsified layer
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "activation_threshold", "_extra_state"}
    assert torch.equal(sd["weight"], lin.weight) and sd["weight"].shape == (16, 8)
    fresh = SparseInferenceLinear(8, 16)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(8)
    assert torch.equal(fresh(x), layer(x))
    other = SparseInferenceLinear(8, 16)
    other.load_state_dict(lin.state_dict())  # a checkpoint of the original layer: weight -> weight_t
    assert torch.equal(other.weight_t, lin.weight.t()) and other.activation_threshold.item() == pytest.approx(0.3)


# --------------------------------------------------------------------------------------------------------
# export_for_inference
# --------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = sparsified_linear(16, 32, threshold=0.3)
        self.act = nn.ReLU()
        self.down = sparsified_linear(32, 16, bias=False, threshold=0.1)
        self.head = nn.Linear(16, 16)  # not sparsified: must stay

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


def test_export_replaces_only_sparsified_layers(torch_backend):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    ref_model = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(3, 16)
    out = export_for_inference(model, max_sparse_tokens=1)
    assert out is model
    for blk in model:
        assert isinstance(blk.up, SparseInferenceLinear) and isinstance(blk.down, SparseInferenceLinear)
        assert type(blk.head) is nn.Linear and not is_sparsified_linear(blk.head)
        assert blk.up.weight is None  # no copy of the dense weight kept
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert [e.name for e in exported_layers(model)] == ["0.up", "0.down", "1.up", "1.down"]
    first = exported_layers(model)[0]
    assert first.threshold == pytest.approx(0.3) and first.max_sparse_tokens == 1 and first.backend == "torch"
    with torch.no_grad():
        # ref_model's layers are plain Linear + buffer, so apply the masks by hand through the blocks
        def masked_forward(blk, h):
            h = F.linear(h.masked_fill(h.abs() <= blk.up.activation_threshold, 0), blk.up.weight, blk.up.bias)
            h = blk.act(h)
            h = F.linear(h.masked_fill(h.abs() <= blk.down.activation_threshold, 0), blk.down.weight)
            return blk.head(h)

        ref = masked_forward(ref_model[1], masked_forward(ref_model[0], x))
        for xi in [x[0], x]:  # sparse path (1 token) and dense path (3 tokens)
            y = model(xi)
            assert torch.allclose(y, ref[0] if xi.dim() == 1 else ref, atol=1e-5)


def test_export_errors_without_sparsified_layers():
    with pytest.raises(ValueError, match=r"no sparsified layer.*2 nn\.Linear.*activation_threshold"):
        export_for_inference(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    model = export_for_inference(nn.Sequential(sparsified_linear(4, 4)))
    with pytest.raises(ValueError, match="1 layers are already exported"):
        export_for_inference(model)
    with pytest.raises(ValueError, match="itself"):
        export_for_inference(sparsified_linear(4, 4))


def test_export_shared_module_is_replaced_everywhere(torch_backend):
    shared = sparsified_linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    export_for_inference(model)
    assert isinstance(model[0], SparseInferenceLinear) and model[0] is model[2]


def test_export_of_core_sparsified_layers(torch_backend):
    modules = pytest.importorskip("pl_actsparse.core.layer")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    modules.install_sparsifier(model[0], 0.5)
    modules.install_sparsifier(model[2], 0.5)
    model[0].activation_threshold.fill_(0.4)  # calibrated
    model[0]._actsparse.mode = modules.SparsifierMode.SPARSIFYING
    model[2].activation_threshold.fill_(0.1)  # still pass-through: the core's forward ignores the buffer
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="1 sparsified layer.*not calibrated.*: 2"):
        export_for_inference(model, max_sparse_tokens=1)
    assert model[2].activation_threshold.item() == -math.inf
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)  # dense path
        assert torch.allclose(model(x[0]), ref[0], atol=1e-6)  # sparse path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_checkpoint_then_export_on_the_real_model(tmp_path, dtype):
    """stories260K, seed recipe: save the sparsified state dict, load it into a fresh model, export, and
    compare prefill (dense path) and KV-cache decode steps (sparse path) with the sparsified model."""
    from pl_actsparse import TargetScope, load_activation_sparsity, sparsify_activations
    from pl_actsparse.demos.llama2c import load_llama2c_checkpoint

    torch.manual_seed(0)
    model = load_llama2c_checkpoint(dtype=dtype)
    calib = [torch.randint(0, 512, (2, 64)) for _ in range(2)]
    recipe = {TargetScope(patterns=[".*up_proj", ".*gate_proj"]): 0.3, TargetScope(patterns=[".*down_proj"]): 0.5}
    sparsify_activations(model, calib, recipe, calibration={"progress": False})
    torch.save(model.state_dict(), tmp_path / "sparse.pt")

    fresh = load_llama2c_checkpoint(dtype=dtype)
    load_activation_sparsity(fresh, torch.load(tmp_path / "sparse.pt", weights_only=True))
    export_for_inference(fresh)
    assert len(exported_layers(fresh)) == 15

    ids = torch.randint(0, 512, (1, 12))
    tol = TOL[dtype] * 4  # logits after 5 blocks: rounding compounds in bf16
    with torch.inference_mode():
        ref_cache, got_cache = model.new_cache(1, 20), fresh.new_cache(1, 20)
        ref, got = model(ids, cache=ref_cache), fresh(ids, cache=got_cache)  # 12 tokens: dense path
        assert float((got.double() - ref.double()).abs().max() / ref.double().abs().max()) <= tol
        for pos in range(12, 16):  # one token at a time: the sparse kernel
            tok = ref[:, -1:].argmax(-1)
            ref, got = model(tok, cache=ref_cache, start_pos=pos), fresh(tok, cache=got_cache, start_pos=pos)
            assert float((got.double() - ref.double()).abs().max() / ref.double().abs().max()) <= tol


def test_ensure_ninja_on_path_finds_the_environments_ninja(monkeypatch, tmp_path):
    bindir = tmp_path / "venv-bin"
    bindir.mkdir()
    fake = bindir / "ninja"
    fake.write_text("#!/bin/sh\necho 1.11\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    from pl_actsparse.kernels import _extension

    monkeypatch.setattr(_extension.sys, "executable", str(bindir / "python"))
    cpu.ensure_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == str(bindir)
    cpu.ensure_ninja_on_path()  # already found: PATH unchanged
    assert os.environ["PATH"].count(str(bindir)) == 1


def test_cached_threshold_follows_buffer_changes(torch_backend):
    layer = SparseInferenceLinear.from_linear(sparsified_linear(8, 4, threshold=0.30001))
    assert layer._threshold_for(torch.bfloat16) == cpu.effective_threshold(torch.tensor(0.30001), torch.bfloat16)
    assert layer._threshold_for(torch.float32) == pytest.approx(0.30001)
    layer.activation_threshold.fill_(0.7)  # in place: the version counter changes
    assert layer._threshold_for(torch.float32) == pytest.approx(0.7)
    layer.load_state_dict({**layer.state_dict(), "activation_threshold": torch.tensor(0.9)})
    assert layer._threshold_for(torch.float32) == pytest.approx(0.9)


# --------------------------------------------------------------------------------------------------------
# The dense path and the measured crossover (kernels/dispatch.py; issue 13 item 9)
# --------------------------------------------------------------------------------------------------------

@pytest.fixture
def profile_cache(monkeypatch, tmp_path):
    """An empty profile cache folder and no profile in memory."""
    monkeypatch.setenv("PL_ACTSPARSE_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("PL_ACTSPARSE_MAX_SPARSE_TOKENS", raising=False)
    monkeypatch.delenv("PL_ACTSPARSE_DENSE_METHOD", raising=False)
    dispatch.clear_profile_memo()
    yield tmp_path
    dispatch.clear_profile_memo()


@pytest.mark.parametrize("method", dispatch.DENSE_METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_every_dense_method_equals_f_linear(profile_cache, monkeypatch, method, dtype, bias):
    monkeypatch.setenv("PL_ACTSPARSE_DENSE_METHOD", method)
    torch.manual_seed(0)
    w = torch.randn(70, 45).to(dtype)
    b = torch.randn(70).to(dtype) if bias else None
    wt = cpu.to_kernel_layout(w)
    for shape in [(45,), (9, 45), (2, 33, 45)]:
        x = torch.randn(*shape).to(dtype)
        expected = "linear" if dtype == torch.float32 else method
        assert dispatch.dense_method(dtype) == expected
        got = dispatch.dense_linear_t(x, wt, b)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        assert_close(got, ref, dtype)


def test_dense_path_reads_the_one_weight_copy(profile_cache, monkeypatch, torch_backend):
    """No second weight copy: the exported layer holds W^T (+ bias) only, and its dense path uses it."""
    monkeypatch.setenv("PL_ACTSPARSE_MAX_SPARSE_TOKENS", "2")
    model = nn.Sequential(sparsified_linear(64, 96, dtype=torch.bfloat16, threshold=0.3))
    ref_w, ref_b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    export_for_inference(model)
    layer = model[0]
    assert layer.weight is None
    assert sum(p.numel() for p in layer.parameters()) == 64 * 96 + 96
    x = torch.randn(4, 7, 64).to(torch.bfloat16)  # 28 tokens > 2: the dense path
    with mock.patch.object(SparseInferenceLinear, "sparse_forward", side_effect=AssertionError("sparse path")):
        y = layer(x)
    assert_close(y, reference(x, ref_w, ref_b, torch.tensor(0.3)), torch.bfloat16)


class FakeClock:
    """A timer driven by the work the (patched) candidates report: deterministic 'measurements'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_machine(monkeypatch, clock, dense_cost, sparse_cost, crossover_dense):
    """dense_cost: method -> seconds (dense-method choice at 64 tokens); sparse_cost / crossover_dense:
    tokens -> seconds of the sparse kernel / of the layer's dense path in the crossover search."""

    def dense_fn(name):
        def fn(x, wt, bias):
            clock.now += dense_cost[name] if x.shape[0] == 64 and wt.shape == (512, 1024) else crossover_dense(x.shape[0])
            return x.new_zeros(x.shape[0], wt.shape[1])
        return fn

    monkeypatch.setattr(dispatch, "_DENSE_FNS", {n: dense_fn(n) for n in dispatch.DENSE_METHODS})

    def sparse(x2, t, wt, bias):
        clock.now += sparse_cost(x2.shape[0])
        return x2.new_zeros(x2.shape[0], wt.shape[1])

    monkeypatch.setattr(cpu, "_sparse_linear_torch", sparse)


@pytest.mark.parametrize(
    "sparse_cost, expected",
    [
        (lambda t: 1.0 * t, 4),  # sparse 1, 2, 4 <= 6 < 8: crossover 4
        (lambda t: 0.1 * t, 32),  # 64 * 0.1 = 6.4 > 6: loses at 64
        (lambda t: 0.01, 64),  # wins everywhere
        (lambda t: 7.0, 1),  # loses at one token already: one token stays sparse (floor)
    ],
)
def test_crossover_measurement_is_the_largest_winning_token_count(monkeypatch, sparse_cost, expected):
    clock = FakeClock()
    _fake_machine(monkeypatch, clock, {"fp32_blocks": 10.0, "linear": 3.0, "matmul": 5.0}, sparse_cost, lambda t: 6.0)
    prof = dispatch.measure_cpu_profile(torch.bfloat16, "torch", rounds=2, timer=clock)
    assert prof.dense_method == "linear"  # the fastest of the three
    assert prof.dense_ms == {"fp32_blocks": 10000.0, "linear": 3000.0, "matmul": 5000.0}
    assert prof.max_sparse_tokens == expected
    assert prof.source == "measured" and prof.dtype == "bfloat16" and prof.backend == "torch"
    assert all(v == pytest.approx(6000.0) for v in prof.dense_by_tokens_ms.values())


def test_dense_method_choice_follows_the_machine(monkeypatch):
    """An AVX2 CPU (bf16 GEMM on W^T slow) picks fp32 blocks; a native-bf16 CPU picks the bf16 GEMM."""
    clock = FakeClock()
    _fake_machine(monkeypatch, clock, {"fp32_blocks": 2.0, "linear": 220.0, "matmul": 230.0}, lambda t: 1.0, lambda t: 6.0)
    assert dispatch.measure_cpu_profile(torch.bfloat16, "torch", rounds=2, timer=clock).dense_method == "fp32_blocks"
    _fake_machine(monkeypatch, clock, {"fp32_blocks": 76.0, "linear": 20.8, "matmul": 21.0}, lambda t: 1.0, lambda t: 6.0)
    assert dispatch.measure_cpu_profile(torch.bfloat16, "torch", rounds=2, timer=clock).dense_method == "linear"
    # fp32 never measures a dense method: F.linear on W^T is the same GEMM
    prof = dispatch.measure_cpu_profile(torch.float32, "torch", rounds=2, timer=clock)
    assert prof.dense_method == "linear" and prof.dense_ms == {}


def test_dense_method_is_measured_per_layer_shape(profile_cache, monkeypatch):
    """The reference shape picks one GEMM for the dtype; a layer's own shape, measured with its crossover at
    first use, gets its own (here "matmul" on 64x96 while the reference picked "linear"), which
    dense_linear_t then uses for that shape only."""
    clock, used = FakeClock(), []
    cost = {(512, 1024): {"fp32_blocks": 9.0, "linear": 3.0, "matmul": 5.0},
            (64, 96): {"fp32_blocks": 9.0, "linear": 4.0, "matmul": 2.0}}

    def dense_fn(name):
        def fn(x, wt, bias):
            clock.now += cost.get(tuple(wt.shape), cost[(512, 1024)])[name] if x.shape[0] == 64 else 6.0
            used.append((name, tuple(wt.shape)))
            return x.new_zeros(*x.shape[:-1], wt.shape[1])
        return fn

    monkeypatch.setattr(dispatch, "_DENSE_FNS", {n: dense_fn(n) for n in dispatch.DENSE_METHODS})
    real = dispatch.measure_cpu_profile
    monkeypatch.setattr(dispatch, "measure_cpu_profile", lambda *a, **kw: real(*a, **{**kw, "rounds": 2, "timer": clock}))
    assert dispatch.dense_method(torch.bfloat16) == "linear"
    wt = torch.randn(64, 96).to(torch.bfloat16)
    assert dispatch.sparse_token_crossover(torch.bfloat16, "torch", weight_t=wt) >= 1
    used.clear()
    dispatch.dense_linear_t(torch.randn(3, 64).to(torch.bfloat16), wt)
    dispatch.dense_linear_t(torch.randn(3, 512).to(torch.bfloat16), torch.randn(512, 1024).to(torch.bfloat16))
    assert used == [("matmul", (64, 96)), ("linear", (512, 1024))]


def test_profile_is_measured_once_cached_per_machine_and_overridable(profile_cache, monkeypatch):
    calls = []

    def fake_measure(dtype, backend, **kw):
        calls.append((dtype, backend))
        return dispatch.CpuProfile(dtype=str(dtype).replace("torch.", ""), backend=backend, dense_method="matmul",
                                   max_sparse_tokens=6, source="measured")

    monkeypatch.setattr(dispatch, "measure_cpu_profile", fake_measure)
    p = dispatch.cpu_profile(torch.bfloat16, "torch")
    assert (p.max_sparse_tokens, p.dense_method, p.source) == (6, "matmul", "measured") and len(calls) == 1
    assert dispatch.sparse_token_crossover(torch.bfloat16, "torch") == 6 and len(calls) == 1  # memory
    import json

    data = json.loads((profile_cache / dispatch.PROFILE_FILE).read_text())
    entry = data[dispatch.machine_key()]
    assert entry["profiles"]["torch/bfloat16"]["max_sparse_tokens"] == 6
    assert set(entry["isa"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    dispatch.clear_profile_memo()  # a new process: read from the file, not measured again
    p = dispatch.cpu_profile(torch.bfloat16, "torch")
    assert (p.max_sparse_tokens, p.source) == (6, "cache") and len(calls) == 1
    assert dispatch.cpu_profile(torch.bfloat16, "torch", refresh=True).source == "measured" and len(calls) == 2
    # a different machine (other flags or thread count) has its own entry
    monkeypatch.setattr(dispatch, "machine_key", lambda: "another-machine")
    dispatch.cpu_profile(torch.bfloat16, "torch")
    assert len(calls) == 3
    # user overrides
    assert dispatch.sparse_token_crossover(torch.bfloat16, "torch") == 6  # memoized now
    monkeypatch.setenv("PL_ACTSPARSE_MAX_SPARSE_TOKENS", "3")
    monkeypatch.setenv("PL_ACTSPARSE_DENSE_METHOD", "fp32_blocks")
    assert dispatch.sparse_token_crossover(torch.bfloat16, "torch") == 6  # memoized until cleared
    dispatch.clear_profile_memo()
    p = dispatch.cpu_profile(torch.bfloat16, "torch")
    assert (p.max_sparse_tokens, p.dense_method, p.source) == (3, "fp32_blocks", "override")
    assert dispatch.sparse_token_crossover(torch.bfloat16, "torch") == 3
    assert dispatch.dense_method(torch.bfloat16) == "fp32_blocks"
    layer = SparseInferenceLinear.from_linear(sparsified_linear(8, 16, dtype=torch.bfloat16))
    layer.backend = "cpp"  # (MIN_SPARSE_WEIGHT_BYTES is 0 for cpp)
    assert layer.sparse_token_limit(torch.bfloat16) == 3
    layer.max_sparse_tokens = 9  # per layer beats everything
    assert layer.sparse_token_limit(torch.bfloat16) == 9
    monkeypatch.setenv("PL_ACTSPARSE_MAX_SPARSE_TOKENS", "many")
    with pytest.raises(ValueError, match="PL_ACTSPARSE_MAX_SPARSE_TOKENS must be an integer"):
        dispatch.cpu_profile(torch.bfloat16, "torch")
    monkeypatch.setenv("PL_ACTSPARSE_MAX_SPARSE_TOKENS", "table")
    monkeypatch.setenv("PL_ACTSPARSE_DENSE_METHOD", "blas")
    with pytest.raises(ValueError, match="PL_ACTSPARSE_DENSE_METHOD must be one of"):
        dispatch.cpu_profile(torch.bfloat16, "torch")
    assert len(calls) == 3


def test_a_corrupt_profile_cache_is_measured_again(profile_cache, monkeypatch):
    (profile_cache / dispatch.PROFILE_FILE).write_text("{not json")
    monkeypatch.setattr(
        dispatch, "measure_cpu_profile",
        lambda dtype, backend, **kw: dispatch.CpuProfile(dtype="float32", backend=backend, dense_method="linear",
                                                         max_sparse_tokens=5, source="measured"),
    )
    assert dispatch.sparse_token_crossover(torch.float32, "torch") == 5


def test_isa_flags_and_machine_key(monkeypatch):
    flags = dispatch.cpu_isa_flags()
    assert {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "torch_capability"} <= set(flags)
    assert all(isinstance(v, bool) for k, v in flags.items() if k != "torch_capability")
    key = dispatch.machine_key()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(n + 1)
        assert dispatch.machine_key() != key  # the crossover depends on the thread count
    finally:
        torch.set_num_threads(n)


def test_real_profile_measurement_on_this_machine(profile_cache):
    """A real (tiny) measurement: valid fields, whatever the machine (no timing assertions)."""
    prof = dispatch.measure_cpu_profile(torch.bfloat16, "torch", shape=(128, 256), dense_shape=(64, 128),
                                        dense_tokens=8, token_counts=(1, 2, 4), rounds=1)
    assert prof.dense_method in dispatch.DENSE_METHODS and set(prof.dense_ms) == set(dispatch.DENSE_METHODS)
    assert 1 <= prof.max_sparse_tokens <= 4 and set(prof.sparse_ms) <= {1, 2, 4}
    assert all(v > 0 for v in prof.sparse_ms.values())


@pytest.mark.parametrize("method", dispatch.DENSE_METHODS)
def test_hf_llama_prefill_and_decode_match_after_export(monkeypatch, profile_cache, method):
    """A real third-party stack: a tiny transformers Llama in bf16, prefill (dense path with each GEMM) and
    one decode step (sparse kernel) of the exported model equal the sparsified model's."""
    from pl_actsparse import TargetScope, sparsify_activations
    from tiny_models import tiny_hf_llama

    monkeypatch.setenv("PL_ACTSPARSE_MAX_SPARSE_TOKENS", "2")
    monkeypatch.setenv("PL_ACTSPARSE_DENSE_METHOD", method)
    model = tiny_hf_llama(vocab=128, hidden=64, intermediate=172).to(torch.bfloat16)
    calib = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sparsify_activations(model, calib, {TargetScope(patterns=[r".*mlp\.(up|gate|down)_proj"]): 0.5}, calibration={"progress": False})
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref_prefill = model(ids).logits.double()
        ref_step = model(ids[:, :1]).logits.double()
        export_for_inference(model)
        assert sum(isinstance(m, SparseInferenceLinear) for m in model.modules()) == 6
        got_prefill = model(ids).logits.double()  # 9 tokens > 2: dense path
        got_step = model(ids[:, :1]).logits.double()  # 1 token: sparse kernel
    for got, ref in ((got_prefill, ref_prefill), (got_step, ref_step)):
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err <= 3e-2, err


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_one_pass_masking_zeroes_exactly_what_the_sparse_path_zeroes(dtype, backend):
    """The dense path masks in one pass (the C++ ``mask_small``, or hardshrink with the "torch" backend) at the
    threshold rounded to the dtype: over every value of the 16-bit dtypes (fp32: a sample and the specials) it
    zeroes exactly the elements with |x| <= t (compared in the dtype, as the kernels do); NaN is kept."""
    from pl_actsparse.kernels.cpu import zero_small

    if dtype == torch.float32:
        every = torch.cat([torch.randn(4096) * 10.0 ** torch.randint(-40, 39, (4096,)), torch.tensor(
            [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 0.1, -0.1, 0.3337, 3e38])])
    else:
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    cpu.set_backend(backend)
    try:
        for t in [0.0, 1e-30, 0.1, 0.3337, 1.0, 65504.0, 3e38, -1.0, math.inf, -math.inf]:
            thr = torch.tensor(t)
            got, want = zero_small(every, thr), every.masked_fill(every.abs() <= thr, 0)
            assert torch.equal(got.isnan(), want.isnan()), t
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), t
            assert got.data_ptr() != every.data_ptr() or t == -math.inf, t  # a new tensor
    finally:
        cpu.set_backend(None)
