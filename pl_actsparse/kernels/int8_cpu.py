"""Weight-only INT8 kernels for activation-sparse decoding on CPU.

Layout: the quantized weight is stored as ``W^T`` (``[in, out]``, contiguous, ``int8``), the layout of
:mod:`pl_actsparse.kernels.cpu`, so that skipping a zeroed input skips one contiguous row. Scales come in two
granularities, both free for the sparse kernel:

``"output"`` (per output channel, the usual weight-only INT8, as NNCF's ``compress_weights``)
    ``scale`` and ``zero_point`` have shape ``[1, out]``; ``W^T[i, j] = scale[j] * (q[i, j] - zp[j])``.
    The kernel accumulates ``acc[j] = sum_i x_i q[i, j]`` over the kept rows and applies
    ``y[j] = scale[j] * (acc[j] - zp[j] * sum_i x_i)`` once per output.
``"input"`` (per row of ``W^T``, i.e. per input channel)
    ``scale`` and ``zero_point`` have shape ``[in, 1]``; ``W^T[i, j] = scale[i] * (q[i, j] - zp[i])``.
    The kernel folds ``scale[i]`` into ``x_i`` and subtracts ``sum_i x_i scale[i] zp[i]`` once.

``zero_point`` is ``None`` or all zeros for symmetric quantization.

One custom op, :func:`int8_sparse_linear` (``torch.ops.pl_actsparse.int8_sparse_linear``), computes
``F.linear(x.masked_fill(|x| <= threshold, 0), dequantize(W^T).T, bias)`` reading only the int8 rows of the
kept inputs and dequantizing on the fly (fp32 accumulation). Two implementations, chosen like the float
kernel's (:func:`pl_actsparse.kernels.cpu.set_backend`, ``PL_ACTSPARSE_CPU_KERNEL``):

``"cpp"``
    A small C++ kernel (``kernels/csrc/int8_sparse_gemv.cpp``, built once per environment like the float
    kernel: :mod:`pl_actsparse.kernels._extension`). Each thread owns a block of output columns and streams
    8 kept int8 rows at a time (AVX2: int8 -> int32 -> fp32 widen + FMA), for one token prefetching 512 bytes
    ahead in the stream of kept rows (``docs/int8.md``).
``"torch"``
    Pure PyTorch fallback: ``index_select`` of the kept int8 rows, converted to fp32 in blocks, then a
    matmul. Correct, but slower than a dense bf16 ``F.linear`` (measured in ``docs/int8.md``).

:func:`int8_dense_linear` is the dense path (prefill, many tokens): it dequantizes ``W^T`` a block of rows
at a time and uses an fp32 GEMM.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pl_actsparse.kernels._extension import InlineExtension
from pl_actsparse.kernels.cpu import zero_small
from pl_actsparse.kernels.sparse_op import FP32_BLOCK_BYTES, blocked_fp32_linear, effective_threshold, linear_t_fake

__all__ = [
    "Granularity",
    "QuantMode",
    "INT8_EXTENSION",
    "dequantize_weight_t",
    "int8_dense_linear",
    "int8_kernel_args",
    "int8_extension_status",
    "int8_masked_linear",
    "int8_sparse_linear",
    "load_int8_extension",
    "quantize_weight_t",
    "resolve_int8_backend",
    "scale_granularity",
]

log = logging.getLogger(__name__)

QuantMode = Literal["asym", "sym"]
Granularity = Literal["output", "input"]


# --------------------------------------------------------------------------------------------------
# Quantization in the kernel layout
# --------------------------------------------------------------------------------------------------


def check_quant_options(mode: Any, granularity: Any, error: type[ValueError] = ValueError) -> None:
    """The one check of ``mode`` and ``granularity``; raises ``error`` naming the bad one."""
    if mode not in ("asym", "sym"):
        raise error(f"mode must be 'asym' or 'sym', got {mode!r}")
    if granularity not in ("output", "input"):
        raise error(f"granularity must be 'output' or 'input', got {granularity!r}")


def quantize_weight_t(
    weight: Tensor, mode: QuantMode = "asym", granularity: Granularity = "output"
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Quantize a float ``weight`` (``[out, in]``, as in ``nn.Linear``) to int8 in the kernel layout.

    Returns ``(qweight_t, scale, zero_point)``: ``qweight_t`` int8 ``[in, out]`` contiguous; ``scale``
    fp32 ``[1, out]`` (``granularity="output"``) or ``[in, 1]`` (``"input"``); ``zero_point`` fp32 of the
    same shape holding integers in ``[-128, 127]`` (``mode="asym"``) or ``None`` (``"sym"``).

    ``asym``: the range ``[min(w, 0), max(w, 0)]`` maps onto ``[-128, 127]`` (zero is exact).
    ``sym``: ``scale = max|w| / 127``, codes in ``[-127, 127]``.

    Degenerate channels, whose scale would not be a normal fp32 number (all zeros, or only values below
    about ``127 * 1.2e-38``, i.e. zeros and denormals), quantize to exact zeros with ``scale = 1`` and
    ``zero_point = 0`` in every mode, so that they add nothing to the kernel's sums (a zero point of -128
    would make the kernel add and subtract ``128 * x`` for them).

    Raises ``ValueError`` for an unknown ``mode``/``granularity``, a weight that is not 2-D, or NaN/inf values.
    """
    check_quant_options(mode, granularity)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    wt = weight.detach().float().t().clone(memory_format=torch.contiguous_format)  # [in, out], our own copy
    if not bool(torch.isfinite(wt).all()):
        raise ValueError("cannot quantize a weight with NaN or infinite values")
    dim = 0 if granularity == "output" else 1
    tiny = torch.finfo(torch.float32).tiny
    # in-place on the copy: a 1B-parameter model would otherwise allocate (and page-fault) ~10 fp32 copies
    if mode == "sym":
        scale = wt.abs().amax(dim=dim, keepdim=True) / 127.0
    else:
        lo = wt.amin(dim=dim, keepdim=True).clamp(max=0)
        scale = (wt.amax(dim=dim, keepdim=True).clamp(min=0) - lo) / 255.0
    degenerate = scale < tiny
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    if mode == "sym":
        q = wt.div_(scale).round_().clamp_(-127, 127).masked_fill_(degenerate, 0)
        zp = None
    else:
        zp = torch.round(-128.0 - lo / scale).clamp_(-128, 127).masked_fill_(degenerate, 0)
        q = wt.div_(scale).round_().add_(zp).clamp_(-128, 127).masked_fill_(degenerate, 0)
    return q.to(torch.int8).contiguous(), scale.contiguous(), zp.contiguous() if zp is not None else None


