"""Per-channel thresholds (``activation_threshold`` of shape ``[in_features]``, as weight-aware sparsification
writes them) through the CPU kernels: ``sparse_gemv``, ``mask_small``, ``int8_sparse_gemv`` and their pure-PyTorch
fallbacks, against the reference ``x.masked_fill(x.abs() <= t, 0)``.

For a 1-D threshold torch's type promotion compares in fp32 (fp64 for an fp64 threshold) and does NOT round the
threshold to a bf16/fp16 ``x``'s dtype (a 0-dim one is rounded): the ties below sit exactly where the two differ.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from pl_actsparse.kernels import cpu, effective_threshold
from pl_actsparse.kernels import int8_cpu as k8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # as tests/export/test_inference.py


def _cpp_available() -> bool:
    return cpu.load_extension(build=os.environ.get("PL_ACTSPARSE_BUILD_EXT") == "1")


CPP = pytest.mark.skipif(not _cpp_available(), reason="C++ kernel not built (PL_ACTSPARSE_BUILD_EXT=1 builds it)")
BACKENDS = ["torch", pytest.param("cpp", marks=CPP)]


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    cpu.set_backend(None)


def tricky(x: torch.Tensor, tdtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A per-channel threshold for ``x`` ``[tokens, in]``: random values, the specials (NaN, -1, +-inf) and, on the
    first token's values, exact ties and the nearest ``tdtype`` values just below and above ``|x|`` (between two
    bf16/fp16 values: rounding the threshold to ``x``'s dtype would zero or keep the wrong element)."""
    in_f = x.shape[-1]
    t = torch.rand(in_f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(tdtype)
    t[:4] = torch.tensor([math.nan, -1.0, math.inf, -math.inf], dtype=tdtype)
    a = x[0].abs().to(tdtype)
    t[4::3] = a[4::3]  # equal: zeroed
    t[5::3] = a[5::3].nextafter(torch.zeros((), dtype=tdtype))[:t[5::3].numel()]  # just below: kept
    t[6::3] = a[6::3].nextafter(torch.full((), math.inf, dtype=tdtype))[:t[6::3].numel()]  # just above: zeroed
    return t


def reference_mask(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(x.abs() <= t, 0)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ntok", [1, 5])
def test_sparse_gemv_skips_exactly_the_reference_rows(backend, dtype, tdtype, ntok):
    """Through an identity weight the product is the masked input itself: every element must match exactly, NaN
    and inf inputs kept (a kept one spreads NaN over its token's row, as in F.linear), for one token and for the
    union of several, through the op and the direct CPU entry."""
    cpu.set_backend(backend)
    in_f = 61
    x = torch.randn(ntok, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    t = tricky(x, tdtype)
    eye = torch.eye(in_f, dtype=dtype)
    x[-1, 8], x[-1, 9], x[-1, 2] = math.nan, -math.inf, math.inf  # t[2] = +inf: |inf| <= inf zeroes it
    for xs in (x, x.nan_to_num(0.0, 0.0, 0.0)):
        want = F.linear(reference_mask(xs, t), eye)
        assert_same(cpu.sparse_linear(xs, t, cpu.to_kernel_layout(eye)), want)
        assert_same(cpu.sparse_linear_cpu(xs, t, cpu.to_kernel_layout(eye)), want)
    assert not reference_mask(x, t)[0].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 3)], ids=["1d", "1tok", "3tok", "3d"])
def test_sparse_gemv_matches_f_linear_of_the_masked_input(backend, dtype, bias, lead):
    cpu.set_backend(backend)
    g = torch.Generator().manual_seed(0)
    for in_f, out_f in [(37, 45), (256, 1024)]:  # tails; big enough for the threaded path
        w = torch.randn(out_f, in_f, generator=g).to(dtype)
        b = torch.randn(out_f, generator=g).to(dtype) if bias else None
        x = torch.randn(*lead, in_f, generator=g).to(dtype)
        t = torch.rand(in_f, generator=g) * 1.2
        t[:3] = torch.tensor([math.nan, math.inf, -math.inf])
        y = cpu.sparse_linear(x, t, cpu.to_kernel_layout(w), b)
        ref = F.linear(reference_mask(x, t).double(), w.double(), None if b is None else b.double())
        assert y.dtype == dtype and y.shape == ref.shape
        assert float((y.double() - ref).abs().max() / ref.abs().max()) <= TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mask_small_per_channel_over_every_16_bit_value(backend, dtype):
    """``zero_small`` (the C++ ``mask_small``, or the plain expression with the "torch" backend) with a per-channel
    threshold zeroes exactly what the reference zeroes, for every bf16/fp16 bit pattern in every column."""
    cpu.set_backend(backend)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 64)
    t = torch.cat([torch.tensor([0.0, 1e-30, 0.1, 0.3337, 1.0, 65504.0, 65520.0, 3e38, -1.0, math.inf, -math.inf, math.nan]),
                   torch.rand(52, generator=torch.Generator().manual_seed(3)) * 4.0])
    t[12:] = t[12:].to(dtype).float().nextafter(torch.tensor(0.0))  # just below a value of x's dtype
    for thr in (t, t.double(), t.to(dtype)):
        assert_same(cpu.zero_small(every, thr), reference_mask(every, thr))
    x = torch.randn(7, 64, dtype=torch.float32)
    assert_same(cpu.zero_small(x, t.double().nextafter(torch.tensor(math.inf, dtype=torch.float64))), reference_mask(x, t.double().nextafter(torch.tensor(math.inf, dtype=torch.float64))))
    with torch.enable_grad():  # autograd recording: the plain expression, gradient masked
        xg = x.clone().requires_grad_()
        cpu.zero_small(xg, t).sum().backward()
        assert torch.equal(xg.grad, (~(x.abs() <= t)).float())


