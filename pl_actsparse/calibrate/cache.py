"""The boundary cache of sequential calibration: every batch's input to the current block, and every block's
other arguments (cf. llm-compressor's ``pipelines/cache.py``).

Kept with the model, in CPU memory (``offload="cpu"``) or in files under a temporary directory
(``offload="disk"``, read back one batch at a time). Tensors shared by several block calls of a batch are stored
once; a cache object handed to the blocks (HF's ``DynamicCache``) is deep-copied per block call, so re-running a
block never sees a key/value state another call appended.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import torch

from pl_actsparse.calibrate.running import map_tensors

__all__ = ["BoundaryCache", "is_cache_object"]


_HIDDEN = object()  # placeholder of the hidden-states argument inside a recorded call


@dataclasses.dataclass
class _Tensor:
    """Placeholder of a stored tensor inside a recorded call (index into the batch's tensor list)."""

    index: int


@dataclasses.dataclass
class _Fresh:
    """A mutable cache object (HF ``Cache``): every block call gets its own deep copy of the captured state."""

    obj: Any


def is_cache_object(v: Any) -> bool:
    """Whether ``v`` is a mutable cache object (HF ``Cache``), deep-copied for every block call."""
    plain = isinstance(v, (torch.Tensor, str, bytes, int, float, bool, type(None), tuple, list, dict))
    return not plain and "cache" in type(v).__name__.lower()


def _walk(v: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to the items of a dict, list or tuple (not a named tuple); anything else as it is."""
    if isinstance(v, Mapping):
        return {k: fn(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
        return type(v)(fn(x) for x in v)
    return v


class _Entry:
    """One calibration batch: its hidden states at the current block boundary and every block's call."""

    def __init__(self) -> None:
        self.hidden: Any = None  # tensor, or the path of its file (offload="disk")
        self.nbytes = 0
        self.calls: list[tuple[tuple, dict]] = []  # per block: args, kwargs with placeholders
        self.tensors: Any = []  # list of tensors, or the path of their file (offload="disk")


class BoundaryCache:
    """Where the block inputs of every calibration batch live: with the model, on CPU or on disk."""

    def __init__(self, n: int, device: torch.device | None, offload: str | None, offload_dir: str | None) -> None:
        self.entries, self.device = [_Entry() for _ in range(n)], device
        self.store_device = torch.device("cpu") if offload in ("cpu", "disk") else None
        self.dir = tempfile.mkdtemp(prefix="actsparse-seq-", dir=offload_dir) if offload == "disk" else None
        self.files = 0

    def hidden_nbytes(self) -> int:
        """Bytes of the cached hidden states (all batches)."""
        return sum(e.nbytes for e in self.entries)

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
                if id(v) not in seen:
                    seen[id(v)] = (len(tensors), v)  # keeps v alive, so ids stay unique
                    tensors.append(v.detach() if self.store_device is None else v.detach().to(self.store_device))
                return _Tensor(seen[id(v)][0])
            return _Fresh(v) if is_cache_object(v) else _walk(v, enc)

        entry.calls.append((enc(args), enc(kwargs)))
        if j == 0:
            self.set_hidden(b, hidden)

    def seal(self, b: int) -> None:
        """The batch's calls are complete: move its tensors to their file (offload="disk")."""
        entry = self.entries[b]
        if self.dir is not None and isinstance(entry.tensors, list):
            entry.tensors = self.keep(b, "calls", entry.tensors)

    # reading and writing: the hidden states, and the outputs of finished sub-modules reused within one block
    # (pl_actsparse.calibrate.levels) ------------------------------------------------------------------------
    def hidden(self, b: int) -> torch.Tensor:
        h = self.entries[b].hidden
        h = torch.load(h, mmap=True, weights_only=True) if isinstance(h, str) else h
        return h if self.device is None else h.to(self.device)

    def set_hidden(self, b: int, t: torch.Tensor) -> None:
        entry = self.entries[b]
        old, entry.hidden, entry.nbytes = entry.hidden, self.keep(b, "hidden", t), t.numel() * t.element_size()
        self.drop(old)  # after writing the new file: the old one may still be mapped (and even be ``t`` itself)

    def keep(self, b: int, name: str, out: Any) -> Any:
        store, disk = self.store_device, self.dir is not None  # a file holds the tensor only, not a larger storage
        out = map_tensors(out, lambda t: t.detach() if store is None else t.detach().to(store, copy=disk))
        if not disk:
            return out
        self.files += 1
        path = os.path.join(self.dir, f"{name}{b}-{self.files}.pt")
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
                return tensors[v.index] if device is None else tensors[v.index].to(device)
            return copy.deepcopy(v.obj) if isinstance(v, _Fresh) else _walk(v, dec)

        args, kwargs = entry.calls[j]
        return dec(args), dec(kwargs)