def dequantize_weight_t(
    qweight_t: Tensor, scale: Tensor, zero_point: Optional[Tensor], dtype: torch.dtype = torch.float32
) -> Tensor:
    """``W^T`` (``[in, out]``) from its int8 codes: ``scale * (q - zero_point)``, computed in fp32."""
    w = qweight_t.to(torch.float32)  # a new tensor: update it in place
    if zero_point is not None:
        w.sub_(zero_point.float())
    return w.mul_(scale.float()).to(dtype)


def scale_granularity(qweight_t: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None) -> str:
    """``"output"`` (``scale`` is ``[1, out]``) or ``"input"`` (``[in, 1]``) for int8 codes ``[in, out]``.

    A ``1x1`` layer's single scale reads as ``"output"`` (both readings give the same product). Raises
    ``ValueError`` for codes that are not a 2-D int8 tensor or scales/zero points of any other shape.
    """
    if qweight_t.dtype != torch.int8 or qweight_t.dim() != 2:
        raise ValueError(f"qweight_t must be a 2-D int8 tensor [in, out], got {qweight_t.dtype} {tuple(qweight_t.shape)}")
    in_f, out_f = qweight_t.shape
    if tuple(scale.shape) == (1, out_f):
        gran = "output"
    elif tuple(scale.shape) == (in_f, 1):
        gran = "input"
    else:
        raise ValueError(f"scale must have shape [1, {out_f}] or [{in_f}, 1], got {tuple(scale.shape)}")
    if zero_point is not None and zero_point.shape != scale.shape:
        raise ValueError(f"zero_point must have the shape of scale {tuple(scale.shape)}, got {tuple(zero_point.shape)}")
    return gran


