"""Layers called several times per forward (weight tying, a shared block): thresholds as fixed points.

Such a layer is calibrated over the inputs of all of its calls. Its later calls' inputs depend on its own
threshold through the earlier ones, so no single pass can know them in advance: such a layer is found in the
first lockstep pass (a batch arrives at it again) and then solved as a fixed point
``tau = quantile(inputs produced under tau)`` by further passes in which it is pinned, every other layer being
recalibrated in lockstep each pass (see ``docs/calibration.md``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pl_actsparse.calibrate.distributed import Distributed
from pl_actsparse.calibrate.histogram import (
    COARSE_BINS, INT_VIEW, LayerStatistics, bits_to_float, coarse_histogram, finalize, merge_coarse, summed_fine
)
from pl_actsparse.calibrate.progress import Progress
from pl_actsparse.errors import CalibrationConvergenceError

__all__ = ["COUPLED_TOLERANCE", "LayerSlot", "solve_repeated"]


@dataclass
class LayerSlot:
    """One layer being calibrated in lockstep (:mod:`pl_actsparse.calibrate.lockstep`; repeated ones solved here)."""

    index: int
    name: str
    module: nn.Module
    target: float
    coarse: torch.Tensor | None = None
    dtype: torch.dtype | None = None
    waiting: list = field(default_factory=list)  # (input, token mask) of the batches waiting here
    finalized: bool = False
    stats: LayerStatistics | None = None
    carried: torch.Tensor | None = None  # summed coarse histogram of earlier groups (streaming mode)
    wake: Any = None  # threading.Condition on the session's lock: the batches waiting at this layer
    visits: dict = field(default_factory=dict)  # batch's forward (worker) -> calls of this layer in it so far
    max_calls: int = 1  # most calls of this layer within one forward seen so far
    repeated: bool = False  # some forward called the layer more than once
    pinned: bool = False  # a repeated layer whose threshold is fixed for the pass; its inputs are observed
    observed: list = field(default_factory=list)  # real-token inputs of every call (pinned layers only)

    def reset_for_group(self) -> None:
        self.coarse, self.waiting, self.finalized, self.visits = None, [], False, {}

    def reset_for_round(self) -> None:
        self.carried, self.stats, self.observed = None, None, []


def _threshold_key(tau: float, dtype: torch.dtype) -> int:
    """Threshold as an integer that orders like it: -1 for -inf, else the bit pattern in ``dtype``."""
    if tau == -math.inf:
        return -1
    return int(torch.tensor([tau], dtype=torch.float32).to(dtype).view(INT_VIEW[dtype]).item())


#: Largest miss |achieved - best reachable| tolerated for *coupled* repeated layers (several layers called several
#: times, each one's later inputs depending on the others' thresholds) when no pass hits every fixed point exactly;
#: it is warned about with the figures. A larger miss (and larger than one element) raises CalibrationConvergenceError.
COUPLED_TOLERANCE = 0.002


@dataclass
class _FixedPoint:
    """The search for a repeated layer's threshold ``tau`` with ``tau = best(inputs produced under tau)``.

    ``tried`` holds, per threshold key, ``(zeroed at it, best zeroed count of the same inputs, elements)``
    measured while every other repeated layer kept its current threshold: it is cleared when they change,
    since the inputs, hence the counts, depend on them.
    """

    tried: dict = field(default_factory=dict)

    def next_key(self, optimum_key: int) -> int | None:
        """The next threshold to try, or ``None`` when no exact fixed point is left to find."""
        lo = max((k for k, (z, best, _) in self.tried.items() if z < best), default=None)  # zeroes too few
        hi = min((k for k, (z, best, _) in self.tried.items() if z > best), default=None)  # zeroes too many
        inside = (lo is None or optimum_key > lo) and (hi is None or optimum_key < hi)
        if optimum_key not in self.tried and inside:
            return optimum_key  # fixed-point iteration: usually within a few elements after 2-3 passes
        if lo is not None and hi is not None and lo < hi:
            mid = (lo + hi) // 2  # bisection over the ordered bit patterns
            return mid if lo < mid < hi and mid not in self.tried else None
        return None

    def closest(self, target: float, current: int) -> int:
        """The tried threshold whose zeroed fraction is closest to the target (ties: ``current``, the threshold in
        place, so that the search settles now instead of spending a pass on an equal count; then fewer zeroed)."""
        return min(self.tried, key=lambda k: (abs(self.tried[k][0] - target * self.tried[k][2]), k != current, self.tried[k][0]))


def _measure_pinned(s: LayerSlot, dist: Distributed) -> tuple[torch.dtype, torch.Tensor, int, float, int]:
    """Statistics of a pinned layer over every call of the last pass:
    ``(dtype, coarse histogram, zeroed at its threshold, best threshold, best zeroed count)``."""
    observed = s.observed
    device = observed[0].device if observed else torch.device("cpu")
    coarse = torch.zeros(COARSE_BINS, dtype=torch.int64, device=device)
    zeroed = torch.zeros((), dtype=torch.int64, device=device)
    for sel in observed:
        coarse += coarse_histogram(sel).to(device)
        zeroed += (sel.abs() <= s.module.activation_threshold).sum().to(device)  # exactly as the forward zeroes
    dtype, coarse = merge_coarse(s.name, s.dtype, coarse, dist)
    zeroed_at = int(dist.sum_(zeroed.reshape(1)).item())
    best = finalize(s.name, s.target, dtype, coarse, summed_fine(observed, device), dist)
    return dtype, coarse, zeroed_at, best.threshold, best.zeroed


def _pinned_pass(slots: Sequence[LayerSlot], repeated: Sequence[LayerSlot], run_pass: Callable[[Any], None],
                 bar: Progress, dist: Distributed, n_groups: int, rounds: int) -> dict[int, tuple]:
    """One pass with the repeated layers pinned at their current thresholds (statistics set); per layer
    ``(dtype, threshold, zeroed at it, best threshold, best zeroed count)`` over all of its calls."""
    for s in slots:
        s.reset_for_round()
    bar.extend((len(slots) - len(repeated)) * n_groups)
    run_pass(bar)
    taus = {id(s): float(s.module.activation_threshold) for s in repeated}
    out = {}
    for s in repeated:
        dtype, coarse, zeroed_at, best_tau, best_zeroed = _measure_pinned(s, dist)
        s.stats = LayerStatistics(s.name, s.target, dtype, coarse, taus[id(s)], zeroed_at, calls=s.max_calls, rounds=rounds)
        out[id(s)] = (dtype, taus[id(s)], zeroed_at, best_tau, best_zeroed)
    return out


def solve_repeated(
    slots: Sequence[LayerSlot],
    repeated: Sequence[LayerSlot],
    run_pass: Callable[[Any], None],
    bar: Progress,
    dist: Distributed,
    max_rounds: int,
    n_groups: int,
) -> None:
    """Make each repeated layer's threshold exact over all of its calls, every other layer exact given them.

    Pass ``r`` pins each repeated layer at a guess ``tau_r`` (sparsifying every call with it) and observes the
    real-token inputs of all its calls, while every other layer is calibrated in lockstep as usual. A layer is
    exact when ``tau_r`` zeroes as many observed elements as the best threshold of those very inputs does (a
    fixed point: its achieved fraction over all calls is the reachable fraction closest to the target). Guesses:
    the best threshold of the last pass's inputs (fixed-point iteration), then bisection over the bit patterns
    between guesses known to zero too few and too many; where the count jumps over the target between two
    adjacent thresholds, the closer one is the answer (the granularity there). The last pass is the result.
    """
    search = {id(s): _FixedPoint() for s in repeated}
    for s in repeated:
        s.pinned = True
    history: list[tuple[float, dict]] = []  # (largest miss, thresholds) per pass
    settled: dict[int, bool] = {}
    jumped: set[int] = set()  # layers settled on the closer side of a jump, not on an exact fixed point
    best_counts: dict[int, int] = {}  # per layer, the best zeroed count of the last pass's inputs
    for round_index in range(1, max_rounds + 2):
        measured = _pinned_pass(slots, repeated, run_pass, bar, dist, n_groups, round_index + 1)
        misses, moves = {}, {}
        for s in repeated:
            dtype, tau, zeroed_at, best_tau, best_counts[id(s)] = measured[id(s)]
            fp, key, n = search[id(s)], _threshold_key(tau, dtype), s.stats.elements  # type: ignore[union-attr]
            fp.tried[key] = (zeroed_at, best_counts[id(s)], n)
            misses[id(s)] = abs(zeroed_at - best_counts[id(s)]) / max(n, 1)
            settled[id(s)] = zeroed_at == best_counts[id(s)]
            if settled[id(s)]:
                jumped.discard(id(s))
                continue
            nxt = fp.next_key(_threshold_key(best_tau, dtype))
            if nxt is None:  # the count jumps over the target between adjacent thresholds: take the closer
                nxt = fp.closest(s.target, key)
                settled[id(s)] = nxt == key
                jumped.add(id(s))
            if nxt != key:
                moves[id(s)] = -math.inf if nxt < 0 else bits_to_float(nxt, dtype)
        history.append((max(misses.values()), {k: v[1] for k, v in measured.items()}))
        if not moves or round_index > max_rounds:
            break
        for s in repeated:  # the others' inputs change with these thresholds: their brackets are stale
            if any(k != id(s) for k in moves):
                search[id(s)].tried.clear()
            if id(s) in moves:
                s.module.activation_threshold.fill_(moves[id(s)])  # type: ignore[union-attr]
    if all(settled.values()):
        _warn_granularity([s for s in repeated if id(s) in jumped])
        return
    best_miss, best_taus = min(history, key=lambda h: h[0])
    if best_taus != history[-1][1]:  # re-run the best pass so that every other layer is calibrated under it
        for s in repeated:
            s.module.activation_threshold.fill_(best_taus[id(s)])  # type: ignore[union-attr]
        measured = _pinned_pass(slots, repeated, run_pass, bar, dist, n_groups, len(history) + 2)
        best_counts.update({k: v[4] for k, v in measured.items()})
    report = ", ".join(
        f"{s.name!r}: achieved {s.stats.achieved:.6f} over {s.stats.elements} elements of {s.max_calls} calls, "
        f"best reachable {best_counts[id(s)] / max(s.stats.elements, 1):.6f}"
        for s in repeated
    )
    grain = max(1 / max(s.stats.elements, 1) for s in repeated)  # type: ignore[union-attr]
    if best_miss > max(COUPLED_TOLERANCE, grain):  # one element is below any tolerance on a small calibration set
        for s in repeated:
            s.stats = None
        raise CalibrationConvergenceError(
            f"layers called several times per forward depend on each other's thresholds and no calibration pass of "
            f"{len(history)} found thresholds within {max(COUPLED_TOLERANCE, grain):.2g} of the exact fixed point ({report}). "
            "Sparsify modules called once per forward instead, or fewer of the shared ones"
        )
    warnings.warn(
        f"layers called several times per forward depend on each other's thresholds: no pass hit every fixed point "
        f"exactly; the closest one (miss {best_miss:.2e} <= {max(COUPLED_TOLERANCE, grain):.2g}) is kept: {report}",
        stacklevel=4,
    )


def _warn_granularity(repeated: Sequence[LayerSlot]) -> None:
    """Say so when a repeated layer's zeroed fraction jumps over the target (no threshold reaches it closer)."""
    for s in repeated:
        st = s.stats
        if st is not None:
            warnings.warn(
                f"layer {s.name!r} is called {s.max_calls} times per forward; its zeroed fraction over all calls "
                f"jumps over the target {st.target:g} (it moves its own later inputs): the closest threshold "
                f"zeroes {st.achieved:.6f} of its {st.elements} calibration elements",
                stacklevel=4,
            )
