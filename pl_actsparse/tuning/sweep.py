"""One calibration pass, any target: thresholds from stored statistics, and metric-vs-sparsity sweeps.

A calibration pass keeps, per layer, a histogram of ``|x|`` over every calibration element
(:class:`~pl_actsparse.core.calibration.LayerStatistics`). That histogram answers "which threshold zeroes a
fraction ``t`` of this layer's inputs?" for *any* ``t`` without running the model again:

* bf16 / fp16 inputs: the histogram covers every bit pattern, so :func:`threshold_for_target` is exact: the
  same threshold a fresh calibration would choose on the same inputs.
* fp32 inputs: the stored histogram keeps the top 16 bits of each value (bins 2**-7 wide, relative). The
  threshold is interpolated linearly inside the bin that holds the order statistic, so it is within one bin
  (relative error < 2**-7) of the exact one, and the zeroed fraction on the calibration inputs differs from
  the target by at most that bin's mass (in practice ~1e-4 or less, see ``docs/sweep.md``).

What one pass cannot know: when *several* layers move to a new target together, a downstream layer's inputs
change (they are produced by sparsified upstream layers). Its stored histogram describes the inputs under the
thresholds of the pass that measured it, so its achieved sparsity drifts a little from the new target. The
first sparsified layer (and any layer whose upstream layers keep their thresholds) is exact.
:func:`sweep_sparsity` therefore offers both: ``recalibrate=False`` (one calibration pass plus N
evaluations; drift measured and reported) and ``recalibrate=True`` (a fresh exact calibration per point,
N calibration passes plus N evaluations).

Command line (the shipped stories260K model; metric = perplexity on stories 0-149)::

    python -m pl_actsparse.tuning.sweep --targets 0.1 0.2 0.3 0.4 0.5 0.6 --patterns '.*mlp.*' \
        --json sweep.json --plot sweep.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as _stats
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from pl_actsparse.core.calibration import LayerStatistics, threshold_from_histogram
from pl_actsparse.errors import InvalidTargetError, NotSparsifiedError
from pl_actsparse.api import (
    _restore,
    _snapshot,
    calibrate_activation_sparsity,
    prepare_activation_sparsity,
    set_target_sparsity,
    validate_target,
)
from pl_actsparse.core.layer import SparsifierMode, sparsified_layers
from pl_actsparse.core.scopes import IgnoredScope, TargetScope
from pl_actsparse.measure.tracking import SparsityCounter

__all__ = [
    "threshold_for_target",
    "thresholds_for_targets",
    "apply_statistics",
    "SweepPoint",
    "SweepResult",
    "sweep_sparsity",
    "lightning_validate_metric",
    "perplexity_metric",
    "main",
]

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(b: int, dtype: torch.dtype) -> float:
    return float(torch.tensor([b], dtype=_INT[dtype]).view(dtype).float().item())


def threshold_for_target(stats: LayerStatistics, target: float) -> float:
    """Threshold zeroing a fraction ``target`` of the inputs ``stats`` describes, with no pass over data.

    Exact for bf16/fp16 statistics (identical to what calibration chooses on the same inputs); for fp32,
    linearly interpolated inside the 2**-7-wide (relative) bin that holds the order statistic.
    Target 0 gives ``-inf`` and 1 gives ``+inf``, as in calibration.

    >>> import torch
    >>> from pl_actsparse.core.calibration import LayerStatistics, coarse_histogram
    >>> x = torch.randn(10000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    >>> st = LayerStatistics("l", 0.5, torch.bfloat16, coarse_histogram(x))  # as measured at target 0.5
    >>> t = threshold_for_target(st, 0.3)
    >>> round(float((x.abs() <= t).float().mean()), 2)
    0.3
    """
    target = validate_target(target, repr(stats.name))
    coarse = stats.coarse.to("cpu", torch.int64)
    n = int(coarse.sum())
    if target <= 0.0 or n == 0:
        return -math.inf
    if target >= 1.0:
        return math.inf
    if stats.dtype != torch.float32:
        return threshold_from_histogram(coarse, target, stats.dtype)[0]
    want = target * n
    cum = torch.cumsum(coarse, 0)
    b = int(torch.searchsorted(cum, torch.tensor(math.ceil(want), dtype=cum.dtype)))
    b = min(b, coarse.numel() - 1)
    below = int(cum[b - 1]) if b > 0 else 0
    count = int(coarse[b])
    lo, hi = _bits(b << 16, torch.float32), _bits((b + 1) << 16, torch.float32)
    if count == 0 or want <= below:
        return _bits((b << 16) - 1, torch.float32) if b > 0 else -math.inf
    # Values in the bin are assumed spread uniformly over [lo, hi); the exact one is within the bin.
    frac = min(max((want - below) / count, 0.0), 1.0)
    return lo + frac * (hi - lo)


def thresholds_for_targets(
    statistics: Mapping[str, LayerStatistics], targets: Mapping[str, float] | float
) -> dict[str, float]:
    """:func:`threshold_for_target` for several layers (a number applies to all)."""
    if not isinstance(targets, Mapping):
        targets = {n: targets for n in statistics}
    missing = [n for n in targets if n not in statistics]
    if missing:
        raise NotSparsifiedError(f"no calibration statistics for {missing}; statistics exist for {list(statistics)}")
    return {n: threshold_for_target(statistics[n], t) for n, t in targets.items()}


def apply_statistics(
    model: nn.Module, statistics: Mapping[str, LayerStatistics], targets: Mapping[str, float] | float
) -> dict[str, float]:
    """Set targets and thresholds of sparsified layers from stored statistics (no forward pass).

    The layers end in sparsifying mode; returns the thresholds that were set. See the module docstring for
    what is exact and what drifts.
    """
    layers = dict(sparsified_layers(model))
    thresholds = thresholds_for_targets(statistics, targets)
    unknown = [n for n in thresholds if n not in layers]
    if unknown:
        raise NotSparsifiedError(f"{unknown} are not sparsified layers of the model")
    for name, thr in thresholds.items():
        m = layers[name]
        t = targets[name] if isinstance(targets, Mapping) else targets
        m._actsparse.target = float(t)
        m.activation_threshold.fill_(thr)
        m._actsparse.mode = SparsifierMode.SPARSIFYING
        m._actsparse.calibration_sparsity = None  # not measured at this target
    return thresholds


# ---------------------------------------------------------------------------------------------------
# sweeps


@dataclass
class SweepPoint:
    """One evaluated setting."""

    targets: dict[str, float]
    mean_target: float  # weight-byte-weighted mean of the per-layer targets
    metric: float
    achieved: float | None  # weight-byte-weighted achieved sparsity on the evaluation data (None: not observed)
    achieved_per_layer: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SweepResult:
    """Metric against sparsity; ``dense`` is the metric with the swept layers passing their inputs through."""

    points: list[SweepPoint]
    metric_name: str
    dense: float | None
    recalibrated: bool
    base_targets: dict[str, float]
    calibration_passes: int
    evaluations: int
    weight_bytes: dict[str, int]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric_name": self.metric_name,
            "dense": self.dense,
            "recalibrated": self.recalibrated,
            "base_targets": self.base_targets,
            "calibration_passes": self.calibration_passes,
            "evaluations": self.evaluations,
            "weight_bytes": self.weight_bytes,
            "seconds": self.seconds,
            "points": [asdict(p) for p in self.points],
        }

    def to_json(self, path: str | Path | None = None, **kwargs: Any) -> str:
        text = json.dumps(self.to_dict(), default=_json_default, **({"indent": 1} | kwargs))
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def plot(self, path: str | Path, *, title: str | None = None, others: Mapping[str, "SweepResult"] | None = None) -> Path:
        """Write a PNG of the metric against achieved sparsity (matplotlib, Agg backend)."""
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        series = {"sweep": self, **(others or {})}
        for label, res in series.items():
            xs = [p.achieved if p.achieved is not None else p.mean_target for p in res.points]
            ys = [p.metric for p in res.points]
            ax.plot(xs, ys, marker="o", label=label if others else None)
            if res is self:
                for p, x, y in zip(res.points, xs, ys):
                    ax.annotate(f"{p.mean_target:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if self.dense is not None:
            ax.axhline(self.dense, color="gray", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("achieved sparsity (weight-byte weighted, evaluation data)")
        ax.set_ylabel(self.metric_name)
        ax.set_title(title or f"{self.metric_name} vs activation sparsity ({'recalibrated' if self.recalibrated else 'one calibration pass'})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o)
    return str(o)


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        try:
            matplotlib.use("Agg", force=True)
        except Exception:  # noqa: BLE001 - a backend already in use by the caller stays
            pass
    import matplotlib.pyplot as plt

    return plt


def _as_targets(point: float | Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    if isinstance(point, Mapping):
        unknown = [n for n in point if n not in names]
        if unknown:
            raise NotSparsifiedError(f"sweep point names layers that are not swept: {unknown}")
        missing = [n for n in names if n not in point]
        if missing:
            raise InvalidTargetError(f"a sweep point given as a dict must set every swept layer; missing {missing}")
        return {n: validate_target(point[n], repr(n)) for n in names}
    v = validate_target(point, "a sweep point")
    return {n: v for n in names}


def _weighted(values: Mapping[str, float], weights: Mapping[str, int]) -> float:
    total = sum(weights[n] for n in values)
    return sum(values[n] * weights[n] for n in values) / total if total else 0.0


def sweep_sparsity(
    model: nn.Module,
    dataset: Iterable[Any],
    targets: Sequence[float | Mapping[str, float]],
    evaluate: Callable[[nn.Module], float],
    target_scope: TargetScope | Mapping[TargetScope, float] | None = None,
    ignored_scope: IgnoredScope | None = None,
    *,
    recalibrate: bool = False,
    base_targets: float | Mapping[str, float] | None = None,
    num_calibration_batches: int | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    metric_name: str = "metric",
    include_dense: bool = True,
    measure_achieved: bool = True,
    progress: bool = False,
) -> SweepResult:
    """Evaluate ``evaluate(model)`` at each sparsity setting of ``targets``; the model is left as it was.

    Args:
        model: a plain or sparsified model.
        dataset: calibration data (as for :func:`~pl_actsparse.sparsify_activations`).
        targets: the points: a number (every swept layer at that target) or a ``{layer: target}`` dict.
        evaluate: ``model -> float``, e.g. :func:`perplexity_metric` or :func:`lightning_validate_metric`.
        target_scope: which layers to sweep (a ``TargetScope`` or a recipe dict, whose targets are ignored);
            default: the model's sparsified layers.
        recalibrate: ``False`` (default): one calibration pass at ``base_targets``, thresholds of every point
            from its statistics; ``True``: an exact calibration per point.
        base_targets: where the single pass calibrates; default: per layer, the median of the points' targets.
        measure_achieved: count zeroed inputs during each evaluation (:class:`SparsityCounter`), the x axis.

    Cost: ``1 + len(targets)`` passes (``recalibrate=False``) or ``2 * len(targets)``, plus one evaluation
    for the dense reference when ``include_dense``.
    """
    if not callable(evaluate):
        raise InvalidTargetError(f"evaluate must be a callable model -> float, got {evaluate!r}")
    if not targets:
        raise InvalidTargetError("targets is empty: give at least one sweep point")
    data = list(dataset) if not isinstance(dataset, (list, tuple)) else dataset
    modules = dict(model.named_modules())
    existing = [n for n, _ in sparsified_layers(model)]
    if target_scope is not None:
        recipe = target_scope if isinstance(target_scope, Mapping) else {target_scope: 0.0}
        from pl_actsparse.api import plan_activation_sparsity

        names = list(plan_activation_sparsity(model, {s: 0.0 for s in recipe}, ignored_scope).targets)
    else:
        names = existing
        if not names:
            raise NotSparsifiedError("the model has no sparsified layer: pass target_scope to say which layers to sweep")
    points = [_as_targets(p, names) for p in targets]
    weights = {n: modules[n].weight.numel() * modules[n].weight.element_size() for n in names}
    if base_targets is None:
        base = {n: float(_stats.median(p[n] for p in points)) for n in names}
    else:
        base = _as_targets(base_targets, names)

    snaps = _snapshot(modules, names)
    plan_before = model.__dict__.get("_actsparse_plan")
    t_start = time.perf_counter()
    passes = 0
    evaluations = 0
    result_points: list[SweepPoint] = []
    dense = None
    try:
        prepare_activation_sparsity(model, {TargetScope(names=[n]): base[n] for n in names})
        if include_dense:
            for n in names:
                modules[n]._actsparse.mode = SparsifierMode.PASSTHROUGH
            dense = float(evaluate(model))
            evaluations += 1
        stats: dict[str, LayerStatistics] = {}
        if not recalibrate:
            set_target_sparsity(model, base)
            for n in names:
                modules[n]._actsparse.target = base[n]
            report = calibrate_activation_sparsity(
                model, data, layers=names, num_calibration_batches=num_calibration_batches, transform_fn=transform_fn, progress=progress
            )
            stats = report.statistics
            passes += 1
        for point in points:
            t0 = time.perf_counter()
            if recalibrate:
                set_target_sparsity(model, point)
                calibrate_activation_sparsity(
                    model, data, layers=names, num_calibration_batches=num_calibration_batches, transform_fn=transform_fn, progress=progress
                )
                passes += 1
                thresholds = {n: _threshold_number(modules[n]) for n in names}
            else:
                thresholds = apply_statistics(model, stats, point)
            if measure_achieved:
                with SparsityCounter(model) as counter:
                    value = float(evaluate(model))
                per_layer = {n: v for n, v in counter.sparsity().items() if n in point}
            else:
                value = float(evaluate(model))
                per_layer = {}
            evaluations += 1
            result_points.append(
                SweepPoint(
                    targets=dict(point),
                    mean_target=_weighted(point, weights),
                    metric=value,
                    achieved=_weighted(per_layer, weights) if len(per_layer) == len(names) else None,
                    achieved_per_layer=per_layer,
                    thresholds=thresholds,
                    seconds=time.perf_counter() - t0,
                )
            )
            if progress:
                print(f"sweep: target {result_points[-1].mean_target:.3f} -> {metric_name} {value:.4f}", file=sys.stderr)
    finally:
        newly = [n for n, s in snaps.items() if not s.was_sparsified]
        _restore(modules, snaps)
        if newly and plan_before is None and not any(True for _ in sparsified_layers(model)):
            model.__dict__.pop("_actsparse_plan", None)
        elif plan_before is not None:
            model.__dict__["_actsparse_plan"] = plan_before
    return SweepResult(
        points=result_points,
        metric_name=metric_name,
        dense=dense,
        recalibrated=recalibrate,
        base_targets=base,
        calibration_passes=passes,
        evaluations=evaluations,
        weight_bytes=weights,
        seconds=time.perf_counter() - t_start,
    )


def _threshold_number(m: nn.Module) -> float:
    t = m.activation_threshold
    return float(t) if t.numel() == 1 else float(t.float().median())


# ---------------------------------------------------------------------------------------------------
# metrics


def perplexity_metric(windows: Any, batch_size: int = 16) -> Callable[[nn.Module], float]:
    """``model -> perplexity`` on token windows (see :func:`pl_actsparse.tuning.objectives.perplexity`)."""
    from pl_actsparse.tuning.objectives import perplexity

    def metric(model: nn.Module) -> float:
        return perplexity(model, windows, batch_size=batch_size)

    return metric


def lightning_validate_metric(
    trainer: Any,
    module: Any,
    key: str,
    *,
    dataloaders: Any = None,
    datamodule: Any = None,
    model_attr: str | None = None,
) -> Callable[[nn.Module], float]:
    """``model -> float``: run ``trainer.validate`` and read one logged metric (e.g. ``"val_loss"``).

    ``module`` is the LightningModule holding the swept model (``model`` may be the module itself or a
    submodule of it, e.g. ``module.model``; sparsifiers live on the layers, so nothing is copied).
    """

    def metric(_model: nn.Module) -> float:
        results = trainer.validate(module, dataloaders=dataloaders, datamodule=datamodule, verbose=False)
        merged: dict[str, Any] = {}
        for r in results:
            merged.update(r)
        if key not in merged:
            raise KeyError(f"trainer.validate logged {sorted(merged)}; no {key!r}")
        value = merged[key]
        return float(value.item() if isinstance(value, torch.Tensor) else value)

    return metric


# ---------------------------------------------------------------------------------------------------
# command line


def _parser(prog: str = "python -m pl_actsparse.tuning.sweep") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Perplexity of the shipped stories260K model at several activation-sparsity targets, "
        "from one calibration pass. Writes JSON and a PNG plot.",
    )
    p.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--patterns", nargs="+", default=[r".*mlp\..*_proj"], help="regexes (re.fullmatch) of layers to sweep")
    p.add_argument("--recalibrate", action="store_true", help="exact calibration at every point (N passes)")
    p.add_argument("--calibration-stories", type=int, nargs=2, default=[500, 600], metavar=("START", "STOP"))
    p.add_argument("--eval-stories", type=int, nargs=2, default=[0, 150], metavar=("START", "STOP"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (windows)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--model", default=None, help="llama2.c checkpoint (default: shipped stories260K.bin)")
    p.add_argument("--json", default="sweep.json", help="output JSON path ('-' for stdout)")
    p.add_argument("--plot", default="sweep.png", help="output PNG path ('' to skip)")
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m pl_actsparse.tuning.sweep") -> SweepResult:
    """``python -m pl_actsparse.tuning.sweep ...`` or ``pl-actsparse sweep ...`` (see ``--help``)."""
    args = _parser(prog).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pl_actsparse.demos.tinystories import TokenWindows, load_stories
    from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint

    model = load_llama2c_checkpoint(args.model, dtype=getattr(torch, args.dtype))
    tok = Llama2cTokenizer.from_file()
    calib_windows = TokenWindows(load_stories(start=args.calibration_stories[0], stop=args.calibration_stories[1]), tok, args.seq_len)
    evaluation = TokenWindows(load_stories(start=args.eval_stories[0], stop=args.eval_stories[1]), tok, args.seq_len)
    xs = [calib_windows[i] for i in range(len(calib_windows))]
    calib = [torch.stack(xs[i : i + args.batch_size]) for i in range(0, len(xs), args.batch_size)]
    result = sweep_sparsity(
        model,
        calib,
        args.targets,
        perplexity_metric(evaluation),
        TargetScope(patterns=args.patterns),
        recalibrate=args.recalibrate,
        metric_name="perplexity",
        progress=True,
    )
    text = result.to_json()
    if args.json == "-":
        print(text)
    else:
        Path(args.json).write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
