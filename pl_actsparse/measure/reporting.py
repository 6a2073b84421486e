"""Per-model sparsity report: terminal table, Markdown, HTML, JSON and PNG plots.

:func:`model_report` reads a **live model** or a **checkpoint** (a state dict, a ``torch.save`` file or a
Lightning checkpoint; no model class needed, everything comes from the saved thresholds, ``_extra_state``
and weight shapes). Per sparsified layer it shows the threshold, the target, the achieved sparsity on the
calibration data, and, given data, the achieved sparsity on that data with its per-token spread (5th and
95th percentiles of the per-token zeroed fraction), the weight bytes a sparse kernel skips per token, and the
group of layers reading the same tensor (live model with an example input).

**Predicted decode-time memory saved.** Decoding one token at batch size 1 is memory-bound: it reads every
weight matrix once. A sparse kernel skips the columns of zeroed inputs, so it saves
``sum_l achieved_l * weight_bytes_l`` per token. The report divides this by the bytes a dense decode step
reads (every parameter except embedding tables, of which one row is read; a tied ``lm_head`` counts once)
and gives the ideal speed-up bound ``1 / (1 - fraction)``. Real kernels reach 75-90% of the per-layer bound
at 50-70% sparsity on CPU (``shared/field-notes.md``); the prediction ignores KV-cache reads.

Command line::

    python -m pl_actsparse.measure.reporting CHECKPOINT.pt --out report/      # report.md, report.html, report.png, report.json
    python -m pl_actsparse.measure.reporting --demo --out report/            # the shipped model, seed recipe, with data
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from pl_actsparse.core.calibration import _to_device, call_model, default_transform_fn, model_device
from pl_actsparse.errors import NotSparsifiedError
from pl_actsparse.core.layer import THRESHOLD_BUFFER, sparsified_layers

__all__ = ["LayerRow", "ModelReport", "model_report", "main"]


@dataclass
class LayerRow:
    name: str
    target: float
    threshold: float  # the scalar threshold; for a per-channel threshold, its median
    per_channel: bool
    calibration_sparsity: float | None
    in_features: int
    out_features: int
    weight_bytes: int
    mode: str
    group: str | None = None  # label of the shared-input group
    data_sparsity: float | None = None  # achieved on the data given to the report
    token_p5: float | None = None
    token_p95: float | None = None

    @property
    def achieved(self) -> float:
        """Best available achieved sparsity: on the report's data, else calibration, else the target."""
        for v in (self.data_sparsity, self.calibration_sparsity):
            if v is not None:
                return v
        return self.target if self.mode == "sparsifying" else 0.0

    @property
    def bytes_skipped(self) -> float:
        return self.achieved * self.weight_bytes


