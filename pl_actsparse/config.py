"""One configuration object for calibration, shared by every verb, the callback, sweep, allocation and the CLI.

The same eight options used to be spelled out in nine signatures and validated in three places (and they drifted:
``pl-actsparse generate`` dropped three of them). They now live here, validated once in ``__post_init__`` with an
error naming the field, and expressible in YAML as a mapping (``CalibrationConfig.from_value``).
Modelled on torchao's ``quantize_(model, Config())`` configuration objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from pl_actsparse.errors import InvalidOptionError, TokenMaskError

__all__ = ["CalibrationConfig", "CALIBRATION_METHODS", "OFFLOAD_MODES", "IN_BLOCK_MODES"]

#: ``method``: how thresholds are computed (see :mod:`pl_actsparse.calibrate`).
CALIBRATION_METHODS = ("auto", "lockstep", "sequential")
#: ``offload``: where the sequential method keeps its cache of block inputs.
OFFLOAD_MODES = (None, "cpu", "disk")
#: ``in_block``: the schedule inside a block of the sequential method.
IN_BLOCK_MODES = ("levels", "lockstep")


def positive_int_or_none(value: Any, what: str, kind: type[Exception] = InvalidOptionError) -> Optional[int]:
    """``value`` as an int if it is a positive integer, ``None`` if None; else ``kind`` naming ``what`` (the one such check)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise kind(f"{what} must be a positive integer or None, got {value!r}")
    return None if value is None else int(value)


def check_choice(value: Any, what: str, valid: tuple, kind: type[Exception] = InvalidOptionError) -> Any:
    """``value`` if it is one of ``valid``; else ``kind`` naming ``what`` and the valid values (the one such check)."""
    if value not in valid:
        raise kind(f"{what} must be one of {', '.join(map(repr, valid))}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """How thresholds are calibrated from data; validated at construction.

    Args:
        method: ``"lockstep"`` (the whole model, every batch in flight), ``"sequential"`` (block by block from a
            cache of block inputs, one batch in flight inside a block; the same thresholds bit for bit, in the memory
            of the cache plus one batch's block activations and 0.93-1.40 dense forwards' time measured on TinyLlama
            shapes, docs/benchmarks.md) or ``"auto"`` (sequential for models with a block list whose parameters take
            at least 256 MiB, else lockstep).
        num_batches: use at most this many items of the calibration data (``None``: all of them).
        transform_fn: maps an item to model inputs (a dict is passed as keyword arguments, a tuple/list as
            positional arguments, anything else as the single argument); ``None``: the item itself.
        token_mask: which input elements are data: ``"auto"`` (a dict item's ``attention_mask``, 1 = real token:
            padding is masked), ``None`` (every element) or a callable ``item -> bool [batch, seq]`` mask.
        offload: where the sequential method keeps its cache: ``None`` (with the model), ``"cpu"`` or ``"disk"``;
            with ``method="auto"`` it chooses sequential for any model with a block list (else warns: lockstep).
        max_batches_in_flight: lockstep only: run batches in groups of this size (smaller groups bound memory and
            make the thresholds approximately exact); ``None``: all at once (exact).
        in_block: sequential only: ``"levels"`` (one batch in flight inside a block) or ``"lockstep"``.
        progress: show a progress bar.
        sync_across_processes: sum statistics over ``torch.distributed`` ranks (``None``: when a process group
            with several ranks is initialized).
        loss_fn: the loss of ``allocation="auto"``/``"fisher"`` and of ``score="fisher"``,
            ``(output, batch, mask) -> (summed loss, count)`` (``batch``: the item, targets included, on the model's
            device, the model having been called with ``transform_fn(batch)``; ``mask``: bool
            ``[B, T]`` of real tokens or ``None``); ``None``: next-token NLL of a causal LM on token ids
            (:func:`~pl_actsparse.calibrate.allocation.next_token_nll`).

    Raises:
        InvalidOptionError: an unknown field name (the message lists the valid ones, closest first), a field with
            an invalid value (the message names the field and what is valid), or ``offload`` with
            ``method="lockstep"`` (only the sequential method keeps a cache to offload).
        TokenMaskError: ``token_mask`` is not ``"auto"``, ``None`` or a callable.

    >>> CalibrationConfig(method="sequential", offload="cpu").method
    'sequential'
    >>> CalibrationConfig.from_value({"num_batches": 4}).num_batches
    4
    """

    method: str = "auto"
    num_batches: Optional[int] = None
    transform_fn: Optional[Callable[[Any], Any]] = None
    token_mask: Union[str, Callable[[Any], Any], None] = "auto"
    offload: Optional[str] = None
    max_batches_in_flight: Optional[int] = None
    in_block: str = "levels"
    progress: bool = True
    sync_across_processes: Optional[bool] = None
    loss_fn: Optional[Callable[[Any, Any, Any], Any]] = None

    def __new__(cls, *args: Any, **fields: Any) -> "CalibrationConfig":
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            closest = difflib.get_close_matches(unknown[0], valid, n=len(valid), cutoff=0)
            raise InvalidOptionError(f"unknown CalibrationConfig field(s) {unknown}; valid fields, closest first: {', '.join(closest)}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        check_choice(self.method, "CalibrationConfig.method", CALIBRATION_METHODS)
        check_choice(self.offload, "CalibrationConfig.offload", OFFLOAD_MODES)
        if self.offload is not None and self.method == "lockstep":
            raise InvalidOptionError(f"CalibrationConfig.offload={self.offload!r} needs method='sequential' (or 'auto'): "
                                     "method='lockstep' keeps no cache of block inputs to offload")
        check_choice(self.in_block, "CalibrationConfig.in_block", IN_BLOCK_MODES)
        positive_int_or_none(self.num_batches, "CalibrationConfig.num_batches")
        positive_int_or_none(self.max_batches_in_flight, "CalibrationConfig.max_batches_in_flight")
        for name in ("transform_fn", "loss_fn"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise InvalidOptionError(f"CalibrationConfig.{name} must be callable or None, got {getattr(self, name)!r}")
        if not (self.token_mask is None or self.token_mask == "auto" or callable(self.token_mask)):
            raise TokenMaskError(f"CalibrationConfig.token_mask must be 'auto', None or a callable, got {self.token_mask!r}")
        if not isinstance(self.progress, bool):
            raise InvalidOptionError(f"CalibrationConfig.progress must be a bool, got {self.progress!r}")
        if self.sync_across_processes is not None and not isinstance(self.sync_across_processes, bool):
            raise InvalidOptionError(f"CalibrationConfig.sync_across_processes must be a bool or None, got {self.sync_across_processes!r}")

    @classmethod
    def from_value(cls, value: Union["CalibrationConfig", Mapping[str, Any], str, None]) -> "CalibrationConfig":
        """A config from a config, a mapping of fields (YAML), a method name, or ``None`` (the defaults).

        Raises:
            InvalidOptionError: an unknown field name or a value of another type.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, Mapping):
            return cls(**dict(value))
        raise InvalidOptionError(f"calibration must be a CalibrationConfig, a mapping of its fields or a method name, got {type(value).__qualname__}")

    def replace(self, **changes: Any) -> "CalibrationConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
