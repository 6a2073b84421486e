"""Lockstep calibration: the whole model, every calibration batch in flight, each layer finalized in turn.

A layer must be calibrated on what it receives once the layers before it are sparsified with their *final*
thresholds, or the achieved sparsity drifts from the target. Every calibration batch runs in its own thread and
all of them advance in *lockstep*: a batch that reaches a layer leaves its input and waits; when every batch is
waiting (or finished), the coordinator finalizes the earliest waiting layer in model order
(:func:`~pl_actsparse.calibrate.histogram.finalize`) and all batches continue with it sparsified: one forward
pass over the data, at the memory cost of every batch's activations alive at once. Layers not called by every
batch (mixture-of-experts) are finalized only when nobody can still arrive. Only real tokens count (each forward
runs under its batch's token mask). A module called several times per forward is calibrated over all of its
calls (:mod:`~pl_actsparse.calibrate.fixed_point`).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from pl_actsparse.calibrate.distributed import NOBODY, Distributed
from pl_actsparse.calibrate.fixed_point import LayerSlot, solve_repeated
from pl_actsparse.calibrate.histogram import (
    COARSE_BINS, LayerStatistics, check_input_dtype, coarse_histogram, finalize, merge_coarse, summed_fine
)
from pl_actsparse.calibrate.progress import Progress
from pl_actsparse.calibrate.running import (
    compilation_disabled, default_transform_fn, forward_is_not_reentrant, mask_of, model_device, run_item, take_batches
)
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.layer import SparsifierMode
from pl_actsparse.core.masking import current_token_mask, resolve_mask_fn, select_tokens
from pl_actsparse.core.module_state import preserved_modes
from pl_actsparse.errors import EmptyDatasetError, LayerNotCalledError, TokenMaskError

__all__ = ["calibrate_layers", "CalibrationSession"]

_WORKER: contextvars.ContextVar[object] = contextvars.ContextVar("pl_actsparse_calibration_worker", default=None)


class _Aborted(Exception):
    """Raised in workers when another worker failed."""


class CalibrationSession:
    """Runs all calibration batches in lockstep threads and finalizes layers one by one."""

    def __init__(self, slots: Sequence[LayerSlot], distributed: Distributed) -> None:
        self.slots = {id(s.module): s for s in slots}
        self.by_index = {s.index: s for s in slots}
        self.dist = distributed
        # One lock; the coordinator waits on `cond`, the batches parked at a layer on that layer's `wake`.
        # Waking only the coordinator on each arrival (not every parked thread) keeps the cost linear in
        # the number of batches: with 159 one-sequence batches, notify_all on one condition cost 3x the
        # forward pass in thread wake-ups alone.
        self._lock = threading.Lock()
        self.cond = threading.Condition(self._lock)
        for s in slots:
            s.wake = threading.Condition(self._lock)
        self.workers = 0
        self.blocked = 0
        self.finished = 0
        self.error: BaseException | None = None
        self._hist_cache: dict = {}
        self._hist_next: dict = {}

    # called from the layers' forward, in worker threads
    def arrive(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        slot = self.slots[id(module)]
        check_input_dtype(slot.name, x)
        mask = current_token_mask()  # this worker's batch (a context variable is per thread)
        if mask is not None:
            try:  # shape check only (no copy): TokenMaskError before any statistic
                select_tokens(x[..., :0], mask, layer=slot.name)
            except TokenMaskError:
                select_tokens(x, mask, layer=slot.name)  # raises, naming the input's real shape
                raise
        worker = _WORKER.get()  # this batch's forward (thread idents are reused once a thread ends)
        with self.cond:
            calls = slot.visits.get(worker, 0) + 1
            slot.visits[worker] = calls
            if calls > 1:  # the same forward reached this layer again
                slot.repeated = True
                slot.max_calls = max(slot.max_calls, calls)
            if slot.dtype is None:
                slot.dtype = x.dtype
            elif x.dtype != slot.dtype:
                self.error = TypeError(f"layer {slot.name!r} received inputs of dtypes {slot.dtype} and {x.dtype}")
                self._wake_everyone()
                raise _Aborted
            parked = not (slot.pinned or slot.finalized)
            if parked:
                slot.waiting.append((x, mask))
                self.blocked += 1
                self.cond.notify()
                while not slot.finalized and self.error is None:
                    slot.wake.wait()
                if self.error is not None:
                    raise _Aborted
        if not parked and slot.pinned:  # every call of a pinned layer counts, with its fixed threshold
            selected = select_tokens(x.detach(), mask, layer=slot.name)
            with self.cond:
                slot.observed.append(selected)
        # else: a late arrival (dynamic control flow, or a repeated call in the first pass): final threshold
        return module.sparsify_input(x)  # type: ignore[operator]

    def _histogram_cached(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Called by the coordinator only. The cache holds the histograms of the previous layer's inputs, with
        # weak references to them: a hit must be the very same tensor (and mask), yet the cache keeps nothing
        # alive. Returns the coarse histogram and the real-token elements it counts.
        version = 0 if x.is_inference() else x._version  # inference tensors have no version counter (and never change)
        key = (id(x), x.data_ptr(), version, tuple(x.shape), x.dtype, id(mask))
        hit = self._hist_cache.get(key)
        if hit is not None and hit[0]() is x and (mask is None or hit[1]() is mask):
            self._hist_next[key] = hit
            return hit[2], hit[3]
        selected = select_tokens(x.detach(), mask)
        hist = coarse_histogram(selected)
        self._hist_next[key] = (weakref.ref(x), None if mask is None else weakref.ref(mask), hist, selected)
        return hist, selected

    def run_worker(self, fn: Callable[[Any], Any], batch: Any) -> None:
        try:
            fn(batch)
        except _Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the coordinator and re-raised there
            with self.cond:
                if self.error is None:
                    self.error = exc
                self._wake_everyone()
        finally:
            with self.cond:
                self.finished += 1
                self.cond.notify()

    def _wake_everyone(self) -> None:  # with the lock held
        self.cond.notify_all()
        for s in self.by_index.values():
            s.wake.notify_all()

    # called from the coordinating (calling) thread
    def coordinate(self, on_finalized: Callable[[LayerSlot], None]) -> None:
        while True:
            with self.cond:
                while self.error is None and self.blocked + self.finished < self.workers:
                    self.cond.wait()
                if self.error is not None:
                    break
                proposal = min((s.index for s in self.by_index.values() if s.waiting and not s.finalized), default=NOBODY)
            proposal = self.dist.min_int(proposal)
            if proposal == NOBODY:
                break
            slot = self.by_index[proposal]
            try:
                self._finalize(slot)
            except BaseException as exc:  # noqa: BLE001
                with self.cond:
                    self.error = exc
                    self._wake_everyone()
                break
            with self.cond:
                slot.finalized = True
                self.blocked -= len(slot.waiting)
                slot.waiting = []
                slot.wake.notify_all()
            on_finalized(slot)

    def _finalize(self, slot: LayerSlot) -> None:
        # The histograms are taken here, by one thread, once every batch has arrived: taken in the workers,
        # the many small bincounts of small batches competed for the GIL and the intra-op threads.
        # gate_proj and up_proj read the same tensors: the second one reuses the first one's histograms.
        self._hist_cache, self._hist_next = self._hist_next, {}
        selected: list[torch.Tensor] = []
        if slot.waiting:
            slot.coarse = torch.zeros(COARSE_BINS, dtype=torch.int64, device=slot.waiting[0][0].device)
            for x, mask in slot.waiting:
                hist, sel = self._histogram_cached(x, mask)
                slot.coarse += hist.to(slot.coarse.device)
                selected.append(sel)
        else:  # nobody on this rank reached the layer; other ranks did
            slot.coarse = torch.zeros(COARSE_BINS, dtype=torch.int64)
        dtype, coarse = merge_coarse(slot.name, slot.dtype, slot.coarse, self.dist)
        slot.stats = finalize(slot.name, slot.target, dtype, coarse, summed_fine(selected, slot.coarse.device), self.dist,
                              carried=slot.carried, calls=slot.max_calls)
        slot.module.activation_threshold.fill_(slot.stats.threshold)  # type: ignore[union-attr]
        # the mode stays CALIBRATING until the pass ends: a later call of this layer must still be seen
        slot.carried = slot.stats.coarse


def _thread_context() -> Callable[[], Any]:
    """Capture the caller's thread-local torch state (autocast, CUDA device) to replay in workers."""
    autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]  # torch >= 2.4 API
    cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def enter() -> contextlib.ExitStack:
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)
        stack = contextlib.ExitStack()
        for d, dt in autocast:
            stack.enter_context(torch.autocast(device_type=d, dtype=dt))
        return stack

    return enter