def test_kernels_reject_a_threshold_of_another_length():
    if not cpu.load_extension(build=True):
        pytest.skip(f"C++ kernel unavailable: {cpu.extension_status().error}")
    wt = torch.randn(5, 6)
    with pytest.raises(RuntimeError, match=r"threshold must hold 1 or 5 \(in_features\) values, got shape \[3\]"):
        torch.ops.pl_actsparse_ext.sparse_gemv(torch.randn(2, 5), torch.zeros(3), wt, None, 0)
    with pytest.raises(RuntimeError, match="1-D threshold must be a contiguous fp32 CPU tensor"):
        torch.ops.pl_actsparse_ext.mask_small(torch.randn(2, 5), torch.zeros(5, dtype=torch.float64))


def test_effective_threshold_of_a_per_channel_threshold():
    t = torch.tensor([0.1, 1.005, 3e39, math.nan, -math.inf], dtype=torch.float64)
    e = effective_threshold(t, torch.bfloat16)  # x.abs() <= t compares in fp64: the largest fp32 <= t, same answers
    assert e.dtype == torch.float32 and e.shape == (5,)
    up, fin = e.nextafter(torch.tensor(math.inf)).double(), t.isfinite()
    assert bool((e.double()[fin] <= t[fin]).all()) and bool((up[fin] > t[fin]).all())
    assert bool(e[3].isnan()) and float(e[4]) == -math.inf
    assert effective_threshold(t, torch.float64).dtype == torch.float64  # fp64 inputs compare in fp64 as they are
    f = torch.tensor([0.3, 0.7])
    assert effective_threshold(f, torch.bfloat16).data_ptr() == f.data_ptr()  # fp32: no copy per call
    assert isinstance(effective_threshold(torch.tensor(0.3), torch.bfloat16), float)  # 0-dim: as before


@pytest.mark.parametrize("mode", ["asym", "sym"])
@pytest.mark.parametrize("gran", ["output", "input"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ntok", [1, 3])
def test_int8_kernel_per_channel(int8_backend, mode, gran, dtype, ntok):
    g = torch.Generator().manual_seed(2)
    in_f, out_f = 61, 45
    q, scale, zp = k8.quantize_weight_t(torch.randn(out_f, in_f, generator=g), mode, gran)
    bias = torch.randn(out_f, generator=g)
    x = torch.randn(ntok, in_f, generator=g).to(dtype)
    t = tricky(x, torch.float32)
    y = k8.int8_sparse_linear(x, t, q, scale, zp, bias)
    ref = k8.int8_masked_linear(x, t, q, scale, zp, bias)
    torch.testing.assert_close(y.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * float(ref.abs().max()))
    # the rows skipped are the reference's: through an identity the zero pattern is the masked input's
    qe, se, ze = k8.quantize_weight_t(torch.eye(in_f), "sym", gran)  # sym: exact zeros off the diagonal
    assert torch.equal(k8.int8_sparse_linear(x, t, qe, se, ze) == 0, reference_mask(x, t) == 0)


def test_cuda_entry_takes_the_masked_dense_product_for_a_per_channel_threshold(monkeypatch):
    """The Triton GEMV takes one threshold: a per-channel one goes to the masked dense product (run here on CPU
    tensors, the entry point does not look at the device), never to the kernel."""
    from pl_actsparse.kernels import cuda

    monkeypatch.setattr(cuda, "triton_available", lambda: True)
    monkeypatch.setattr(cuda, "triton_sparse_linear", lambda *a: pytest.fail("Triton kernel called"))
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(4)).bfloat16()
    t, wt = tricky(x, torch.float32), torch.randn(16, 8).bfloat16()
    assert_same(cuda.sparse_linear_cuda(x, t, wt), F.linear(reference_mask(x, t), wt.t()))
    assert_same(cuda.sparse_linear_cuda(x, effective_threshold(t, x.dtype), wt), F.linear(reference_mask(x, t), wt.t()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_a_per_channel_threshold(backend):
    """The custom ops' schemas, fake implementations and AOT dispatch hold with a ``[in]`` threshold too."""
    cpu.set_backend(backend)
    g = torch.Generator().manual_seed(0)
    wt = cpu.to_kernel_layout(torch.randn(24, 16, generator=g))
    q, scale, zp = k8.quantize_weight_t(torch.randn(24, 16, generator=g))
    for x in (torch.randn(16, generator=g), torch.randn(2, 3, 16, generator=g)):
        t = torch.rand(16, generator=g)
        utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
        torch.library.opcheck(torch.ops.pl_actsparse.sparse_linear.default, (x, t, wt, None), test_utils=utils)
        torch.library.opcheck(torch.ops.pl_actsparse.int8_sparse_linear.default, (x, t, q, scale, zp, None, None),
                              test_utils=utils)
