"""What was sparsified, how well, and what it saves: the one report of the package.

:func:`activation_sparsity_report` (what every calibration returns) and :func:`model_report` build the same
:class:`SparsityReport`, from a **live model** (right after calibration) or from a **checkpoint** (a state dict,
a ``torch.save`` file or a Lightning checkpoint; no model class needed, everything comes from the saved
thresholds, ``_extra_state`` and weight shapes). Per sparsified layer (:class:`LayerReport`) it shows the target,
the threshold (scalar, or the mean of a per-channel one), the achieved sparsity on the calibration data, and,
given data, the achieved sparsity on that data with its per-token spread (5th and 95th percentiles of the
per-token zeroed fraction, real tokens only), the weight bytes a sparse kernel skips per token, and the group of
layers reading the same tensor.

**Weight bytes** are what the layer stores (:func:`~pl_actsparse.core.layer.weight_nbytes`): an int8 or
torchao-quantized layer counts its codes and scales, not the float matrix it hands out on access.

**Predicted decode-time memory saved.** Decoding one token at batch size 1 is memory-bound: it reads every
weight matrix once. A sparse kernel skips the columns of zeroed inputs, so it saves
``sum_l achieved_l * weight_bytes_l`` per token. The report divides this by the bytes a dense decode step
reads (every parameter except embedding tables, of which one row is read; a tied ``lm_head`` counts once)
and gives the ideal speed-up bound ``1 / (1 - fraction)``. Real kernels reach a good part of the per-layer
bound at 50-70% sparsity on CPU (``docs/inference.md``); the prediction ignores KV-cache reads.

Output: ``str(report)`` and :meth:`SparsityReport.print` (tables rendered by ``rich``, in :func:`_table` only),
:meth:`~SparsityReport.to_markdown`, :meth:`~SparsityReport.to_html`, :meth:`~SparsityReport.to_json`,
:meth:`~SparsityReport.plot` (:mod:`pl_actsparse.measure.plot`) and :meth:`~SparsityReport.save` (all of them).
Command line: ``pl-actsparse report CHECKPOINT --out DIR`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import pickle
import base64
import html
import io
import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from pl_actsparse.calibrate.groups import find_shared_input_groups
from pl_actsparse.calibrate.running import check_batches, default_transform_fn, mask_of, model_device, run_item
from pl_actsparse.core.checkpoint import read_state_dict, saved_sparsifiers
from pl_actsparse.core.layer import STATE_KEY, THRESHOLD_BUFFER, is_sparsified, sparsified_layers, threshold_summary, weight_nbytes
from pl_actsparse.core.masking import MaskFn, resolve_mask_fn
from pl_actsparse.core.module_state import preserved_modes
from pl_actsparse.errors import ActivationSparsityError, InvalidOptionError, NotSparsifiedError
from pl_actsparse.measure.plot import plot_report  # matplotlib itself is imported when a plot is drawn

__all__ = [
    "LayerReport", "SparsityReport", "activation_sparsity_report", "model_report", "achieved_table", "main",
]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LayerReport:
    """One sparsified layer.

    ``threshold`` is the scalar threshold or, for a per-channel one (``per_channel``), its mean
    (:func:`~pl_actsparse.core.layer.threshold_summary`). Sparsities are fractions in ``[0, 1]``; ``weight_bytes``
    are stored bytes (:func:`~pl_actsparse.core.layer.weight_nbytes`). ``data_sparsity``, ``token_p5`` and
    ``token_p95`` are filled by :func:`model_report` given data; ``group`` labels a shared-input group.
    """

    name: str
    target: float
    threshold: float
    calibration_sparsity: float | None  # achieved on the calibration data, all layers sparsified together
    in_features: int
    out_features: int
    weight_bytes: int
    mode: str
    calibration_elements: int = 0
    per_channel: bool = False
    group: str | None = None
    data_sparsity: float | None = None  # achieved on the data given to model_report (real tokens)
    token_p5: float | None = None
    token_p95: float | None = None

    @property
    def error(self) -> float | None:
        """Achieved minus target on the calibration data."""
        return None if self.calibration_sparsity is None else self.calibration_sparsity - self.target

    @property
    def achieved(self) -> float:
        """Best available achieved sparsity: on the report's data, else calibration, else the target of a
        sparsifying (or exported) layer; 0 for a pass-through one (it zeroes nothing, whatever its stale threshold)."""
        if self.mode in ("passthrough", "removed"):
            return 0.0
        return next((v for v in (self.data_sparsity, self.calibration_sparsity) if v is not None),
                    self.target if self.mode == "sparsifying" else 0.0)

    @property
    def bytes_skipped(self) -> float:
        """Weight bytes a sparse kernel need not read per token: ``achieved * weight_bytes``."""
        return self.achieved * self.weight_bytes


@dataclass
class SparsityReport:
    """Per-layer rows, what the recipe skipped or ignored, and the decode-memory prediction.

    ``decode_bytes``: bytes a dense batch-1 decode step reads (parameters except embedding tables);
    ``model_bytes``: all unique parameter bytes; ``statistics``: the calibration histograms (name ->
    :class:`~pl_actsparse.calibrate.histogram.LayerStatistics`) when the report comes from a calibration;
    ``scopes``: the layer names each ``TargetScope`` of the recipe claimed (``repr(scope)``; live models only);
    ``removed``: rows (mode ``removed``, dense) of those layers that ``remove_activation_sparsity`` gave back since.
    """

    layers: list[LayerReport]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)
    ignored: list[str] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict, repr=False)
    decode_bytes: int = 0
    model_bytes: int = 0
    groups: list[list[str]] = field(default_factory=list)
    source: str = "model"
    data_tokens: int | None = None
    scopes: dict[str, list[str]] = field(default_factory=dict)
    removed: list[LayerReport] = field(default_factory=list)

    # -- summary ----------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """Stored weight bytes of the sparsified layers."""
        return sum(r.weight_bytes for r in self.layers)

    @property
    def mean_sparsity(self) -> float | None:
        """Element-weighted achieved sparsity on the calibration data."""
        rows = [r for r in self.layers if r.calibration_sparsity is not None and r.calibration_elements]
        n = sum(r.calibration_elements for r in rows)
        return sum(r.calibration_sparsity * r.calibration_elements for r in rows) / n if n else None  # type: ignore[operator]

    @property
    def mean_target(self) -> float:
        """Element-weighted target over the calibrated layers (NaN if none was calibrated)."""
        rows = [r for r in self.layers if r.calibration_elements]
        n = sum(r.calibration_elements for r in rows)
        return sum(r.target * r.calibration_elements for r in rows) / n if n else math.nan

    @property
    def max_abs_error(self) -> float | None:
        """Largest ``|achieved - target|`` on the calibration data."""
        return max((abs(r.error) for r in self.layers if r.error is not None), default=None)

    @property
    def bytes_skipped(self) -> float:
        """Weight bytes a sparse kernel need not read per token (see :attr:`LayerReport.achieved`)."""
        return sum(r.bytes_skipped for r in self.layers)

    @property
    def skipped_fraction_of_sparsified(self) -> float:
        """:attr:`bytes_skipped` over the sparsified layers' :attr:`weight_bytes` (0 without layers)."""
        return self.bytes_skipped / self.weight_bytes if self.weight_bytes else 0.0

    @property
    def decode_saving(self) -> float:
        """Predicted fraction of the bytes a batch-1 decode step reads that a sparse kernel skips."""
        return self.bytes_skipped / self.decode_bytes if self.decode_bytes else 0.0

    @property
    def speedup_bound(self) -> float:
        """Ideal memory-bound speed-up ``1 / (1 - decode_saving)``."""
        return 1.0 / (1.0 - self.decode_saving) if self.decode_saving < 1 else math.inf

    def budgets(self) -> dict[str, tuple[float, float]]:
        """Per scope (:attr:`scopes`): the weight-byte-weighted target and achieved sparsity (:attr:`LayerReport.achieved`)
        of its layers, fractions in [0, 1] (``allocation="auto"``: the first is the scope's byte budget); :attr:`removed` count dense."""
        rows = {r.name: r for r in [*self.layers, *self.removed]}
        groups = {scope: [rows[n] for n in names if n in rows] for scope, names in self.scopes.items()}
        return {scope: (sum(r.target * r.weight_bytes for r in rs) / total, sum(r.bytes_skipped for r in rs) / total)
                for scope, rs in groups.items() if (total := sum(r.weight_bytes for r in rs))}

    def summary(self) -> dict[str, Any]:
        """The report's totals as a flat dict (the ``"summary"`` of :meth:`to_dict`)."""
        return {
            "layers": len(self.layers),
            "mean_calibration_sparsity": self.mean_sparsity,
            "max_abs_error": self.max_abs_error,
            "weight_bytes": self.weight_bytes,
            "weight_bytes_skipped_per_token": self.bytes_skipped,
            "skipped_fraction_of_sparsified": self.skipped_fraction_of_sparsified,
            "decode_bytes_per_token_dense": self.decode_bytes,
            "decode_bytes_per_token_sparse": self.decode_bytes - self.bytes_skipped,
            "predicted_decode_memory_saving": self.decode_saving,
            "ideal_decode_speedup_bound": self.speedup_bound,
            "model_parameter_bytes": self.model_bytes,
            "shared_input_groups": [list(g) for g in self.groups],
            "byte_budgets": {k: {"target": t, "achieved": a} for k, (t, a) in self.budgets().items()},
            "data_tokens": self.data_tokens,
            "source": self.source,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"layers": [...], "skipped": [...], "ignored": [...], "summary": {...}}``."""
        return {
            "layers": [asdict(r) | {"achieved": r.achieved, "bytes_skipped": r.bytes_skipped} for r in self.layers],
            "skipped": [{"name": n, "reason": why} for n, why in self.skipped],
            "ignored": list(self.ignored),
            "summary": self.summary(),
        }

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON (``json.dumps`` keyword arguments pass through; indent 1 by default)."""
        return json.dumps(self.to_dict(), **({"indent": 1} | kwargs))

    # -- tables -----------------------------------------------------------------------------------
    _HEAD = ["layer", "group", "target", "threshold", "calib.", "error", "data", "token p5-p95", "in->out", "KiB", "KiB skipped", "mode"]

    def _cells(self) -> list[list[str]]:
        return [
            [
                r.name,
                r.group or "",
                f"{r.target:.4f}",
                "-" if r.mode == "passthrough" else _fmt(r.threshold) + (" (per-ch. mean)" if r.per_channel else ""),
                "-" if r.calibration_sparsity is None else f"{r.calibration_sparsity:.4f}",
                "-" if r.error is None else f"{round(r.error, 4) + 0.0:+.4f}",  # no "-0.0000"
                "-" if r.data_sparsity is None else f"{r.data_sparsity:.4f}",
                "-" if r.token_p5 is None else f"{r.token_p5:.3f}-{r.token_p95:.3f}",
                f"{r.in_features}->{r.out_features}",
                f"{r.weight_bytes / 1024:.1f}",
                f"{r.bytes_skipped / 1024:.1f}",
                r.mode,
            ]
            for r in self.layers
        ]

    def _summary_lines(self) -> list[str]:
        mean, err = self.mean_sparsity, self.max_abs_error
        lines = [
            f"{len(self.layers)} layers; mean achieved sparsity on the calibration data "
            + ("-" if mean is None else f"{mean:.4f}")
            + f"; max |error| {'-' if err is None else f'{err:.4f}'}",
            f"{self.weight_bytes / 1024:.1f} KiB of sparsified weights; {self.bytes_skipped / 1024:.1f} KiB skipped per token "
            f"({self.skipped_fraction_of_sparsified:.1%} of them).",
        ]
        if self.decode_bytes:
            lines.append(
                f"Predicted batch-1 decode: {self.decode_bytes / 1024:.1f} KiB -> {(self.decode_bytes - self.bytes_skipped) / 1024:.1f} KiB "
                f"read per token ({self.decode_saving:.1%} less; ideal memory-bound speed-up <= {self.speedup_bound:.2f}x)."
            )
        if self.budgets():
            lines.append("Byte budgets (weight-byte-weighted target -> achieved): " + "; ".join(f"{k} {t:.4f} -> {a:.4f}" for k, (t, a) in self.budgets().items())
                         + (f" (removed since, counted dense: {', '.join(r.name for r in self.removed)})" if self.removed else ""))
        if self.groups:
            lines.append("Shared-input groups: " + "; ".join(f"g{i + 1} = {', '.join(g)}" for i, g in enumerate(self.groups)))
        if self.data_tokens:
            lines.append(f"'data' column: achieved sparsity on {self.data_tokens} real tokens given to the report.")
        if self.skipped:
            lines.append("skipped (not sparsifiable): " + ", ".join(f"{n} ({why})" for n, why in self.skipped))
        if self.ignored:
            lines.append("ignored: " + ", ".join(self.ignored))
        return lines

    def __str__(self) -> str:
        return _render(_table(self._HEAD, self._cells(), left=2), self._summary_lines())

    def print(self, console: Any = None) -> None:
        """The table on a ``rich`` console (default: a new one; at least 170 columns when not a terminal)."""
        from rich.console import Console

        if console is None:
            console = Console()
            if not console.is_terminal:
                console = Console(width=max(console.width, 170))
        console.print(_table(self._HEAD, self._cells(), left=2, title=f"activation sparsity: {self.source}"))
        for line in self._summary_lines():
            console.print(line, highlight=False, markup=False)

    def to_markdown(self, image: str | None = None, *, document: bool | None = None) -> str:
        """A Markdown table, one row per layer. ``document=True`` (the default when ``image`` is given) adds a
        title, the summary lines and the image link."""
        document = image is not None if document is None else document
        lines = [f"# Activation sparsity report: {self.source}", ""] if document else []
        lines += ["| " + " | ".join(self._HEAD) + " |", "|" + "---|" * len(self._HEAD)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self._cells()]
        if document:
            lines += [""] + [f"* {s}" for s in self._summary_lines()]
            if image:
                lines += ["", f"![per-layer sparsity]({image})"]
        return "\n".join(lines) + "\n"

    def to_html(self, png: bytes | None = None) -> str:
        """A standalone HTML page with the table, the summary and (given PNG bytes) the embedded plot."""
        style = (
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
            "th{background:#eee}"
        )
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self._cells())
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self._HEAD)
        summary = "".join(f"<li>{html.escape(s)}</li>" for s in self._summary_lines())
        img = f'<img alt="per-layer sparsity" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
        title = html.escape(f"Activation sparsity report: {self.source}")
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
            f"<body><h1>{title}</h1><table><tr>{head}</tr>{rows}</table><ul>{summary}</ul>{img}</body></html>\n"
        )

    def plot(self, path: str | Path | None = None) -> bytes:
        """PNG: per-layer target vs achieved (with the per-token spread), thresholds, and bytes skipped
        (:func:`pl_actsparse.measure.plot.plot_report`; needs matplotlib)."""
        return plot_report(self, path)

    def save(self, directory: str | Path, stem: str = "report") -> dict[str, Path]:
        """Write ``{stem}.md``, ``{stem}.html`` (plot embedded), ``{stem}.png`` and ``{stem}.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        png = self.plot(d / f"{stem}.png")
        paths = {"png": d / f"{stem}.png", "md": d / f"{stem}.md", "html": d / f"{stem}.html", "json": d / f"{stem}.json"}
        paths["md"].write_text(self.to_markdown(image=f"{stem}.png"))
        paths["html"].write_text(self.to_html(png))
        paths["json"].write_text(self.to_json() + "\n")
        return paths


# ---------------------------------------------------------------------------------------------------
# rendering: the one place that draws text tables (rich)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1, title: str | None = None) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < left else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _render(table: Any, lines: Sequence[str] = ()) -> str:
    """Plain text of a rich table (no colour, never wrapped) followed by ``lines``."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=10_000, color_system=None, force_terminal=False, legacy_windows=False).print(table)
    text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())
    return "\n".join([text, *lines])