def int8_kernel_args(
    qweight_t: Tensor, scale: Tensor, zero_point: Optional[Tensor], bias: Optional[Tensor]
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The C++ kernel's ``(row_scale, row_zero, col_scale, col_zero, bias)`` for one int8 layer.

    Contiguous fp32 vectors: ``row_*`` of ``in`` elements for ``granularity="input"``, ``col_*`` of ``out``
    elements for ``"output"`` (the other pair ``None``), ``bias`` of ``out``; ``zero_point=None`` means
    symmetric. The one place that maps a layout to the kernel's arguments (:func:`int8_sparse_linear`,
    :func:`int8_sparse_gemv_direct` callers). Raises ``ValueError`` as :func:`scale_granularity`.
    """
    gran = scale_granularity(qweight_t, scale, zero_point)
    s = scale.reshape(-1).float().contiguous()
    z = None if zero_point is None else zero_point.reshape(-1).float().contiguous()
    b = None if bias is None else bias.reshape(-1).float().contiguous()
    if gran == "input":
        return s, z, None, None, b
    return None, None, s, z, b


def int8_masked_linear(
    x: Tensor,
    threshold: Tensor | float,
    qweight_t: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Reference semantics: dequantize, then ``F.linear(x.masked_fill(|x| <= threshold, 0), W, bias)`` in fp32."""
    w = dequantize_weight_t(qweight_t, scale, zero_point).t()
    xm = x.float().masked_fill(x.abs() <= threshold, 0)
    return F.linear(xm, w, None if bias is None else bias.float()).to(x.dtype)


def int8_dense_linear(
    x: Tensor, qweight_t: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, bias: Optional[Tensor] = None
) -> Tensor:
    """``F.linear(x, dequantize(W^T).T, bias)`` through an fp32 GEMM, dequantizing a block of rows at a time.

    The dense path for prefill; the output has ``x``'s dtype.
    """
    per_row = scale_granularity(qweight_t, scale, zero_point) == "input"  # checks the shapes first

    def rows(i0: int, i1: int) -> Tensor:
        z = None if zero_point is None else (zero_point[i0:i1] if per_row else zero_point)
        return dequantize_weight_t(qweight_t[i0:i1], scale[i0:i1] if per_row else scale, z)

    return blocked_fp32_linear(x, *qweight_t.shape, bias, rows)


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch sparse fallback
# --------------------------------------------------------------------------------------------------


