"""Sparsified layers under accelerate's dispatch hooks (``device_map``, cpu/disk offload, ``dispatch_model``,
``cpu_offload``).

accelerate's ``add_hook_to_module`` stores the module's bound ``forward`` in ``module._old_forward`` and puts
a wrapper in the *instance* attribute ``forward``; ``remove_hook_from_module`` later puts ``_old_forward``
back as the instance ``forward``. Both shadow the class, so a class swap alone would never reach the
sparsifier (the layer reports sparsifying and runs dense). :func:`pl_actsparse.core.layer.rebind_instance_forward` re-points every
such instance attribute bound to the old class's ``forward`` at the new class's one, on install and on removal,
in either order of dispatch and sparsification.

Offloaded layers keep their weights in the hook's ``weights_map`` and on ``meta`` in the module; their threshold
buffer is created on the hook's execution device (:func:`threshold_device`), where it stays (accelerate moves
buffers only with ``offload_buffers=True``, which is refused with an error: the threshold would be read from a
``weights_map`` that does not hold it, or holds a copy made at dispatch that calibration cannot update).

accelerate is never imported here: a hooked module is recognised by its ``_hf_hook`` attribute.
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["forward_patch_problem", "threshold_device", "is_offloaded", "shared_offload_hooks"]

_FORWARD_ATTRS = ("forward", "_old_forward")


def _hooks(module: nn.Module) -> list[Any]:
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def forward_patch_problem(module: nn.Module) -> str | None:
    """Why a sparsifier installed on ``module`` would not run in its forward, or ``None`` when it would.

    Runs: no instance ``forward``; an instance ``forward`` that is the module's own class ``forward`` bound to it
    (what ``remove_hook_from_module`` leaves); an accelerate hook whose ``_old_forward`` is such a bound method.
    Does not run: any other instance ``forward`` (a patch replacing the computation), and accelerate hooks that
    offload buffers (``offload_buffers=True``: the threshold buffer would be fetched from a ``weights_map``
    that lacks it).
    """
    cls = type(module)
    for attr in _FORWARD_ATTRS:
        bound = module.__dict__.get(attr)
        if bound is None or (attr == "forward" and "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__):
            continue
        if not (isinstance(bound, types.MethodType) and bound.__self__ is module and bound.__func__ is cls.forward):
            return (f"its forward is replaced on the instance by {getattr(bound, '__qualname__', type(bound).__qualname__)} "
                    f"(via {attr!r}), which never calls the class's forward: the sparsifier would not run")
    if any(getattr(h, "offload", False) and getattr(h, "offload_buffers", False) for h in _hooks(module)):
        return ("it is dispatched by accelerate with offload_buffers=True: its threshold buffer is looked up in the offloaded "
                "weights, which hold none or a copy that calibration cannot update; dispatch with offload_buffers=False")
    return None


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s weights outside it (on ``meta`` between forwards)."""
    return any(getattr(h, "offload", False) for h in _hooks(module))


def threshold_device(module: nn.Module) -> torch.device | None:
    """Where a new threshold buffer of an offloaded ``module`` (weight on ``meta``) lives: the accelerate hook's
    execution device; ``None`` when no hook says (registered in :data:`pl_actsparse.core.layer.PLACEMENT_SOURCES`)."""
    dev = next((d for h in _hooks(module) if (d := getattr(h, "execution_device", None)) is not None), None)
    return None if dev is None else torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")


class _SharedOnload:
    """An accelerate hook of an offloaded module shared by several batches in flight at once (lockstep
    calibration runs one thread per batch, all waiting inside the layer): the weights are unloaded to ``meta``
    only when the last call leaves, not when the first one does (which would hand the others meta weights)."""

    def __init__(self, hook: Any) -> None:
        self.hook, self.calls = hook, 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hook, name)

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.calls += 1
            return self.hook.pre_forward(module, *args, **kwargs)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        with self.lock:
            self.calls -= 1
            if self.calls == 0:
                return self.hook.post_forward(module, output)
        device = getattr(self.hook, "input_device", None)
        if getattr(self.hook, "io_same_device", False) and device is not None:
            from accelerate.utils import send_to_device

            return send_to_device(output, device)
        return output


@contextlib.contextmanager
def shared_offload_hooks(model: nn.Module) -> Iterator[None]:
    """While open, every offloaded module's accelerate hook tolerates concurrent calls (see
    :class:`_SharedOnload`); the hooks are put back on exit. A no-op for a model without offloaded modules.
    """
    swapped = [(m, m.__dict__["_hf_hook"]) for m in model.modules() if is_offloaded(m)]
    for m, hook in swapped:
        m.__dict__["_hf_hook"] = _SharedOnload(hook)
    try:
        yield
    finally:
        for m, hook in swapped:
            m.__dict__["_hf_hook"] = hook
