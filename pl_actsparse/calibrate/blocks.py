"""The block list of a model and how sequential calibration drives it: stubs in place of the blocks, runners
that run the model or one block on a cached batch, and the probe that checks the blocks form a chain.

Every block's ``forward`` can be replaced by a stub (:class:`Stubs`): in :attr:`StubMode.PROBE` the first batch
calls each block once for real to learn its output format; in :attr:`StubMode.CAPTURE` every block's arguments
go into the boundary cache and the hidden states pass on unchanged, the last stub stopping the forward (GPTQ's
"Catcher"); in :attr:`StubMode.TAIL` the last block returns the cached final hidden states.
"""

from __future__ import annotations

import copy
import enum
import threading
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pl_actsparse.calibrate.cache import BoundaryCache, is_cache_object
from pl_actsparse.calibrate.distributed import Distributed
from pl_actsparse.calibrate.histogram import check_data
from pl_actsparse.calibrate.running import hooks_removed, map_tensors, model_device, patch_forward, restore_forward, run_item
from pl_actsparse.core.masking import token_mask as token_mask_context
from pl_actsparse.errors import InvalidOptionError

__all__ = ["find_block_list", "hidden_out", "StubMode", "Stubs", "ModelRunner", "BlockRunner", "probe"]


class _Stop(Exception):
    """Raised by a stub or an observer to end a forward pass early (GPTQ's "Catcher")."""


class _NotAChain(Exception):
    """The model does something the block-wise scheme cannot reproduce; the message says what."""


class StubMode(enum.Enum):
    """What the block stubs do (module docstring)."""

    PROBE = "probe"
    CAPTURE = "capture"
    TAIL = "tail"


