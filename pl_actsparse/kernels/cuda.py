"""Sparse GEMV for CUDA in Triton (optional: needs ``triton``; never imported by the CPU paths).

The TEAL design: the weight is stored transposed (``W^T``, ``[in, out]``, the layout the CPU kernels use
too), each program owns a block of output columns and a slice of the input features, compares its inputs
with the threshold, and loads a row of ``W^T`` only where the input survives (a masked load: on a GPU the
dropped rows are never read from memory). Products accumulate in fp32; the slices of the input features
are summed with fp32 atomics, so a single token still fills the GPU.

This module registers the CUDA kernel of the custom op :func:`pl_actsparse.kernels.sparse_linear`; triton
itself is imported on the first call only.

Status: correctness is tested on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``,
``tests/kernels/test_triton_gemv.py``). It has **not** been compiled or timed on a GPU yet; the block sizes are
starting points, not tuned values. :class:`~pl_actsparse.export.linear.SparseInferenceLinear` uses it for
single-token calls on CUDA when ``triton`` imports; everything else takes the masked dense product.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from pl_actsparse.kernels.sparse_op import check_kernel_args, effective_threshold, masked_linear, sparse_linear

__all__ = ["CUDA_MAX_SPARSE_TOKENS", "sparse_linear_cuda", "triton_available", "triton_error", "triton_sparse_linear"]

BLOCK_N = 128  # output columns per program
BLOCK_K = 64  # input features per loop step
_TARGET_PROGRAMS = 512  # enough programs to fill a large GPU with one token

#: Token count up to which exported layers on CUDA use the Triton kernel by default (TEAL's kernel is for
#: batch-1 decoding; several tokens need the union of their rows, where a GEMM wins). Not measured here.
CUDA_MAX_SPARSE_TOKENS = 1

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_failure: Optional[str] = None


@functools.lru_cache(maxsize=None)
def _triton():
    """``(triton, kernel)``, imported on first use (CPU users never import triton); ``None`` without triton."""
    try:  # optional dependency
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return triton, _define_kernel(triton, tl)


def triton_available() -> bool:
    """Whether ``triton`` imports and the kernel has not failed in this process."""
    return _triton() is not None and _failure is None


def triton_error() -> Optional[str]:
    """Why the Triton kernel is not used (``None`` when it is available)."""
    if _triton() is None:
        return "triton is not installed"
    return _failure


def sparse_linear_cuda(
    x: Tensor, threshold: Tensor | float, weight_t: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """The CUDA implementation of ``pl_actsparse.kernels.sparse_linear``: the Triton kernel when it can run,
    else the masked dense product. A kernel that fails to compile or launch is not retried; the failure is
    reported once (``RuntimeWarning``) and by :func:`triton_error`.

    A float ``threshold`` must already be rounded to ``x.dtype`` (exported layers cache it, which saves a
    device sync per call); a tensor is rounded here. The Triton kernel takes one threshold: a per-channel one
    (``[in]``, or its :func:`effective_threshold` tensor) always takes the masked dense product."""
    global _failure
    t = threshold if isinstance(threshold, float) else effective_threshold(threshold, x.dtype)
    if isinstance(t, float) and triton_available() and x.dtype in _TRITON_DTYPES and x.dtype == weight_t.dtype:
        try:
            return triton_sparse_linear(x, t, weight_t, bias)
        except Exception as exc:  # compile or launch failure -> the dense product, once reported
            _failure = f"{type(exc).__name__}: {exc}"[:2000]
            warnings.warn(
                f"pl_actsparse: the Triton sparse GEMV failed ({_failure}); using the masked dense product",
                RuntimeWarning,
                stacklevel=2,
            )
    return masked_linear(x, t, weight_t.t(), bias)


sparse_linear.register_kernel("cuda")(sparse_linear_cuda)


def _define_kernel(triton, tl):
    @triton.jit
    def _sparse_gemv_kernel(
        x_ptr,
        wt_ptr,
        y_ptr,
        threshold,
        K,
        N,
        stride_xm,
        stride_wk,
        stride_ym,
        K_PER_PROGRAM,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        row = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        k_start = pid_k * K_PER_PROGRAM
        k_stop = tl.minimum(k_start + K_PER_PROGRAM, K)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_stop
            x = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            # The threshold arrives rounded to x's dtype, so comparing in fp32 is comparing in that dtype.
            # NaN is kept (a NaN is not <= threshold), as masked_fill(|x| <= t, 0) does.
            keep = k_ok & (~(tl.abs(x) <= threshold))
            w = tl.load(
                wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                mask=keep[:, None] & n_ok[None, :],
                other=0.0,
            )
            xk = tl.where(keep, x, 0.0)
            acc += tl.sum(xk[:, None] * w.to(tl.float32), axis=0)
        tl.atomic_add(y_ptr + row * stride_ym + offs_n, acc, mask=n_ok)

    return _sparse_gemv_kernel


def triton_sparse_linear(x: Tensor, threshold: float, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x.masked_fill(|x| <= threshold, 0), weight_t.T, bias)``, reading only the kept rows of ``W^T``.

    ``x`` is ``[..., in]`` (fp32, fp16 or bf16), ``weight_t`` contiguous ``[in, out]`` of the same dtype,
    ``threshold`` a float already rounded to ``x.dtype`` (see :func:`~pl_actsparse.kernels.effective_threshold`).
    Meant for one or a few tokens. Returns ``x.dtype``.
    """
    loaded = _triton()
    if loaded is None:
        raise RuntimeError("triton_sparse_linear needs the optional 'triton' package (pip install triton)")
    triton, kernel = loaded
    weight_t = check_kernel_args("triton_sparse_linear", x, weight_t)
    in_f, out_f = weight_t.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f).contiguous()
    m = x2.shape[0]
    y = torch.zeros(m, out_f, dtype=torch.float32, device=x.device)
    if m and in_f and out_f:
        n_blocks = triton.cdiv(out_f, BLOCK_N)
        split_k = max(1, min(triton.cdiv(in_f, BLOCK_K), _TARGET_PROGRAMS // max(1, n_blocks * m)))
        k_per_program = triton.cdiv(triton.cdiv(in_f, split_k), BLOCK_K) * BLOCK_K
        split_k = triton.cdiv(in_f, k_per_program)
        t = float(threshold)
        if math.isnan(t):
            raise ValueError("threshold is NaN")
        kernel[(n_blocks, split_k, m)](
            x2,
            weight_t,
            y,
            t,
            in_f,
            out_f,
            x2.stride(0),
            weight_t.stride(0),
            y.stride(0),
            k_per_program,
            BLOCK_K=BLOCK_K,
            BLOCK_N=BLOCK_N,
        )
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*lead, out_f)
