"""CPU sparse GEMV for activation-sparse decoding.

A decode step multiplies one token (or a handful) by every weight matrix, so on CPU it is bound by the
bytes of weight read, not by arithmetic. When a layer zeroes a fraction ``s`` of its inputs, the rows of
``W^T`` that belong to zeroed inputs never need to be read, so a GEMV that only streams the needed rows
can approach ``1 / (1 - s)``. That needs the weight stored as ``W^T`` (``[in, out]``, contiguous): each
needed input feature is then one contiguous row.

Two implementations sit behind one custom op, :func:`sparse_linear` (``torch.ops.pl_actsparse.sparse_linear``):

``"cpp"``
    A small C++ kernel (``kernels/csrc/sparse_gemv.cpp``, built once per environment, ahead of time with
    ``pl-actsparse build-kernels`` or on first use; see :mod:`pl_actsparse.kernels._extension`). Each thread owns a contiguous block of output columns and streams
    8 needed rows at a time, accumulating in fp32. Several tokens read the *union* of their rows once.
``"torch"``
    Pure PyTorch: ``F.embedding_bag`` over a view of ``W^T`` as ``[in * P, out / P]`` (``P`` bags per
    token so that ``P`` threads work), with the kept activations as ``per_sample_weights``.

``"auto"`` (the default) uses ``"cpp"`` when it can be built and loaded and ``"torch"`` otherwise (with
one warning). Choose with :func:`set_backend` or the ``PL_ACTSPARSE_CPU_KERNEL`` environment variable.
Measured figures and the method are in ``docs/inference.md``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pl_actsparse.kernels._extension import (
    ExtensionStatus, InlineExtension, KernelBackend, ensure_ninja_on_path, get_backend, set_backend,
)
from pl_actsparse.kernels.sparse_op import (
    check_kernel_args, effective_threshold, masked_linear, sparse_linear, to_kernel_layout,
)

__all__ = [
    "DEFAULT_MAX_SPARSE_TOKENS", "EXTENSION", "MIN_SPARSE_WEIGHT_BYTES", "ExtensionStatus", "KernelBackend",
    "effective_threshold", "ensure_ninja_on_path", "extension_status", "get_backend", "load_extension",
    "masked_linear", "resolve_backend", "set_backend", "sparse_linear", "sparse_linear_cpu", "to_kernel_layout",
    "zero_small",
]

log = logging.getLogger(__name__)

#: Largest number of tokens per call for which the sparse kernel beats the layer's dense path, keyed by
#: ``(backend, dtype)`` with ``(backend, None)`` as the fallback. Measured at s = 0.5 with
#: ``python benchmarks/decode.py --crossover`` on a 2-core AMD EPYC (AVX2, torch 2.13 with MKL); fp16 uses the
#: same kernels as bf16 and was not measured separately. See ``docs/inference.md``. The C++ kernel reads the
#: union of the tokens' rows once; ``embedding_bag`` reads them once per token. Machine-dependent (MKL's
#: small-batch GEMMs are slow on this CPU, which favours the sparse kernel): override with
#: ``max_sparse_tokens`` where it matters.
DEFAULT_MAX_SPARSE_TOKENS: dict[tuple[str, Optional[torch.dtype]], int] = {
    ("cpp", None): 8, ("cpp", torch.bfloat16): 16, ("cpp", torch.float16): 16,
    ("torch", None): 2, ("torch", torch.bfloat16): 8, ("torch", torch.float16): 8,
}

#: Per backend: layers with fewer weight bytes use the dense path by default. The C++ call's fixed cost is
#: below that of the dense path's masking ops (64x172 fp32, warm: 17 us vs 24 us), so it needs no minimum;
#: the ``embedding_bag`` path costs ~60 us more than the dense path per call, which at s = 0.5 only pays off
#: once half the weight takes that long to read (a few MiB).
MIN_SPARSE_WEIGHT_BYTES: dict[str, int] = {"cpp": 0, "torch": 4 << 20}


#: The float C++ kernel (``torch.ops.pl_actsparse_ext.sparse_gemv``).
EXTENSION = InlineExtension(
    "pl_actsparse_cpu_", "sparse_gemv.cpp", "pl_actsparse_ext", "sparse_gemv", description="C++ CPU sparse kernel",
    fallback_cost="decode runs at the pure-PyTorch embedding_bag kernel's speed (about 0.8-1.0x of dense bf16 "
    "instead of about 1.5x at 50% sparsity, docs/inference.md)",
)


#: Whether the C++ kernel is loaded (``error`` says why not; ``None`` if not tried yet), and loading it,
#: compiling it first if needed (20-60 s, once per environment; ``False`` instead of raising, the status has
#: the reason): :meth:`~pl_actsparse.kernels._extension.InlineExtension.status` and ``.load`` of EXTENSION.
extension_status = EXTENSION.status
load_extension = EXTENSION.load


def resolve_backend(build: bool = True) -> str:
    """The backend the next float-kernel call uses, ``"cpp"`` or ``"torch"``: :meth:`InlineExtension.resolve
    <pl_actsparse.kernels._extension.InlineExtension.resolve>` of :data:`EXTENSION` (``RuntimeError`` as there)."""
    return EXTENSION.resolve(build=build)


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch kernel
# --------------------------------------------------------------------------------------------------


_MIN_PARALLEL_BYTES = 1 << 19  # as kMinParallelBytes in the C++ kernel
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # others (fp64) take the torch path


def _num_bags(out_features: int, read_bytes: int) -> int:
    # embedding_bag parallelises over bags: one column block per thread, and the block count must divide
    # out_features so that W^T can be viewed (not copied) as [in * P, out / P]. Small products use one bag.
    if read_bytes < _MIN_PARALLEL_BYTES:
        return 1
    threads = max(1, torch.get_num_threads())
    for p in range(threads, 0, -1):
        if out_features % p == 0:
            return p
    return 1


@functools.lru_cache(maxsize=64)
def _bag_starts(p: int) -> Tensor:
    return torch.arange(p).unsqueeze(1)


def _sparse_linear_torch(x2: Tensor, t: float, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    ntok, in_f = x2.shape
    out_f = weight_t.shape[1]
    drop = x2.abs() <= t  # NaN is kept, as in masked_fill(|x| <= t)
    if ntok == 1:
        idx = drop[0].logical_not_().nonzero().squeeze(1)
        n = idx.numel()
        p = _num_bags(out_f, n * out_f * weight_t.element_size())
        vals = x2[0].index_select(0, idx)
        if p == 1:
            ind, offsets = idx, idx.new_zeros(1)
        else:
            ind = (idx * p + _bag_starts(p)).flatten()  # bag q reads rows i * p + q
            offsets = torch.arange(0, p * n, max(n, 1))
            vals = vals.repeat(p)
        table = weight_t.view(in_f * p, out_f // p)  # row i * p + q = W^T[i, q * cw:(q + 1) * cw]
        y = F.embedding_bag(ind, table, offsets, per_sample_weights=vals, mode="sum").view(1, out_f)
    else:
        tok, idx = drop.logical_not_().nonzero().unbind(1)
        n = idx.numel()
        p = _num_bags(out_f, n * out_f * weight_t.element_size())
        vals = x2[tok, idx]
        counts = torch.bincount(tok, minlength=ntok)
        starts = torch.cumsum(counts, 0) - counts
        ind = (idx * p + _bag_starts(p)).flatten()  # bags ordered (q, token)
        offsets = (_bag_starts(p) * n + starts).flatten()
        table = weight_t.view(in_f * p, out_f // p)
        y = F.embedding_bag(ind, table, offsets, per_sample_weights=vals.repeat(p), mode="sum")
        y = y.view(p, ntok, out_f // p).transpose(0, 1).reshape(ntok, out_f)
    if bias is not None:
        y = y + bias
    return y


def zero_small(x: Tensor, threshold: Tensor) -> Tensor:
    """``x.masked_fill(|x| <= threshold, 0)``: the same values, mask and gradient, in one pass where possible.

    On CPU, outside ``torch.compile`` and with nothing to differentiate, this is the C++ kernel's one-pass
    ``mask_small`` (fp32/bf16/fp16; a 0-dim threshold rounded to ``x.dtype`` as the reference compares, a
    per-channel ``[in]`` one compared in fp32: :func:`effective_threshold`); else, or with autograd recording,
    ``F.hardshrink(x, t)`` for one finite threshold: one fused pass instead of three (``abs``, compare,
    ``masked_fill``). The three passes cost as much as the 128-token bf16 prefill GEMM they feed, ``hardshrink`` up
    to a third of it (docs/inference.md). NaN stays NaN. Elsewhere (per-channel thresholds with autograd or the
    "torch" backend, other devices, inside ``torch.compile``) the plain expression is used.
    """
    if (x.device.type == "cpu" and x.is_floating_point() and threshold.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        scalar = threshold.dim() == 0
        if (x.dtype in _CPP_DTYPES and not (x.requires_grad and torch.is_grad_enabled())
                and EXTENSION.resolve_for_call() == "cpp"):
            return torch.ops.pl_actsparse_ext.mask_small(x, threshold if scalar else effective_threshold(threshold, x.dtype))
        t = effective_threshold(threshold, x.dtype) if scalar else None
        if t == -math.inf:
            return x
        if scalar and 0.0 <= t < math.inf:
            return F.hardshrink(x, t)
    return x.masked_fill(x.abs() <= threshold, 0)


# --------------------------------------------------------------------------------------------------
# The CPU kernel of the custom op
# --------------------------------------------------------------------------------------------------


def sparse_linear_cpu(x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The CPU implementation of :func:`sparse_linear`, callable without the custom-op wrappers.

    Eager callers save ~40 us per call this way (the custom op's Python dispatch layers); under
    ``torch.compile`` use :func:`sparse_linear` so that the call stays one opaque graph node.
    """
    weight_t = check_kernel_args("sparse_linear", x, weight_t)
    in_f, out_f = weight_t.shape
    if x.dtype in _CPP_DTYPES and EXTENSION.resolve_for_call() == "cpp":
        t = threshold if threshold.dim() == 0 else effective_threshold(threshold, x.dtype)
        return torch.ops.pl_actsparse_ext.sparse_gemv(x, t, weight_t, bias, 0)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    if x2.shape[0] == 0:
        return F.linear(x, weight_t.t(), bias)
    y = _sparse_linear_torch(x2, effective_threshold(threshold, x.dtype), weight_t, bias)
    return y.reshape(*lead, out_f)


sparse_linear.register_kernel("cpu")(sparse_linear_cpu)