def hidden_out(out: Any) -> torch.Tensor:
    """The hidden states of a block's output (the output itself, or its first element)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def find_block_list(model: nn.Module, layers: Sequence[str] | None = None, blocks: str | None = None) -> tuple[str | None, str]:
    """The qualified name of the ``nn.ModuleList`` of blocks to calibrate one after another.

    Without ``blocks``, the candidate is the ``nn.ModuleList`` (of at least 2 distinct modules) holding the most
    of ``layers`` (qualified names of the targeted layers; default: every ``nn.Linear``), the outermost one on
    ties; it must hold more than half of them. ``blocks`` names the list explicitly (then it may hold any
    share of the layers: those outside run before or after the blocks).

    Returns ``(name, reason)``: ``name`` is ``None`` when there is no suitable list, and ``reason`` says why
    (or what was found).

    Raises:
        InvalidOptionError: ``blocks`` is given but names no ``nn.ModuleList`` of the model.
    """
    modules = dict(model.named_modules())
    layers = list(layers) if layers is not None else [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if blocks is not None:
        if not isinstance(blocks, str) or not isinstance(modules.get(blocks), nn.ModuleList):
            lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
            raise InvalidOptionError(f"blocks must be the qualified name of an nn.ModuleList of the model, got {blocks!r}; "
                                     f"the model's ModuleLists are {lists[:10]}{'...' if len(lists) > 10 else ''}")
        candidates = [blocks]
    else:
        candidates = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) >= 2]
    if not candidates:
        return None, "the model has no nn.ModuleList of at least 2 blocks"
    if not layers:
        return None, "no targeted layer"

    def inside(name: str) -> int:
        prefix = f"{name}." if name else ""
        return sum(1 for n in layers if n.startswith(prefix))

    best = max(candidates, key=lambda n: (inside(n), -n.count(".") if n else 1, -len(n)))
    held = inside(best)
    block_list = modules[best]
    if len({id(b) for b in block_list}) != len(block_list):
        return None, f"{best!r} holds the same block object more than once (shared blocks)"
    if len(block_list) < 2:
        return None, f"{best!r} holds fewer than 2 blocks"
    if blocks is None and 2 * held <= len(layers):
        return None, (
            f"no nn.ModuleList holds the bulk of the {len(layers)} targeted layer(s) "
            f"(the best, {best!r}, holds {held})"
        )
    owner: dict[int, int] = {}
    for j, block in enumerate(block_list):
        for m in block.modules():
            if id(m) in owner and owner[id(m)] != j:
                return None, f"blocks {owner[id(m)]} and {j} of {best!r} share a submodule"
            owner[id(m)] = j
    return best, f"{len(block_list)} blocks in {best!r} hold {held} of {len(layers)} targeted layer(s)"


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states", kwargs.get("x"))
    if isinstance(h, torch.Tensor):
        return h
    raise _NotAChain("a block was called without a tensor as first argument or hidden_states=")


def _output_format(out: Any, hidden: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    """How a block returns its hidden states: a tensor, or a tuple/list whose first element is one."""
    if isinstance(out, torch.Tensor) and out.shape == hidden.shape:
        return lambda h: h
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) and out[0].shape == hidden.shape:
        # The other outputs are those of the probe's one real call, not of the batch at hand: float tensors among
        # them are handed on as NaN, so a model that computes with them fails loudly (NonFiniteActivationError)
        # instead of calibrating on stale values; one passed on to the next block as it is is caught by identity.
        rest = tuple(torch.full_like(v, float("nan")) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                     for v in out[1:])
        kind = type(out)
        fmt = lambda h: kind((h,) + rest)  # noqa: E731
        fmt.others = {id(v) for v in rest if isinstance(v, torch.Tensor)}  # type: ignore[attr-defined]
        return fmt
    raise _NotAChain(f"a block returned {type(out).__qualname__}, not its hidden states (a tensor or a tuple starting with one)")


def _holds_any(args: tuple, kwargs: dict, ids: set) -> bool:
    found: list[bool] = []
    map_tensors((args, kwargs), lambda t: found.append(id(t) in ids))
    return any(found)


class _StubState(threading.local):
    index: int = -1
    next_block: int = 0
    passed: Any = None
    seen: dict | None = None
    visited: set | None = None
    final: Any = None


class Stubs:
    """Replaces every block's forward while installed; what the stubs do is ``mode`` (a :class:`StubMode`)."""

    def __init__(self, block_list: Sequence[nn.Module], cache: BoundaryCache | None) -> None:
        self.blocks = list(block_list)
        self.cache = cache
        self.mode = StubMode.PROBE
        self.state = _StubState()
        self.fmt: Callable[[torch.Tensor], Any] | None = None
        self._saved: list = []

    def __enter__(self) -> "Stubs":
        for j, block in enumerate(self.blocks):
            self._saved.append(patch_forward(block, lambda real, j=j: self._stub(j, real)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for block, saved in zip(self.blocks, self._saved):
            restore_forward(block, saved)
        self._saved = []

    def start(self, index: int) -> None:
        st = self.state
        st.index, st.next_block, st.passed, st.seen = index, 0, None, {}

    def _stub(self, j: int, real: Callable[..., Any]) -> Callable[..., Any]:
        last = len(self.blocks) - 1

        def stub(*args: Any, **kwargs: Any) -> Any:
            st = self.state
            if j != st.next_block:
                raise _NotAChain(f"block {j} was called when block {st.next_block} was expected (each block once, in order)")
            hidden = _hidden_of(args, kwargs)
            if j > 0 and hidden is not st.passed:
                raise _NotAChain(f"the input of block {j} is not the output of block {j - 1} (the model changes it in between)")
            others = getattr(self.fmt, "others", None)
            if j > 0 and others and _holds_any(args, kwargs, others):
                raise _NotAChain(f"block {j} receives an output of block {j - 1} other than the hidden states (a second "
                                 "stream, e.g. a residual passed between blocks), which the cache does not carry")
            st.next_block = j + 1
            if self.mode is StubMode.TAIL:
                if j == last:  # with autograd on, a leaf whose gradient the caller reads (state.final)
                    st.final = self.cache.hidden(st.index).detach().requires_grad_(torch.is_grad_enabled())  # type: ignore[union-attr]
                    return self.fmt(st.final)  # type: ignore[misc]
                # never read by a chained model; NaN makes any other use fail loudly (NonFiniteActivationError)
                if j == 0:
                    st.poison = torch.full_like(hidden, float("nan"))
                st.passed = st.poison
                return self.fmt(st.poison)  # type: ignore[misc]
            if self.mode is StubMode.CAPTURE:
                check_data(f"block {j}", hidden)
                self.cache.record(st.index, j, args, kwargs, hidden, st.seen)  # type: ignore[union-attr]
            elif self.fmt is None:  # probe: learn the output format from one real call
                fresh = lambda v: copy.deepcopy(v) if is_cache_object(v) else v  # noqa: E731
                out = real(*[fresh(a) for a in args], **{k: fresh(v) for k, v in kwargs.items()})
                self.fmt = _output_format(out, hidden)
            if j == last:
                raise _Stop
            st.passed = hidden
            return self.fmt(hidden)  # type: ignore[misc]

        return stub


class ModelRunner(nn.Module):
    """Runs the whole model on calibration batch ``index`` with the blocks stubbed (capture or tail)."""

    def __init__(self, model: nn.Module, stubs: Stubs, batches: list, transform: Callable, masks: list,
                 post: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self.model = model
        self.train(False)
        self.__dict__.update(stubs=stubs, batches=batches, transform=transform, masks=masks, failure=None, post={id(m) for m in post})

    def forward(self, index: int) -> None:
        stubs = self.stubs
        stubs.start(index)
        stubs.state.visited = set()
        try:
            run_item(self.model, self.batches[index], self.transform, self.masks[index], model_device(self.model))
        except _Stop:
            pass
        except _NotAChain as exc:
            self.__dict__["failure"] = str(exc)
            return
        if stubs.mode is not StubMode.TAIL and stubs.state.next_block != len(stubs.blocks):
            self.__dict__["failure"] = f"the forward pass ended after {stubs.state.next_block} of {len(stubs.blocks)} blocks"
        elif stubs.mode is StubMode.CAPTURE:
            stubs.cache.seal(index)  # type: ignore[union-attr]

    def observer(self, module: nn.Module, inputs: torch.Tensor, x: torch.Tensor) -> None:
        """Stops a tail pass once this thread went through every post-block layer (no logits computed)."""
        visited = self.stubs.state.visited
        if visited is None:
            return
        visited.add(id(module))
        if self.post <= visited:
            raise _Stop


class BlockRunner(nn.Module):
    """Runs block ``j`` on the cached input of calibration batch ``index``; :meth:`commit` makes the outputs of
    the last run of every batch the cached inputs of the next block.

    The outputs wait until then: lockstep calibration may run every batch several times (layers called several
    times per forward are solved in passes), and each pass must read the block's inputs."""

    def __init__(self, block: nn.Module, j: int, cache: BoundaryCache, masks: list) -> None:
        super().__init__()
        self.block = block
        self.train(False)
        self.__dict__.update(j=j, cache=cache, masks=masks, outputs={}, lock=threading.Lock())

    def forward(self, index: int) -> None:
        hidden = self.cache.hidden(index)
        args, kwargs = self.cache.call(index, self.j, hidden)
        with token_mask_context(self.masks[index]):
            out = self.block(*args, **kwargs)
        with self.lock:
            self.outputs[index] = hidden_out(out).detach()

    def commit(self) -> None:
        for index, out in sorted(self.outputs.items()):
            self.cache.set_hidden(index, out)
        self.outputs.clear()


def probe(model: nn.Module, stubs: Stubs, batches: list, transform: Callable,
          outside: Sequence[tuple[str, nn.Module]], dist: Distributed) -> tuple[set[str], str | None]:
    """Run the first batch with the blocks stubbed: learn the blocks' output format, check they form a chain,
    and find which targeted layers outside them run before block 0 (``pre``) or between blocks (not allowed).
    The answer is agreed by all ranks."""
    calls = torch.zeros(2 * len(outside) + 1, dtype=torch.int64)

    def count(k: int) -> None:  # calls before block 0 at 2k, between blocks at 2k + 1
        if stubs.state.next_block < len(stubs.blocks):
            calls[2 * k + int(stubs.state.next_block > 0)] += 1

    handles = [m.register_forward_pre_hook(lambda *_, k=k: count(k)) for k, (_, m) in enumerate(outside)]
    stubs.mode = StubMode.PROBE
    runner = ModelRunner(model, stubs, batches[:1], transform, [None])
    with hooks_removed(handles), torch.no_grad():
        if batches:
            runner(0)
    calls[-1] = int(runner.failure is not None)
    calls = dist.sum_(calls)
    between = [n for k, (n, _) in enumerate(outside) if calls[2 * k + 1]]
    failure = runner.failure or ("another rank's model does not fit the block-wise scheme" if calls[-1] else None)
    if failure is None and between:
        failure = f"targeted layers outside the blocks run between two blocks: {between}"
    return {n for k, (n, _) in enumerate(outside) if calls[2 * k]}, failure
