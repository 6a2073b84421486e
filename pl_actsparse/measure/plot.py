"""Every plot of the package, in one place: matplotlib is an optional extra (``pip install 'pl-actsparse[plot]'``).

* :func:`plot_metric`: :meth:`ActivationSparsity.plot <pl_actsparse.measure.metric.ActivationSparsity.plot>`;
* :func:`plot_report`: the three-panel PNG of a :class:`~pl_actsparse.measure.report.SparsityReport`;
* :func:`plot_sweep`: metric against achieved sparsity of a :class:`~pl_actsparse.tuning.sweep.SweepResult`.

Figures are drawn with the non-interactive Agg backend unless the caller already chose one.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["pyplot", "plot_metric", "plot_report", "plot_sweep", "quantile_key", "short_layer_name"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (a backend already in use by the caller stays).

    Raises:
        ModuleNotFoundError: matplotlib is not installed (with the install hint).
    """
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dev/plot extra
        raise ModuleNotFoundError("plots need matplotlib: pip install 'pl-actsparse[plot]'") from exc
    if matplotlib.get_backend().lower() != "agg":
        with contextlib.suppress(Exception):  # a backend already in use by the caller stays
            matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def short_layer_name(name: str) -> str:
    """``layers.3.mlp.up_proj`` -> ``L3.up``: tick labels that fit."""
    return name.replace("layers.", "L").replace(".mlp.", ".").replace(".self_attn.", ".").replace("_proj", "")


def quantile_key(q: float) -> str:
    """The key suffix of quantile ``q`` in metric results: 0.05 -> ``p5``, 0.025 -> ``p2_5``."""
    return f"p{100 * q:g}".replace(".", "_")


def plot_metric(metric: Any, val: Any, ax: Any = None) -> Any:
    """Per-layer achieved sparsity of an ``ActivationSparsity`` result as bars with the per-token spread; a list of
    results plots the overall values over time. Returns ``(figure, axes)`` (figure ``None`` when ``ax`` is given)."""
    if isinstance(val, Sequence) and not isinstance(val, Mapping):
        from torchmetrics.utilities.plot import plot_single_or_multi_val

        keys = ("sparsity", "weighted_sparsity")
        return plot_single_or_multi_val(
            [{k: v[k] for k in keys} for v in val],
            ax=ax,
            lower_bound=metric.plot_lower_bound,
            upper_bound=metric.plot_upper_bound,
            name="achieved sparsity",
        )
    plt = pyplot()
    lo_key, hi_key = (f"token_sparsity_{quantile_key(q)}" for q in (metric.quantiles[0], metric.quantiles[-1]))
    s = [float(val[f"{n}/sparsity"]) for n in metric.layers]
    lo = [float(val[f"{n}/{lo_key}"]) for n in metric.layers]
    hi = [float(val[f"{n}/{hi_key}"]) for n in metric.layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(s)), 3.5)) if ax is None else (None, ax)
    xs = list(range(len(s)))
    err = [[max(0.0, a - b) for a, b in zip(s, lo)], [max(0.0, b - a) for a, b in zip(s, hi)]]
    ax.bar(xs, s, yerr=err, capsize=3, color="tab:blue", alpha=0.8, label=f"achieved ({lo_key}-{hi_key} per token)")
    ax.axhline(float(val["sparsity"]), color="k", linestyle="--", linewidth=1, label="overall")
    ax.set_xticks(xs)
    ax.set_xticklabels(metric.layers, rotation=90, fontsize=7)
    ax.set_ylim(metric.plot_lower_bound, metric.plot_upper_bound)
    ax.set_ylabel("achieved sparsity")
    ax.legend(loc="upper right", fontsize=7)
    if fig is not None:
        fig.tight_layout()
    return fig, ax


def plot_report(report: Any, path: str | Path | None = None) -> bytes:
    """PNG bytes of a report: per-layer target vs achieved (with the per-token spread), thresholds, and weight
    bytes skipped vs read per token; also written to ``path`` if given."""
    plt = pyplot()
    rows = report.layers
    n = len(rows)
    x = list(range(n))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.45 * n + 2), 9.0), dpi=110, sharex=True)
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], [r.target for r in rows], width=0.4, label="target", color="#bbbbbb")
    ach = [r.achieved for r in rows]
    yerr = None
    if any(r.token_p5 is not None for r in rows):
        yerr = [
            [max(a - (r.token_p5 if r.token_p5 is not None else a), 0) for a, r in zip(ach, rows)],
            [max((r.token_p95 if r.token_p95 is not None else a) - a, 0) for a, r in zip(ach, rows)],
        ]
    ax.bar([i + 0.2 for i in x], ach, width=0.4, yerr=yerr, capsize=2, label="achieved (p5-p95 per token)" if yerr else "achieved", color="#4477aa")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1]
    thr = [r.threshold if math.isfinite(r.threshold) and r.threshold > 0 else float("nan") for r in rows]
    ax.plot(x, thr, "o", color="#aa3377")
    if any(t == t for t in thr):
        ax.set_yscale("log")
    ax.set_ylabel("threshold")
    ax.grid(True, alpha=0.3)
    ax = axes[2]
    skipped = [r.bytes_skipped / 1024 for r in rows]
    kept = [(r.weight_bytes - r.bytes_skipped) / 1024 for r in rows]
    ax.bar(x, skipped, label="skipped per token", color="#228833")
    ax.bar(x, kept, bottom=skipped, label="read per token", color="#dddddd")
    ax.set_ylabel("weight KiB")
    ax.legend(fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([short_layer_name(r.name) for r in rows], rotation=60, ha="right", fontsize=7)
    if report.decode_bytes:
        fig.suptitle(f"predicted decode read saving {report.decode_saving:.1%} (bound {report.speedup_bound:.2f}x)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def plot_sweep(result: Any, path: str | Path, *, title: str | None = None, others: Mapping[str, Any] | None = None) -> Path:
    """PNG of a sweep's metric against achieved sparsity (weight-byte weighted; the mean target where nothing
    was measured), with the dense reference; ``others`` adds labelled series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    series = {"sweep": result, **(others or {})}
    for label, res in series.items():
        xs = [p.achieved if p.achieved is not None else p.mean_target for p in res.points]
        ys = [p.metric for p in res.points]
        ax.plot(xs, ys, marker="o", label=label if others else None)
        if res is result:
            for p, x, y in zip(res.points, xs, ys):
                ax.annotate(f"{p.mean_target:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if result.dense is not None:
        ax.axhline(result.dense, color="gray", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("achieved sparsity (weight-byte weighted, evaluation data)")
    ax.set_ylabel(result.metric_name)
    ax.set_title(title or f"{result.metric_name} vs activation sparsity ({'recalibrated' if result.recalibrated else 'one calibration pass'})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
