"""pl-actsparse: activation sparsity for PyTorch and PyTorch Lightning.

The functional core (:func:`sparsify_activations` and friends) is plain PyTorch; Lightning is imported only
when the callback or the CLI is used.
"""

from __future__ import annotations

from typing import Any

from pl_actsparse.calibrate.histogram import LayerStatistics, threshold_from_histogram
from pl_actsparse.errors import (
    ActivationSparsityError,
    CheckpointError,
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
    TokenMaskError,
    CalibrationConvergenceError,
    CheckpointError,
)
from pl_actsparse.api import (
    SparsityPlan,
    calibrate_activation_sparsity,
    from_pretrained,
    load_activation_sparsity,
    plan_activation_sparsity,
    prepare_activation_sparsity,
    remove_activation_sparsity,
    set_target_sparsity,
    sparsify_activations,
)
from pl_actsparse.core.layer import GradientMode, SparseActivationLinear, SparsifierMode, is_sparsified, sparsified_layers
from pl_actsparse.measure.report import LayerReport, SparsityReport, activation_sparsity_report
from pl_actsparse.core.scopes import IgnoredScope, TargetScope

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
    "from_pretrained",
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
    "CheckpointError",
]

_LAZY = {
    # Imported on first use so that `import pl_actsparse` stays light (no Lightning, no matplotlib).
    "allocate_sparsity": ".tuning.allocation",
    "measure_sensitivity": ".tuning.allocation",
    "Allocation": ".tuning.allocation",
    "load_scopes_yaml": ".core.recipe",
    "sweep_sparsity": ".tuning.sweep",
    "SweepResult": ".tuning.sweep",
    "threshold_for_target": ".calibrate.histogram",
    "find_shared_input_groups": ".core.groups",
    "sparsify_activations_weight_aware": ".tuning.weight_aware",
    "model_report": ".measure.report",
    "ModelReport": ".measure.report",
    "SparsityCounter": ".measure.metric",
    "quantize_weights_int8": ".core.int8",
    "dequantize_weights_int8": ".core.int8",
    "export_int8_for_inference": ".export.int8_linear",
    "Int8WeightLinear": ".core.int8",
    "Int8SparseInferenceLinear": ".export.int8_linear",
    "Int8QuantizationReport": ".core.int8",
    "Int8LayerReport": ".core.int8",
    "ActivationSparsityCallback": ".lightning.callback",
    "ScopeSpec": ".core.recipe",
    "IgnoredScopeSpec": ".core.recipe",
    "activation_sparsity_disabled": ".lightning.callback",
    "install_sparsifiers_from_state_dict": ".lightning.callback",
    "CallbackConfigurationError": ".lightning.callback",
    "ActivationSparsity": ".measure.metric",
    "TinyStoriesLM": ".demos.lightning_models",
    "HFLlamaLM": ".demos.lightning_models",
    "TinyStoriesDataModule": ".demos.lightning_models",
    "export_for_inference": ".export.convert",
    "exported_layers": ".export.convert",
    "SparseInferenceLinear": ".export.linear",
    "compare_decoding": ".demos.generate",
    "DecodeComparison": ".demos.generate",
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