@dataclass
class ModelReport:
    rows: list[LayerRow]
    decode_bytes: int  # bytes a dense decode step reads per token (parameters except embedding tables)
    model_bytes: int  # all unique parameter bytes
    groups: list[list[str]] = field(default_factory=list)
    source: str = "model"
    data_tokens: int | None = None

    # -- summary ----------------------------------------------------------------------------------
    @property
    def sparsified_bytes(self) -> int:
        return sum(r.weight_bytes for r in self.rows)

    @property
    def bytes_skipped(self) -> float:
        return sum(r.bytes_skipped for r in self.rows)

    @property
    def skipped_fraction_of_sparsified(self) -> float:
        return self.bytes_skipped / self.sparsified_bytes if self.sparsified_bytes else 0.0

    @property
    def decode_saving(self) -> float:
        """Predicted fraction of the bytes a batch-1 decode step reads that a sparse kernel skips."""
        return self.bytes_skipped / self.decode_bytes if self.decode_bytes else 0.0

    @property
    def speedup_bound(self) -> float:
        return 1.0 / (1.0 - self.decode_saving) if self.decode_saving < 1 else math.inf

    def summary(self) -> dict[str, Any]:
        return {
            "layers": len(self.rows),
            "sparsified_weight_bytes": self.sparsified_bytes,
            "weight_bytes_skipped_per_token": self.bytes_skipped,
            "skipped_fraction_of_sparsified": self.skipped_fraction_of_sparsified,
            "decode_bytes_per_token_dense": self.decode_bytes,
            "decode_bytes_per_token_sparse": self.decode_bytes - self.bytes_skipped,
            "predicted_decode_memory_saving": self.decode_saving,
            "ideal_decode_speedup_bound": self.speedup_bound,
            "model_parameter_bytes": self.model_bytes,
            "shared_input_groups": [list(g) for g in self.groups],
            "data_tokens": self.data_tokens,
            "source": self.source,
        }

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["achieved"] = r.achieved
            d["bytes_skipped"] = r.bytes_skipped
            rows.append(d)
        return {"layers": rows, "summary": self.summary()}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=lambda o: str(o), **({"indent": 1} | kwargs))

    # -- tables -----------------------------------------------------------------------------------
    _HEAD = ["layer", "group", "target", "threshold", "calib.", "data", "token p5-p95", "in->out", "KiB", "KiB skipped"]

    def _cells(self) -> list[list[str]]:
        out = []
        for r in self.rows:
            thr = _fmt(r.threshold) + (" (per-ch. median)" if r.per_channel else "")
            spread = "-" if r.token_p5 is None else f"{r.token_p5:.3f}-{r.token_p95:.3f}"
            out.append(
                [
                    r.name,
                    r.group or "",
                    f"{r.target:.4f}",
                    thr,
                    "-" if r.calibration_sparsity is None else f"{r.calibration_sparsity:.4f}",
                    "-" if r.data_sparsity is None else f"{r.data_sparsity:.4f}",
                    spread,
                    f"{r.in_features}->{r.out_features}",
                    f"{r.weight_bytes / 1024:.1f}",
                    f"{r.bytes_skipped / 1024:.1f}",
                ]
            )
        return out

    def _summary_lines(self) -> list[str]:
        lines = [
            f"{len(self.rows)} sparsified layers, {self.sparsified_bytes / 1024:.1f} KiB of weights; "
            f"{self.bytes_skipped / 1024:.1f} KiB skipped per token ({self.skipped_fraction_of_sparsified:.1%} of them).",
            f"Predicted batch-1 decode: {self.decode_bytes / 1024:.1f} KiB -> {(self.decode_bytes - self.bytes_skipped) / 1024:.1f} KiB "
            f"read per token ({self.decode_saving:.1%} less; ideal memory-bound speed-up <= {self.speedup_bound:.2f}x).",
        ]
        if self.groups:
            lines.append("Shared-input groups: " + "; ".join(f"{_group_label(i)} = {', '.join(g)}" for i, g in enumerate(self.groups)))
        if self.data_tokens:
            lines.append(f"'data' column: achieved sparsity on {self.data_tokens} tokens given to the report.")
        return lines

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max(len(self._HEAD[i]), *(len(c[i]) for c in cells)) if cells else len(self._HEAD[i]) for i in range(len(self._HEAD))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        return "\n".join([fmt(self._HEAD), fmt(["-" * w for w in widths]), *(fmt(c) for c in cells), *self._summary_lines()])

    def print(self, console: Any = None) -> None:
        """A rich table on the terminal."""
        from rich.console import Console
        from rich.table import Table

        if console is None:
            console = Console()
            if not console.is_terminal:
                console = Console(width=max(console.width, 170))
        table = Table(title=f"activation sparsity: {self.source}")
        for i, h in enumerate(self._HEAD):
            table.add_column(h, justify="left" if i < 2 else "right")
        for c in self._cells():
            table.add_row(*c)
        console.print(table)
        for line in self._summary_lines():
            console.print(line)

    def to_markdown(self, image: str | None = None) -> str:
        lines = [f"# Activation sparsity report: {self.source}", ""]
        lines += ["| " + " | ".join(self._HEAD) + " |", "|" + "---|" * len(self._HEAD)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self._cells()]
        lines += [""] + [f"* {s}" for s in self._summary_lines()]
        if image:
            lines += ["", f"![per-layer sparsity]({image})"]
        return "\n".join(lines) + "\n"

    def to_html(self, png: bytes | None = None) -> str:
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

    # -- plots ------------------------------------------------------------------------------------
    def plot(self, path: str | Path | None = None) -> bytes:
        """PNG: per-layer target vs achieved (with the per-token spread), thresholds, and bytes skipped."""
        from pl_actsparse.tuning.sweep import _pyplot

        plt = _pyplot()
        n = len(self.rows)
        x = list(range(n))
        labels = [_short(r.name) for r in self.rows]
        fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.45 * n + 2), 9.0), dpi=110, sharex=True)
        ax = axes[0]
        ax.bar([i - 0.2 for i in x], [r.target for r in self.rows], width=0.4, label="target", color="#bbbbbb")
        ach = [r.achieved for r in self.rows]
        yerr = None
        if any(r.token_p5 is not None for r in self.rows):
            yerr = [
                [max(a - (r.token_p5 if r.token_p5 is not None else a), 0) for a, r in zip(ach, self.rows)],
                [max((r.token_p95 if r.token_p95 is not None else a) - a, 0) for a, r in zip(ach, self.rows)],
            ]
        ax.bar([i + 0.2 for i in x], ach, width=0.4, yerr=yerr, capsize=2, label="achieved (p5-p95 per token)" if yerr else "achieved", color="#4477aa")
        ax.set_ylabel("sparsity")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax = axes[1]
        thr = [r.threshold if math.isfinite(r.threshold) and r.threshold > 0 else float("nan") for r in self.rows]
        ax.plot(x, thr, "o", color="#aa3377")
        if any(t == t for t in thr):
            ax.set_yscale("log")
        ax.set_ylabel("threshold")
        ax.grid(True, alpha=0.3)
        ax = axes[2]
        skipped = [r.bytes_skipped / 1024 for r in self.rows]
        kept = [(r.weight_bytes - r.bytes_skipped) / 1024 for r in self.rows]
        ax.bar(x, skipped, label="skipped per token", color="#228833")
        ax.bar(x, kept, bottom=skipped, label="read per token", color="#dddddd")
        ax.set_ylabel("weight KiB")
        ax.legend(fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        fig.suptitle(f"predicted decode read saving {self.decode_saving:.1%} (bound {self.speedup_bound:.2f}x)", fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        data = buf.getvalue()
        if path is not None:
            Path(path).write_bytes(data)
        return data

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


def _fmt(v: float) -> str:
    return str(v) if math.isinf(v) else f"{v:.5g}"


def _short(name: str) -> str:
    return name.replace("layers.", "L").replace(".mlp.", ".").replace(".self_attn.", ".").replace("_proj", "")


def _group_label(i: int) -> str:
    return f"g{i + 1}"


# ---------------------------------------------------------------------------------------------------
# building


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set = set()
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _decode_bytes_of_model(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    embed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    read_by_linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decode = [p for p in params if id(p) not in embed or id(p) in read_by_linear]
    return _unique_bytes(decode), _unique_bytes(params)


def _rows_from_model(model: nn.Module) -> list[LayerRow]:
    from pl_actsparse.measure.report import threshold_value

    rows = []
    for name, m in sparsified_layers(model):
        s = m._actsparse
        t = m.activation_threshold
        rows.append(
            LayerRow(
                name=name,
                target=s.target,
                threshold=threshold_value(t),
                per_channel=t.numel() > 1,
                calibration_sparsity=s.calibration_sparsity,
                in_features=m.in_features,
                out_features=m.out_features,
                weight_bytes=m.weight.numel() * m.weight.element_size(),
                mode=s.mode.value,
            )
        )
    return rows


def _load_state_dict(source: Any, prefix: str) -> tuple[Mapping[str, Any], str]:
    from pl_actsparse.core.checkpoint import read_state_dict

    label = str(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    return read_state_dict(source, prefix=prefix), label


def _rows_from_state_dict(sd: Mapping[str, Any]) -> list[LayerRow]:
    from pl_actsparse.measure.report import threshold_value

    from pl_actsparse.core.checkpoint import saved_sparsifiers

    rows = []
    for entry in saved_sparsifiers(sd):
        name, t, extra = entry.name, entry.threshold, entry.state or {}
        pre = f"{name}." if name else ""
        w = sd.get(pre + "weight")
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise NotSparsifiedError(f"the state dict has a threshold for {name!r} but no 2-D {pre}weight")
        rows.append(
            LayerRow(
                name=name,
                target=float(extra.get("target", 0.0)),
                threshold=threshold_value(t),
                per_channel=t.numel() > 1,
                calibration_sparsity=extra.get("calibration_sparsity"),
                in_features=w.shape[1],
                out_features=w.shape[0],
                weight_bytes=w.numel() * w.element_size(),
                mode="sparsifying" if extra.get("calibrated", entry.state is None) else "passthrough",
            )
        )
    return rows


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _is_embedding_key(key: str) -> bool:
    module = key.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in key else ""
    return "embed" in module or module in ("wte", "wpe")


def _decode_bytes_of_state_dict(sd: Mapping[str, Any]) -> tuple[int, int]:
    """Parameters read per decode step, from names: embedding tables (one row read) are left out unless a
    non-embedding key (a tied classifier) shares their storage."""
    floats = {
        k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not k.endswith((THRESHOLD_BUFFER, "_extra_state"))
    }
    by_storage: dict[tuple, list[str]] = {}
    for k, v in floats.items():
        by_storage.setdefault(_storage_key(v), []).append(k)
    decode = [floats[keys[0]] for keys in by_storage.values() if not all(_is_embedding_key(k) for k in keys)]
    return _unique_bytes(decode), _unique_bytes(floats.values())


def model_report(
    model_or_checkpoint: nn.Module | Mapping[str, Any] | str | os.PathLike,
    data: Iterable[Any] | None = None,
    *,
    example_input: Any = None,
    detect_groups: bool = True,
    num_batches: int | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    prefix: str = "",
) -> ModelReport:
    """Build the report of a live model or of a checkpoint (path, state dict or Lightning checkpoint).

    ``data`` (live model only): model inputs to measure achieved sparsity and its per-token spread on (at
    most ``num_batches`` items). Shared-input groups are detected on ``example_input`` (default: the first
    data item) when ``detect_groups``. ``prefix`` strips a LightningModule attribute path from checkpoint keys.
    """
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
        rows = _rows_from_model(model)
        if not rows:
            raise NotSparsifiedError("the model has no sparsified layer to report")
        decode, total = _decode_bytes_of_model(model)
        report = ModelReport(rows=rows, decode_bytes=decode, model_bytes=total, source=type(model).__name__)
        items = None
        if data is not None:
            items = []
            for item in data:
                if num_batches is not None and len(items) >= num_batches:
                    break
                items.append(item)
            if example_input is None and items:
                example_input = items[0]
        if detect_groups and example_input is not None:
            from pl_actsparse.core.groups import find_shared_input_groups

            report.groups = find_shared_input_groups(model, example_input, [r.name for r in rows], transform_fn=transform_fn)
            label = {n: _group_label(i) for i, g in enumerate(report.groups) for n in g}
            for r in rows:
                r.group = label.get(r.name)
        if items:
            _measure(model, items, rows, transform_fn, report)
        return report
    if data is not None:
        raise ValueError("data can only be measured on a live model; load the checkpoint into the model first")
    sd, label = _load_state_dict(model_or_checkpoint, prefix)
    rows = _rows_from_state_dict(sd)
    if not rows:
        raise NotSparsifiedError(f"{label} holds no '{THRESHOLD_BUFFER}' entry, so no sparsified layer")
    decode, total = _decode_bytes_of_state_dict(sd)
    return ModelReport(rows=rows, decode_bytes=decode, model_bytes=total, source=label)


def _measure(model: nn.Module, items: list[Any], rows: list[LayerRow], transform_fn: Callable | None, report: ModelReport) -> None:
    from pl_actsparse.measure.tracking import SparsityCounter

    transform = transform_fn or default_transform_fn
    device = model_device(model)
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        with SparsityCounter(model, per_token=True) as counter, torch.no_grad():
            for item in items:
                inputs = _to_device(transform(item), device)
                call_model(model, inputs)
                if isinstance(inputs, torch.Tensor):
                    tokens += inputs.numel() if not inputs.is_floating_point() else inputs[..., 0].numel()
    finally:
        model.train(was_training)
    sparsity = counter.sparsity()
    spread = counter.token_quantiles((0.05, 0.95))
    for r in rows:
        if r.name in sparsity:
            r.data_sparsity = sparsity[r.name]
            r.token_p5, r.token_p95 = spread[r.name]
    report.data_tokens = tokens or None


# ---------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None, prog: str = "python -m pl_actsparse.measure.reporting") -> ModelReport:
    """``python -m pl_actsparse.measure.reporting [CHECKPOINT] --out DIR`` or ``pl-actsparse report ...`` (see ``--help``)."""
    p = argparse.ArgumentParser(prog=prog, description="Activation-sparsity report of a checkpoint or of the shipped model.")
    p.add_argument("checkpoint", nargs="?", help="sparsified state dict / Lightning checkpoint (.pt/.ckpt)")
    p.add_argument("--prefix", default="", help="strip this key prefix (e.g. 'model.')")
    p.add_argument("--demo", action="store_true", help="the shipped stories260K model with the seed recipe, measured on stories 0-29")
    p.add_argument("--out", default="actsparse-report", help="output directory")
    p.add_argument("--no-files", action="store_true", help="only print the table")
    args = p.parse_args(argv)
    if args.demo:
        from pl_actsparse.demos.tinystories import TokenWindows, load_stories
        from pl_actsparse.api import sparsify_activations
        from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
        from pl_actsparse.core.scopes import TargetScope

        model = load_llama2c_checkpoint()
        tok = Llama2cTokenizer.from_file()
        cw = TokenWindows(load_stories(start=500, stop=600), tok, 256)
        xs = [cw[i] for i in range(len(cw))]
        calib = [torch.stack(xs[i : i + 8]) for i in range(0, len(xs), 8)]
        recipe = {TargetScope(patterns=[".*up_proj", ".*gate_proj"]): 0.3, TargetScope(patterns=[".*down_proj"]): 0.5}
        sparsify_activations(model, calib, recipe, progress=False)
        held = TokenWindows(load_stories(start=0, stop=30), tok, 256)
        hx = [held[i] for i in range(len(held))]
        report = model_report(model, [torch.stack(hx[i : i + 8]) for i in range(0, len(hx), 8)])
        report.source = "stories260K, seed recipe"
    elif args.checkpoint:
        report = model_report(args.checkpoint, prefix=args.prefix)
    else:
        p.error("give a CHECKPOINT or --demo")
    report.print()
    if not args.no_files:
        paths = report.save(args.out)
        print("wrote " + ", ".join(str(v) for v in paths.values()), file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
