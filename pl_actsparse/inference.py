"""Deprecated alias of :mod:`pl_actsparse.export` (moved in 0.2; this shim goes in 0.3)."""

import sys as _sys
import warnings as _warnings

import pl_actsparse.export as _moved

_warnings.warn(
    "pl_actsparse.inference moved to pl_actsparse.export; the old path is removed in 0.3",
    DeprecationWarning,
    stacklevel=2,
)
_sys.modules[__name__] = _moved
