"""One calibration pass, any target: thresholds from stored statistics, and metric-vs-sparsity sweeps.

A calibration pass keeps each layer's ``|x|`` histogram (:class:`~pl_actsparse.calibrate.histogram.LayerStatistics`),
which gives the threshold of any target without running the model: exact for bf16/fp16 inputs, within one bin
(relative error < 2**-7) for fp32. Downstream layers drift when upstream layers move too (their stored inputs were
produced at the old thresholds), so :func:`sweep_sparsity` offers ``recalibrate=False`` (one pass, drift measured)
and ``recalibrate=True`` (an exact calibration per point). Details and measured drift: ``docs/sweep.md``; the
shipped-model demo is ``python -m pl_actsparse.demos sweep --targets ...``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics as _stats
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from pl_actsparse.api import calibrate_activation_sparsity, plan_activation_sparsity, prepare_activation_sparsity, set_target_sparsity
from pl_actsparse.calibrate.histogram import LayerStatistics, threshold_for_target
from pl_actsparse.calibrate.running import check_batches
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.layer import SparsifierMode, preserved, sparsified_layers, threshold_summary, weight_nbytes
from pl_actsparse.core.recipe import validate_target
from pl_actsparse.core.scopes import IgnoredScope, TargetScope
from pl_actsparse.errors import InvalidOptionError, InvalidTargetError, NotSparsifiedError
from pl_actsparse.measure.metric import SparsityCounter
from pl_actsparse.measure.plot import plot_sweep
from pl_actsparse.tuning.objectives import perplexity

__all__ = [
    "thresholds_for_targets", "apply_statistics", "SweepPoint", "SweepResult", "sweep_sparsity",
    "lightning_validate_metric", "perplexity_metric",
]

log = logging.getLogger(__name__)


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

    The layers end in sparsifying mode; returns the thresholds that were set. Exact for bf16/fp16 statistics
    of the layer alone; downstream layers drift, since their inputs were measured at the old thresholds.

    Raises:
        NotSparsifiedError: a layer has no statistics or is not a sparsified layer of ``model``.
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
        """Plain data: every field, the points as dicts of theirs."""
        return asdict(self)

    def to_json(self, path: str | Path | None = None, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON (indent 1 by default); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), **({"indent": 1} | kwargs))
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def plot(self, path: str | Path, *, title: str | None = None, others: Mapping[str, "SweepResult"] | None = None) -> Path:
        """Write a PNG of the metric against achieved sparsity (:func:`pl_actsparse.measure.plot.plot_sweep`)."""
        return plot_sweep(self, path, title=title, others=others)


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
    calibration: CalibrationConfig | Mapping[str, Any] | str | None = None,
    metric_name: str = "metric",
    include_dense: bool = True,
    measure_achieved: bool = True,
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
        calibration: how each pass calibrates (as for :func:`~pl_actsparse.sparsify_activations`); its
            ``progress`` also logs each point.
        measure_achieved: count zeroed inputs during each evaluation (:class:`SparsityCounter`), the x axis.

    Weights of the mean target and of the achieved sparsity are stored weight bytes
    (:func:`~pl_actsparse.core.layer.weight_nbytes`).

    Raises:
        InvalidOptionError: ``evaluate`` is not callable.
        InvalidTargetError: ``targets`` is empty, or a point is malformed.
        NotSparsifiedError: no layer to sweep, or a point names a layer that is not swept.
        InvalidOptionError, TokenMaskError: an invalid ``calibration``.

    Cost: ``1 + len(targets)`` passes (``recalibrate=False``) or ``2 * len(targets)``, plus one evaluation
    for the dense reference when ``include_dense``.
    """
    config = CalibrationConfig.from_value(calibration)
    if not callable(evaluate):
        raise InvalidOptionError(f"evaluate must be a callable model -> float, got {evaluate!r}")
    if not targets:
        raise InvalidTargetError("targets is empty: give at least one sweep point")
    data = list(check_batches(dataset)) if not isinstance(dataset, (list, tuple)) else dataset
    modules = dict(model.named_modules())
    if target_scope is not None:
        recipe = target_scope if isinstance(target_scope, Mapping) else {target_scope: 0.0}
        names = list(plan_activation_sparsity(model, {s: 0.0 for s in recipe}, ignored_scope).targets)
    else:
        names = [n for n, _ in sparsified_layers(model)]
        if not names:
            raise NotSparsifiedError("the model has no sparsified layer: pass target_scope to say which layers to sweep")
    points = [_as_targets(p, names) for p in targets]
    weights = {n: weight_nbytes(modules[n]) for n in names}
    if base_targets is None:
        base = {n: float(_stats.median(p[n] for p in points)) for n in names}
    else:
        base = _as_targets(base_targets, names)
    calibrate = lambda: calibrate_activation_sparsity(model, data, layers=names, calibration=config)  # noqa: E731

    t_start = time.perf_counter()
    result_points: list[SweepPoint] = []
    dense = None
    with preserved(model, names):
        prepare_activation_sparsity(model, {TargetScope(names=[n]): base[n] for n in names})
        if include_dense:
            for n in names:
                modules[n]._actsparse.mode = SparsifierMode.PASSTHROUGH
            dense = float(evaluate(model))
        stats: dict[str, LayerStatistics] | None = None
        if not recalibrate:
            set_target_sparsity(model, base)
            stats = calibrate().statistics
        for point in points:
            t0 = time.perf_counter()
            if recalibrate:
                set_target_sparsity(model, point)
                calibrate()
            result_points.append(_evaluate_point(model, point, stats, evaluate, weights, measure_achieved))
            result_points[-1].seconds = time.perf_counter() - t0  # calibration included
            if config.progress:
                log.info("sweep: target %.3f -> %s %.4f", result_points[-1].mean_target, metric_name, result_points[-1].metric)
    return SweepResult(
        points=result_points, metric_name=metric_name, dense=dense, recalibrated=recalibrate, base_targets=base,
        calibration_passes=len(points) if recalibrate else 1, evaluations=len(points) + include_dense,
        weight_bytes=weights, seconds=time.perf_counter() - t_start,
    )