def achieved_table(stage: str, values: Mapping[str, Any], model: nn.Module) -> str:
    """Per-layer achieved sparsity on evaluation data (an :class:`~pl_actsparse.measure.metric.ActivationSparsity`
    result ``values``) next to each layer's target, threshold (scalar or per-channel mean) and calibration result."""
    head = ["layer", "target", "threshold", "calibration", stage, "token p5", "token p95"]
    rows = []
    for name, m in sparsified_layers(model):
        if f"{name}/sparsity" not in values:
            continue
        s = m._actsparse
        cal = "-" if s.calibration_sparsity is None else f"{s.calibration_sparsity:.4f}"
        rows.append(
            [name, f"{s.target:.3f}", _fmt(threshold_summary(m.activation_threshold)), cal, f"{float(values[f'{name}/sparsity']):.4f}"]
            + [f"{float(values.get(f'{name}/token_sparsity_{q}', math.nan)):.4f}" for q in ("p5", "p95")]
        )
    rows.append(
        ["all layers (element-weighted)", "", "", "", f"{float(values['sparsity']):.4f}"]
        + [f"{float(values.get(k, math.nan)):.4f}" for k in ("token_sparsity_p5", "token_sparsity_p95")]
    )
    return _render(
        _table(head, rows, title=f"achieved activation sparsity on the {stage} data (|x| <= threshold)"),
        [f"weight-bytes-weighted: {float(values['weighted_sparsity']):.4f}"],
    )


