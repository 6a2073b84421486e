"""One block, one calibration batch in flight: dependency levels and one partial pass per level.

Inside a block the targeted layers form a few *dependency levels*: a layer's input depends on the thresholds of
lower levels only (Llama: ``q/k/v_proj`` 0, ``o_proj`` 1, ``gate/up_proj`` 2, ``down_proj`` 3). As GPTQ's "true
sequential" mode, :func:`calibrate_block` calibrates them one after another on the cached block inputs:

* **Plan** (:func:`plan_block`, once per block structure): one forward with autograd on (nothing saved for
  backward); ``B`` depends on ``A`` when the graph of ``B``'s input reaches ``A``'s thresholded input. A block
  whose layers are not each called once (mixture-of-experts), or whose layer inputs are not traced back to its
  arguments, is not leveled and is calibrated in lockstep instead.
* **Level passes**: for level ``l`` every batch in turn runs the block, levels ``< l`` at their final thresholds,
  until every level-``l`` layer has seen its input; then :func:`~pl_actsparse.calibrate.histogram.finalize`
  sets the level's thresholds, as in lockstep. **Propagation**: each batch's output under the final thresholds
  becomes the cached input of the next block.
* **Reuse**: a sub-module (HF's ``self_attn``) whose targeted layers are all final returns its kept output in
  later passes (kept only while no larger than the block input). When its output is the output of its last
  layer (``o_proj``, called on one tensor), that layer's input is kept in the layer's own pass, and the
  sub-module's output is then computed from it (``o_proj`` alone, not ``q/k/v`` and the attention again).

Float32 fine counts are kept for a *window* of coarse bins around the first batch's quantile; when the final
bin falls outside, the level pass runs once more for its fine counts. Thresholds, histograms and zeroed counts
are bit for bit lockstep's: every batch computes the very tensors it computes inside the lockstep forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pl_actsparse.calibrate.blocks import hidden_out
from pl_actsparse.calibrate.cache import BoundaryCache
from pl_actsparse.calibrate.distributed import Distributed
from pl_actsparse.calibrate.histogram import (
    COARSE_BINS, FINE_BINS, LayerStatistics, abs_keys, check_input_dtype, coarse_histogram, finalize, fine_bin,
    fine_histogram, merge_coarse
)
from pl_actsparse.calibrate.running import compilation_disabled, hooks_removed, map_tensors, patch_forward, restore_forward
from pl_actsparse.core.layer import ADAPTER_INPUT_KWARG, SparsifierMode, linear_like_spec
from pl_actsparse.core.masking import select_tokens, token_mask as token_mask_context

__all__ = ["Unleveled", "BlockPlan", "plan_block", "calibrate_block"]

#: Coarse bins of fine counts kept per float32 layer (each 2**16 int64 counters: 512 KiB); the window covers
#: the first batch's quantiles within ``FINE_WINDOW_QUANTILE_MARGIN`` of the target.
FINE_WINDOW_BINS = 16
FINE_WINDOW_QUANTILE_MARGIN = 0.02


class _NotLeveled(Exception):
    """The block cannot be calibrated level by level; the message says why."""


class _CacheSpoiled(_NotLeveled):
    """The block stopped following its plan while the cache was being overwritten with its outputs."""


@dataclasses.dataclass(frozen=True)
class Unleveled:
    """What :func:`calibrate_block` returns when the block cannot be calibrated level by level (all ranks agree):
    calibrate the block in lockstep, or, when ``spoiled`` (its outputs already replaced part of the cache), start
    over in lockstep."""

    reason: str
    spoiled: bool = False


class _Stop(Exception):
    """Ends a level pass once every layer of the level has seen its input."""


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Dependency levels of a block's targeted layers, by their names inside the block.

    ``levels[l]`` lists the level-``l`` layers in call order; ``reuse`` holds ``(name, ready, tail)`` of each
    sub-module that can return its earlier output: ``ready`` is the first pass (level index) in which all of its
    targeted layers are final; ``tail`` is ``(layer, arity)`` when its output is the output of its last layer
    (``arity`` 0: that tensor, ``k``: a tuple of it and ``k - 1`` ``None``), else ``None``.
    """

    levels: tuple[tuple[str, ...], ...]
    reuse: tuple[tuple[str, int, tuple[str, int] | None], ...]


