"""Block-wise (sequential) exact calibration: a cache of block inputs instead of the whole model in flight.

Lockstep calibration (:mod:`pl_actsparse.core.calibration`) runs the *whole model* with every calibration batch
in flight, so every batch's activations at the layer being finalized are alive at once. Most large models are
a list of blocks (``model.model.layers`` of HF Llama/Qwen2/Mistral, ``transformer.h`` of GPT-2, the
``layers`` of the llama2.c demo). GPTQ and llm-compressor's sequential pipeline exploit that for quantization;
this module does the same for activation thresholds, with the same exactness as lockstep:

1. **Capture.** Every block's ``forward`` is replaced by a stub that records its arguments (``hidden_states``
   plus every other argument: attention mask, position embeddings, position ids, cache flags) and passes the
   hidden states on unchanged; the stub of the last block stops the forward (GPTQ's "Catcher"). So one cheap
   pass (embeddings and masks only) caches, per calibration batch, the input hidden states of block 0 and the
   other arguments of *every* block (a model may give blocks different masks, e.g. sliding-window layers).
   Targeted layers that run before block 0 are calibrated during this pass, in lockstep.
2. **Blocks, in order.** Block ``j`` is calibrated level by level with one batch in flight
   (:mod:`pl_actsparse.core.levels`): its targeted layers are grouped into dependency levels, each level is
   observed by a partial pass of every batch in turn with the lower levels at their final thresholds, and a
   last pass writes each batch's output (computed with the final thresholds) over its cache entry. A block that
   cannot be leveled (a layer called twice or skipped) is calibrated by
   :func:`~pl_actsparse.core.calibration.calibrate_layers` with the block as the model and every cached batch in
   flight. Either way each threshold is the exact quantile over all of that layer's elements, measured with the
   block's upstream layers at their final thresholds, and every earlier block was final when the cache was made.
3. **Tail.** Targeted layers after the last block (``lm_head``) are calibrated by a last lockstep pass of the
   whole model in which the blocks are stubs returning the cached final hidden states; the pass stops once a
   batch has gone through every such layer (the logits are never computed).

Memory above the model's own: the boundary cache (``batches x tokens x hidden`` elements, plus the blocks'
other arguments, stored once per batch), the outputs of finished sub-modules kept while their block is
calibrated (at most one more boundary-sized tensor), and the activations of one batch inside one block.
``offload="cpu"`` keeps both caches in host memory for a model on an accelerator, ``offload="disk"`` in files
under a temporary directory (read back one batch at a time). ``max_batches_in_flight`` only bounds the blocks
calibrated with every batch in flight, with the approximation documented for lockstep.

Identical thresholds to lockstep (bit for bit): each block computes on the very same tensors it gets inside
the full forward. A cache object handed to the blocks (HF's ``DynamicCache``) is deep-copied per block call,
so re-running a block never sees a key/value state another call appended.

When the model does not fit this scheme (no block list, blocks not chained output-to-input, a targeted layer
called between two blocks, NNCF's non-reentrant forward), calibration falls back to lockstep and logs why.
Anything that would make a threshold wrong raises or falls back; nothing is skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from pl_actsparse.core.calibration import (
    LayerStatistics,
    _Distributed,
    _forward_is_not_reentrant,
    _to_device,
    calibrate_layers,
    call_model,
    default_transform_fn,
    map_tensors,
    model_device,
)
from pl_actsparse.core.levels import (
    BlockIO,
    BlockPlan,
    CacheSpoiled,
    NotLeveled,
    _hidden_out,
    calibrate_block,
    patch_forward,
    plan_block,
    restore_forward,
)
from pl_actsparse.core.masking import resolve_mask_fn, token_mask as _token_mask_context
from pl_actsparse.errors import EmptyDatasetError, InvalidTargetError

__all__ = [
    "CALIBRATION_MODES",
    "OFFLOAD_MODES",
    "AUTO_SEQUENTIAL_MIN_PARAM_BYTES",
    "find_block_list",
    "calibrate_sequential",
    "calibrate",
    "check_calibration_options",
]

log = logging.getLogger(__name__)

CALIBRATION_MODES = ("auto", "sequential", "lockstep")
IN_BLOCK_MODES = ("levels", "lockstep")
OFFLOAD_MODES = (None, "cpu", "disk")

#: ``calibration="auto"`` chooses the sequential mode when the model has a block list and its parameters take
#: at least this many bytes (256 MiB: about 128M bf16 parameters); smaller models use lockstep, whose
#: activation memory is small next to what the machine holds anyway.
AUTO_SEQUENTIAL_MIN_PARAM_BYTES = 256 << 20


class _Stop(Exception):
    """Raised by a stub or an observer to end a forward pass early (GPTQ's "Catcher")."""


class _NotAChain(Exception):
    """The model does something the block-wise scheme cannot reproduce; the message says what."""


class _Fallback(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# finding the block list


def find_block_list(
    model: nn.Module, layers: Sequence[str] | None = None, blocks: str | None = None
) -> tuple[str | None, str]:
    """The qualified name of the ``nn.ModuleList`` of blocks to calibrate one after another.

    Without ``blocks``, the candidate is the ``nn.ModuleList`` (of at least 2 distinct modules) holding the most
    of ``layers`` (qualified names of the targeted layers; default: every ``nn.Linear``), the outermost one on
    ties; it must hold more than half of them. ``blocks`` names the list explicitly (then it may hold any
    share of the layers: those outside run before or after the blocks).

    Returns ``(name, reason)``: ``name`` is ``None`` when there is no suitable list, and ``reason`` says why
    (or what was found).

    Raises:
        InvalidTargetError: ``blocks`` is given but names no ``nn.ModuleList`` of the model.
    """
    modules = dict(model.named_modules())
    if layers is None:
        layers = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    layers = list(layers)
    if blocks is not None:
        if not isinstance(blocks, str) or not isinstance(modules.get(blocks), nn.ModuleList):
            lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
            raise InvalidTargetError(
                f"blocks must be the qualified name of an nn.ModuleList of the model, got {blocks!r}; "
                f"the model's ModuleLists are {lists[:10]}{'...' if len(lists) > 10 else ''}"
            )
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


# ---------------------------------------------------------------------------------------------------
# the boundary cache


class _Hidden:
    """Placeholder of the hidden-states argument inside a recorded call."""


_HIDDEN = _Hidden()


@dataclasses.dataclass
class _Tensor:
    """Placeholder of a stored tensor inside a recorded call (index into the batch's tensor list)."""

    index: int


@dataclasses.dataclass
class _Fresh:
    """A mutable cache object (HF ``Cache``): every block call gets its own deep copy of the captured state."""

    obj: Any


def _is_cache_object(v: Any) -> bool:
    if isinstance(v, (torch.Tensor, str, bytes, int, float, bool, type(None), tuple, list, dict)):
        return False
    return "cache" in type(v).__name__.lower()


class _Entry:
    """One calibration batch: its hidden states at the current block boundary and every block's call."""

    def __init__(self) -> None:
        self.hidden: Any = None  # tensor, or the path of its file (offload="disk")
        self.shape: tuple = ()
        self.dtype: torch.dtype | None = None
        self.calls: list[tuple[tuple, dict]] = []  # per block: args, kwargs with placeholders
        self.tensors: Any = []  # list of tensors, or the path of their file (offload="disk")
        self.mask: torch.Tensor | None = None
        self.generation = 0


class _BoundaryCache:
    """Where the block inputs of every calibration batch live: with the model, on CPU or on disk."""

    def __init__(self, n: int, device: torch.device | None, offload: str | None, offload_dir: str | None) -> None:
        self.entries = [_Entry() for _ in range(n)]
        self.device = device
        self.offload = offload
        self.store_device = torch.device("cpu") if offload in ("cpu", "disk") else None
        self.dir = tempfile.mkdtemp(prefix="actsparse-seq-", dir=offload_dir) if offload == "disk" else None
        self.kept_files = 0

    def hidden_nbytes(self) -> int:
        """Bytes of the cached hidden states (all batches)."""
        total = 0
        for e in self.entries:
            n = 1
            for d in e.shape:
                n *= d
            total += n * (e.dtype.itemsize if e.dtype is not None else 0)
        return total

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # recording -------------------------------------------------------------------------------------
    def record(self, b: int, j: int, args: tuple, kwargs: dict, hidden: torch.Tensor, seen: dict) -> None:
        entry = self.entries[b]
        tensors: list = entry.tensors

        def enc(v: Any) -> Any:
            if v is hidden:
                return _HIDDEN
            if isinstance(v, torch.Tensor):
                key = id(v)
                if key not in seen:
                    seen[key] = (len(tensors), v)  # keeps v alive, so ids stay unique
                    tensors.append(v.detach() if self.store_device is None else v.detach().to(self.store_device))
                return _Tensor(seen[key][0])
            if isinstance(v, dict):
                return {k: enc(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
                return type(v)(enc(x) for x in v)
            if _is_cache_object(v):
                return _Fresh(v)
            return v

        if len(entry.calls) != j:
            raise _NotAChain(f"block {j} was called out of order")
        entry.calls.append((enc(args), enc(kwargs)))
        if j == 0:
            self.set_hidden(b, hidden)

    def seal(self, b: int) -> None:
        """The batch's calls are complete: move its tensors to their file (offload="disk")."""
        entry = self.entries[b]
        if self.dir is not None and isinstance(entry.tensors, list):
            path = os.path.join(self.dir, f"calls{b}.pt")
            torch.save(entry.tensors, path)
            entry.tensors = path

    # reading and writing ---------------------------------------------------------------------------
    def hidden(self, b: int) -> torch.Tensor:
        entry = self.entries[b]
        if isinstance(entry.hidden, str):
            n = 1
            for s in entry.shape:
                n *= s
            t = torch.from_file(entry.hidden, shared=False, size=n, dtype=entry.dtype).view(entry.shape)
        else:
            t = entry.hidden
        return t if self.device is None else t.to(self.device)

    def set_hidden(self, b: int, t: torch.Tensor) -> None:
        entry = self.entries[b]
        t = t.detach()
        entry.shape, entry.dtype = tuple(t.shape), t.dtype
        if self.dir is not None:
            # a new file each time: the old one may still be mapped (and even be ``t`` itself)
            entry.generation += 1
            path = os.path.join(self.dir, f"hidden{b}-{entry.generation}.bin")
            t.contiguous().cpu().view(torch.uint8).numpy().tofile(path)
            old, entry.hidden = entry.hidden, path
            if isinstance(old, str):
                os.remove(old)
        else:
            entry.hidden = t if self.store_device is None else t.to(self.store_device)

    # outputs of finished sub-modules, reused within one block (pl_actsparse.core.levels) -------------------
    def keep(self, b: int, name: str, out: Any) -> Any:
        out = map_tensors(out, lambda t: t.detach() if self.store_device is None else t.detach().to(self.store_device))
        if self.dir is None:
            return out
        self.kept_files += 1
        path = os.path.join(self.dir, f"kept{b}-{self.kept_files}.pt")
        torch.save(out, path)
        return path

    def load(self, handle: Any) -> Any:
        obj = torch.load(handle, mmap=True, weights_only=True) if isinstance(handle, str) else handle
        device = self.device
        return map_tensors(obj, lambda t: t.to(device if device is not None else t.device, copy=True))

    def drop(self, handle: Any) -> None:
        if isinstance(handle, str) and os.path.exists(handle):
            os.remove(handle)

    def call(self, b: int, j: int, hidden: torch.Tensor) -> tuple[tuple, dict]:
        entry = self.entries[b]
        tensors = entry.tensors
        if isinstance(tensors, str):
            tensors = torch.load(tensors, mmap=True, weights_only=True)
        device = self.device

        def dec(v: Any) -> Any:
            if v is _HIDDEN:
                return hidden
            if isinstance(v, _Tensor):
                t = tensors[v.index]
                return t if device is None else t.to(device)
            if isinstance(v, _Fresh):
                return copy.deepcopy(v.obj)
            if isinstance(v, dict):
                return {k: dec(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
                return type(v)(dec(x) for x in v)
            return v

        args, kwargs = entry.calls[j]
        return dec(args), dec(kwargs)


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
    def walk(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return id(v) in ids
        if isinstance(v, dict):
            return any(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return any(walk(x) for x in v)
        return False

    return walk(args) or walk(kwargs)


# ---------------------------------------------------------------------------------------------------
# block stubs


class _StubState(threading.local):
    index: int = -1
    next_block: int = 0
    passed: Any = None
    seen: dict | None = None
    visited: set | None = None


class _Stubs:
    """Replaces every block's forward while installed. ``mode`` is "probe", "capture" or "tail"."""

    def __init__(self, block_list: Sequence[nn.Module], cache: _BoundaryCache | None) -> None:
        self.blocks = list(block_list)
        self.cache = cache
        self.mode = "probe"
        self.state = _StubState()
        self.fmt: Callable[[torch.Tensor], Any] | None = None
        self.lock = threading.Lock()
        self._saved: list = []

    def __enter__(self) -> "_Stubs":
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
            if self.mode == "tail":
                if j == last:
                    return self.fmt(self.cache.hidden(st.index))  # type: ignore[misc,union-attr]
                # never read by a chained model; NaN makes any other use fail loudly (NonFiniteActivationError)
                if j == 0:
                    st.poison = torch.full_like(hidden, float("nan"))
                st.passed = st.poison
                return self.fmt(st.poison)  # type: ignore[misc]
            if self.mode == "capture":
                self.cache.record(st.index, j, args, kwargs, hidden, st.seen)  # type: ignore[union-attr]
            elif self.fmt is None:  # probe: learn the output format from one real call
                fresh = lambda v: copy.deepcopy(v) if _is_cache_object(v) else v  # noqa: E731
                out = real(*[fresh(a) for a in args], **{k: fresh(v) for k, v in kwargs.items()})
                self.fmt = _output_format(out, hidden)
            if j == last:
                raise _Stop
            st.passed = hidden
            return self.fmt(hidden)  # type: ignore[misc]

        return stub


# ---------------------------------------------------------------------------------------------------
# the runners handed to calibrate_layers as "the model"


class _ModelRunner(nn.Module):
    """Runs the whole model on calibration batch ``index`` with the blocks stubbed (capture or tail)."""

    def __init__(self, model: nn.Module, stubs: _Stubs, batches: list, transform: Callable, masks: list,
                 post: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self.model = model
        self.train(False)
        self.__dict__.update(stubs=stubs, batches=batches, transform=transform, masks=masks, failure=None)
        self.__dict__["post"] = {id(m) for m in post}

    def forward(self, index: int) -> None:
        stubs = self.stubs
        stubs.start(index)
        stubs.state.visited = set()
        device = model_device(self.model)
        try:
            with _token_mask_context(self.masks[index]):
                call_model(self.model, _to_device(self.transform(self.batches[index]), device))
        except _Stop:
            pass
        except _NotAChain as exc:
            self.__dict__["failure"] = str(exc)
            return
        if stubs.mode == "capture":
            if stubs.state.next_block != len(stubs.blocks):
                self.__dict__["failure"] = f"the forward pass ended after {stubs.state.next_block} of {len(stubs.blocks)} blocks"
                return
            stubs.cache.seal(index)  # type: ignore[union-attr]

    def observer(self, module: nn.Module, inputs: torch.Tensor, x: torch.Tensor) -> None:
        """Stops a tail pass once this thread went through every post-block layer (no logits computed)."""
        visited = self.stubs.state.visited
        if visited is None:
            return
        visited.add(id(module))
        if self.post <= visited:
            raise _Stop


class _BlockRunner(nn.Module):
    """Runs block ``j`` on the cached input of calibration batch ``index``; :meth:`commit` makes the outputs of
    the last run of every batch the cached inputs of the next block.

    The outputs wait until then: lockstep calibration may run every batch several times (layers called several
    times per forward are solved in passes), and each pass must read the block's inputs."""

    def __init__(self, block: nn.Module, j: int, cache: _BoundaryCache, masks: list) -> None:
        super().__init__()
        self.block = block
        self.train(False)
        self.__dict__.update(j=j, cache=cache, masks=masks, outputs={}, lock=threading.Lock())

    def forward(self, index: int) -> None:
        hidden = self.cache.hidden(index)
        args, kwargs = self.cache.call(index, self.j, hidden)
        with _token_mask_context(self.masks[index]):
            out = self.block(*args, **kwargs)
        with self.lock:
            self.outputs[index] = _hidden_out(out).detach()

    def commit(self) -> None:
        for index, out in sorted(self.outputs.items()):
            self.cache.set_hidden(index, out)
        self.outputs.clear()


# ---------------------------------------------------------------------------------------------------
# the entry points


def _check_choice(name: str, value: Any, valid: tuple) -> None:
    if not any(value is v or (isinstance(v, str) and value == v) for v in valid):
        raise InvalidTargetError(f"{name} must be one of {', '.join(repr(v) for v in valid)}, got {value!r}")


def check_calibration_options(calibration: Any, offload: Any) -> None:
    """Validate the api's ``calibration`` and ``offload`` options before anything changes.

    Raises:
        InvalidTargetError: ``calibration`` is not one of :data:`CALIBRATION_MODES` or ``offload`` not one of
            :data:`OFFLOAD_MODES`.
    """
    _check_choice("calibration", calibration, CALIBRATION_MODES)
    _check_choice("offload", offload, OFFLOAD_MODES)


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def calibrate(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    items: Iterable[Any],
    *,
    calibration: str = "auto",
    offload: str | None = None,
    **kwargs: Any,
) -> dict[str, LayerStatistics]:
    """Calibrate ``layers`` by the chosen method; the dispatcher behind the api's ``calibration=`` option.

    * ``"lockstep"``: :func:`~pl_actsparse.core.calibration.calibrate_layers` (the whole model, every batch in
      flight at once);
    * ``"sequential"``: :func:`calibrate_sequential` (block by block; falls back to lockstep, with a logged
      warning saying why, for a model it cannot handle);
    * ``"auto"``: sequential when :func:`find_block_list` finds a block list and the parameters take at least
      :data:`AUTO_SEQUENTIAL_MIN_PARAM_BYTES`, else lockstep.

    ``offload`` (``None``, ``"cpu"`` or ``"disk"``) is where the sequential mode keeps its cache. Other keyword
    arguments go to the calibration function unchanged. Returns statistics per layer name.

    Raises:
        InvalidTargetError: ``calibration`` or ``offload`` is not one of the values above.
    """
    check_calibration_options(calibration, offload)
    if calibration == "lockstep":
        return calibrate_layers(model, layers, items, **kwargs)
    if calibration == "auto":
        name, why = find_block_list(model, [n for n, _ in layers])
        size = _param_bytes(model)
        if name is None or size < AUTO_SEQUENTIAL_MIN_PARAM_BYTES or _forward_is_not_reentrant(model):
            log.debug("calibration='auto' chose lockstep (%s; %d parameter bytes)", why, size)
            return calibrate_layers(model, layers, items, **kwargs)
        log.info("calibration='auto' chose sequential: %s", why)
    return calibrate_sequential(model, layers, items, offload=offload, **kwargs)


def calibrate_sequential(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    items: Iterable[Any],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    num_calibration_batches: int | None = None,
    progress: bool = True,
    sync_across_processes: bool | None = None,
    max_batches_in_flight: int | None = None,
    blocks: str | None = None,
    offload: str | None = None,
    offload_dir: str | None = None,
    token_mask: Any = "auto",
    in_block: str = "levels",
) -> dict[str, LayerStatistics]:
    """Block-wise exact calibration of ``layers`` (already sparsified modules of ``model``) on ``items``.

    Same contract and same thresholds as :func:`~pl_actsparse.core.calibration.calibrate_layers` (bit for bit),
    with the memory of the boundary cache plus one batch's activations inside one block (see the module
    docstring): the activations, logits and key/value caches of all batches are never alive together.

    Args:
        blocks: qualified name of the ``nn.ModuleList`` of blocks; default: found by :func:`find_block_list`.
        offload: ``None`` keeps the cache on the model's device, ``"cpu"`` in host memory, ``"disk"`` in files
            (under ``offload_dir``, default the system's temporary directory), deleted at the end.
        token_mask: ``"auto"``, ``None`` or a callable batch -> bool ``[batch, seq]`` mask
            (:func:`pl_actsparse.core.masking.resolve_mask_fn`), evaluated on each original batch and made the
            current token mask while that batch's cached inputs run.
        in_block: ``"levels"`` (default) calibrates a block's layers level by level with one batch in flight
            (:mod:`pl_actsparse.core.levels`); ``"lockstep"`` runs every batch through the block at once (one
            pass, more memory). A block that cannot be leveled (a layer called twice or not at all, e.g.
            mixture-of-experts) is calibrated in lockstep, with a logged message saying why.
        the others: as for :func:`~pl_actsparse.core.calibration.calibrate_layers`.

    Falls back to ``calibrate_layers`` (logging a warning that says why) when the model has no block list, its
    blocks are not called once each in order with each block's output as the next one's input, a targeted
    layer outside the blocks runs between two blocks, or the model's forward is not reentrant (NNCF).

    Raises:
        InvalidTargetError: bad ``offload`` or ``blocks``.
        EmptyDatasetError, LayerNotCalledError, NonFiniteActivationError: as ``calibrate_layers``.
    """
    _check_choice("offload", offload, OFFLOAD_MODES)
    _check_choice("in_block", in_block, IN_BLOCK_MODES)
    transform = transform_fn or default_transform_fn
    mask_fn = resolve_mask_fn(token_mask)
    device = model_device(model)
    dist = _Distributed(sync_across_processes, device)
    batches: list[Any] = []
    for item in items:
        if num_calibration_batches is not None and len(batches) >= num_calibration_batches:
            break
        batches.append(item)
    lockstep_kwargs = dict(transform_fn=transform_fn, progress=progress, sync_across_processes=sync_across_processes,
                           max_batches_in_flight=max_batches_in_flight, token_mask=token_mask)

    def fallback(reason: str) -> dict[str, LayerStatistics]:
        log.warning("sequential calibration is not possible here, calibrating in lockstep instead: %s", reason)
        return calibrate_layers(model, layers, batches, **lockstep_kwargs)

    total = dist.sum_(torch.tensor([len(batches)])).item() if dist.enabled else len(batches)
    if total == 0:
        raise EmptyDatasetError(
            "the calibration data yielded no item: pass a non-empty iterable of model inputs"
            + (f" (num_calibration_batches={num_calibration_batches!r})" if num_calibration_batches is not None else "")
        )
    names = [n for n, _ in layers]
    list_name, why = find_block_list(model, names, blocks)
    if list_name is None:
        return fallback(why)
    if _forward_is_not_reentrant(model):
        return fallback("the model keeps per-forward global state (NNCF's function hooks)")
    modules = dict(model.named_modules())
    block_list = list(modules[list_name])
    prefix = f"{list_name}." if list_name else ""
    by_block: list[list[tuple[str, nn.Module]]] = [[] for _ in block_list]
    outside: list[tuple[str, nn.Module]] = []
    block_of = {id(m): j for j, b in enumerate(block_list) for m in b.modules()}
    for name, m in layers:
        j = block_of.get(id(m))
        if j is None or not name.startswith(prefix):
            outside.append((name, m))
        else:
            by_block[j].append((name, m))

    training = {id(m): m.training for m in model.modules()}
    masks = [mask_fn(b) if mask_fn is not None else None for b in batches]
    cache = _BoundaryCache(len(batches), device, offload, offload_dir)
    stubs = _Stubs(block_list, cache)
    stats: dict[str, LayerStatistics] = {}
    bar = _BlockProgress(progress and dist.is_main, len(block_list) + 2)
    try:
        model.eval()
        with bar:
            with stubs:
                pre, failure = _probe(model, stubs, batches, transform, outside, dist)
                if failure:
                    raise _Fallback(failure)
                post = [(n, m) for n, m in outside if n not in pre]
                pre_layers = [(n, m) for n, m in outside if n in pre]
                stubs.mode = "capture"
                runner = _ModelRunner(model, stubs, batches, transform, masks)
                indices = list(range(len(batches)))
                if pre_layers:
                    stats.update(_run(runner, pre_layers, indices, lockstep_kwargs))
                else:
                    with torch.no_grad():
                        for i in indices:
                            runner(i)
            bad = dist.sum_(torch.tensor([int(runner.failure is not None)])).item()
            if bad:
                raise _Fallback(runner.failure or "another rank's model does not fit the block-wise scheme")
            where = {None: "with the model", "cpu": "in CPU memory", "disk": "on disk"}[offload]
            bar.advance(f"captured the inputs of {len(block_list)} blocks "
                        f"({cache.hidden_nbytes() / 2**20:.1f} MiB of hidden states, {where})")
            plans: dict[tuple, BlockPlan | str] = {}
            for j, block in enumerate(block_list):
                block_runner = _BlockRunner(block, j, cache, masks)
                if by_block[j]:
                    got = None if in_block == "lockstep" else _leveled(block, j, by_block[j], cache, masks, indices, dist, plans)
                    if got is None:
                        got = _run(block_runner, by_block[j], indices, lockstep_kwargs)
                        block_runner.commit()
                    stats.update(got)
                else:
                    with torch.no_grad():
                        for i in indices:
                            block_runner(i)
                            block_runner.commit()
                bar.advance(f"block {j + 1}/{len(block_list)}")
            if post:
                stubs.mode = "tail"
                tail = _ModelRunner(model, stubs, batches, transform, masks, post=[m for _, m in post])
                for _, m in post:
                    m._actsparse.observers[id(tail)] = tail.observer
                try:
                    with stubs:
                        stats.update(_run(tail, post, indices, lockstep_kwargs))
                finally:
                    for _, m in post:
                        m._actsparse.observers.pop(id(tail), None)
            bar.advance("after the blocks")
    except _Fallback as exc:
        _restore_training(model, training)
        return fallback(exc.reason)
    finally:
        cache.close()
        _restore_training(model, training)
    return {n: stats[n] for n in names}


def _signature(block: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> tuple:
    local = {id(m): n for n, m in block.named_modules()}
    return (type(block),) + tuple((local[id(m)], type(m)) for _, m in layers)


def _agreed_plan(block: nn.Module, j: int, layers: Sequence[tuple[str, nn.Module]], cache: _BoundaryCache,
                 indices: list, dist: _Distributed) -> BlockPlan | str:
    """The block's dependency levels from this rank's first batch, agreed by all ranks (or why there are none)."""
    modules = [m for _, m in layers]
    plan: BlockPlan | None = None
    reason = "this rank has no calibration batch"
    if indices:
        hidden = cache.hidden(indices[0])
        args, kwargs = cache.call(indices[0], j, hidden)
        try:
            plan = plan_block(block, modules, args, kwargs)
        except NotLeveled as exc:
            reason = str(exc)
        del hidden, args, kwargs
    if not dist.enabled:
        return plan if plan is not None else reason
    local = {id(m): n for n, m in block.named_modules()}
    names = [local[id(m)] for m in modules]
    level = {n: lv for lv, group in enumerate(plan.levels) for n in group} if plan is not None else {}
    vec = [level.get(n, 0) for n in names]
    sums = dist.sum_(torch.tensor([int(plan is not None), int(plan is None and bool(indices))]
                                  + vec + [v * v for v in vec], dtype=torch.int64)).tolist()
    planned, failed, k = sums[0], sums[1], len(names)
    if failed or not planned:
        return reason if plan is None else "another rank's block cannot be calibrated level by level"
    lv_sum, sq_sum = sums[2 : 2 + k], sums[2 + k :]
    if any(sq * planned != s * s for s, sq in zip(lv_sum, sq_sum)):  # equal on every rank iff Cauchy-Schwarz is tight
        return "the ranks found different dependency levels"
    agreed = [s // planned for s in lv_sum]
    if plan is not None:
        return plan
    order = {n: i for i, n in enumerate(names)}
    levels = tuple(tuple(sorted((n for n in names if agreed[order[n]] == lv), key=order.get)) for lv in range(max(agreed) + 1))
    return BlockPlan(levels, ())


def _leveled(block: nn.Module, j: int, layers: Sequence[tuple[str, nn.Module]], cache: _BoundaryCache,
             masks: list, indices: list, dist: _Distributed, plans: dict) -> dict[str, LayerStatistics] | None:
    """Calibrate block ``j`` level by level (:mod:`pl_actsparse.core.levels`); ``None`` when it cannot be."""
    sig = _signature(block, layers)
    if sig not in plans:
        plans[sig] = _agreed_plan(block, j, layers, cache, indices, dist)
        if isinstance(plans[sig], BlockPlan):
            log.debug("block %d: dependency levels %s, reused outputs %s", j, plans[sig].levels, plans[sig].reuse)
    plan = plans[sig]
    if isinstance(plan, str):
        log.info("block %d is calibrated with all batches in flight (lockstep): %s", j, plan)
        return None
    io = BlockIO(indices, cache.hidden, lambda i, h: cache.call(i, j, h), cache.set_hidden, masks.__getitem__,
                 cache.keep, cache.load, cache.drop)
    try:
        return calibrate_block(block, plan, layers, io, dist)
    except CacheSpoiled as exc:
        raise _Fallback(f"block {j}: {exc}") from exc
    except NotLeveled as exc:
        log.warning("block %d is calibrated with all batches in flight (lockstep) instead of level by level: %s", j, exc)
        return None


def _restore_training(model: nn.Module, training: dict[int, bool]) -> None:
    for m in model.modules():
        if id(m) in training:
            m.training = training[id(m)]


def _run(runner: nn.Module, layers: Sequence[tuple[str, nn.Module]], indices: list, kwargs: dict) -> dict[str, LayerStatistics]:
    """``calibrate_layers`` on a runner; statistics renamed to the layers' names in the full model."""
    local = {id(m): n for n, m in runner.named_modules()}
    full = {local[id(m)]: n for n, m in layers}
    got = calibrate_layers(runner, [(local[id(m)], m) for _, m in layers], indices,
                           **{**kwargs, "transform_fn": None, "progress": False, "token_mask": None})
    return {full[k]: dataclasses.replace(st, name=full[k]) for k, st in got.items()}


def _probe(model: nn.Module, stubs: _Stubs, batches: list, transform: Callable,
           outside: Sequence[tuple[str, nn.Module]], dist: _Distributed) -> tuple[set[str], str | None]:
    """Run the first batch with the blocks stubbed: learn the blocks' output format, check they form a chain,
    and find which targeted layers outside them run before block 0 (``pre``) or between blocks (not allowed).
    The answer is agreed by all ranks."""
    calls = torch.zeros(2 * len(outside) + 1, dtype=torch.int64)
    handles = []
    for k, (_, m) in enumerate(outside):
        def hook(module: nn.Module, args: Any, k: int = k) -> None:
            stage = stubs.state.next_block
            if stage == 0:
                calls[2 * k] += 1
            elif stage < len(stubs.blocks):
                calls[2 * k + 1] += 1
        handles.append(m.register_forward_pre_hook(hook))
    failure = None
    try:
        if batches:
            stubs.mode = "probe"
            stubs.start(0)
            try:
                with torch.no_grad():
                    call_model(model, _to_device(transform(batches[0]), model_device(model)))
                failure = f"the forward pass ended after {stubs.state.next_block} of {len(stubs.blocks)} blocks"
            except _Stop:
                pass
            except _NotAChain as exc:
                failure = str(exc)
    finally:
        for h in handles:
            h.remove()
    calls[-1] = int(failure is not None)
    calls = dist.sum_(calls)
    if failure is None and calls[-1]:
        failure = "another rank's model does not fit the block-wise scheme"
    between = [n for k, (n, _) in enumerate(outside) if calls[2 * k + 1]]
    if failure is None and between:
        failure = f"targeted layers outside the blocks run between two blocks: {between}"
    return {n for k, (n, _) in enumerate(outside) if calls[2 * k]}, failure


class _BlockProgress:
    """A rich progress bar over blocks, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._progress = None
        self._task = None

    def __enter__(self) -> "_BlockProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("calibrating block by block"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[step]}"), TimeElapsedColumn())
            self._progress.__enter__()
            self._task = self._progress.add_task("calibrate", total=self.total, step="")
        return self

    def advance(self, step: str) -> None:
        log.debug("sequential calibration: %s", step)
        if self._progress is not None:
            self._progress.update(self._task, advance=1, step=step)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