def _int8_sparse_torch(
    x2: Tensor, t: float, qweight_t: Tensor, scale: Tensor, zero_point: Optional[Tensor], bias: Optional[Tensor], gran: str
) -> Tensor:
    in_f, out_f = qweight_t.shape
    xf = x2.float()
    keep = ~(xf.abs() <= t)  # NaN is kept, as masked_fill(|x| <= t) keeps it
    idx = keep.any(0).nonzero().squeeze(1)  # union of the tokens' rows
    v = (xf * keep)[:, idx]  # [ntok, nr]
    if gran == "input":
        v = v * scale.view(-1)[idx].float()
    acc = xf.new_zeros(xf.shape[0], out_f)
    step = max(16, FP32_BLOCK_BYTES // (4 * max(out_f, 1)))
    for k0 in range(0, idx.numel(), step):
        rows = qweight_t.index_select(0, idx[k0 : k0 + step]).float()
        acc.addmm_(v[:, k0 : k0 + step], rows)
    if gran == "input":
        if zero_point is not None:
            acc -= (v * zero_point.view(-1)[idx].float()).sum(1, keepdim=True)
    else:
        if zero_point is not None:
            acc -= v.sum(1, keepdim=True) * zero_point.view(1, -1).float()
        acc *= scale.view(1, -1).float()
    if bias is not None:
        acc += bias.float()
    return acc


# --------------------------------------------------------------------------------------------------
# The custom op
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pl_actsparse::int8_sparse_linear", mutates_args=())
def int8_sparse_linear(
    x: Tensor,
    threshold: Tensor,
    qweight_t: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    max_sparse_tokens: Optional[int] = None,
) -> Tensor:
    """``F.linear(x.masked_fill(|x| <= threshold, 0), dequantize(qweight_t).T, bias)`` reading only kept rows.

    With ``max_sparse_tokens`` set, calls with more tokens take :func:`int8_dense_linear` on the masked input
    instead (the choice made at run time: under ``torch.compile``/``torch.export`` the exported int8 layer is
    this one op). Differentiable with respect to ``x`` (zero gradient where ``x`` was zeroed).

    ``x`` is ``[..., in]`` (fp32, bf16 or fp16), ``qweight_t`` int8 ``[in, out]`` with ``scale`` /
    ``zero_point`` as returned by :func:`quantize_weight_t`; ``threshold`` a 0-dim tensor (``-inf`` keeps
    every row: a dense int8 GEMV) or a per-channel ``[in]`` one. Accumulates in fp32 and returns ``x``'s dtype.
    Several tokens read the union of their rows once. The threshold is compared as the reference forward
    compares ``|x| <= t`` (:func:`~pl_actsparse.kernels.effective_threshold`: a 0-dim one rounded to ``x``'s dtype).
    """
    gran = scale_granularity(qweight_t, scale, zero_point)
    in_f, out_f = qweight_t.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, qweight_t has {in_f} rows")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    if max_sparse_tokens is not None and x2.shape[0] > max_sparse_tokens:
        return int8_dense_linear(zero_small(x, threshold), qweight_t, scale, zero_point, bias)
    t = effective_threshold(threshold, x.dtype)
    if x.device.type == "cpu" and INT8_EXTENSION.resolve_for_call() == "cpp":
        args = int8_kernel_args(qweight_t, scale, zero_point, bias)
        y = int8_sparse_gemv_direct(x2.contiguous(), t, qweight_t.contiguous(), *args)
    else:  # the pure-PyTorch path, also on other devices
        y = _int8_sparse_torch(x2, t, qweight_t, scale, zero_point, bias, gran)
    return y.to(x.dtype).reshape(*lead, out_f)


def int8_sparse_gemv_direct(
    x2: Tensor,
    t: float | Tensor,
    qweight_t: Tensor,
    row_scale: Optional[Tensor],
    row_zero: Optional[Tensor],
    col_scale: Optional[Tensor],
    col_zero: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """The C++ kernel without the custom op's checks and conversions (for modules that prepared them).

    ``x2`` is ``[tokens, in]`` on the CPU, ``t`` the threshold as :func:`pl_actsparse.kernels.effective_threshold`
    gives it (a float rounded to ``x2``'s dtype, or a contiguous fp32 tensor of ``in`` per-channel values), the
    optional vectors contiguous fp32 with ``row_*`` of ``in`` and ``col_*``/``bias`` of ``out`` elements. Returns
    fp32 ``[tokens, out]``. Requires :func:`load_int8_extension` to have returned ``True``.
    """
    vec = isinstance(t, Tensor)
    return torch.ops.pl_actsparse_int8_ext.int8_sparse_gemv(
        x2, 0.0 if vec else t, qweight_t, row_scale, row_zero, col_scale, col_zero, bias, t if vec else None
    )


int8_sparse_linear.register_fake(linear_t_fake)


def _int8_setup_context(ctx, inputs, output) -> None:
    x, threshold, qweight_t, scale, zero_point = inputs[:5]
    ctx.save_for_backward(x, threshold, qweight_t, scale, zero_point)


def _int8_backward(ctx, grad: Tensor):
    x, threshold, qweight_t, scale, zero_point = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:  # grad @ dequantize(W^T)^T: the dense path on the transposed codes and scales
        zt = None if zero_point is None else zero_point.t()
        grad_x = int8_dense_linear(grad, qweight_t.t(), scale.t(), zt).masked_fill(x.abs() <= threshold, 0)
    return grad_x, None, None, None, None, None, None


int8_sparse_linear.register_autograd(_int8_backward, setup_context=_int8_setup_context)


# --------------------------------------------------------------------------------------------------
# The optional C++ extension (built like the float kernel's: one InlineExtension each)
# --------------------------------------------------------------------------------------------------

#: The int8 C++ kernel (``torch.ops.pl_actsparse_int8_ext.int8_sparse_gemv``).
INT8_EXTENSION = InlineExtension(
    "pl_actsparse_int8_", "int8_sparse_gemv.cpp", "pl_actsparse_int8_ext", "int8_sparse_gemv",
    description="int8 C++ CPU kernel", fallback_cost="int8 decode runs at the pure-PyTorch fallback's speed "
    "(index_select + fp32 GEMM, slower than a dense bf16 F.linear, docs/int8.md)",
)


#: Whether the int8 C++ kernel is loaded, and loading it (compiled once per environment; ``False`` instead of
#: raising), as :data:`pl_actsparse.kernels.cpu.extension_status` and ``load_extension`` for the float kernel.
int8_extension_status = INT8_EXTENSION.status
load_int8_extension = INT8_EXTENSION.load


def resolve_int8_backend(build: bool = True) -> str:
    """The implementation the next int8 call uses, ``"cpp"`` or ``"torch"``: :meth:`InlineExtension.resolve
    <pl_actsparse.kernels._extension.InlineExtension.resolve>` of :data:`INT8_EXTENSION` (``RuntimeError`` as there)."""
    return INT8_EXTENSION.resolve(build=build)