def calibrate_layers(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    items: Iterable[Any],
    config: CalibrationConfig = CalibrationConfig(),
    *,
    max_rounds: int = 24,
) -> dict[str, LayerStatistics]:
    """Calibrate the thresholds of ``layers`` (already sparsified modules) on ``items``, every batch in flight.

    Every layer of ``layers`` ends in sparsifying mode with its exact threshold; other sparsified layers keep
    doing what they did. A threshold is written only once its statistics are complete (a failed run leaves only
    finalized layers changed: the caller restores them). Returns statistics per layer name. Of ``config`` this
    reads all but ``method``, ``offload`` and ``in_block``; ``max_batches_in_flight`` runs the batches in groups
    of that size with histograms accumulated over groups (earlier groups saw the upstream thresholds of their
    time: approximately exact). A layer called several times per forward is solved as a fixed point in at most
    ``max_rounds`` further passes (:mod:`~pl_actsparse.calibrate.fixed_point`).

    Raises:
        EmptyDatasetError: no item, or a layer received no real token.
        LayerNotCalledError: a layer was never called.
        TokenMaskError: a layer input has no token axes matching the mask.
        NonFiniteActivationError, CalibrationConvergenceError: a NaN/inf input; no fixed point found.
    """
    mask_fn = resolve_mask_fn(config.token_mask)
    transform = config.transform_fn or default_transform_fn
    device = model_device(model)
    dist = Distributed(config.sync_across_processes, device)
    groups = _groups(model, take_batches(items, config.num_batches, dist), config.max_batches_in_flight, dist)
    order = {id(m): (i, n) for i, (n, m) in enumerate(model.named_modules())}  # model order, full names
    slots = [LayerSlot(*order[id(m)], m, m._actsparse.target) for _, m in layers]
    previous_modes = {id(s.module): s.module._actsparse.mode for s in slots}
    enter_context = _thread_context()

    def work(batch: Any) -> None:
        with enter_context(), torch.no_grad():
            _WORKER.set(object())
            run_item(model, batch, transform, mask_of(mask_fn, batch), device)

    def run_pass(bar: Progress) -> None:
        for group in groups:
            _run_group(group, slots, dist, work, bar)

    bar = Progress("calibrating activation thresholds", len(slots) * len(groups), config.progress and dist.is_main)
    try:
        with preserved_modes(model), bar, compilation_disabled():
            model.eval()
            run_pass(bar)
            flags = dist.sum_(torch.tensor([int(s.repeated) for s in slots], dtype=torch.int64))
            repeated = [s for s, f in zip(slots, flags.tolist()) if f]
            if repeated:
                solve_repeated(slots, repeated, run_pass, bar, dist, max_rounds, len(groups))
    finally:
        for s in slots:
            s.pinned, s.observed, s.module._actsparse.session = False, [], None
            s.module._actsparse.mode = SparsifierMode.SPARSIFYING if s.stats is not None else previous_modes[id(s.module)]
    return _results(slots)


