"""The sparse-linear custom op and the helpers every backend shares.

:func:`sparse_linear` (``torch.ops.pl_actsparse.sparse_linear``) computes
``F.linear(x.masked_fill(|x| <= threshold, 0), weight_t.T, bias)`` reading only the rows of ``W^T`` that
belong to kept inputs. This module defines the op, its fake (meta) implementation and a default (masked
dense) implementation; each backend registers its own device kernel: :mod:`pl_actsparse.kernels.cpu`
("cpu") and :mod:`pl_actsparse.kernels.cuda` ("cuda"). Importing :mod:`pl_actsparse.kernels` registers both.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_kernel_args", "effective_threshold", "linear_t_fake", "masked_linear", "sparse_linear", "to_kernel_layout"]


def to_kernel_layout(weight: Tensor) -> Tensor:
    """Return ``weight`` ([out, in]) in the layout the sparse kernels read: ``W^T``, contiguous [in, out].

    Rows of ``W^T`` are input features, so skipping a zero activation skips one contiguous row.
    """
    return weight.detach().t().contiguous()


def effective_threshold(threshold: Tensor | float, dtype: torch.dtype) -> float | Tensor:
    """The threshold as the reference forward applies it to inputs of ``dtype``: what fp32 ``|x|`` is compared with.

    A 0-dim (or Python) threshold gives a Python float: ``x.abs() <= t`` with a 0-dim fp32 buffer ``t`` and a
    bf16/fp16 ``x`` compares in ``x.dtype`` (type promotion), i.e. against ``t`` rounded to that dtype. A per-channel
    threshold (1-D, ``[in_features]``) promotes ``x`` instead (fp32 for an fp32/bf16/fp16 ``t``, where ``t`` is
    exact): it gives ``t`` as an fp32 tensor, an fp64 ``t`` rounded down (the same answers for every fp32 ``|x|``;
    kept fp64 for fp64 inputs). The kernels compare in fp32 against this value, zeroing exactly the same elements.
    """
    t = threshold.detach() if isinstance(threshold, Tensor) else torch.tensor(float(threshold))
    if t.dim() == 0:
        return float(t.to(device="cpu", dtype=dtype).float().item())
    f = t.float().contiguous()
    if t.dtype != torch.float64 or dtype == torch.float64:
        return t.contiguous() if dtype == torch.float64 else f
    return torch.where(f.double() > t, f.nextafter(f.new_tensor(-math.inf)), f)


#: fp32 bytes of ``W^T`` converted per step by the blocked dense paths (well inside a typical L3).
FP32_BLOCK_BYTES = 8 << 20


def blocked_fp32_linear(x: Tensor, in_f: int, out_f: int, bias: Optional[Tensor], rows: Callable[[int, int], Tensor]) -> Tensor:
    """``x @ W^T + bias`` by fp32 ``addmm`` over blocks of ``W^T`` (``[in, out]``) of :data:`FP32_BLOCK_BYTES`: ``rows(i0, i1)``
    gives rows ``i0:i1`` in fp32, so no fp32 copy of the whole weight is made. ``x`` is ``[..., in]``; returns its dtype."""
    x2 = x.reshape(-1, in_f).float()
    acc = x2.new_zeros(x2.shape[0], out_f)
    if bias is not None:
        acc += bias.float()
    step = max(16, FP32_BLOCK_BYTES // (4 * max(out_f, 1)))
    for i0 in range(0, in_f, step):
        acc.addmm_(x2[:, i0 : i0 + step], rows(i0, min(in_f, i0 + step)))
    return acc.to(x.dtype).reshape(*x.shape[:-1], out_f)


def masked_linear(x: Tensor, threshold: Tensor | float, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Reference semantics: ``F.linear(x.masked_fill(|x| <= threshold, 0), weight, bias)`` (weight [out, in])."""
    return F.linear(x.masked_fill(x.abs() <= threshold, 0), weight, bias)


def check_kernel_args(kernel: str, x: Tensor, weight_t: Tensor) -> Tensor:
    """Validate ``x`` (``[..., in]``) against ``weight_t`` (``[in, out]``) for a sparse kernel.

    Returns ``weight_t`` contiguous. Raises ``ValueError`` (feature count) or ``TypeError`` (dtype mismatch),
    naming ``kernel``.
    """
    in_f = weight_t.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"{kernel}: x has {x.shape[-1]} features, weight_t is {tuple(weight_t.shape)}")
    if x.dtype != weight_t.dtype:
        raise TypeError(f"{kernel}: x is {x.dtype} but weight_t is {weight_t.dtype}")
    return weight_t if weight_t.is_contiguous() else weight_t.contiguous()


@torch.library.custom_op("pl_actsparse::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x.masked_fill(|x| <= threshold, 0), weight_t.T, bias)`` reading only the needed rows.

    ``x`` is ``[..., in]``, ``weight_t`` the kernel layout ``[in, out]`` (see :func:`to_kernel_layout`),
    ``threshold`` a 0-dim tensor compared in ``x.dtype`` or a per-channel ``[in]`` one (see
    :func:`effective_threshold`). Meant for a few tokens; the work grows with the
    number of tokens (see :func:`pl_actsparse.kernels.dispatch.sparse_token_crossover`). Devices without a
    registered kernel compute the masked dense product.
    """
    if x.shape[-1] != weight_t.shape[0]:
        raise ValueError(f"sparse_linear: x has {x.shape[-1]} features, weight_t is {tuple(weight_t.shape)}")
    thr = threshold.to(x.device) if threshold.device != x.device else threshold
    return F.linear(x.masked_fill(x.abs() <= thr, 0), weight_t.t(), bias)


def linear_t_fake(x: Tensor, threshold: Tensor, weight_t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The fake (meta) of each sparse-linear op (float, int8, exported layer): ``x [..., in] @ weight_t [in, out]``."""
    torch._check(x.shape[-1] == weight_t.shape[0])
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


sparse_linear.register_fake(linear_t_fake)
