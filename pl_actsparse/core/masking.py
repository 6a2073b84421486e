"""Which elements of a layer's input are data: token masks for padded batches.

Hugging Face batches are right- or left-padded and carry an ``attention_mask`` of shape ``[batch, seq]``
(1 = real token, 0 = padding). The inputs of every Linear at pad positions are not data: counting them in
calibration, in the achieved-sparsity metric or in reports shifts thresholds and figures (on stories260K
with about 20% padding, achieved sparsity on real tokens missed its target by up to 0.023).

The mask of the batch being run is held in a :class:`contextvars.ContextVar` for the duration of the
forward pass (:func:`token_mask`), so every observer (calibration, metric, report) reads the same one without
threading it through the model. Each calibration batch runs in its own thread, and a context variable is
per thread, so lockstep calibration keeps one mask per batch.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import torch

from pl_actsparse.errors import TokenMaskError

__all__ = [
    "MaskFn", "attention_mask_of", "resolve_mask_fn", "token_mask", "current_token_mask", "select_tokens",
]

#: A function from a batch (what the data loader yields) to a bool token mask ``[batch, seq]`` or ``None``.
MaskFn = Callable[[Any], Optional[torch.Tensor]]

_CURRENT: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("pl_actsparse_token_mask", default=None)
# The main thread's mask, also held in a plain global: ``torch.compile`` cannot trace ``ContextVar.get``, and a
# compiled region always runs in the thread that called it (calibration, the only multi-threaded user, runs
# with compilation off), so a compiled observer reads this slot instead (dynamo guards on it).
_MAIN_THREAD_MASK: list[Optional[torch.Tensor]] = [None]


def attention_mask_of(batch: Any) -> Optional[torch.Tensor]:
    """The default mask function: ``batch["attention_mask"]`` of a mapping batch (as bool), else ``None``."""
    if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
        return torch.as_tensor(batch["attention_mask"]).bool()
    return None


def resolve_mask_fn(mask: Union[str, MaskFn, None]) -> Optional[MaskFn]:
    """``"auto"`` -> :func:`attention_mask_of`; ``None`` -> no masking; a callable is used as it is.

    Raises:
        TokenMaskError: ``mask`` is none of these.
    """
    if mask == "auto":
        return attention_mask_of
    if mask is None or callable(mask):
        return mask
    raise TokenMaskError(f"token_mask must be 'auto', None or a callable batch -> bool mask [batch, seq], got {mask!r}")


@contextmanager
def token_mask(mask: Optional[torch.Tensor]) -> Iterator[None]:
    """Make ``mask`` (bool ``[batch, seq]``, or ``None`` for "every element counts") the current token mask."""
    value = None if mask is None else mask.bool()
    tok = _CURRENT.set(value)
    main = threading.current_thread() is threading.main_thread()
    if main:
        previous, _MAIN_THREAD_MASK[0] = _MAIN_THREAD_MASK[0], value
    try:
        yield
    finally:
        _CURRENT.reset(tok)
        if main:
            _MAIN_THREAD_MASK[0] = previous


def current_token_mask() -> Optional[torch.Tensor]:
    """The token mask of the forward pass under way in this thread, or ``None``."""
    if torch.compiler.is_compiling():
        return _MAIN_THREAD_MASK[0]
    return _CURRENT.get()


def select_tokens(x: torch.Tensor, mask: Optional[torch.Tensor], *, layer: str = "layer") -> torch.Tensor:
    """The elements of a layer input ``x`` ``[..., features]`` that belong to real tokens.

    ``x``'s leading axes must be the mask's ``[batch, seq]`` (or the mask flattened, ``[batch * seq]``, as
    some models reshape before a Linear; batch-major, as ``x.view(-1, d)`` of ``[batch, seq, d]`` gives: a
    sequence-major flattening has the same length and is not detectable). Returns a 2-D ``[real_tokens, features]`` tensor (a view-free copy
    only when ``mask`` is not ``None``; ``x`` reshaped otherwise).

    Raises:
        TokenMaskError: no token axis of ``x`` matches the mask (named with both shapes).
    """
    if mask is None:
        return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    lead = tuple(x.shape[:-1])
    m = mask.to(device=x.device, dtype=torch.bool)
    if lead == tuple(m.shape):
        return x[m]
    if len(lead) == 1 and lead[0] == m.numel():
        return x[m.reshape(-1)]
    raise TokenMaskError(
        f"{layer}: input of shape {tuple(x.shape)} has no token axes matching the token mask of shape "
        f"{tuple(m.shape)}; pass token_mask=None to count every element, or a function returning a mask "
        "of the input's leading [batch, seq] shape"
    )
