"""pl-actsparse: activation sparsity for PyTorch and PyTorch Lightning.

The functional core (:func:`sparsify_activations` and friends) is plain PyTorch; Lightning is imported only
when the callback or the CLI is used.
"""

from __future__ import annotations

from typing import Any

from .calibration import LayerStatistics, threshold_from_histogram
from .errors import (
    ActivationSparsityError,
    ConflictingScopesError,
    EmptyDatasetError,
    InvalidScopeError,
    InvalidTargetError,
    LayerNotCalledError,
    NonFiniteActivationError,
    NothingToSparsifyError,
    NotSparsifiedError,
    UnmatchedScopeError,
    UnsupportedModuleError,
)
from .functional import (
    SparsityPlan,
    calibrate_activation_sparsity,
    load_activation_sparsity,
    plan_activation_sparsity,
    prepare_activation_sparsity,
    remove_activation_sparsity,
    set_target_sparsity,
    sparsify_activations,
)
from .modules import GradientMode, SparseActivationLinear, SparsifierMode, is_sparsified, sparsified_layers
from .report import LayerReport, SparsityReport, activation_sparsity_report
from .scopes import IgnoredScope, TargetScope

__version__ = "0.1.0"

__all__ = [
    "TargetScope",
    "IgnoredScope",
    "sparsify_activations",
    "remove_activation_sparsity",
    "prepare_activation_sparsity",
    "calibrate_activation_sparsity",
    "plan_activation_sparsity",
    "load_activation_sparsity",
    "set_target_sparsity",
    "activation_sparsity_report",
    "SparsityPlan",
    "SparsityReport",
    "LayerReport",
    "LayerStatistics",
    "threshold_from_histogram",
    "GradientMode",
    "SparsifierMode",
    "SparseActivationLinear",
    "is_sparsified",
    "sparsified_layers",
    "ActivationSparsityError",
    "InvalidTargetError",
    "InvalidScopeError",
    "UnmatchedScopeError",
    "ConflictingScopesError",
    "UnsupportedModuleError",
    "NothingToSparsifyError",
    "EmptyDatasetError",
    "NonFiniteActivationError",
    "NotSparsifiedError",
    "LayerNotCalledError",
]

_LAZY = {
    # Lightning-dependent names are imported on first use so the core stays light.
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'pl_actsparse' has no attribute {name!r}")
