"""Exceptions raised at the public boundary: the one family, every class defined here.

Every error is an :class:`ActivationSparsityError`, a ``ValueError``, so that callers who only know "bad input"
can catch one type, while tests and tools can tell the cases apart. :class:`InvalidTargetError` is for target
sparsities only; :class:`InvalidOptionError` for every other option or argument value. Argument *type* checks
raise ``TypeError``.
"""

from __future__ import annotations

__all__ = [
    "ActivationSparsityError", "InvalidTargetError", "InvalidScopeError", "ScopeSpecError", "UnmatchedScopeError",
    "ConflictingScopesError", "UnsupportedModuleError", "NothingToSparsifyError", "EmptyDatasetError",
    "NonFiniteActivationError", "NotSparsifiedError", "LayerNotCalledError", "TokenMaskError", "CheckpointError",
    "CalibrationConvergenceError", "CallbackConfigurationError", "InvalidOptionError",
]


class ActivationSparsityError(ValueError):
    """Base class of every error raised by pl-actsparse for bad input."""


class InvalidTargetError(ActivationSparsityError):
    """A target sparsity is not a number in [0, 1]."""


class InvalidScopeError(ActivationSparsityError):
    """A scope is malformed (bad regex, wrong type of entry, wrong scope class)."""


class ScopeSpecError(InvalidScopeError):
    """An entry of a ``scopes`` list (a recipe, the callback's ``scopes=``) is malformed: not a mapping, an
    unknown key, or no ``sparsity``. A ``sparsity`` outside ``[0, 1]`` is an :class:`InvalidTargetError`."""


class UnmatchedScopeError(ActivationSparsityError):
    """Names, patterns or types of a validating scope match nothing in the model."""


class ConflictingScopesError(ActivationSparsityError):
    """A layer is claimed by two target scopes."""


class UnsupportedModuleError(ActivationSparsityError):
    """A module named exactly in a target scope cannot be sparsified (it is not an ``nn.Linear``)."""


class NothingToSparsifyError(ActivationSparsityError):
    """After ignoring and skipping, no layer is left to sparsify."""


class EmptyDatasetError(ActivationSparsityError):
    """The calibration data yielded no item."""


class NonFiniteActivationError(ActivationSparsityError):
    """A layer's input contained NaN or infinity during calibration."""


class NotSparsifiedError(ActivationSparsityError):
    """An operation needs sparsified layers and found none (or not the ones named)."""


class LayerNotCalledError(ActivationSparsityError):
    """A layer to calibrate was never called by the model on the calibration data."""


class TokenMaskError(ActivationSparsityError):
    """A token mask (e.g. an ``attention_mask``) does not fit a layer's input: no token axis matches it."""


class CheckpointError(ActivationSparsityError):
    """A saved activation-sparsity state (state dict, checkpoint file, ``save_pretrained`` folder) is malformed,
    incomplete (e.g. a threshold without the layer's sparsifier state) or does not fit the model."""


class CalibrationConvergenceError(ActivationSparsityError):
    """A layer called several times per forward has no threshold that is the exact quantile of the inputs it
    produces itself (the calibration passes did not reach that fixed point)."""


class CallbackConfigurationError(ActivationSparsityError):
    """An argument of :class:`~pl_actsparse.lightning.callback.ActivationSparsityCallback` (or of its
    :class:`~pl_actsparse.lightning.calibration_data.CalibrationData` / schedule) is invalid, or the run it is
    used in cannot work with it (raised by the constructor, or at ``setup`` naming the fix)."""


class InvalidOptionError(ActivationSparsityError):
    """An option that is not a target sparsity or a scope has an invalid value (a calibration method, a batch
    count, an offload mode, ...); the message names the option and what would be valid."""
