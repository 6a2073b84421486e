"""Exact threshold calibration in one forward pass.

Two problems, two answers:

**Exact quantiles with bounded, mergeable state.** ``|x|`` of a float, read as an unsigned integer, sorts like
the float. A histogram over those bit patterns is therefore an exact order statistic, not an approximation:

* bf16 / fp16 inputs: one histogram of all 2**15 non-negative bit patterns is exact.
* fp32 inputs: a histogram of the top 16 bits finds the bin holding the wanted order statistic; a second
  histogram of the low 16 bits *inside that bin only* resolves it exactly.

Histograms are integer counts, so the statistics of several processes are merged by summing them
(``all_reduce(SUM)``), which is how DDP ranks agree on identical thresholds.

**Layers downstream see sparsified inputs.** The calibration data of ``down_proj`` must be what it receives
once ``gate_proj``/``up_proj`` are already sparsified with their *final* thresholds, or the achieved
sparsity drifts from the target (NNCF's moving average, or dense calibration, both leave this error).
Computing layer thresholds one after another normally costs one pass per layer. Instead, every calibration
batch runs in its own thread and all of them advance in *lockstep*: a batch that reaches a layer
contributes its histogram and waits; when every batch is waiting (or finished), the coordinator finalizes
the earliest waiting layer, after which all batches continue with that layer sparsified. Each layer is
thus calibrated on exactly the inputs it will see, in a single forward pass over the data. The cost is
memory: the activations of all calibration batches are alive at the same time (cap them with
``num_calibration_batches``).

Layers that are not called by every batch (mixture-of-experts) are handled too: the coordinator only
finalizes when nobody can still arrive, choosing the earliest layer in model order.

**What counts as an element.** Only real tokens: each batch's forward runs under
:func:`pl_actsparse.core.masking.token_mask` (``token_mask="auto"`` takes a dict batch's ``attention_mask``),
and a layer's statistic histograms ``select_tokens(x, mask)``, so padding never moves a threshold.
Every call counts: a module called ``k`` times per forward (weight tying, a shared block) is calibrated over
the inputs of all ``k`` calls. Its later calls' inputs depend on its own threshold through the earlier ones,
so no single pass can know them in advance: such a layer is found in the first pass (a batch arrives at it
again) and then solved as a fixed point ``tau = quantile(inputs produced under tau)`` by further passes in
which it is pinned, every other layer being recalibrated in lockstep each pass (see ``docs/calibration.md``).
"""

from __future__ import annotations

import contextvars
import contextlib
import math
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from pl_actsparse.errors import (
    CalibrationConvergenceError,
    EmptyDatasetError,
    LayerNotCalledError,
    NonFiniteActivationError,
    TokenMaskError,
)
from pl_actsparse.core.layer import SparsifierMode
from pl_actsparse.core.masking import current_token_mask, resolve_mask_fn, select_tokens, token_mask as _token_mask_ctx

__all__ = [
    "LayerStatistics",
    "threshold_from_histogram",
    "calibrate_layers",
    "default_transform_fn",
    "call_model",
    "compilation_disabled",
]