def _with_grad(v: Any) -> Any:
    return map_tensors(v, lambda t: t.detach().clone().requires_grad_(True) if t.is_floating_point() else t)


def _reachable(node: Any) -> set:
    seen: set = set()
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(nxt for nxt, _ in getattr(n, "next_functions", ()) if nxt is not None)
    return seen


def plan_block(block: nn.Module, layers: Sequence[nn.Module], args: tuple, kwargs: dict) -> BlockPlan | str:
    """Dependency levels of ``layers`` (sparsified modules inside ``block``) from one forward of the block on
    ``args``/``kwargs`` with autograd on (see the module docstring). The layers' modes are restored.

    Returns the plan, or why there is none (a layer is not called exactly once, a layer input is not traced
    back to the block's arguments, or the forward fails with autograd on).
    """
    local = {id(m): n for n, m in block.named_modules()}
    ids = {id(m): k for k, m in enumerate(layers)}
    k_layers = len(layers)
    raw: list[Any] = [None] * k_layers
    marks: list[Any] = [None] * k_layers
    calls = [0] * k_layers
    order: list[int] = []
    token = object()

    def observer(module: nn.Module, inp: torch.Tensor, x: torch.Tensor) -> None:
        k = ids[id(module)]
        calls[k] += 1
        if calls[k] == 1:
            raw[k], marks[k] = inp, x.grad_fn
            order.append(k)

    containers = [m for m in block.modules() if m is not block and id(m) not in ids
                  and any(id(x) in ids for x in m.modules())]
    container_calls = {id(m): 0 for m in containers}
    outs: dict[int, Any] = {}  # module -> its output; a layer called on one tensor only

    def count(module: nn.Module, _args: Any) -> None:
        container_calls[id(module)] += 1

    def output(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if id(module) in container_calls or (len(args) == 1 and not kwargs):
            outs[id(module)] = out

    handles = [m.register_forward_pre_hook(count) for m in containers]
    handles += [m.register_forward_hook(output, with_kwargs=True) for m in (*containers, *layers)]
    modes = [m._actsparse.mode for m in layers]
    for m in layers:
        m._actsparse.mode = SparsifierMode.SPARSIFYING  # x * keep: a graph node per layer, whatever the threshold
        m._actsparse.observers[id(token)] = observer
    try:
        # callers may be in inference mode; only the graph's structure is read, so nothing is saved for backward
        # (the forward costs the memory of a no-grad one)
        with hooks_removed(handles), torch.inference_mode(False), torch.enable_grad(), compilation_disabled(), \
                torch.autograd.graph.saved_tensors_hooks(lambda _: None, lambda _: None):
            block(*_with_grad(args), **_with_grad(kwargs))
    except Exception as exc:  # noqa: BLE001 - any failure means: calibrate this block in lockstep
        return f"the block's forward failed with autograd on ({type(exc).__name__}: {exc})"
    finally:
        for m, mode in zip(layers, modes):
            m._actsparse.mode = mode
            m._actsparse.observers.pop(id(token), None)
    names = [local[id(m)] for m in layers]
    for bad, why in (([k for k in range(k_layers) if calls[k] == 0], "were not called by the block's forward (data-dependent routing)"),
                     ([k for k in range(k_layers) if calls[k] > 1], "are called more than once per block forward"),
                     ([k for k in range(k_layers) if marks[k] is None], "have inputs that do not depend on the block's arguments")):
        if bad:
            return f"layer(s) {[names[k] for k in bad]} {why}"
    level = [0] * k_layers
    for k in order:
        reach = _reachable(raw[k].grad_fn)
        level[k] = 1 + max((level[a] for a in order if a != k and marks[a] in reach), default=-1)  # 0 without dependencies
    n_levels = max(level) + 1
    levels = tuple(tuple(names[k] for k in order if level[k] == lv) for lv in range(n_levels))
    # sub-modules called once whose targeted layers are all final before the last level: their output can be reused
    ready = {}
    for m in containers:
        inside = [ids[id(x)] for x in m.modules() if id(x) in ids]
        r = max(level[k] for k in inside) + 1
        last = [k for k in inside if level[k] == r - 1]
        tail = _tail(outs.get(id(m)), outs.get(id(layers[last[0]]))) if len(last) == 1 else None
        if container_calls[id(m)] == 1 and (r < n_levels or tail is not None):
            ready[local[id(m)]] = (r, None if tail is None else (names[last[0]], tail))
    outermost = tuple(sorted(
        ((n, r, t) for n, (r, t) in ready.items() if not any(n.startswith(o + ".") for o in ready)),
        key=lambda t: t[0],
    ))
    return BlockPlan(levels, outermost)


def _tail(out: Any, layer_out: Any) -> int | None:
    """The arity of a sub-module output that is ``layer_out`` (0) or a tuple of it and ``None``s, else ``None``."""
    if layer_out is None or out is layer_out:
        return None if layer_out is None else 0
    tuple_of_it = type(out) is tuple and out and out[0] is layer_out and all(v is None for v in out[1:])
    return len(out) if tuple_of_it else None


# ---------------------------------------------------------------------------------------------------
# statistics of one layer over one level pass


class _Accumulator:
    """Coarse counts of a layer's real-token inputs over the batches of a pass, plus float32 fine counts in a
    window of coarse bins."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.target = float(module._actsparse.target)
        self.dtype: torch.dtype | None = None
        self.window: tuple[int, int] | None = None  # coarse bins [lo, hi] with fine counts
        self.repass_bin: int | None = None  # the bin whose fine counts a second pass collects (float32)
        self.coarse = self.fine = self.repass = None  # counts: all bins, the window, the second pass's bin

    def add(self, sel: torch.Tensor, hist: torch.Tensor) -> None:
        if self.dtype is None:
            self.dtype = sel.dtype
        elif sel.dtype != self.dtype:
            raise TypeError(f"layer {self.name!r} received inputs of dtypes {self.dtype} and {sel.dtype}")
        if self.repass_bin is not None:  # the second pass of a float32 level: fine counts of one bin only
            h = fine_histogram(sel, self.repass_bin)
            self.repass = h if self.repass is None else self.repass + h
            return
        self.coarse = hist.clone() if self.coarse is None else self.coarse.add_(hist)
        if sel.dtype != torch.float32:
            return
        if self.window is None:
            self.window = _window(hist, self.target)
        lo, hi = self.window
        keys = abs_keys(sel)
        inside = keys[(keys >= (lo << 16)) & (keys < ((hi + 1) << 16))] - (lo << 16)
        h = torch.bincount(inside, minlength=(hi - lo + 1) * FINE_BINS)
        self.fine = h if self.fine is None else self.fine.add_(h)

    def fine_of(self, b: int) -> torch.Tensor | None:
        lo, hi = self.window or (1, 0)
        return self.fine[(b - lo) * FINE_BINS : (b - lo + 1) * FINE_BINS] if lo <= b <= hi else None  # type: ignore[index]


def _window(hist: torch.Tensor, target: float) -> tuple[int, int]:
    """Coarse bins around the first batch's quantiles ``target -/+ FINE_WINDOW_QUANTILE_MARGIN`` (at most
    ``FINE_WINDOW_BINS``, centred on the target's bin when wider)."""
    cum = torch.cumsum(hist.to("cpu"), 0)
    q = lambda f: int(torch.searchsorted(cum, torch.tensor(min(max(f, 0.0), 1.0) * int(cum[-1]), dtype=cum.dtype)))  # noqa: E731
    lo, hi = max(q(target - FINE_WINDOW_QUANTILE_MARGIN) - 1, 0), min(q(target + FINE_WINDOW_QUANTILE_MARGIN) + 1, COARSE_BINS - 1)
    if hi - lo + 1 > FINE_WINDOW_BINS:
        lo = max(q(target) - FINE_WINDOW_BINS // 2, 0)
        hi = min(lo + FINE_WINDOW_BINS - 1, COARSE_BINS - 1)
    return lo, hi


# ---------------------------------------------------------------------------------------------------
# the passes


class _Pass:
    """Observers and reused outputs installed on a block for one pass."""

    def __init__(self, block: nn.Module, j: int, plan: BlockPlan, layers: dict[str, nn.Module], cache: BoundaryCache,
                 masks: list) -> None:
        self.block, self.j, self.plan, self.layers, self.cache, self.masks = block, j, plan, layers, cache, masks
        self.names = {id(m): n for n, m in layers.items()}
        self.kept: dict = {}  # (batch, sub-module) -> its output; (batch, sub-module, "input") -> its last layer's input
        self.hidden_bytes: dict[int, int] = {}
        self.pending: set[int] = set()
        self.level_of = {n: lv for lv, names in enumerate(plan.levels) for n in names}
        self.skipping: dict[str, Any] = {}  # layer name -> its own instance ``forward`` (or _MISSING) while skipped
        self.inside: dict[str, set[int]] = {}  # reused sub-module -> the targeted layers inside it
        self.replayed: set[int] = set()  # targeted layers skipped in this run (their sub-module was reused)
        self.token, self.index, self.level = object(), -1, 0
        self.observed: dict[str, _Accumulator] = {}
        self.calls: dict[int, int] = {}
        self.last: tuple | None = None  # (input, mask, selected, histogram) of the previous observation
        self.saved: list = []
        self.wont_keep: set = set()  # sub-modules whose output (name) or last layer's input ((name,)) is too large
        self.tails: dict[int, str] = {}  # last layer -> its sub-module, whose output is that layer's (BlockPlan.reuse)

    def __enter__(self) -> "_Pass":
        for m in self.layers.values():
            m._actsparse.observers[id(self.token)] = self.observe
        modules = dict(self.block.named_modules())
        layer_ids = {id(m) for m in self.layers.values()}
        for name, ready, tail in self.plan.reuse:
            sub = modules[name]
            self.inside[name] = {id(m) for m in sub.modules() if id(m) in layer_ids}
            if tail is not None:
                self.tails[id(self.layers[tail[0]])] = name
            self.saved.append((sub, patch_forward(sub, lambda real, name=name, ready=ready, tail=tail: self._reusing(name, ready, tail, real))))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.skip_from(len(self.plan.levels))
        for m in self.layers.values():
            m._actsparse.observers.pop(id(self.token), None)
        for sub, saved in self.saved:
            restore_forward(sub, saved)
        self.saved = []

    def skip_from(self, level: int) -> None:
        """Layers of ``level`` and above compute nothing (zeros of the output's shape, after their observers saw
        the input): in the pass of ``level`` their outputs feed only higher levels, which that pass never
        observes. Layers below ``level`` compute as usual."""
        for name, m in self.layers.items():
            skip = self.level_of[name] >= level
            if skip and name not in self.skipping:
                self.skipping[name] = patch_forward(m, lambda _real, m=m: _zeros_after_observers(m))
            elif not skip and name in self.skipping:
                restore_forward(m, self.skipping.pop(name))

    def _reusing(self, name: str, ready: int, tail: tuple[str, int] | None, real: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            key = (self.index, name)
            if key in self.kept:
                self.replayed |= self.inside[name]
                return self.cache.load(self.kept[key])
            kept_input = self.kept.pop(key + ("input",), None) if self.level >= ready else None
            if kept_input is not None:  # the output of the last layer on its input kept in its own pass
                layer = self.layers[tail[0]]  # type: ignore[index]
                y = layer(self.cache.load(kept_input))
                self.cache.drop(kept_input)
                self.replayed |= self.inside[name] - {id(layer)}
                out = (y,) + (None,) * (tail[1] - 1) if tail[1] else y  # type: ignore[index]
            else:
                out = real(*args, **kwargs)
            last_pass = self.level >= len(self.plan.levels)  # propagation: nobody reads a kept output afterwards
            if self.level >= ready and not last_pass and name not in self.wont_keep:
                if _nbytes(out) <= self.hidden_bytes[self.index]:
                    self.kept[key] = self.cache.keep(self.index, name, out)
                else:
                    self.wont_keep.add(name)
            return out

        return forward

    def observe(self, module: nn.Module, inp: torch.Tensor, x: torch.Tensor) -> None:
        key = id(module)
        if key in self.calls:
            raise _NotLeveled("a layer was called more than once in one block forward")
        self.calls[key] = 1
        acc = self.observed.get(self.names[key])
        if acc is None:
            return
        mask = self.masks[self.index]
        last = self.last
        if last is not None and last[0] is inp and last[1] is mask:
            sel, hist = last[2], last[3]
        else:
            check_input_dtype(acc.name, inp)
            sel = select_tokens(inp.detach(), mask, layer=acc.name)
            hist = coarse_histogram(sel)
            self.last = (inp, mask, sel, hist)
        acc.add(sel, hist)
        sub = self.tails.get(key)  # the sub-module's output is computed from this input later (not again in a float32 repass)
        if sub is not None and (sub,) not in self.wont_keep and (self.index, sub, "input") not in self.kept:
            if _nbytes(inp) > self.hidden_bytes[self.index]:
                self.wont_keep.add((sub,))
            else:
                handle = self.cache.keep(self.index, sub, inp)
                same = isinstance(handle, torch.Tensor) and handle.data_ptr() == inp.data_ptr()
                self.kept[(self.index, sub, "input")] = handle.clone() if same else handle  # the model may change inp later
        self.pending.discard(key)
        if not self.pending:
            self.last = None
            raise _Stop

    def run(self, index: int, level: int, accumulators: dict[str, _Accumulator]) -> torch.Tensor | None:
        """Run batch ``index``; a level pass stops after its layers' inputs and returns ``None``, the
        propagation pass (``level == passes``) returns the block output."""
        self.index, self.level, self.observed, self.calls, self.last, self.replayed = index, level, accumulators, {}, None, set()
        self.skip_from(level)
        self.pending = {id(acc.module) for acc in accumulators.values()}
        hidden = self.cache.hidden(index)
        self.hidden_bytes[index] = hidden.numel() * hidden.element_size()
        args, kwargs = self.cache.call(index, self.j, hidden)
        try:
            with token_mask_context(self.masks[index]):
                out = self.block(*args, **kwargs)
        except _Stop:
            return None
        finally:
            self.last = None
        if self.pending:
            raise _NotLeveled("the block's forward ended before every layer of a level was called")
        if level == len(self.plan.levels) and set(self.calls) | self.replayed != {id(m) for m in self.layers.values()}:
            raise _NotLeveled("not every targeted layer of the block was called in the propagation pass")
        return hidden_out(out)


def _zeros_after_observers(module: nn.Module) -> Callable[..., torch.Tensor]:
    out_features = linear_like_spec(module).out_features(module)  # type: ignore[union-attr]

    def forward(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not kwargs.pop(ADAPTER_INPUT_KWARG, False):
            module.activation_input(input)  # type: ignore[operator]
        autocast = torch.is_autocast_enabled(input.device.type)
        dtype = torch.get_autocast_dtype(input.device.type) if autocast else input.dtype
        return input.new_zeros(*input.shape[:-1], out_features, dtype=dtype)

    return forward


def _nbytes(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list, dict)):
        return sum(map(_nbytes, out.values() if isinstance(out, dict) else out))
    return 0 if out is None or isinstance(out, (int, float, bool, str)) else 1 << 62  # unknown objects are never kept


def calibrate_block(block: nn.Module, plan: BlockPlan, layers: Sequence[tuple[str, nn.Module]], j: int,
                    cache: BoundaryCache, masks: list, dist: Distributed) -> dict[str, LayerStatistics] | Unleveled:
    """Calibrate ``layers`` (``(full name, module)`` inside ``block``, the ``j``-th block) level by level on the
    inputs in ``cache`` (``masks``: each batch's token mask), then write every batch's output there. Returns
    statistics per full name, or :class:`Unleveled` when, on any rank, a pass found the block behaving unlike its
    plan (all ranks return it together).

    Raises:
        NonFiniteActivationError, TokenMaskError, TypeError: as lockstep calibration.
    """
    local = {id(m): n for n, m in block.named_modules()}
    by_local = {local[id(m)]: (full, m) for full, m in layers}
    if sorted(by_local) != sorted(n for lv in plan.levels for n in lv):
        return Unleveled("the block's targeted layers differ from its plan")
    modules = {n: m for n, (_, m) in by_local.items()}
    for m in modules.values():
        m._actsparse.mode = SparsifierMode.PASSTHROUGH
    stats: dict[str, LayerStatistics] = {}
    p = _Pass(block, j, plan, modules, cache, masks)
    kept = p.kept
    try:
        with p, torch.no_grad(), compilation_disabled():
            for level, names in enumerate(plan.levels):
                accs = {n: _Accumulator(by_local[n][0], modules[n]) for n in names}
                _every_batch(p, level, accs, dist)
                _finalize(p, level, accs, dist)
                for n in names:
                    stats[by_local[n][0]] = accs[n].stats  # type: ignore[attr-defined]
            failed = None
            for i in range(len(masks)):
                try:
                    out = p.run(i, len(plan.levels), {})
                except _NotLeveled as exc:
                    failed = exc  # too late to redo only this block: the cache holds outputs already
                    break
                cache.set_hidden(i, out)  # type: ignore[arg-type]
                for key in [k for k in kept if k[0] == i]:
                    cache.drop(kept.pop(key))
            if dist.any(failed is not None):
                raise _CacheSpoiled(f"{failed or 'another rank'}: while propagating the block's outputs")
    except _NotLeveled as exc:
        return Unleveled(str(exc), spoiled=isinstance(exc, _CacheSpoiled))
    finally:
        for handle in kept.values():
            cache.drop(handle)
        kept.clear()
    return stats


def _every_batch(p: _Pass, level: int, accs: dict[str, _Accumulator], dist: Distributed) -> None:
    """The pass of ``level`` over every batch (none when ``accs`` is empty); on every rank, :class:`_NotLeveled`
    when it failed on any."""
    failed = None
    try:
        for i in range(len(p.masks) if accs else 0):
            p.run(i, level, accs)
    except _NotLeveled as exc:
        failed = exc
    if dist.any(failed is not None):
        raise failed or _NotLeveled("another rank's block did not follow the plan")


def _finalize(p: _Pass, level: int, accs: dict[str, _Accumulator], dist: Distributed) -> None:
    """Thresholds of one level from the summed histograms (all ranks), written into the layers."""
    ordered = list(accs.values())
    merged = [merge_coarse(acc.name, acc.dtype, acc.coarse, dist) for acc in ordered]
    # float32: the fine counts of the bin each threshold falls in; a second pass where a window missed it
    bins = [fine_bin(coarse, acc.target) if dtype == torch.float32 else None for acc, (dtype, coarse) in zip(ordered, merged)]
    here = [b is not None and acc.fine_of(b) is None for acc, b in zip(ordered, bins)]  # missing on this rank
    if dist.any(any(here)):  # some rank needs a second pass
        for acc, b, miss in zip(ordered, bins, here):
            acc.repass_bin = b if miss else None
        again = {n: acc for n, acc in accs.items() if acc.repass_bin is not None}
        _every_batch(p, level, again, dist)  # every rank gets here (``here`` is summed over all of them)
    for acc, (dtype, coarse) in zip(ordered, merged):
        local_fine = lambda b, acc=acc: acc.repass if acc.repass_bin is not None else acc.fine_of(b)  # noqa: E731
        acc.stats = finalize(acc.name, acc.target, dtype, coarse, local_fine, dist)  # type: ignore[attr-defined]
        acc.module.activation_threshold.fill_(acc.stats.threshold)  # type: ignore[operator,attr-defined]
        acc.module._actsparse.mode = SparsifierMode.SPARSIFYING
        acc.coarse = acc.fine = acc.repass = None
