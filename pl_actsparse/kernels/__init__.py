"""Sparse kernels for activation-sparse inference (CPU now; see :mod:`pl_actsparse.kernels.cpu`)."""

from pl_actsparse.kernels.cpu import (
    DEFAULT_MAX_SPARSE_TOKENS,
    MIN_SPARSE_WEIGHT_BYTES,
    ExtensionStatus,
    KernelBackend,
    effective_threshold,
    extension_status,
    get_backend,
    load_extension,
    masked_linear,
    resolve_backend,
    set_backend,
    sparse_linear,
    sparse_linear_cpu,
    to_kernel_layout,
)

__all__ = [
    "DEFAULT_MAX_SPARSE_TOKENS",
    "MIN_SPARSE_WEIGHT_BYTES",
    "ExtensionStatus",
    "KernelBackend",
    "effective_threshold",
    "extension_status",
    "get_backend",
    "load_extension",
    "masked_linear",
    "resolve_backend",
    "set_backend",
    "sparse_linear",
    "sparse_linear_cpu",
    "to_kernel_layout",
]
