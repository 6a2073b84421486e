"""Per-layer sparsities under one byte budget from loss curves *measured* around the uniform point.

The budget is the fraction of the selected layers' stored weight bytes
(:func:`~pl_actsparse.core.layer.weight_nbytes`) skipped per token, ``sum_l bytes_l * s_l = budget * sum_l
bytes_l``. :func:`measure_sensitivity` calibrates once at the uniform budget, then moves each unit (a layer, or
layers reading one tensor when ``tie_shared_inputs``) to ``budget + offsets`` with thresholds from the stored
histograms while the others stay at the budget, and measures the loss: ``units * len(offsets)`` forward
passes (:attr:`Allocation.forward_passes`), with any ``loss_fn`` (not only a causal LM's). The convex optimum
of those curves (:func:`~pl_actsparse.calibrate.allocation.allocate_levels`) meets the budget exactly.
``sparsify_activations(..., allocation="auto")`` is the cheaper and better choice for a causal LM
(``docs/allocation.md``); this one serves any model and loss. The result is a recipe
(:meth:`Allocation.target_sparsity_by_scope`) or a YAML ``scopes:`` list (:meth:`Allocation.to_yaml`, read
back by :func:`~pl_actsparse.core.recipe.load_scopes_yaml`); the model is left as it was.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from pl_actsparse.api import calibrate_activation_sparsity, plan_activation_sparsity, prepare_activation_sparsity
from pl_actsparse.calibrate.allocation import allocate_levels, lower_hull
from pl_actsparse.calibrate.histogram import LayerStatistics, threshold_for_target
from pl_actsparse.calibrate.running import check_batches
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.layer import preserved, weight_nbytes
from pl_actsparse.core.recipe import dump_scopes_yaml, load_scopes_yaml, scopes_from_list, validate_target
from pl_actsparse.core.scopes import IgnoredScope, TargetScope
from pl_actsparse.errors import InvalidTargetError
from pl_actsparse.tuning.objectives import CalibrationLoss

__all__ = ["DEFAULT_OFFSETS", "SensitivityProfile", "Allocation", "measure_sensitivity", "allocate_sparsity",
           "allocate_from_curves", "load_scopes_yaml", "scopes_from_list"]

DEFAULT_OFFSETS = (-0.3, -0.2, -0.1, 0.1, 0.2, 0.3, 0.4)

log = logging.getLogger(__name__)


@dataclass
class SensitivityProfile:
    """Loss increase of each unit as a function of its sparsity, the other layers at their base targets."""

    units: list[list[str]]  # allocation units: one layer, or layers tied to one target
    unit_bytes: list[int]
    curves: list[dict[float, float]]  # per unit: sparsity -> calibration loss minus base loss
    base_targets: dict[str, float]
    base_loss: float
    forward_passes: int  # calibration pass + loss passes
    batches: int
    layer_bytes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def allocate(self, budget: float) -> "Allocation":
        """Targets meeting ``budget`` (fraction of weight bytes skipped) with the least predicted loss."""
        return allocate_from_curves(self, budget)


@dataclass
class Allocation:
    """Per-layer targets chosen for a byte budget, and what it cost to find them."""

    targets: dict[str, float]  # layer -> target, model order
    budget: float
    weight_bytes: dict[str, int]
    units: list[list[str]]
    predicted_loss_increase: float  # versus the base (uniform) point, from the convexified curves
    forward_passes: int
    profile: SensitivityProfile | None = field(default=None, repr=False)

    @property
    def skipped_fraction(self) -> float:
        """Weight-byte-weighted mean target: the fraction of the layers' weight bytes skipped per token."""
        total = sum(self.weight_bytes.values())
        return sum(self.targets[n] * self.weight_bytes[n] for n in self.targets) / total

    def target_sparsity_by_scope(self) -> dict[TargetScope, float]:
        """A recipe for :func:`~pl_actsparse.sparsify_activations`: one exact-name scope per unit."""
        return {TargetScope(names=list(u)): self.targets[u[0]] for u in self.units}

    def to_scopes(self) -> list[dict[str, Any]]:
        """``[{"names": [...], "sparsity": s}, ...]``, the callback's ``scopes`` list form."""
        return [{"names": list(u), "sparsity": round(float(self.targets[u[0]]), 6)} for u in self.units]

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML ``scopes:`` list (``yaml.safe_dump``, with a comment saying how it was made); written to ``path``
        if given. :func:`~pl_actsparse.core.recipe.load_scopes_yaml` reads it back."""
        return dump_scopes_yaml(self.to_scopes(), path, comment=f"pl_actsparse allocation: budget {self.budget:.4f} of "
                                f"{sum(self.weight_bytes.values())} weight bytes skipped per token (achieved "
                                f"{self.skipped_fraction:.4f}); {self.forward_passes} forward passes")


def _units(names: list[str], groups: Sequence[Sequence[str]], base: Mapping[str, float]) -> list[list[str]]:
    order = {n: i for i, n in enumerate(names)}
    units: list[list[str]] = []
    taken: set[str] = set()
    for g in groups:  # only layers with the same base target are tied (one threshold, one mask)
        for t in {base[n] for n in g if n in order}:
            ms = [n for n in g if n in order and n not in taken and base[n] == t]
            if len(ms) > 1:
                units.append(sorted(ms, key=order.__getitem__))
                taken.update(ms)
    units += [[n] for n in names if n not in taken]
    units.sort(key=lambda u: order[u[0]])
    return units


def measure_sensitivity(
    model: nn.Module,
    dataset: Iterable[Any],
    target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None,
    *,
    offsets: Sequence[float] = DEFAULT_OFFSETS,
    tie_shared_inputs: bool = True,
    groups: Sequence[Sequence[str]] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    calibration: CalibrationConfig | Mapping[str, Any] | str | None = None,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.95,
) -> SensitivityProfile:
    """Loss-increase curves of every unit around the recipe's targets (the base point).

    Each unit is measured at ``base + offsets`` clipped to ``[min_sparsity, max_sparsity]``, the others at
    base. ``loss_fn(output, item) -> scalar`` defaults to next-token NLL for token-id inputs. ``groups``
    (default: :func:`~pl_actsparse.calibrate.groups.find_shared_input_groups` when ``tie_shared_inputs``) are
    tied to one target. Cost: one calibration pass, one base-loss pass and ``sum over units of len(grid)`` loss
    passes over the data, capped by ``calibration``'s ``num_batches`` (its ``transform_fn`` and ``token_mask``
    apply; ``progress`` logs each unit's curve). The model is restored afterwards.

    Raises:
        InvalidTargetError: a bad offset, ``min_sparsity``/``max_sparsity`` or target.
        InvalidOptionError, TokenMaskError: an invalid ``calibration``.
    """
    config = CalibrationConfig.from_value(calibration)
    for o in offsets:
        if not isinstance(o, (int, float)) or isinstance(o, bool) or not math.isfinite(o):
            raise InvalidTargetError(f"offsets must be finite numbers, got {o!r}")
    min_sparsity = validate_target(min_sparsity, "min_sparsity")
    max_sparsity = validate_target(max_sparsity, "max_sparsity")
    if min_sparsity > max_sparsity:
        raise InvalidTargetError(f"min_sparsity {min_sparsity} > max_sparsity {max_sparsity}")
    data = list(itertools.islice(check_batches(dataset), config.num_batches))
    plan = plan_activation_sparsity(model, target_sparsity_by_scope, ignored_scope)
    names, base = list(plan.targets), dict(plan.targets)
    modules = dict(model.named_modules())
    if tie_shared_inputs and groups is None and data:
        from pl_actsparse.calibrate.groups import find_shared_input_groups

        groups = find_shared_input_groups(model, data[0], names, transform_fn=config.transform_fn)
    units = _units(names, (groups or ()) if tie_shared_inputs else (), base)
    nbytes = {n: weight_nbytes(modules[n]) for n in names}

    t0 = time.perf_counter()
    runner = CalibrationLoss(model, data, loss_fn, config.transform_fn, config.token_mask)
    with preserved(model, names):
        prepare_activation_sparsity(model, {TargetScope(names=[n]): base[n] for n in names})
        report = calibrate_activation_sparsity(model, data, layers=names, calibration=config.replace(progress=False))
        stats: dict[str, LayerStatistics] = report.statistics
        base_loss = runner()
        curves: list[dict[float, float]] = []
        for k, unit in enumerate(units):
            b = base[unit[0]]
            grid = sorted({round(min(max(b + o, min_sparsity), max_sparsity), 6) for o in offsets} - {round(b, 6)})
            saved = [modules[n].activation_threshold.clone() for n in unit]
            curve = {b: 0.0}
            try:
                for s in grid:
                    for n in unit:
                        modules[n].activation_threshold.fill_(threshold_for_target(stats[n], s))
                    curve[s] = runner() - base_loss
            finally:
                for n, t in zip(unit, saved):
                    modules[n].activation_threshold.copy_(t)
            curves.append(curve)
            if config.progress:
                pretty = ", ".join(f"{s:.2f}:{d:+.4f}" for s, d in sorted(curve.items()))
                log.info("sensitivity %d/%d %s: %s", k + 1, len(units), "+".join(unit), pretty)
    return SensitivityProfile(units=units, unit_bytes=[sum(nbytes[n] for n in u) for u in units], curves=curves, base_targets=base,
                              base_loss=base_loss, forward_passes=1 + runner.passes, batches=len(data), layer_bytes=nbytes,
                              seconds=time.perf_counter() - t0)


def allocate_from_curves(profile: SensitivityProfile, budget: float) -> Allocation:
    """Greedy over convex-hull segments (= Lagrangian optimum of the convexified problem), exact budget."""
    budget = validate_target(budget, "budget")
    levels = allocate_levels({u: sorted(c.items()) for u, c in enumerate(profile.curves)}, dict(enumerate(profile.unit_bytes)), budget)
    of_layer = {n: levels[u] for u, unit in enumerate(profile.units) for n in unit}  # exact, not rounded
    hulls = [lower_hull(sorted(c.items())) for c in profile.curves]  # convex: each is the largest of its lines
    predicted = sum(max((y1 + (y2 - y1) * (levels[u] - x1) / (x2 - x1) for (x1, y1), (x2, y2) in zip(h, h[1:])), default=h[0][1])
                    for u, h in enumerate(hulls))
    return Allocation(targets={n: of_layer[n] for n in profile.base_targets}, budget=budget,  # model order
                      weight_bytes={n: profile.layer_bytes[n] for n in profile.base_targets}, units=[list(u) for u in profile.units],
                      predicted_loss_increase=predicted, forward_passes=profile.forward_passes, profile=profile)


def allocate_sparsity(
    model: nn.Module,
    dataset: Iterable[Any],
    budget: float,
    target_scope: TargetScope,
    ignored_scope: IgnoredScope | None = None,
    **kwargs: Any,
) -> Allocation:
    """Choose per-layer targets for the layers of ``target_scope`` so that a fraction ``budget`` of their
    weight bytes is skipped per token, minimising the loss increase on ``dataset``.

    Keyword arguments go to :func:`measure_sensitivity` (``offsets``, ``tie_shared_inputs``, ``loss_fn``,
    ``calibration``, ``max_sparsity``). The model is unchanged;
    apply the result with ``sparsify_activations(model, data, allocation.target_sparsity_by_scope())``.

    >>> import torch
    >>> from torch import nn
    >>> from pl_actsparse import TargetScope
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    >>> data = [torch.randn(16, 8) for _ in range(2)]
    >>> alloc = allocate_sparsity(net, data, 0.5, TargetScope(types=[nn.Linear]),
    ...                           loss_fn=lambda out, x: out.pow(2).mean())
    >>> round(alloc.skipped_fraction, 6)
    0.5
    """
    budget = validate_target(budget, "budget")
    if not isinstance(target_scope, TargetScope):
        raise InvalidTargetError(f"target_scope must be a TargetScope, got {target_scope!r}")
    profile = measure_sensitivity(model, dataset, {target_scope: budget}, ignored_scope, **kwargs)
    return profile.allocate(budget)
