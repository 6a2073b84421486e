"""Third-party layer families: one module per library we adapt to, called only through the functions here.

:mod:`~pl_actsparse.integrations.transformers` (GPT-2 ``Conv1D`` as a Linear-like type),
:mod:`~pl_actsparse.integrations.peft` (LoRA/DoRA wrappers: the adapted projection's input is thresholded once),
:mod:`~pl_actsparse.integrations.torchao` (weight-only int8 weights read for export) and
:mod:`~pl_actsparse.integrations.nncf` (NNCF's hook storage). None of them imports its library: a model can
hold such layers only once the library was imported, so each is looked up in ``sys.modules`` and loaded lazily.
The rest of the package imports this package, never one of its modules; ``core`` imports neither (this
package registers :func:`linear_like_types` in :data:`pl_actsparse.core.layer.LINEAR_LIKE_SOURCES`
and NNCF's check in :data:`pl_actsparse.calibrate.running.NON_REENTRANT_CHECKS`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable

from torch import Tensor, nn

from pl_actsparse.calibrate.running import NON_REENTRANT_CHECKS
from pl_actsparse.core.layer import LINEAR_LIKE_SOURCES, PLACEMENT_SOURCES

__all__ = ["linear_like_types", "layer_map", "sync_adapter_hooks", "int8_weight", "is_tool_storage",
           "forward_is_not_reentrant", "forward_patch_problem", "shared_offload_hooks"]

# library module that defines a Linear-like type -> the integration that describes it (dropped once registered)
_LINEAR_LIKE_PENDING = {"transformers.pytorch_utils": "transformers"}


def _integration(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{name}")


def linear_like_types() -> list[tuple[type, dict[str, Callable[[nn.Module], Any]]]]:
    """``(class, accessors for core.layer.register_linear_like)`` of the Linear-like types whose library has been
    imported since the last call (each is returned once)."""
    found = []
    for module, integration in list(_LINEAR_LIKE_PENDING.items()):
        if module in sys.modules:
            found += _integration(integration).linear_like_types(sys.modules[module])
            del _LINEAR_LIKE_PENDING[module]
    return found


LINEAR_LIKE_SOURCES.append(linear_like_types)


def layer_map(named_modules: Iterable[tuple[str, nn.Module]]) -> Any:
    """How module names map to sparsifiable layers in a model with wrapper layers (peft adapters): a
    :class:`~pl_actsparse.integrations.peft.AdapterMap` (``select(name, exact)``, ``canonical``, ``aliases``,
    ``wrapper_of``), empty when peft was never imported."""
    return _integration("peft").adapter_map(named_modules)


def sync_adapter_hooks(model: nn.Module) -> int:
    """Hook every adapter wrapper whose base layer is sparsified, unhook the others (after any install or
    removal of sparsifiers); the number of wrappers hooked."""
    return _integration("peft").sync_adapter_hooks(model) if "peft" in sys.modules else 0


def int8_weight(name: str, weight: Any) -> tuple[Tensor, Tensor, Tensor, "torch.dtype", Callable[..., Tensor]] | None:
    """A quantized weight tensor subclass read for the int8 kernel: ``(qdata [out, in] int8, scale [out],
    zero_point [out], float dtype, rebuild)`` (torchao weight-only int8; ``rebuild(qdata, scale, zero_point)``
    gives the subclass back), ``None`` for a plain tensor. Raises
    :class:`~pl_actsparse.errors.UnsupportedModuleError` naming ``name`` for any other tensor subclass."""
    if type(weight) in (Tensor, nn.Parameter) or not isinstance(weight, Tensor):
        return None
    return _integration("torchao").int8_weight(name, weight)


def is_tool_storage(name: str) -> bool:
    """Whether a module name is storage of another tool (NNCF's ``__nncf_hooks``), nobody's layer."""
    return _integration("nncf").is_hook_storage(name)


def forward_is_not_reentrant(model: nn.Module) -> bool:
    """Whether two forwards of ``model`` must not overlap (NNCF-wrapped models patch shared state); registered in
    :data:`pl_actsparse.calibrate.running.NON_REENTRANT_CHECKS`."""
    return "nncf" in sys.modules and _integration("nncf").has_hooks(model)


NON_REENTRANT_CHECKS.append(forward_is_not_reentrant)


def _offload_device(module: nn.Module) -> Any:
    return _integration("accelerate").threshold_device(module) if "_hf_hook" in module.__dict__ else None


PLACEMENT_SOURCES.append(_offload_device)


def forward_patch_problem(module: nn.Module) -> str | None:
    """Why a sparsifier installed on ``module`` would not run in its forward (a forward patched on the instance,
    an accelerate hook offloading buffers), or ``None`` when it would
    (:func:`pl_actsparse.integrations.accelerate.forward_patch_problem`)."""
    return _integration("accelerate").forward_patch_problem(module)


def shared_offload_hooks(model: nn.Module) -> Any:
    """A context in which accelerate's offload hooks of ``model`` tolerate several batches in flight at once
    (:func:`pl_actsparse.integrations.accelerate.shared_offload_hooks`)."""
    return _integration("accelerate").shared_offload_hooks(model)
