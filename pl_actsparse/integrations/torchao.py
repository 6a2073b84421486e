"""torchao: weight-only int8 weights (``quantize_(model, Int8WeightOnlyConfig())``) read for the int8 kernel."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from pl_actsparse.errors import UnsupportedModuleError


def int8_weight(name: str, weight: Tensor) -> tuple[Tensor, Tensor, Tensor, torch.dtype, Callable[..., Tensor]]:
    """``(qdata [out, in] int8, scale [out], zero_point [out], float dtype, rebuild)`` of a torchao weight-only
    int8 weight, ``W = scale * (qdata - zero_point)`` per output channel. ``rebuild(qdata, scale, zero_point)``
    gives back a tensor of the same subclass, shape and strides (picklable: a partial of a module function).

    Raises :class:`~pl_actsparse.errors.UnsupportedModuleError` for any other tensor subclass (int4, float8,
    int8 with dynamic activation quantization, group-wise scales): the export has no kernel that computes
    what it computes, and dequantizing silently would change the model.
    """
    cls = type(weight)
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    ok = (
        cls.__module__.startswith("torchao")
        and isinstance(qdata, Tensor) and qdata.dtype == torch.int8 and qdata.dim() == 2
        and isinstance(scale, Tensor) and scale.numel() == qdata.shape[0]
        and list(getattr(weight, "block_size", [1, qdata.shape[1]])) == [1, qdata.shape[1]]
        and getattr(weight, "act_quant_kwargs", None) is None
    )
    if not ok:
        raise UnsupportedModuleError(
            f"export_for_inference: {name!r} has a {cls.__module__}.{cls.__qualname__} weight; the export reads "
            "plain float weights, pl-actsparse Int8WeightLinear layers and torchao weight-only int8 with one scale "
            "per output channel (quantize_(model, Int8WeightOnlyConfig())). Dequantize it or use one of these"
        )
    zp = getattr(weight, "zero_point", None)
    zp = torch.zeros_like(scale, dtype=torch.float32) if zp is None else zp
    names, meta = weight.__tensor_flatten__()
    inner = {n: (tuple(getattr(weight, n).shape), getattr(weight, n).dtype) for n in names}
    rebuild = functools.partial(_rebuild, cls, names, meta, inner, tuple(weight.shape), tuple(weight.stride()))
    return qdata, scale.reshape(-1), zp.reshape(-1), getattr(weight, "dtype", torch.float32), rebuild


def _rebuild(cls: type, names: list[str], meta: Any, inner: dict[str, tuple[tuple[int, ...], torch.dtype]],
             shape: tuple[int, ...], stride: tuple[int, ...], qdata: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    parts = {"qdata": qdata, "scale": scale, "zero_point": zero_point}
    tensors = {n: parts[n].reshape(inner[n][0]).to(inner[n][1]).contiguous() for n in names}
    return cls.__tensor_unflatten__(tensors, meta, torch.Size(shape), stride)
