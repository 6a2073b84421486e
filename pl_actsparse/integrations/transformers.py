"""transformers: GPT-2's ``Conv1D`` (``y = x @ weight + bias``, ``weight`` stored ``[in, out]``) is Linear-like."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

from torch import nn


def linear_like_types(pytorch_utils: ModuleType) -> list[tuple[type, dict[str, Callable[[nn.Module], Any]]]]:
    """``Conv1D`` of ``transformers.pytorch_utils`` with its accessors (``nx`` inputs, ``nf`` outputs)."""
    cls = getattr(pytorch_utils, "Conv1D", None)
    if not isinstance(cls, type):
        return []
    return [(cls, dict(in_features=lambda m: m.nx, out_features=lambda m: m.nf, weight_t=lambda m: m.weight))]
