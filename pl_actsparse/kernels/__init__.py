"""Sparse kernels for activation-sparse inference. Imports nothing from the rest of the package.

* :mod:`~pl_actsparse.kernels.sparse_op`: the custom op ``torch.ops.pl_actsparse.sparse_linear``, its fake,
  and the shared helpers (:func:`to_kernel_layout`, :func:`effective_threshold`, :func:`masked_linear`).
  (Not named ``sparse_linear.py``: ``import pl_actsparse.kernels.sparse_linear as m`` would then bind the op
  :func:`sparse_linear` exported here, not the module.)
* :mod:`~pl_actsparse.kernels.cpu`: the CPU kernels (C++ ``csrc/sparse_gemv.cpp``, ``embedding_bag`` fallback)
  and :func:`zero_small`, the dense path's one-pass masking.
* :mod:`~pl_actsparse.kernels.dispatch`: the dense path and the sparse/dense crossover of exported layers,
  measured per machine (:func:`dense_linear_t`, :func:`sparse_token_crossover`, :func:`cpu_profile`).
* :mod:`~pl_actsparse.kernels.int8_cpu`: weight-only int8 kernels (C++ ``csrc/int8_sparse_gemv.cpp``).
* :mod:`~pl_actsparse.kernels.cuda`: the Triton GEMV (registers the op's CUDA kernel; triton imported lazily).
* :mod:`~pl_actsparse.kernels._extension`: building/loading the C++ kernels (:class:`InlineExtension`).

:func:`build_all` (``pl-actsparse build-kernels``) builds both C++ kernels ahead of time.
"""

from pl_actsparse.kernels import cuda as _cuda  # noqa: F401  (registers the custom op's CUDA kernel)
from pl_actsparse.kernels._extension import NOT_BUILT, BuildLockTimeout, InlineExtension, environment_key
from pl_actsparse.kernels.build import build_all, build_kernels_main
from pl_actsparse.kernels.dispatch import (
    CpuProfile, cpu_isa_flags, cpu_profile, dense_linear_t, dense_method, sparse_token_crossover,
)
from pl_actsparse.kernels.cpu import (
    DEFAULT_MAX_SPARSE_TOKENS, MIN_SPARSE_WEIGHT_BYTES, ExtensionStatus, KernelBackend, effective_threshold,
    extension_status, get_backend, load_extension, masked_linear, resolve_backend, set_backend, sparse_linear,
    sparse_linear_cpu, to_kernel_layout,
)

__all__ = [
    "DEFAULT_MAX_SPARSE_TOKENS", "MIN_SPARSE_WEIGHT_BYTES", "NOT_BUILT", "BuildLockTimeout", "CpuProfile",
    "ExtensionStatus", "InlineExtension", "KernelBackend", "build_all", "build_kernels_main", "cpu_isa_flags",
    "cpu_profile", "dense_linear_t", "dense_method", "effective_threshold", "environment_key", "extension_status",
    "get_backend", "load_extension", "masked_linear", "resolve_backend", "set_backend", "sparse_linear",
    "sparse_linear_cpu", "sparse_token_crossover", "to_kernel_layout",
]