def _run_group(group: list, slots: Sequence[LayerSlot], dist: Distributed, work: Callable[[Any], None],
               bar: Progress) -> None:
    """One lockstep pass of a group of batches, one thread per batch; re-raises the first failure."""
    session = CalibrationSession(slots, dist)
    for s in slots:
        s.reset_for_group()
        s.module._actsparse.mode = SparsifierMode.CALIBRATING
        s.module._actsparse.session = session
    threads = [threading.Thread(target=session.run_worker, args=(work, b), name=f"actsparse-calib-{i}", daemon=True)
               for i, b in enumerate(group)]
    session.workers = len(threads)
    for t in threads:
        t.start()
    session.coordinate(lambda slot: bar.advance(slot.name))
    for t in threads:
        t.join()
    if session.error is not None:
        raise session.error


def _groups(model: nn.Module, batches: list, max_batches_in_flight: int | None, dist: Distributed) -> list[list]:
    """The batches in lockstep groups of ``max_batches_in_flight``; every rank gets as many groups (some empty)."""
    if max_batches_in_flight is None and forward_is_not_reentrant(model):
        warnings.warn(
            "this model keeps per-forward global state (NNCF's function hooks), so calibration batches cannot run "
            "concurrently: calibrating in streaming mode (max_batches_in_flight=1), which is approximately exact",
            stacklevel=4,
        )
        max_batches_in_flight = 1
    size = len(batches) if max_batches_in_flight is None else max_batches_in_flight
    groups = [batches[i : i + size] for i in range(0, len(batches), size)] if batches else []
    n_groups = -dist.min_int(-len(groups))  # every rank must run the same number of lockstep rounds
    return groups + [[] for _ in range(n_groups - len(groups))]


def _results(slots: Sequence[LayerSlot]) -> dict[str, LayerStatistics]:
    missing = [s.name for s in slots if s.stats is None]
    if missing:
        raise LayerNotCalledError(
            f"{len(missing)} layer(s) were never called during calibration, so they have no threshold: {missing}; "
            "check that the calibration inputs reach them (transform_fn) or exclude them with IgnoredScope"
        )
    empty = [s.name for s in slots if s.stats.elements == 0 and s.target > 0]  # type: ignore[union-attr]
    if empty:
        raise EmptyDatasetError(
            f"{len(empty)} layer(s) were called but received no real token (every position masked out by the token "
            f"mask), so no threshold can reach its target: {empty}; check the batches' attention_mask, or pass "
            "token_mask=None to count every element"
        )
    return {s.name: s.stats for s in slots}  # type: ignore[misc]
