"""The sparse-linear custom op and the helpers every backend shares.

:func:`sparse_linear` (``torch.ops.pl_actsparse.sparse_linear``) computes
``F.linear(x.masked_fill(|x| <= threshold, 0), weight_t.T, bias)`` reading only the rows of ``W^T`` that
belong to kept inputs. This module defines the op, its fake (meta) implementation and a default (masked
dense) implementation; each backend registers its own device kernel: :mod:`pl_actsparse.kernels.cpu`
("cpu") and :mod:`pl_actsparse.kernels.cuda` ("cuda"). Importing :mod:`pl_actsparse.kernels` registers both.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_kernel_args", "effective_threshold", "masked_linear", "sparse_linear", "to_kernel_layout"]


def to_kernel_layout(weight: Tensor) -> Tensor:
    """Return ``weight`` ([out, in]) in the layout the sparse kernels read: ``W^T``, contiguous [in, out].

    Rows of ``W^T`` are input features, so skipping a zero activation skips one contiguous row.
    """
    return weight.detach().t().contiguous()


def effective_threshold(threshold: Tensor | float, dtype: torch.dtype) -> float:
    """The threshold as the reference forward applies it to inputs of ``dtype`` (a Python float).

    ``x.abs() <= t`` with a 0-dim fp32 buffer ``t`` and a bf16/fp16 ``x`` compares in ``x.dtype`` (type
    promotion), i.e. against ``t`` rounded to that dtype; the kernels compare in fp32 against the same
    rounded value so that they zero exactly the same elements.
    """
    t = threshold if isinstance(threshold, Tensor) else torch.tensor(float(threshold))
    return float(t.detach().to(device="cpu", dtype=dtype).float().item())


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
    ``threshold`` a 0-dim tensor compared in ``x.dtype``. Meant for a few tokens; the work grows with the
    number of tokens (see :func:`pl_actsparse.kernels.dispatch.sparse_token_crossover`). Devices without a
    registered kernel compute the masked dense product.
    """
    if x.shape[-1] != weight_t.shape[0]:
        raise ValueError(f"sparse_linear: x has {x.shape[-1]} features, weight_t is {tuple(weight_t.shape)}")
    thr = threshold.to(x.device) if threshold.device != x.device else threshold
    return F.linear(x.masked_fill(x.abs() <= thr, 0), weight_t.t(), bias)


@sparse_linear.register_fake
def _sparse_linear_fake(x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    torch._check(x.shape[-1] == weight_t.shape[0])
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))