COARSE_BINS = 1 << 15  # non-negative bit patterns of a 16-bit float, or the top 16 bits of a float32
FINE_BINS = 1 << 16  # low 16 bits of a float32
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_NONFINITE_KEY = {torch.float32: 0x7F80, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def _abs_keys(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns of ``|x|`` as non-negative integers (ordered like ``|x|``)."""
    if x.dtype not in _INT_VIEW:
        raise TypeError(f"calibration supports float32, bfloat16 and float16 inputs, got {x.dtype}")
    bits = x.detach().reshape(-1).view(_INT_VIEW[x.dtype])
    return bits & (0x7FFFFFFF if x.dtype == torch.float32 else 0x7FFF)


def coarse_histogram(x: torch.Tensor) -> torch.Tensor:
    """Mergeable first-level statistic of one input tensor (int64 counts, on the tensor's device)."""
    keys = _abs_keys(x)
    if x.dtype == torch.float32:
        keys = keys >> 16
    return torch.bincount(keys, minlength=COARSE_BINS)


def fine_histogram(x: torch.Tensor, coarse_bin: int) -> torch.Tensor:
    """Low-16-bit counts of the float32 elements that fall in one coarse bin."""
    keys = _abs_keys(x)
    inside = keys[(keys >> 16) == coarse_bin]
    return torch.bincount(inside & 0xFFFF, minlength=FINE_BINS)


def _bits_to_float(bits: int, dtype: torch.dtype) -> float:
    return float(torch.tensor([bits], dtype=_INT_VIEW[dtype]).view(dtype).float().item())


@dataclass
class LayerStatistics:
    """The calibration result of one layer, kept so reports and sweeps need no second pass.

    ``coarse`` counts the real-token input elements (padding excluded by the token mask) of *every* call of
    the layer during calibration; ``zeroed`` of them satisfy ``|x| <= threshold`` with all layers sparsified.
    """

    name: str
    target: float
    dtype: torch.dtype
    coarse: torch.Tensor  # int64 [COARSE_BINS] on CPU, summed over all batches (and ranks)
    threshold: float = -math.inf
    zeroed: int = 0
    calls: int = 1  # most calls of the layer in one forward pass; the statistic covers all of them
    rounds: int = 1  # calibration passes needed (more than one only for layers called several times)

    @property
    def elements(self) -> int:
        return int(self.coarse.sum())

    @property
    def achieved(self) -> float:
        """Fraction of calibration elements with ``|x| <= threshold``, all layers sparsified together."""
        n = self.elements
        return self.zeroed / n if n else 0.0


def _choose(counts_le: torch.Tensor, target_count: float) -> int:
    """Index of the candidate count closest to the target; ties go to fewer zeroed elements."""
    err = (counts_le.double() - target_count).abs()
    best = err.min()
    return int(torch.nonzero(err == best)[0, 0])


def _first_bin_reaching(cum: torch.Tensor, want: float) -> int:
    return int(torch.searchsorted(cum, torch.tensor(math.ceil(want), dtype=cum.dtype)))


def fine_bin(coarse: torch.Tensor, target: float) -> int | None:
    """The coarse bin whose fine histogram :func:`threshold_from_histogram` asks for (float32 inputs), or
    ``None`` when it asks for none (target 0 or 1, no element)."""
    coarse = coarse.to("cpu", torch.int64)
    n = int(coarse.sum())
    if target <= 0.0 or target >= 1.0 or n == 0:
        return None
    return _first_bin_reaching(torch.cumsum(coarse, 0), target * n)


def threshold_from_histogram(
    coarse: torch.Tensor,
    target: float,
    dtype: torch.dtype,
    fine_fn: Callable[[int], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Threshold whose zeroed count is the achievable count closest to ``target * N``.

    Returns ``(threshold, zeroed_count)``. Target 0 gives ``-inf`` (nothing zeroed, not even exact zeros);
    target 1 gives ``+inf`` (everything zeroed, also on unseen data). With ties (many equal values) the exact
    target may be unreachable; the closest reachable fraction is chosen, rounding towards less zeroing.
    For float32, ``fine_fn(bin)`` must return the summed fine histogram of that coarse bin.
    """
    coarse = coarse.to("cpu", torch.int64)
    n = int(coarse.sum())
    if target <= 0.0 or n == 0:
        return -math.inf, 0
    if target >= 1.0:
        return math.inf, n
    want = target * n
    cum = torch.cumsum(coarse, 0)
    if dtype != torch.float32:
        keys = torch.nonzero(coarse).flatten()
        candidates = torch.cat([torch.zeros(1, dtype=torch.int64), cum[keys]])
        i = _choose(candidates, want)
        if i == 0:
            return -math.inf, 0
        return _bits_to_float(int(keys[i - 1]), dtype), int(candidates[i])
    # float32: the optimum is either "everything below bin b" or a value inside bin b, where b is the
    # first coarse bin whose cumulative count reaches the target.
    b = _first_bin_reaching(cum, want)
    below = int(cum[b - 1]) if b > 0 else 0
    if fine_fn is None:
        raise ValueError("float32 calibration needs the fine histogram of the selected bin")
    fine = fine_fn(b).to("cpu")
    low = torch.nonzero(fine).flatten()
    candidates = torch.cat([torch.tensor([below], dtype=fine.dtype), below + torch.cumsum(fine, 0)[low]])
    i = _choose(candidates, want)
    if i == 0:
        if below == 0:
            return -math.inf, 0
        # any value in [max of earlier bins, min of bin b) zeroes the same elements: use the bin's lower edge - 1 ulp
        return _bits_to_float((b << 16) - 1, dtype), below
    return _bits_to_float((b << 16) | int(low[i - 1]), dtype), int(round(float(candidates[i])))


# ---------------------------------------------------------------------------------------------------
# running the model on calibration data


def default_transform_fn(item: Any) -> Any:
    """Calibration items are model inputs as they are (see :func:`call_model` for how they are passed)."""
    return item


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call the model the way NNCF does: a dict is keyword arguments, a tuple or list positional ones,
    anything else the single argument."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside its dicts, lists and tuples (named tuples and other
    objects are left as they are)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def _to_device(obj: Any, device: torch.device | None) -> Any:
    return obj if device is None else map_tensors(obj, lambda t: t.to(device, non_blocking=True))


def model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


_WORKER: contextvars.ContextVar[object] = contextvars.ContextVar("pl_actsparse_calibration_worker", default=None)


class _Aborted(Exception):
    """Raised in workers when another worker failed."""


@dataclass
class _LayerSlot:
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


class _Distributed:
    """Summing and agreeing across processes; a no-op in a single process."""

    def __init__(self, enabled: bool | None, device: torch.device | None) -> None:
        import torch.distributed as dist

        available = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.enabled = available if enabled is None else (enabled and available)
        self.dist = dist
        backend = dist.get_backend() if self.enabled else None
        # gloo reduces CPU tensors; nccl needs CUDA ones
        self.device = device if (backend == "nccl" and device is not None) else torch.device("cpu")

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        buf = t.to(self.device)
        self.dist.all_reduce(buf, op=self.dist.ReduceOp.SUM)
        return buf.to(t.device)

    def min_int(self, value: int) -> int:
        if not self.enabled:
            return value
        buf = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(buf, op=self.dist.ReduceOp.MIN)
        return int(buf.item())

    @property
    def is_main(self) -> bool:
        return not self.enabled or self.dist.get_rank() == 0


_NOBODY = 1 << 62


class CalibrationSession:
    """Runs all calibration batches in lockstep threads and finalizes layers one by one."""

    def __init__(self, slots: Sequence[_LayerSlot], distributed: _Distributed) -> None:
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
        if x.dtype not in _INT_VIEW:
            raise TypeError(
                f"layer {slot.name!r} received a {x.dtype} input; calibration supports float32, bfloat16 and float16"
            )
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
            if slot.pinned or slot.finalized:
                parked = False
            else:
                parked = True
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

    def run_worker(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
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
    def coordinate(self, on_finalized: Callable[[_LayerSlot], None]) -> None:
        while True:
            with self.cond:
                while self.error is None and self.blocked + self.finished < self.workers:
                    self.cond.wait()
                if self.error is not None:
                    break
                pending = [s.index for s in self.by_index.values() if s.waiting and not s.finalized]
                proposal = min(pending) if pending else _NOBODY
            proposal = self.dist.min_int(proposal)
            if proposal == _NOBODY:
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

    def _finalize(self, slot: _LayerSlot) -> None:
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
        dtype = _agreed_dtype(self.dist, slot.dtype)
        coarse = self.dist.sum_(slot.coarse).to("cpu")
        _check_finite(slot.name, coarse, dtype)
        carried = slot.carried
        device = slot.coarse.device

        def fine(b: int) -> torch.Tensor:
            local = torch.zeros(FINE_BINS, dtype=torch.int64, device=device)
            for sel in selected:
                local += fine_histogram(sel, b).to(local.device)
            local = self.dist.sum_(local).to("cpu")
            if carried is None or not int(carried[b]):
                return local
            # earlier groups' elements in this bin are gone: spread them evenly over its sub-bins
            return local.double() + float(carried[b]) / FINE_BINS

        total = coarse if carried is None else coarse + carried
        threshold, zeroed = threshold_from_histogram(total, slot.target, dtype, fine)
        slot.module.activation_threshold.fill_(threshold)  # type: ignore[union-attr]
        # the mode stays CALIBRATING until the pass ends: a later call of this layer must still be seen
        slot.carried = total
        slot.stats = LayerStatistics(slot.name, slot.target, dtype, total, threshold, zeroed, calls=slot.max_calls)


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def _agreed_dtype(dist: _Distributed, dtype: torch.dtype | None) -> torch.dtype:
    """Ranks that saw no input for a layer learn its dtype from the others."""
    return _CODE_DTYPES[dist.min_int(_DTYPE_CODES[dtype] if dtype is not None else _NOBODY)]


def _check_finite(name: str, coarse: torch.Tensor, dtype: torch.dtype) -> None:
    bad = int(coarse[_NONFINITE_KEY[dtype] :].sum())
    if bad:
        raise NonFiniteActivationError(
            f"layer {name!r} received {bad} non-finite input value(s) (NaN or inf) during calibration; "
            "a threshold needs finite activations: check the model and the calibration data"
        )


def _thread_context() -> Callable[[], Any]:
    """Capture the caller's thread-local torch state (autocast, CUDA device) to replay in workers."""
    autocast = []
    for device_type in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device_type):
                autocast.append((device_type, torch.get_autocast_dtype(device_type)))
        except (RuntimeError, AttributeError):
            pass
    cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def enter() -> list:
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)
        contexts = [torch.autocast(device_type=d, dtype=dt) for d, dt in autocast]
        for c in contexts:
            c.__enter__()
        return contexts

    return enter


def calibrate_layers(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    items: Iterable[Any],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    num_calibration_batches: int | None = None,
    progress: bool = True,
    sync_across_processes: bool | None = None,
    max_batches_in_flight: int | None = None,
    token_mask: Any = "auto",
    max_rounds: int = 24,
) -> dict[str, LayerStatistics]:
    """Calibrate the thresholds of ``layers`` (already sparsified modules) on ``items``.

    Every layer of ``layers`` is switched to calibrating mode for the pass and ends in sparsifying mode with
    its exact threshold. Other sparsified layers of the model keep doing what they did (their sparsification
    is part of what the calibrated layers see). Thresholds are written only after a layer's statistics are
    complete, and nothing is written for a failed run except layers already finalized (the caller restores
    them). Returns statistics per layer name.

    ``token_mask`` (``"auto"``, ``None`` or a callable item -> bool ``[batch, seq]`` mask, see
    :func:`pl_actsparse.core.masking.resolve_mask_fn`) is applied to each item as the data yields it (before
    ``transform_fn``); only the real tokens of each layer input count. A layer input without token axes
    matching the mask raises :class:`~pl_actsparse.errors.TokenMaskError`.

    A layer called several times in one forward is calibrated over all of its calls: after the first pass
    such layers are solved as fixed points in at most ``max_rounds`` further passes (module docstring);
    :class:`~pl_actsparse.errors.CalibrationConvergenceError` if that fails.

    ``max_batches_in_flight`` bounds memory: batches then run in consecutive groups of that size, each in
    lockstep, with histograms accumulated over groups. Thresholds are still quantiles of all elements, but
    earlier groups saw the upstream thresholds of their time, so the guarantee becomes approximate.
    """
    mask_fn = resolve_mask_fn(token_mask)
    transform = transform_fn or default_transform_fn
    device = model_device(model)
    dist = _Distributed(sync_across_processes, device)

    batches: list[Any] = []
    for item in items:
        if num_calibration_batches is not None and len(batches) >= num_calibration_batches:
            break
        batches.append(item)
    total = dist.sum_(torch.tensor([len(batches)])).item() if dist.enabled else len(batches)
    if total == 0:
        raise EmptyDatasetError(
            "the calibration data yielded no item: pass a non-empty iterable of model inputs"
            + (" (num_calibration_batches=%r)" % num_calibration_batches if num_calibration_batches is not None else "")
        )

    if max_batches_in_flight is None and _forward_is_not_reentrant(model):
        warnings.warn(
            "this model keeps per-forward global state (NNCF's function hooks), so calibration batches cannot run "
            "concurrently: calibrating in streaming mode (max_batches_in_flight=1), which is approximately exact",
            stacklevel=3,
        )
        max_batches_in_flight = 1
    size = len(batches) if max_batches_in_flight is None else max_batches_in_flight
    groups = [batches[i : i + size] for i in range(0, len(batches), size)] if batches else []
    n_groups = len(groups)
    if dist.enabled:  # every rank must run the same number of lockstep rounds
        n_groups = -dist.min_int(-n_groups)
    groups += [[] for _ in range(n_groups - len(groups))]

    name_of = {id(m): n for n, m in model.named_modules()}
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    slots = [
        _LayerSlot(index=order[id(m)], name=name_of.get(id(m), name), module=m, target=m._actsparse.target)
        for name, m in layers
    ]
    previous_modes = {id(s.module): s.module._actsparse.mode for s in slots}
    enter_context = _thread_context()
    was_training = model.training
    model.eval()

    def work(batch: Any) -> Callable[[], Any]:
        def run() -> None:
            contexts = enter_context()
            _WORKER.set(object())
            try:
                mask = mask_fn(batch) if mask_fn is not None else None
                if mask is not None and not isinstance(mask, torch.Tensor):
                    raise TypeError(f"token_mask function returned {type(mask).__qualname__}, expected a bool tensor [batch, seq] or None")
                with torch.no_grad(), _token_mask_ctx(mask):
                    call_model(model, _to_device(transform(batch), device))
            finally:
                for c in reversed(contexts):
                    c.__exit__(None, None, None)

        return run

    def run_pass(bar: _Progress) -> None:
        for group in groups:
            session = CalibrationSession(slots, dist)
            for s in slots:
                s.reset_for_group()
                s.module._actsparse.mode = SparsifierMode.CALIBRATING
                s.module._actsparse.session = session
            threads = [
                threading.Thread(target=session.run_worker, args=(work(b),), name=f"actsparse-calib-{i}", daemon=True)
                for i, b in enumerate(group)
            ]
            session.workers = len(threads)
            for t in threads:
                t.start()
            session.coordinate(lambda slot: bar.advance(slot.name))
            for t in threads:
                t.join()
            if session.error is not None:
                raise session.error

    bar = _Progress(progress and dist.is_main, len(slots) * n_groups)
    try:
        with bar, compilation_disabled():
            run_pass(bar)
            flags = dist.sum_(torch.tensor([int(s.repeated) for s in slots], dtype=torch.int64))
            repeated = [s for s, f in zip(slots, flags.tolist()) if f]
            if repeated:
                _solve_repeated(slots, repeated, run_pass, bar, dist, max_rounds, n_groups)
    finally:
        model.train(was_training)
        for s in slots:
            s.pinned = False
            s.observed = []
            s.module._actsparse.session = None
            s.module._actsparse.mode = SparsifierMode.SPARSIFYING if s.stats is not None else previous_modes[id(s.module)]
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


# ---------------------------------------------------------------------------------------------------
# layers called several times per forward


def _threshold_key(tau: float, dtype: torch.dtype) -> int:
    """Threshold as an integer that orders like it: -1 for -inf, else the bit pattern in ``dtype``."""
    if tau == -math.inf:
        return -1
    return int(torch.tensor([tau], dtype=torch.float32).to(dtype).view(_INT_VIEW[dtype]).item())


def _key_threshold(key: int, dtype: torch.dtype) -> float:
    return -math.inf if key < 0 else _bits_to_float(key, dtype)


#: Largest miss |achieved - best reachable| tolerated for *coupled* repeated layers (several layers called several
#: times, each one's later inputs depending on the others' thresholds) when no pass hits every fixed point exactly;
#: it is warned about with the figures. A larger miss raises CalibrationConvergenceError.
COUPLED_TOLERANCE = 0.002


@dataclass
class _FixedPoint:
    """The search for a repeated layer's threshold ``tau`` with ``tau = best(inputs produced under tau)``.

    ``tried`` holds, per threshold key, ``(zeroed at it, best zeroed count of the same inputs, elements)``
    measured while every other repeated layer kept its current threshold: it is cleared when they change,
    since the inputs, hence the counts, depend on them.
    """

    tried: dict = field(default_factory=dict)

    def next_key(self, key: int, optimum_key: int) -> int | None:
        """The next threshold to try, or ``None`` when no exact fixed point is left to find."""
        too_low = [k for k, (z, best, _) in self.tried.items() if z < best]
        too_high = [k for k, (z, best, _) in self.tried.items() if z > best]
        lo = max(too_low) if too_low else None
        hi = min(too_high) if too_high else None
        inside = (lo is None or optimum_key > lo) and (hi is None or optimum_key < hi)
        if optimum_key not in self.tried and inside:
            return optimum_key  # fixed-point iteration: usually within a few elements after 2-3 passes
        if lo is not None and hi is not None and lo < hi:
            mid = (lo + hi) // 2  # bisection over the ordered bit patterns
            return mid if lo < mid < hi and mid not in self.tried else None
        return None

    def closest(self, target: float) -> int:
        """The tried threshold whose zeroed fraction is closest to the target (ties: fewer zeroed)."""
        return min(self.tried, key=lambda k: (abs(self.tried[k][0] - target * self.tried[k][2]), self.tried[k][0]))


def _measure_pinned(s: _LayerSlot, dist: _Distributed) -> tuple[torch.dtype, torch.Tensor, int, float, int]:
    """Statistics of a pinned layer over every call of the last pass:
    ``(dtype, coarse histogram, zeroed at its threshold, best threshold, best zeroed count)``."""
    dtype = _agreed_dtype(dist, s.dtype)
    observed = s.observed
    device = observed[0].device if observed else torch.device("cpu")
    coarse = torch.zeros(COARSE_BINS, dtype=torch.int64, device=device)
    zeroed = torch.zeros((), dtype=torch.int64, device=device)
    for sel in observed:
        coarse += coarse_histogram(sel).to(device)
        zeroed += (sel.abs() <= s.module.activation_threshold).sum().to(device)  # exactly as the forward zeroes
    coarse = dist.sum_(coarse).to("cpu")
    zeroed_at = int(dist.sum_(zeroed.reshape(1)).item())
    _check_finite(s.name, coarse, dtype)

    def fine(b: int) -> torch.Tensor:
        local = torch.zeros(FINE_BINS, dtype=torch.int64, device=device)
        for sel in observed:
            local += fine_histogram(sel, b).to(device)
        return dist.sum_(local).to("cpu")

    best_tau, best_zeroed = threshold_from_histogram(coarse, s.target, dtype, fine)
    return dtype, coarse, zeroed_at, best_tau, best_zeroed


def _solve_repeated(
    slots: Sequence[_LayerSlot],
    repeated: Sequence[_LayerSlot],
    run_pass: Callable[[Any], None],
    bar: "_Progress",
    dist: _Distributed,
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
    free = len(slots) - len(repeated)
    history: list[tuple[float, dict]] = []  # (largest miss, thresholds) per pass
    settled: dict[int, bool] = {}
    jumped: set[int] = set()  # layers settled on the closer side of a jump, not on an exact fixed point
    best_counts: dict[int, int] = {}  # per layer, the best zeroed count of the last pass's inputs
    for round_index in range(1, max_rounds + 2):
        for s in slots:
            s.reset_for_round()
        bar.extend(free * n_groups)
        run_pass(bar)
        taus = {id(s): float(s.module.activation_threshold) for s in repeated}
        misses, moves = {}, {}
        for s in repeated:
            fp = search[id(s)]
            dtype, coarse, zeroed_at, best_tau, best_zeroed = _measure_pinned(s, dist)
            n = int(coarse.sum())
            key = _threshold_key(taus[id(s)], dtype)
            s.stats = LayerStatistics(
                s.name, s.target, dtype, coarse, taus[id(s)], zeroed_at, calls=s.max_calls, rounds=round_index + 1
            )
            fp.tried[key] = (zeroed_at, best_zeroed, n)
            best_counts[id(s)] = best_zeroed
            if zeroed_at == best_zeroed:
                jumped.discard(id(s))
            misses[id(s)] = abs(zeroed_at - best_zeroed) / max(n, 1)
            settled[id(s)] = zeroed_at == best_zeroed
            if not settled[id(s)]:
                nxt = fp.next_key(key, _threshold_key(best_tau, dtype))
                if nxt is None:  # the count jumps over the target between adjacent thresholds: take the closer
                    nxt = fp.closest(s.target)
                    settled[id(s)] = nxt == key
                    jumped.add(id(s))
                if nxt != key:
                    moves[id(s)] = _key_threshold(nxt, dtype)
        history.append((max(misses.values()), dict(taus)))
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
        for s in slots:
            s.reset_for_round()
        bar.extend(free * n_groups)
        run_pass(bar)
        for s in repeated:
            dtype, coarse, zeroed_at, _, best_zeroed = _measure_pinned(s, dist)
            s.stats = LayerStatistics(
                s.name, s.target, dtype, coarse, best_taus[id(s)], zeroed_at, calls=s.max_calls, rounds=len(history) + 2
            )
            best_counts[id(s)] = best_zeroed
    report = ", ".join(
        f"{s.name!r}: achieved {s.stats.achieved:.6f} over {s.stats.elements} elements of {s.max_calls} calls, "
        f"best reachable {best_counts[id(s)] / max(s.stats.elements, 1):.6f}"
        for s in repeated
    )
    if best_miss > COUPLED_TOLERANCE:
        for s in repeated:
            s.stats = None
        raise CalibrationConvergenceError(
            f"layers called several times per forward depend on each other's thresholds and no calibration pass of "
            f"{len(history)} found thresholds within {COUPLED_TOLERANCE} of the exact fixed point ({report}). "
            "Sparsify modules called once per forward instead, or fewer of the shared ones"
        )
    warnings.warn(
        f"layers called several times per forward depend on each other's thresholds: no pass hit every fixed point "
        f"exactly; the closest one (miss {best_miss:.2e} <= {COUPLED_TOLERANCE}) is kept: {report}",
        stacklevel=4,
    )


def _warn_granularity(repeated: Sequence[_LayerSlot]) -> None:
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
@contextlib.contextmanager
def compilation_disabled() -> Iterator[None]:
    """Run every ``torch.compile``'d function and module eagerly while the context is open, then restore.

    Calibration runs the model in several threads at once, with locks, conditions and ``bincount`` in the
    layers: traced by dynamo, that breaks graphs, and concurrent compiles invalidate each other's guards until
    the recompile limit sends the user's compiled model to eager for good. Under
    ``torch.compiler.set_stance("force_eager")`` nothing is traced and the compiled graphs stay cached, so the
    first step after calibration reuses (or compiles once) the user's graph. A no-op when dynamo was never
    imported (nothing can be compiled then). Not for use inside a compiled region.
    """
    if "torch._dynamo" not in sys.modules:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def _forward_is_not_reentrant(model: nn.Module) -> bool:
    """Models whose forward patches shared state (NNCF-wrapped ones) break when two forwards overlap."""
    return any("__nncf_hooks" in m._modules for m in model.modules())


class _Progress:
    """A rich progress bar over layers, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self._progress = None
        self._task = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("calibrating activation thresholds"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[layer]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("calibrate", total=self.total, layer="")
        return self

    def extend(self, n: int) -> None:
        """More layers to finalize (another calibration pass)."""
        self.total += n
        if self._progress is not None:
            self._progress.update(self._task, total=self.total)

    def advance(self, name: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, layer=name)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
