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
    # Imported on first use so that `import pl_actsparse` stays light (no Lightning, no matplotlib).
    "allocate_sparsity": ".allocation",
    "measure_sensitivity": ".allocation",
    "Allocation": ".allocation",
    "load_scopes_yaml": ".allocation",
    "sweep_sparsity": ".sweep",
    "SweepResult": ".sweep",
    "threshold_for_target": ".sweep",
    "find_shared_input_groups": ".groups",
    "sparsify_activations_weight_aware": ".scoring",
    "model_report": ".reporting",
    "ModelReport": ".reporting",
    "SparsityCounter": ".tracking",
    "quantize_weights_int8": ".quantization",
    "dequantize_weights_int8": ".quantization",
    "export_int8_for_inference": ".quantization",
    "Int8WeightLinear": ".quantization",
    "Int8SparseInferenceLinear": ".quantization",
    "Int8QuantizationReport": ".quantization",
    "Int8LayerReport": ".quantization",
    "ActivationSparsityCallback": ".callback",
    "ScopeSpec": ".callback",
    "IgnoredScopeSpec": ".callback",
    "activation_sparsity_disabled": ".callback",
    "install_sparsifiers_from_state_dict": ".callback",
    "CallbackConfigurationError": ".callback",
    "ActivationSparsity": ".metrics",
    "TinyStoriesLM": ".lightning_models",
    "HFLlamaLM": ".lightning_models",
    "TinyStoriesDataModule": ".lightning_models",
    "export_for_inference": ".inference",
    "exported_layers": ".inference",
    "SparseInferenceLinear": ".inference",
    "compare_decoding": ".generation",
    "DecodeComparison": ".generation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'pl_actsparse' has no attribute {name!r}")


__all__ += list(_LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
