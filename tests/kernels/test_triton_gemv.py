"""The Triton sparse GEMV (kernels/triton_gemv.py), run by Triton's CPU interpreter (TRITON_INTERPRET=1).

No GPU is needed: the interpreter executes the kernel body with numpy on CPU tensors, masked loads and fp32
atomics included. It runs in a subprocess because ``@triton.jit`` picks interpreter or compiler when the
module is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the Triton kernel is optional (pip install triton)")

SCRIPT = textwrap.dedent(
    """
    import math, torch, torch.nn.functional as F
    from pl_actsparse.kernels.cpu import effective_threshold
    from pl_actsparse.kernels.cuda import triton_sparse_linear, BLOCK_K, BLOCK_N

    torch.manual_seed(0)
    TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
    checked = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for in_f, out_f in ((64, 128), (100, 300), (3 * BLOCK_K + 5, BLOCK_N - 1)):
            wt = torch.randn(in_f, out_f).to(dtype).contiguous()
            bias = torch.randn(out_f).to(dtype)
            for lead in ((), (1,), (3,), (2, 2)):
                for b in (None, bias):
                    for thr in (0.0, 0.6, -math.inf):
                        x = torch.randn(*lead, in_f).to(dtype)
                        t = effective_threshold(torch.tensor(thr), dtype)
                        y = triton_sparse_linear(x, t, wt, b)
                        xm = x.masked_fill(x.abs() <= t, 0).double()
                        ref = F.linear(xm, wt.t().double(), None if b is None else b.double())
                        assert y.dtype == dtype and y.shape == ref.shape, (y.shape, ref.shape)
                        err = float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                        assert err <= TOL[dtype], (dtype, in_f, out_f, lead, b is None, thr, err)
                        checked += 1
    # NaN inputs are kept (the output becomes NaN), +inf zeroes every finite input
    wt = torch.randn(32, 16)
    x = torch.randn(32); x[3] = float("nan")
    assert torch.isnan(triton_sparse_linear(x, 0.5, wt)).all()
    assert torch.equal(triton_sparse_linear(torch.randn(32), math.inf, wt), torch.zeros(16))
    # rows that are zeroed are not read: poison them with NaN, the result stays finite and exact
    wt = torch.randn(40, 24)
    x = torch.randn(40)
    drop = x.abs() <= 0.5
    poisoned = wt.clone(); poisoned[drop] = float("nan")
    y = triton_sparse_linear(x, 0.5, poisoned)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, F.linear(x.masked_fill(drop, 0), wt.t()), atol=1e-5)
    # the CUDA entry point (what exported layers call on a GPU) runs the same kernel
    from pl_actsparse.kernels.cuda import sparse_linear_cuda, triton_error
    wt = torch.randn(48, 40).bfloat16()
    x = torch.randn(1, 48).bfloat16()
    thr = torch.tensor(0.3)  # fp32 buffer, rounded to bf16 as the reference forward compares
    ref = F.linear(x.masked_fill(x.abs() <= thr, 0).double(), wt.t().double())
    got = sparse_linear_cuda(x, thr, wt)
    assert triton_error() is None and float((got.double() - ref).abs().max() / ref.abs().max()) <= 1.6e-2
    print("OK", checked)
    """
)


def test_triton_kernel_matches_masked_dense_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.split() == ["OK", str(3 * 3 * 4 * 2 * 3)]


def test_triton_availability_is_reported():
    from pl_actsparse.kernels.cuda import triton_available

    assert triton_available()


def test_a_failing_kernel_falls_back_to_the_dense_product_once(monkeypatch):
    import math

    import torch
    import torch.nn.functional as F

    from pl_actsparse.kernels import cuda as triton_gemv

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no GPU to compile for")

    monkeypatch.setattr(triton_gemv, "triton_sparse_linear", broken)
    monkeypatch.setattr(triton_gemv, "_failure", None)
    wt, x = torch.randn(16, 8), torch.randn(2, 16)
    ref = F.linear(x.masked_fill(x.abs() <= 0.5, 0), wt.t())
    with pytest.warns(RuntimeWarning, match="Triton sparse GEMV failed .*no GPU to compile for"):
        y = triton_gemv.sparse_linear_cuda(x, torch.tensor(0.5), wt)
    assert torch.allclose(y, ref) and not triton_gemv.triton_available()
    assert "no GPU to compile for" in triton_gemv.triton_error()
    y = triton_gemv.sparse_linear_cuda(x, torch.tensor(-math.inf), wt)  # not retried, no second warning
    assert len(calls) == 1 and torch.allclose(y, x @ wt)


def test_the_custom_op_has_a_cuda_kernel():
    import torch

    import pl_actsparse.kernels.cpu  # noqa: F401  (registers the op)

    assert torch._C._dispatch_has_kernel_for_dispatch_key("pl_actsparse::sparse_linear", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pl_actsparse::sparse_linear", "CPU")
