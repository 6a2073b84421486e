"""What was sparsified, how well, and what it saves.

The report is built from the layers themselves (their buffers and ``_extra_state``), so it works on a live
model right after calibration and on a model loaded from a checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from pl_actsparse.core.layer import sparsified_layers

__all__ = ["LayerReport", "SparsityReport", "activation_sparsity_report"]


@dataclass(frozen=True)
class LayerReport:
    """One sparsified layer."""

    name: str
    target: float
    threshold: float
    calibration_sparsity: float | None  # achieved on the calibration data, all layers sparsified together
    calibration_elements: int
    in_features: int
    out_features: int
    weight_bytes: int
    mode: str

    @property
    def error(self) -> float | None:
        """Achieved minus target on the calibration data."""
        return None if self.calibration_sparsity is None else self.calibration_sparsity - self.target


@dataclass
class SparsityReport:
    """Per-layer table plus what the recipe skipped or ignored; prints as a table."""

    layers: list[LayerReport]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)
    ignored: list[str] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict, repr=False)  # name -> LayerStatistics, when fresh

    @property
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def mean_sparsity(self) -> float | None:
        """Element-weighted achieved sparsity on the calibration data."""
        rows = [r for r in self.layers if r.calibration_sparsity is not None and r.calibration_elements]
        n = sum(r.calibration_elements for r in rows)
        return sum(r.calibration_sparsity * r.calibration_elements for r in rows) / n if n else None  # type: ignore[operator]

    @property
    def weight_bytes_skipped(self) -> float:
        """Weight bytes a sparse kernel need not read per token, at the achieved (else target) sparsity."""
        return sum(
            r.weight_bytes * (r.calibration_sparsity if r.calibration_sparsity is not None else r.target)
            for r in self.layers
        )

    @property
    def max_abs_error(self) -> float | None:
        errors = [abs(r.error) for r in self.layers if r.error is not None]
        return max(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "skipped": [{"name": n, "reason": why} for n, why in self.skipped],
            "ignored": list(self.ignored),
            "summary": {
                "layers": len(self.layers),
                "mean_calibration_sparsity": self.mean_sparsity,
                "max_abs_error": self.max_abs_error,
                "weight_bytes": self.weight_bytes,
                "weight_bytes_skipped_per_token": self.weight_bytes_skipped,
            },
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=_json_default, **kwargs)

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        head = ["layer", "target", "threshold", "achieved", "error", "in->out", "weight KiB", "mode"]
        rows = []
        for r in self.layers:
            rows.append(
                [
                    r.name,
                    f"{r.target:.3f}",
                    _fmt_float(r.threshold),
                    "-" if r.calibration_sparsity is None else f"{r.calibration_sparsity:.4f}",
                    "-" if r.error is None else f"{round(r.error, 4) + 0.0:+.4f}",  # no "-0.0000"
                    f"{r.in_features}->{r.out_features}",
                    f"{r.weight_bytes / 1024:.1f}",
                    r.mode,
                ]
            )
        return head, rows

    def __str__(self) -> str:
        head, rows = self._rows()
        widths = [max(len(head[i]), *(len(row[i]) for row in rows)) if rows else len(head[i]) for i in range(len(head))]
        line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        out = [line(head), line(["-" * w for w in widths])]
        out += [line(row) for row in rows]
        mean = self.mean_sparsity
        out.append(
            f"{len(self.layers)} layers; mean achieved sparsity "
            + ("-" if mean is None else f"{mean:.4f}")
            + f"; max |error| {'-' if self.max_abs_error is None else f'{self.max_abs_error:.4f}'}"
            + f"; weight bytes skipped per token {self.weight_bytes_skipped / 1024:.1f} KiB of {self.weight_bytes / 1024:.1f} KiB"
        )
        if self.skipped:
            out.append("skipped (not sparsifiable): " + ", ".join(f"{n} ({why})" for n, why in self.skipped))
        if self.ignored:
            out.append("ignored: " + ", ".join(self.ignored))
        return "\n".join(out)

    def to_markdown(self) -> str:
        head, rows = self._rows()
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out) + "\n"


def threshold_value(t: Any) -> float:
    """A layer's threshold as one number: the scalar, or the median of a per-channel threshold vector."""
    return float(t) if t.numel() == 1 else float(t.float().median())


def _weight_bytes(m: nn.Module) -> int:
    """Bytes the layer's weight occupies as stored (int8 layers report their own)."""
    stored = getattr(m, "weight_nbytes", None)
    return int(stored) if stored is not None else m.weight.numel() * m.weight.element_size()


def _fmt_float(v: float) -> str:
    return str(v) if math.isinf(v) else f"{v:.5g}"


def _json_default(o: Any) -> Any:
    if isinstance(o, float):
        return str(o)
    return str(o)


def activation_sparsity_report(model: nn.Module) -> SparsityReport:
    """Report every sparsified layer of a model (live, or loaded from a checkpoint).

    >>> import torch
    >>> from torch import nn
    >>> from pl_actsparse import sparsify_activations, TargetScope, activation_sparsity_report
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = sparsify_activations(net, [torch.randn(64, 8)], {TargetScope(names=["0"]): 0.25}, progress=False)
    >>> report = activation_sparsity_report(net)
    >>> [(r.name, r.target, round(r.calibration_sparsity, 4)) for r in report.layers]
    [('0', 0.25, 0.25)]
    """
    rows = []
    for name, m in sparsified_layers(model):
        s = m._actsparse
        rows.append(
            LayerReport(
                name=name,
                target=s.target,
                threshold=threshold_value(m.activation_threshold),
                calibration_sparsity=s.calibration_sparsity,
                calibration_elements=s.calibration_elements,
                in_features=m.in_features,
                out_features=m.out_features,
                weight_bytes=_weight_bytes(m),
                mode=s.mode.value,
            )
        )
    plan = model.__dict__.get("_actsparse_plan")
    return SparsityReport(
        layers=rows,
        skipped=list(plan.skipped) if plan is not None else [],
        ignored=list(plan.ignored) if plan is not None else [],
    )
