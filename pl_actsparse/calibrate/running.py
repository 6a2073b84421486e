"""Running a model on calibration items: how an item becomes a call, on which device, and which items are used."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import warnings
import weakref
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from pl_actsparse.calibrate.distributed import Distributed
from pl_actsparse.core.masking import token_mask as token_mask_context
from pl_actsparse.errors import EmptyDatasetError, InvalidOptionError, TokenMaskError

__all__ = [
    "default_transform_fn", "call_model", "map_tensors", "to_device", "model_device", "compilation_disabled", "hooks_removed",
    "forward_is_not_reentrant", "take_batches", "run_item", "mask_of", "patch_forward", "restore_forward", "logits_of", "check_batches",
]


def default_transform_fn(item: Any) -> Any:
    """Calibration items are model inputs as they are (see :func:`call_model` for how they are passed)."""
    return item


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call the model the way NNCF does: a mapping (a dict, HF's ``BatchEncoding``) is keyword arguments, a tuple
    or list positional ones, anything else the single argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside its dicts, lists and tuples (named tuples and other
    objects are left as they are)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):  # a BatchEncoding becomes a dict: call_model passes both as keyword arguments
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Every tensor of ``obj`` moved to ``device`` (``None``: ``obj`` unchanged)."""
    return obj if device is None else map_tensors(obj, lambda t: t.to(device, non_blocking=True))


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer) that is not on ``meta`` (accelerate keeps offloaded
    weights there and its hooks move inputs to their execution device); ``None`` for a model with neither."""
    return next((t.device for t in itertools.chain(model.parameters(), model.buffers()) if t.device.type != "meta"), None)


def run_item(model: nn.Module, item: Any, transform: Callable[[Any], Any], mask: torch.Tensor | None,
             device: torch.device | None) -> Any:
    """One forward of ``model`` on ``transform(item)`` (moved to ``device``) with ``mask`` as the token mask. Warns when a tuple's
    2nd element, not a 0/1 mask, becomes a Hugging Face model's ``attention_mask`` (once per model): ``(inputs, labels)`` need dicts."""
    with token_mask_context(mask):
        return call_model(model, _positional(model, to_device(transform(item), device)))


@contextlib.contextmanager
def compilation_disabled() -> Iterator[None]:
    """Run every ``torch.compile``'d function and module eagerly while the context is open, then restore.

    Calibration runs threads, locks and ``bincount`` in the layers, which would break graphs and spend the
    recompile limit; under ``set_stance("force_eager")`` nothing is traced and the user's compiled graphs stay
    cached. A no-op when dynamo was never imported. Not for use inside a compiled region.
    """
    with torch.compiler.set_stance("force_eager") if "torch._dynamo" in sys.modules else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def hooks_removed(handles: Iterable[Any]) -> Iterator[None]:
    """Remove the hook ``handles`` (``register_forward_pre_hook``'s ...) when the block ends, also by an exception."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# model -> True when two of its forwards must not overlap; pl_actsparse.integrations registers NNCF's check here
NON_REENTRANT_CHECKS: list[Callable[[nn.Module], bool]] = []


def forward_is_not_reentrant(model: nn.Module) -> bool:
    """Models whose forward patches shared state (NNCF-wrapped ones) break when two forwards overlap."""
    return any(check(model) for check in NON_REENTRANT_CHECKS)


_WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models told that a tuple's 2nd element is their attention_mask
_WARN_LOCK = threading.Lock()


def _positional(model: nn.Module, inputs: Any) -> Any:
    second = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else None
    if second is None or model in _WARNED or (isinstance(second, torch.Tensor) and bool(((second == 0) | (second == 1)).all())):
        return inputs
    with _WARN_LOCK:  # batches run in overlapping threads: check and record at once, so one warning per model
        told = model in _WARNED
        _WARNED.add(model)
    try:
        takes_mask = list(inspect.signature(model.forward).parameters)[1:2] == ["attention_mask"]
    except (TypeError, ValueError):  # builtins, C extensions: nothing to check
        takes_mask = False
    if not told and takes_mask:
        warnings.warn(f"{type(model).__name__} receives a tuple batch's 2nd element as attention_mask (its 2nd positional argument), but it is "
                      "not a 0/1 mask: pass dict batches, or select the inputs (callback: input_key=0; transform_fn=lambda b: b[0])", stacklevel=3)
    return inputs


def check_batches(data: Any, what: str = "data") -> Any:
    """``data`` unless it is a single tensor (whose rows would be taken for batches): then ``InvalidOptionError``."""
    if isinstance(data, torch.Tensor):
        raise InvalidOptionError(f"{what} must be an iterable of batches (a DataLoader, a list, ...), got one Tensor of shape "
                                 f"{tuple(data.shape)}, whose rows would be taken for batches; pass [tensor] for a single batch")
    return data


def take_batches(items: Iterable[Any], num_batches: int | None, dist: Distributed) -> list[Any]:
    """The first ``num_batches`` items (all when ``None``).

    Raises:
        EmptyDatasetError: no rank has an item.
    """
    batches = list(itertools.islice(items, num_batches))
    if dist.count(len(batches)) == 0:
        raise EmptyDatasetError(
            "the calibration data yielded no item: pass a non-empty iterable of model inputs"
            + (f" (CalibrationConfig.num_batches={num_batches!r})" if num_batches is not None else "")
        )
    return batches


def mask_of(mask_fn: Callable[[Any], Any] | None, item: Any) -> torch.Tensor | None:
    """The token mask of ``item`` (``mask_fn`` from :func:`pl_actsparse.core.masking.resolve_mask_fn`).

    Raises:
        TokenMaskError: ``mask_fn`` returned something other than a tensor or ``None``.
    """
    mask = mask_fn(item) if mask_fn is not None else None
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TokenMaskError(f"token_mask function returned {type(mask).__qualname__}, expected a bool tensor [batch, seq] or None")
    return mask


_MISSING = object()


def patch_forward(module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """Replace ``module.forward`` by ``make(current forward)`` (an instance attribute, so hooks still run);
    returns what :func:`restore_forward` needs. A forward already set on the instance (accelerate's hook
    wrapper) is the one wrapped and later restored."""
    saved = module.__dict__.get("forward", _MISSING)
    module.forward = make(type(module).forward.__get__(module) if saved is _MISSING else saved)
    return saved


def restore_forward(module: nn.Module, saved: Any) -> None:
    """Undo :func:`patch_forward` (``saved`` is what it returned)."""
    if saved is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.forward = saved


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, an object with ``.logits`` (HF ``ModelOutput``), or a tuple's
    first tensor. Raises ``TypeError`` for anything else."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"model output of type {type(output).__name__} has no logits")