def _evaluate_point(
    model: nn.Module,
    point: dict[str, float],
    stats: Mapping[str, LayerStatistics] | None,
    evaluate: Callable[[nn.Module], float],
    weights: Mapping[str, int],
    measure_achieved: bool,
) -> SweepPoint:
    """One sweep point: thresholds from ``stats`` (or the calibration just run when None), then ``evaluate``
    (the caller times it, calibration included)."""
    if stats is None:
        modules = dict(model.named_modules())
        thresholds = {n: threshold_summary(modules[n].activation_threshold) for n in point}
    else:
        thresholds = apply_statistics(model, stats, point)
    counter = SparsityCounter(model) if measure_achieved else None
    with counter or contextlib.nullcontext():
        value = float(evaluate(model))
    per_layer = {n: v for n, v in counter.sparsity().items() if n in point} if counter else {}
    return SweepPoint(
        targets=dict(point),
        mean_target=_weighted(point, weights),
        metric=value,
        achieved=_weighted(per_layer, weights) if len(per_layer) == len(point) else None,
        achieved_per_layer=per_layer,
        thresholds=thresholds,
    )


# ---------------------------------------------------------------------------------------------------
# metrics


def perplexity_metric(windows: Any, batch_size: int = 16) -> Callable[[nn.Module], float]:
    """``model -> perplexity`` on token windows (see :func:`pl_actsparse.tuning.objectives.perplexity`)."""
    return lambda model: perplexity(model, windows, batch_size=batch_size)


def lightning_validate_metric(
    trainer: Any,
    module: Any,
    key: str,
    *,
    dataloaders: Any = None,
    datamodule: Any = None,
) -> Callable[[nn.Module], float]:
    """``model -> float``: run ``trainer.validate`` and read one logged metric (e.g. ``"val_loss"``).

    ``module`` is the LightningModule holding the swept model (``model`` may be the module itself or a
    submodule of it, e.g. ``module.model``; sparsifiers live on the layers, so nothing is copied).
    """

    def metric(_model: nn.Module) -> float:
        results = trainer.validate(module, dataloaders=dataloaders, datamodule=datamodule, verbose=False)
        merged: dict[str, Any] = {k: v for r in results for k, v in r.items()}
        if key not in merged:
            raise KeyError(f"trainer.validate logged {sorted(merged)}; no {key!r}")
        value = merged[key]
        return float(value.item() if isinstance(value, torch.Tensor) else value)

    return metric
