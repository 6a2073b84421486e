"""pl-actsparse: activation sparsity for PyTorch and PyTorch Lightning.

One verb per workflow step; everything else is importable from its subpackage (``pl_actsparse.core``,
``calibrate``, ``measure``, ``tuning``, ``export``, ``kernels``, ``lightning``, ``integrations``). The functional
core is plain PyTorch; Lightning is imported only when the callback or the metric is used.
"""

from __future__ import annotations

from typing import Any

from pl_actsparse import integrations  # noqa: F401  (registers third-party layer types with core)
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
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.layer import GradientMode
from pl_actsparse.core.scopes import IgnoredScope, TargetScope
from pl_actsparse.errors import ActivationSparsityError
from pl_actsparse.measure.report import LayerReport, SparsityReport, activation_sparsity_report

__version__ = "0.1.0"

_LAZY = {
    # Imported on first use so that `import pl_actsparse` stays light (no Lightning, no matplotlib).
    "export_for_inference": ".export.convert",
    "quantize_weights_int8": ".core.int8",
    "sweep_sparsity": ".tuning.sweep",
    "rotate_activations": ".tuning.rotation",
    "activation_sparsity_disabled": ".core.layer",
    "ActivationSparsityCallback": ".lightning.callback",
    "ActivationSparsity": ".measure.metric",
}

__all__ = [
    "plan_activation_sparsity",
    "prepare_activation_sparsity",
    "sparsify_activations",
    "calibrate_activation_sparsity",
    "set_target_sparsity",
    "activation_sparsity_report",
    "remove_activation_sparsity",
    "load_activation_sparsity",
    "from_pretrained",
    "TargetScope",
    "IgnoredScope",
    "CalibrationConfig",
    "SparsityPlan",
    "SparsityReport",
    "LayerReport",
    "GradientMode",
    "ActivationSparsityError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pl_actsparse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