def _fmt(v: float) -> str:
    return str(v) if math.isinf(v) else f"{v:.5g}"


# ---------------------------------------------------------------------------------------------------
# building


def _storage_key(t: torch.Tensor) -> Any:
    if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type == "meta":
        return ("id", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _decode_bytes_of_model(model: nn.Module) -> tuple[int, int]:
    """(bytes a dense decode step reads, all unique parameter bytes), stored bytes per tensor: embedding tables
    are left out of the first unless a non-embedding module (a tied classifier) reads the same tensor."""
    stored: dict[Any, list] = {}  # key -> [bytes, only read as an embedding table]
    for m in model.modules():
        is_embedding = isinstance(m, nn.Embedding)
        for name, p in m.named_parameters(recurse=False):
            key = _storage_key(p)
            if key in stored:
                stored[key][1] = stored[key][1] and is_embedding
                continue
            nbytes = weight_nbytes(m) if name == "weight" else p.numel() * p.element_size()
            stored[key] = [nbytes, is_embedding]
        if "weight" not in m._parameters and isinstance(getattr(m, "weight_nbytes", None), int):
            stored[("module", id(m))] = [weight_nbytes(m), False]  # int8 layers: codes and scales are buffers
    return sum(b for b, emb in stored.values() if not emb), sum(b for b, _ in stored.values())


def activation_sparsity_report(model: nn.Module) -> SparsityReport:
    """Report every sparsified (or exported) layer of a model (live, or loaded from a checkpoint), with what the recipe
    skipped and ignored and the decode-memory prediction. No data is run. ``TypeError`` if ``model`` is no ``nn.Module``.

    >>> import torch
    >>> from torch import nn
    >>> from pl_actsparse import sparsify_activations, TargetScope, activation_sparsity_report
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = sparsify_activations(net, [torch.randn(64, 8)], {TargetScope(names=["0"]): 0.25}, calibration={"progress": False})
    >>> report = activation_sparsity_report(net)
    >>> [(r.name, r.target, round(r.calibration_sparsity, 4)) for r in report.layers]
    [('0', 0.25, 0.25)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"activation_sparsity_report: model must be an nn.Module (a checkpoint: model_report), got {type(model).__qualname__} {model!r:.60}")
    rows = [_row(name, m.activation_threshold, *((vars(m._actsparse), m._actsparse.mode.value) if is_sparsified(m) else (m.sparsity_state, "exported"
                 if m.sparsity_state["calibrated"] else "passthrough")), m.in_features, m.out_features, weight_nbytes(m))
            for name, m in model.named_modules() if is_sparsified(m) or isinstance(getattr(m, "sparsity_state", None), dict)]
    plan, modules, names = model.__dict__.get("_actsparse_plan"), dict(model.named_modules()), {r.name for r in rows}
    removed = [_row(n, torch.tensor(math.nan), {"target": t}, "removed", getattr(modules[n], "in_features", 0), getattr(modules[n], "out_features", 0),
                    weight_nbytes(modules[n])) for n, t in (plan.targets.items() if plan else ()) if n not in names and n in modules]
    decode, total = _decode_bytes_of_model(model)
    return SparsityReport(
        layers=rows,
        skipped=list(plan.skipped) if plan is not None else [],
        ignored=list(plan.ignored) if plan is not None else [],
        decode_bytes=decode,
        model_bytes=total,
        source=type(model).__name__,
        scopes={repr(sc): [n for n, s in plan.claimed_by.items() if s == sc] for sc in dict.fromkeys(plan.claimed_by.values())} if plan is not None else {},
        removed=removed,
    )


_INT8_PARTS = ("qweight", "scale", "zero_point")


def _row(name: str, threshold: torch.Tensor, state: Mapping[str, Any], mode: str, in_f: int, out_f: int, nbytes: int) -> LayerReport:
    """One layer's row from its threshold and (live or decoded) state; a pass-through layer's (stale) calibration left out."""
    on = mode != "passthrough"
    return LayerReport(
        name=name, target=float(state.get("target", 0.0)), threshold=threshold_summary(threshold),
        per_channel=threshold.numel() > 1, calibration_sparsity=state.get("calibration_sparsity") if on else None,
        calibration_elements=int(state.get("calibration_elements", 0)) if on else 0, in_features=int(in_f), out_features=int(out_f),
        weight_bytes=int(nbytes), mode=mode,
    )


def _rows_from_state_dict(sd: Mapping[str, Any]) -> list[LayerReport]:
    rows = []
    for entry in saved_sparsifiers(sd):
        w, qw, b = (sd.get(entry.key(k)) for k in ("weight", "qweight", "bias"))
        if isinstance(qw, torch.Tensor) and qw.dim() == 2:  # an int8 layer: qweight is [in, out]
            in_f, out_f = qw.shape
            nbytes = sum(t.numel() * t.element_size() for p in _INT8_PARTS if isinstance(t := sd.get(entry.key(p)), torch.Tensor))
        elif isinstance(w, torch.Tensor) and w.dim() == 2:
            out_f, in_f = w.shape
            if isinstance(b, torch.Tensor) and b.numel() == in_f != out_f:  # stored [in, out] (GPT-2's Conv1D)
                out_f, in_f = in_f, out_f
            nbytes = w.numel() * w.element_size()
        else:
            raise NotSparsifiedError(f"the state dict has a threshold for {entry.name!r} but no 2-D {entry.key('weight')} "
                                     f"(or int8 {entry.key('qweight')})")
        state = entry.state or {}
        mode = "sparsifying" if state.get("calibrated", entry.state is None) else "passthrough"
        rows.append(_row(entry.name, entry.threshold, state, mode, in_f, out_f, nbytes))
    return rows


def _is_embedding_key(key: str) -> bool:
    module = key.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in key else ""
    return "embed" in module or module in ("wte", "wpe")


def _decode_bytes_of_state_dict(sd: Mapping[str, Any]) -> tuple[int, int]:
    """Parameters read per decode step, from names: embedding tables (one row read) are left out unless a
    non-embedding key (a tied classifier) shares their storage. Int8 codes count as stored."""
    weights = {
        k: v
        for k, v in sd.items()
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or k.endswith(".qweight")) and not k.endswith((THRESHOLD_BUFFER, STATE_KEY))
    }
    by_storage: dict[Any, list[str]] = {}
    for k, v in weights.items():
        by_storage.setdefault(_storage_key(v), []).append(k)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    decode = sum(nbytes(weights[keys[0]]) for keys in by_storage.values() if not all(_is_embedding_key(k) for k in keys))
    return decode, sum(nbytes(weights[keys[0]]) for keys in by_storage.values())


def model_report(
    model_or_checkpoint: nn.Module | Mapping[str, Any] | str | os.PathLike,
    data: Iterable[Any] | None = None,
    *,
    example_input: Any = None,
    detect_groups: bool = True,
    num_batches: int | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    token_mask: str | MaskFn | None = "auto",
    prefix: str = "",
) -> SparsityReport:
    """Build the report of a live model or of a checkpoint (path, state dict or Lightning checkpoint).

    Args:
        model_or_checkpoint: a model with sparsified layers, or a checkpoint of one.
        data: (live model only) batches to measure achieved sparsity and its per-token spread on (at most
            ``num_batches`` of them); each goes through ``transform_fn`` (default: the batch as model input).
        example_input: input for detecting shared-input groups (default: the first data item), when
            ``detect_groups``.
        token_mask: which tokens of ``data`` count: ``"auto"`` (a dict batch's ``attention_mask``), ``None``
            (every element) or a callable batch -> bool ``[batch, seq]`` mask.
        prefix: strip a LightningModule attribute path from checkpoint keys (``"model."``).

    Raises:
        NotSparsifiedError: no sparsified layer (or no ``activation_threshold`` key in the checkpoint); ``data`` or
            ``example_input`` with exported layers (reported from their saved state, mode ``exported``).
        ValueError: ``data`` given with a checkpoint.
        TokenMaskError: ``token_mask`` is not ``"auto"``, ``None`` or a callable, or a layer's input has no token axis
            matching a batch's mask.
    """
    mask_fn = resolve_mask_fn(token_mask)
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
        report = activation_sparsity_report(model)
        if not report.layers:
            raise NotSparsifiedError("the model has no sparsified layer to report")
        if (data is not None or example_input is not None) and any(r.mode == "exported" for r in report.layers):
            raise NotSparsifiedError("exported layers (export_for_inference) are not measured on data: call model_report(model) without "
                                     "data, measure before exporting, or count decode steps with pl_actsparse.measure.metric.DecodeSparsity")
        items = None
        if data is not None:
            items = list(itertools.islice(check_batches(data), num_batches))
            if example_input is None and items:
                example_input = items[0]
        if detect_groups and example_input is not None:
            report.groups = find_shared_input_groups(model, example_input, [r.name for r in report.layers], transform_fn=transform_fn)
            label = {n: f"g{i + 1}" for i, g in enumerate(report.groups) for n in g}
            for r in report.layers:
                r.group = label.get(r.name)
        if items:
            _measure(model, items, report, transform_fn, mask_fn)
        return report
    if data is not None:
        raise InvalidOptionError(
            f"data can only be measured on a live model, not on {type(model_or_checkpoint).__name__} "
            f"{model_or_checkpoint!r:.80}; load the checkpoint into the model first"
        )
    sd = read_state_dict(model_or_checkpoint, prefix=prefix)
    label = str(model_or_checkpoint) if isinstance(model_or_checkpoint, (str, os.PathLike)) else "state dict"
    rows = _rows_from_state_dict(sd)
    if not rows:
        raise NotSparsifiedError(f"{label} holds no '{THRESHOLD_BUFFER}' entry, so no sparsified layer")
    decode, total = _decode_bytes_of_state_dict(sd)
    return SparsityReport(layers=rows, decode_bytes=decode, model_bytes=total, source=label)


def _token_count(inputs: Any, mask: torch.Tensor | None) -> int:
    if mask is not None:
        return int(mask.sum())
    if isinstance(inputs, Mapping):
        inputs = inputs.get("input_ids")
    if isinstance(inputs, torch.Tensor):
        return inputs.numel() if not inputs.is_floating_point() else inputs[..., 0].numel()
    return 0


def _measure(model: nn.Module, items: list[Any], report: SparsityReport, transform_fn: Callable | None, mask_fn: MaskFn | None) -> None:
    from pl_actsparse.measure.metric import SparsityCounter

    transform = transform_fn or default_transform_fn
    device = model_device(model)
    tokens = 0
    with preserved_modes(model), SparsityCounter(model) as counter, torch.no_grad():
        model.eval()
        for item in items:  # the calibration's way of running an item (transformed once: the token count reads it)
            inputs, mask = transform(item), mask_of(mask_fn, item)
            run_item(model, inputs, default_transform_fn, mask, device)
            tokens += _token_count(inputs, mask)
    sparsity = counter.sparsity()
    spread = counter.token_quantiles((0.05, 0.95))
    for r in report.layers:
        if r.name in sparsity and r.mode == "sparsifying":  # the counter compares with a pass-through layer's unused threshold
            r.data_sparsity = sparsity[r.name]
            r.token_p5, r.token_p95 = spread[r.name]
    report.data_tokens = tokens or None


# ---------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None, prog: str = "pl-actsparse report") -> SparsityReport:
    """``pl-actsparse report CHECKPOINT [--prefix model.] [--out DIR | --no-files]``: the report of a checkpoint,
    printed as a table and written as ``report.{md,html,png,json}``. (The shipped-model demo is
    ``python -m pl_actsparse.demos report``.)"""
    p = argparse.ArgumentParser(prog=prog, description="Activation-sparsity report of a sparsified checkpoint.")
    p.add_argument("checkpoint", help="sparsified state dict / Lightning checkpoint (.pt/.ckpt)")
    p.add_argument("--prefix", default="", help="strip this key prefix (e.g. 'model.')")
    p.add_argument("--out", default="actsparse-report", help="output directory")
    p.add_argument("--no-files", action="store_true", help="only print the table")
    args = p.parse_args(argv)
    try:
        report = model_report(args.checkpoint, prefix=args.prefix)
    except (OSError, ActivationSparsityError, pickle.UnpicklingError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        p.exit(2, f"{prog}: error: {args.checkpoint}: {type(exc).__name__}: {first}\n")  # one line, like argparse
    write_report(report, None if args.no_files else args.out)
    return report


def write_report(report: SparsityReport, out: str | Path | None) -> None:
    """Print ``report`` on the terminal and, unless ``out`` is None, save its files there (logged)."""
    report.print()
    if out is not None:
        paths = report.save(out)
        log.info("wrote %s", ", ".join(str(v) for v in paths.values()))
