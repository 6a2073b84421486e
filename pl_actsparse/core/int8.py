"""Weight-only INT8 for ``nn.Linear`` layers, composable with activation sparsity.

:func:`quantize_weights_int8` turns matched ``nn.Linear`` layers into :class:`Int8WeightLinear` *in place*
(the module object, its name, its bias Parameter and, for a sparsified layer, its threshold are kept; the
float ``weight`` Parameter is replaced by int8 buffers). An :class:`Int8WeightLinear` is still an
``nn.Linear``: it dequantizes in ``forward``, so sparsification, calibration, reports, removal and
checkpoints work on it as on a float layer, before or after quantization.

The int8 codes are stored as ``W^T`` (``[in, out]``), the layout the sparse decode kernel reads
(:mod:`pl_actsparse.kernels.int8_cpu`), with a scale and zero point per output channel (default) or per input
channel. :func:`pl_actsparse.export.convert.export_for_inference` swaps them for
:class:`~pl_actsparse.export.int8_linear.Int8SparseInferenceLinear`, which runs the int8 sparse GEMV while
decoding and a dequantize-and-GEMM dense path for prefill. See ``docs/int8.md``.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from pl_actsparse.kernels.int8_cpu import Granularity, QuantMode, check_quant_options, dequantize_weight_t, quantize_weight_t
from pl_actsparse.core.layer import SparseActivationLinear, is_sparsified, sparse_class_for, original_module_class, weight_nbytes
from pl_actsparse.core.scopes import IgnoredScope, TargetScope
from pl_actsparse.errors import InvalidOptionError, InvalidScopeError, UnmatchedScopeError

__all__ = [
    "Int8WeightLinear", "SparseActivationInt8WeightLinear", "Int8LayerReport", "Int8QuantizationReport",
    "quantize_weights_int8", "dequantize_weights_int8",
]



class Int8WeightLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored as int8 codes in the sparse kernel's layout.

    Buffers: ``qweight`` int8 ``[in_features, out_features]`` (``W^T``), ``scale`` fp32 (``[1, out]`` per
    output channel or ``[in, 1]`` per input channel) and ``zero_point`` fp32 of the same shape (all zeros
    for symmetric quantization). ``bias`` stays a float Parameter. ``weight`` is a read-only property that
    returns the dequantized ``[out, in]`` weight in ``weight_dtype`` (a new tensor on every access).

    ``forward`` computes ``F.linear(x, dequantized W, bias)`` in ``x``'s dtype, so it is differentiable with
    respect to the input and the bias (the int8 weight is frozen). Loading a float state dict (with a
    ``weight`` entry) quantizes it with this layer's ``mode`` and ``granularity``.
    """

    qweight: Tensor
    scale: Tensor
    zero_point: Tensor

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, mode: QuantMode = "asym",
        granularity: Granularity = "output", device: Any = None, dtype: Optional[torch.dtype] = None,
    ) -> None:
        nn.Module.__init__(self)
        check_quant_options(mode, granularity, InvalidOptionError)
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.granularity = granularity
        self.weight_dtype = dtype or torch.get_default_dtype()
        sshape = (1, out_features) if granularity == "output" else (in_features, 1)
        self.register_buffer("qweight", torch.zeros(in_features, out_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(sshape, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.zeros(sshape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: QuantMode = "asym", granularity: Granularity = "output") -> "Int8WeightLinear":
        """A new layer holding ``linear``'s weight quantized (the bias Parameter is shared, not copied)."""
        new = cls(linear.in_features, linear.out_features, bias=False, mode=mode, granularity=granularity,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.set_weight(linear.weight)
        new.bias = linear.bias
        return new

    # -- weights --------------------------------------------------------------------------------------
    def set_weight(self, weight: Tensor) -> None:
        """Quantize a float ``[out, in]`` weight into this layer's buffers (``mode``/``granularity`` kept)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise InvalidOptionError(f"weight must be [{self.out_features}, {self.in_features}], got {tuple(weight.shape)}")
        dev = self.qweight.device
        self.qweight, self.scale, self.zero_point = (t.to(dev) for t in _quantized(weight, self.mode, self.granularity))
        self.weight_dtype = weight.dtype

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dequantized weight ``[out, in]`` (in ``dtype``, default ``weight_dtype``)."""
        wt = dequantize_weight_t(self.qweight, self.scale, self._zp(), dtype or self.weight_dtype)
        return wt.t()

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.dequantize()

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: int8 codes plus scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero_point))

    def _zp(self) -> Optional[Tensor]:
        return self.zero_point if self.mode == "asym" else None

    def forward(self, input: Tensor) -> Tensor:
        # y = x @ W^T with W^T dequantized contiguous [in, out]. Half-precision inputs compute in fp32: a CPU
        # bf16/fp16 GEMM against this layout falls back to a scalar loop (20-50x slower).
        lowp = input.dtype in (torch.bfloat16, torch.float16)
        cdtype = torch.float32 if lowp else input.dtype
        wt = dequantize_weight_t(self.qweight, self.scale, self._zp(), cdtype)
        y = torch.matmul(input.to(cdtype), wt)
        if self.bias is not None:
            y = y + self.bias.to(cdtype)
        return y.to(input.dtype) if lowp else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int8 {self.mode}, per-{self.granularity}-channel"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        wkey = prefix + "weight"
        if wkey in state_dict and prefix + "qweight" not in state_dict:
            # a float checkpoint: quantize its weight with this layer's settings
            parts = _quantized(state_dict.pop(wkey), self.mode, self.granularity)
            state_dict.update({prefix + k: t for k, t in zip(("qweight", "scale", "zero_point"), parts)})
        sk = state_dict.get(prefix + "scale")
        if isinstance(sk, Tensor) and sk.shape != self.scale.shape and sk.dim() == 2:
            # the checkpoint was quantized with the other granularity: adopt it
            self.granularity = "input" if sk.shape[1] == 1 and sk.shape[0] == self.in_features else "output"
            self.scale = torch.empty(sk.shape, dtype=self.scale.dtype, device=self.scale.device)
            self.zero_point = torch.empty(sk.shape, dtype=self.zero_point.dtype, device=self.zero_point.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        zk = state_dict.get(prefix + "zero_point")
        if isinstance(zk, Tensor):
            self.mode = "asym" if bool((zk != 0).any()) or self.mode == "asym" else "sym"


#: The sparsified form of :class:`Int8WeightLinear` (what :func:`~pl_actsparse.sparsify_activations` turns it
#: into), registered here under its own name so that whole models pickle with ``torch.save(model)``.
SparseActivationInt8WeightLinear = sparse_class_for(Int8WeightLinear)
SparseActivationInt8WeightLinear.__module__ = __name__


def _quantized(weight: Tensor, mode: QuantMode, granularity: Granularity) -> tuple[Tensor, Tensor, Tensor]:
    """``(qweight [in, out] int8, scale, zero_point)`` of a float ``[out, in]`` weight; a zero ``zero_point`` for sym."""
    q, s, z = quantize_weight_t(weight, mode, granularity)
    return q, s, z if z is not None else torch.zeros_like(s)


# --------------------------------------------------------------------------------------------------
# Model-level API
# --------------------------------------------------------------------------------------------------


@dataclass
class Int8LayerReport:
    """One layer quantized by :func:`quantize_weights_int8`."""

    name: str
    in_features: int
    out_features: int
    mode: str
    granularity: str
    sparsified: bool  # carried an activation sparsifier when quantized
    shared_weight: bool  # its float weight was also used by another module (which keeps the float tensor)
    float_bytes: int
    int8_bytes: int
    relative_error: float  # ||W - dequantize(quantize(W))||_F / ||W||_F
    max_abs_error: float


@dataclass
class Int8QuantizationReport:
    """What :func:`quantize_weights_int8` did, plus optional accuracy figures filled in by the caller."""

    layers: list[Int8LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.layers)

    @property
    def int8_bytes(self) -> int:
        return sum(r.int8_bytes for r in self.layers)

    @property
    def max_relative_error(self) -> float:
        return max((r.relative_error for r in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the fields and the three totals."""
        totals = {k: getattr(self, k) for k in ("float_bytes", "int8_bytes", "max_relative_error")}
        return asdict(self) | totals

    def __str__(self) -> str:
        head = ["layer", "in->out", "mode", "per", "sparsified", "rel. error", "KiB float->int8"]
        rows = [
            [
                r.name, f"{r.in_features}->{r.out_features}", r.mode, r.granularity, "yes" if r.sparsified else "no",
                f"{r.relative_error:.2e}", f"{r.float_bytes / 1024:.1f}->{r.int8_bytes / 1024:.1f}",
            ]
            for r in self.layers
        ]
        widths = [max(map(len, column)) for column in zip(head, *rows)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *rows]]
        lines.append(
            f"{len(self.layers)} layers quantized to int8: {self.float_bytes / 2**20:.2f} MiB -> "
            f"{self.int8_bytes / 2**20:.2f} MiB; max relative weight error {self.max_relative_error:.2e}"
        )
        return "\n".join(lines + [f"skipped {name}: {why}" for name, why in self.skipped])


@torch.no_grad()
def quantize_weights_int8(
    model: nn.Module, scope: TargetScope | None = None, ignored_scope: IgnoredScope | None = None, *,
    mode: QuantMode = "asym", granularity: Granularity = "output",
) -> Int8QuantizationReport:
    """Quantize the weights of matched ``nn.Linear`` layers to int8, in place; returns a report.

    Args:
        model: any module; layers are matched by qualified name as in :func:`sparsify_activations`.
        scope: which layers (default: every ``nn.Linear``). Sparsified layers match as their original class.
        ignored_scope: layers to leave in floating point.
        mode: ``"asym"`` (scale and zero point, as NNCF's ``INT8_ASYM``) or ``"sym"`` (scale only).
        granularity: ``"output"`` (one scale per output channel, default) or ``"input"`` (per input channel);
            both are applied by the sparse kernel without extra weight traffic (``docs/int8.md``).

    Each matched layer keeps its object identity, name, bias Parameter and sparsifier (threshold and state);
    its float ``weight`` Parameter is dropped (rebuild an optimizer afterwards) and replaced by the buffers
    of :class:`Int8WeightLinear`. Only plain ``nn.Linear`` layers (sparsified or not) are converted; other
    ``nn.Linear`` subclasses and layers already in int8 are listed in ``report.skipped``. A weight shared
    with another module (tied embeddings) is quantized for this layer only; the other module keeps it.

    Raises ``ValueError`` if ``scope`` matches no layer.
    """
    check_quant_options(mode, granularity, InvalidOptionError)
    if scope is not None and not isinstance(scope, TargetScope):
        raise InvalidScopeError(f"scope must be a TargetScope or None, got {scope!r}")
    report = Int8QuantizationReport()
    users = collections.Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    matched = 0
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear):
            continue
        if scope is not None and not scope.matches(name, m):
            continue
        if ignored_scope is not None and ignored_scope.matches(name, m):
            continue
        matched += 1
        if isinstance(m, Int8WeightLinear):
            report.skipped.append((name, "already int8"))
            continue
        base = original_module_class(m)
        if base is not nn.Linear:
            report.skipped.append((name, f"{base.__qualname__} is an nn.Linear subclass with its own forward"))
            continue
        w = m.weight
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            report.skipped.append((name, f"weight is not a float Parameter ({type(w).__name__}, {w.dtype})"))
            continue
        shared = users.get(id(w), 0) > 1
        sparse = is_sparsified(m)
        q, s, z = _quantized(w, mode, granularity)
        err = dequantize_weight_t(q, s, z if mode == "asym" else None)
        wf = w.detach().float().t()  # [in, out] view; the error in the kernel layout, without a copy
        err -= wf
        rel = float(err.norm() / wf.norm().clamp_min(1e-30))
        mae = float(err.abs().max()) if err.numel() else 0.0
        del err, wf
        float_bytes = w.numel() * w.element_size()
        dtype, device = w.dtype, w.device
        del m._parameters["weight"]
        m.__class__ = SparseActivationInt8WeightLinear if sparse else Int8WeightLinear
        m.mode = mode
        m.granularity = granularity
        m.weight_dtype = dtype
        for key, t in (("qweight", q), ("scale", s), ("zero_point", z)):
            m.register_buffer(key, t.to(device))
        report.layers.append(
            Int8LayerReport(
                name=name, in_features=m.in_features, out_features=m.out_features, mode=mode, granularity=granularity,
                sparsified=sparse, shared_weight=shared, float_bytes=float_bytes, int8_bytes=weight_nbytes(m),
                relative_error=rel, max_abs_error=mae,
            )
        )
    if matched == 0:
        raise UnmatchedScopeError(f"quantize_weights_int8: {scope!r} matches no nn.Linear layer of {type(model).__name__}")
    return report


@torch.no_grad()
def dequantize_weights_int8(model: nn.Module) -> nn.Module:
    """Turn every :class:`Int8WeightLinear` back into a plain ``nn.Linear`` with the dequantized float weight.

    In place, keeping module objects, bias Parameters and sparsifiers. The weight is the *dequantized* one
    (quantization error included), in the layer's ``weight_dtype``.
    """
    for m in [m for m in model.modules() if isinstance(m, Int8WeightLinear)]:  # listed first: classes change below
        w = m.dequantize()
        sparse = is_sparsified(m)
        for key in ("qweight", "scale", "zero_point"):
            del m._buffers[key]
        for key in ("mode", "granularity", "weight_dtype"):
            m.__dict__.pop(key, None)
        m.__class__ = SparseActivationLinear if sparse else nn.Linear
        m.weight = nn.Parameter(w)
    return model
