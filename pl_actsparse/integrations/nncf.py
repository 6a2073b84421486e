"""NNCF: ``compress_weights`` and friends keep their hooks in ``__nncf_hooks`` submodules and patch shared state
in forward."""

from __future__ import annotations

from torch import nn

HOOK_STORAGE = "__nncf_hooks"


def is_hook_storage(name: str) -> bool:
    """Whether a qualified module name lies in another tool's storage (a ``__``-prefixed part such as NNCF's
    ``__nncf_hooks``): never a layer to list as skipped."""
    return any(part.startswith("__") for part in name.split("."))


def has_hooks(model: nn.Module) -> bool:
    """Whether ``model`` is NNCF-wrapped (its forward is then not reentrant: two forwards must not overlap)."""
    return any(HOOK_STORAGE in m._modules for m in model.modules())
