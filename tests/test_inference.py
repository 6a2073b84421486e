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
from pl_actsparse.export.linear import (
    SparseInferenceLinear,
    default_max_sparse_tokens,
    export_for_inference,
    exported_layers,
    is_sparsified_linear,
)
from pl_actsparse.kernels import cpu

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

    op = torch.ops.pl_actsparse.sparse_linear.default
    for backend in (recording_backend, "aot_eager"):
        compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)
        for shape in [(16,), (1, 2, 16), (5, 16)]:  # sparse, sparse, dense path
            x = torch.randn(*shape)
            with torch.no_grad():
                assert torch.allclose(compiled(x), layer(x), atol=1e-5)
        torch._dynamo.reset()
    assert [op in ops for ops in traced] == [True, True, False]  # one graph per shape, op in the sparse ones


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
    monkeypatch.setattr(cpu, "_ext_loaded", None)
    monkeypatch.setattr(cpu, "_ext_error", None)
    monkeypatch.setattr(cpu, "_ext_warned", False)
    monkeypatch.setenv("PL_ACTSPARSE_EXT_DIR", str(tmp_path))


def test_auto_falls_back_to_torch_when_the_build_fails(monkeypatch, fresh_extension_state):
    import torch.utils.cpp_extension as cpp_extension

    def failing_build(*args, **kwargs):
        raise RuntimeError("simulated compiler error")

    monkeypatch.setattr(cpp_extension, "load_inline", failing_build)
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


def test_default_crossover_comes_from_the_measured_table(monkeypatch, torch_backend):
    monkeypatch.setitem(cpu.DEFAULT_MAX_SPARSE_TOKENS, ("torch", torch.bfloat16), 5)
    monkeypatch.setitem(cpu.MIN_SPARSE_WEIGHT_BYTES, "torch", 8 * 16 * 2)  # fp32 (512 bytes) is big enough
    layer = SparseInferenceLinear.from_linear(sparsified_linear(8, 16))
    assert layer.backend == "torch" and layer.max_sparse_tokens is None
    assert layer.sparse_token_limit(torch.float32) == cpu.DEFAULT_MAX_SPARSE_TOKENS[("torch", None)]
    assert layer.sparse_token_limit(torch.bfloat16) == 5 == default_max_sparse_tokens(torch.bfloat16, "torch")
    monkeypatch.setitem(cpu.MIN_SPARSE_WEIGHT_BYTES, "torch", 8 * 16 * 4 + 1)  # now too small: always dense
    assert layer.sparse_token_limit(torch.float32) == 0
    with pytest.raises(ValueError, match="max_sparse_tokens"):
        SparseInferenceLinear.from_linear(sparsified_linear(8, 16), max_sparse_tokens=-1)


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


def test_export_keep_dense_weight_shares_and_serves_the_dense_path(torch_backend):
    lin = sparsified_linear(8, 16, threshold=0.2)
    w = lin.weight
    model = export_for_inference(nn.Sequential(lin), keep_dense_weight=True, max_sparse_tokens=1)
    layer = model[0]
    assert layer.weight.data_ptr() == w.data_ptr()  # the original tensor, not a copy
    with mock.patch.object(F, "linear", wraps=F.linear) as linear:
        layer(torch.randn(4, 8))
    assert linear.call_args.args[1] is layer.weight


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
    sparsify_activations(model, calib, recipe, progress=False)
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
    monkeypatch.setattr(cpu.sys, "executable", str(bindir / "python"))
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
