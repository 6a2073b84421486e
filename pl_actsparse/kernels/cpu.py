"""CPU sparse GEMV for activation-sparse decoding.

A decode step multiplies one token (or a handful) by every weight matrix, so on CPU it is bound by the
bytes of weight read, not by arithmetic. When a layer zeroes a fraction ``s`` of its inputs, the rows of
``W^T`` that belong to zeroed inputs never need to be read, so a GEMV that only streams the needed rows
can approach ``1 / (1 - s)``. That needs the weight stored as ``W^T`` (``[in, out]``, contiguous): each
needed input feature is then one contiguous row.

Two implementations sit behind one custom op, :func:`sparse_linear` (``torch.ops.pl_actsparse.sparse_linear``):

``"cpp"``
    A small C++ kernel (compiled on first use with :func:`torch.utils.cpp_extension.load_inline` and cached
    in torch's extension directory). Each thread owns a contiguous block of output columns and streams
    8 needed rows at a time, accumulating in fp32. Several tokens read the *union* of their rows once.
``"torch"``
    Pure PyTorch: ``F.embedding_bag`` over a view of ``W^T`` as ``[in * P, out / P]`` (``P`` bags per
    token so that ``P`` threads work), with the kept activations as ``per_sample_weights``.

``"auto"`` (the default) uses ``"cpp"`` when it can be built and loaded and ``"torch"`` otherwise (with
one warning). Choose with :func:`set_backend` or the ``PL_ACTSPARSE_CPU_KERNEL`` environment variable.
Measured figures and the method are in ``docs/inference.md``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ensure_ninja_on_path",
    "DEFAULT_MAX_SPARSE_TOKENS",
    "MIN_SPARSE_WEIGHT_BYTES",
    "KernelBackend",
    "ExtensionStatus",
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

log = logging.getLogger(__name__)

KernelBackend = Literal["auto", "cpp", "torch"]
_BACKENDS = ("auto", "cpp", "torch")
_ENV_BACKEND = "PL_ACTSPARSE_CPU_KERNEL"

#: Largest number of tokens per call for which the sparse kernel beats the layer's dense path, keyed by
#: ``(backend, dtype)`` with ``(backend, None)`` as the fallback. Measured at s = 0.5 with
#: ``python benchmarks/decode.py --crossover`` on a 2-core AMD EPYC (AVX2, torch 2.13 with MKL); fp16 uses the
#: same kernels as bf16 and was not measured separately. See ``docs/inference.md``. The C++ kernel reads the
#: union of the tokens' rows once; ``embedding_bag`` reads them once per token. Machine-dependent (MKL's
#: small-batch GEMMs are slow on this CPU, which favours the sparse kernel): override with
#: ``max_sparse_tokens`` where it matters.
DEFAULT_MAX_SPARSE_TOKENS: dict[tuple[str, Optional[torch.dtype]], int] = {
    ("cpp", None): 8,
    ("cpp", torch.bfloat16): 16,
    ("cpp", torch.float16): 16,
    ("torch", None): 2,
    ("torch", torch.bfloat16): 8,
    ("torch", torch.float16): 8,
}

#: Per backend: layers with fewer weight bytes use the dense path by default. The C++ call's fixed cost is
#: below that of the dense path's masking ops (64x172 fp32, warm: 17 us vs 24 us), so it needs no minimum;
#: the ``embedding_bag`` path costs ~60 us more than the dense path per call, which at s = 0.5 only pays off
#: once half the weight takes that long to read (a few MiB).
MIN_SPARSE_WEIGHT_BYTES: dict[str, int] = {"cpp": 0, "torch": 4 << 20}


def to_kernel_layout(weight: Tensor) -> Tensor:
    """Return ``weight`` ([out, in]) in the layout the sparse kernels read: ``W^T``, contiguous [in, out].

    Rows of ``W^T`` are input features, so skipping a zero activation skips one contiguous row.
    """
    return weight.detach().t().contiguous()


def effective_threshold(threshold: Tensor | float, dtype: torch.dtype) -> float:
    """The threshold as the reference forward applies it to inputs of ``dtype``.

    ``x.abs() <= t`` with a 0-dim fp32 buffer ``t`` and a bf16/fp16 ``x`` compares in ``x.dtype`` (type
    promotion), i.e. against ``t`` rounded to that dtype; the kernels compare in fp32 against the same
    rounded value so that they zero exactly the same elements.
    """
    t = threshold if isinstance(threshold, Tensor) else torch.tensor(float(threshold))
    return float(t.detach().to(device="cpu", dtype=dtype).float().item())


def masked_linear(x: Tensor, threshold: Tensor | float, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Reference semantics: ``F.linear(x.masked_fill(|x| <= threshold, 0), weight, bias)`` (weight [out, in])."""
    return F.linear(x.masked_fill(x.abs() <= threshold, 0), weight, bias)


# --------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------

_backend: Optional[str] = None


def set_backend(backend: Optional[KernelBackend]) -> None:
    """Choose the CPU kernel: ``"auto"``, ``"cpp"`` (error if it cannot be built) or ``"torch"``.

    ``None`` returns to the ``PL_ACTSPARSE_CPU_KERNEL`` environment variable (default ``"auto"``).
    The choice is read on every call, so it also applies inside ``torch.compile``-d models.
    """
    global _backend
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    _backend = backend


def get_backend() -> str:
    """The configured backend (``"auto"``, ``"cpp"`` or ``"torch"``), before resolution."""
    if _backend is not None:
        return _backend
    env = os.environ.get(_ENV_BACKEND, "auto").strip().lower() or "auto"
    if env not in _BACKENDS:
        raise ValueError(f"{_ENV_BACKEND} must be one of {_BACKENDS}, got {env!r}")
    return env


def resolve_backend(build: bool = True) -> str:
    """The backend the next call will use: ``"cpp"`` or ``"torch"``.

    With ``"auto"`` or ``"cpp"`` this may compile the extension (once). With ``build=False`` nothing is
    compiled and nothing raises: a configured but unbuilt ``"cpp"`` reports ``"cpp"`` (it is built on use).
    """
    backend = get_backend()
    if backend == "torch":
        return "torch"
    if load_extension(build=build):
        return "cpp"
    if backend == "cpp":
        if not build:
            return "cpp"
        raise RuntimeError(
            "pl_actsparse: the C++ CPU kernel was requested (backend='cpp') but is unavailable: "
            f"{extension_status().error}"
        )
    return "torch"


# --------------------------------------------------------------------------------------------------
# Optional C++ extension
# --------------------------------------------------------------------------------------------------


class ExtensionStatus:
    """Whether the C++ kernel is loaded, and why not if it is not."""

    __slots__ = ("loaded", "error", "name", "build_directory")

    def __init__(self, loaded: bool, error: Optional[str], name: str, build_directory: str) -> None:
        self.loaded = loaded
        self.error = error
        self.name = name
        self.build_directory = build_directory

    def __repr__(self) -> str:
        return (
            f"ExtensionStatus(loaded={self.loaded}, error={self.error!r}, name={self.name!r}, "
            f"build_directory={self.build_directory!r})"
        )


_ext_lock = threading.Lock()
_ext_loaded: Optional[bool] = None  # None: not tried yet
_ext_error: Optional[str] = None
_ext_warned = False
_NOT_BUILT = "not built yet"


def _ext_flags() -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-std=c++17"]
    ldflags: list[str] = []
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # Not -march=native: the build cache may be shared between machines.
        cflags += ["-mavx2", "-mfma", "-mf16c"]
    if "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        # at::parallel_for is inlined from the headers; without -fopenmp it would run on one thread.
        # The extension then links libgomp.so.1, which resolves to the copy torch has already loaded.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


@functools.lru_cache(maxsize=None)
def _ext_name_for(prefix: str, source: str) -> str:
    # Cached builds are keyed by source, compiler flags and torch version.
    cflags, ldflags = _ext_flags()
    key = "\n".join([source, " ".join(cflags), " ".join(ldflags), torch.__version__])
    return prefix + hashlib.sha1(key.encode()).hexdigest()[:12]


def _ext_name() -> str:
    return _ext_name_for("pl_actsparse_cpu_", _CPP_SOURCE)


def _build_inline_extension(name: str, source: str, build_dir: str) -> None:
    """Compile (or load the cached build of) one of the package's C++ kernels; raises on any failure."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH)")
    ensure_ninja_on_path()
    from torch.utils import cpp_extension

    os.makedirs(build_dir, exist_ok=True)
    cflags, ldflags = _ext_flags()
    if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
        log.info("pl_actsparse: compiling the C++ kernel %s into %s (once)", name, build_dir)
    kwargs = {}
    if "no_implicit_headers" in inspect.signature(cpp_extension.load_inline).parameters:
        kwargs["no_implicit_headers"] = True  # skip <torch/extension.h> (pybind11): faster build
    cpp_extension.load_inline(
        name=name,
        cpp_sources=[source],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
        **kwargs,
    )


def _ext_build_dir(name: str) -> str:
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("PL_ACTSPARSE_EXT_DIR") or get_default_build_root()
    return os.path.join(root, name)


def ensure_ninja_on_path() -> None:
    """Put the ``ninja`` of this Python environment on ``PATH`` if ``PATH`` has none.

    ``torch.utils.cpp_extension`` runs ``ninja`` from ``PATH``. The pip-installed one (the ``kernels``
    extra) lives next to the interpreter, which is not on ``PATH`` when a venv is used without activating it
    (``.venv/bin/pl-actsparse ...``).
    """
    if shutil.which("ninja") is not None:
        return
    for folder in (os.path.dirname(sys.executable), sysconfig.get_path("scripts")):
        if folder and shutil.which("ninja", path=folder) is not None:
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return


def extension_status() -> ExtensionStatus:
    """Report whether the C++ kernel is loaded (``error`` says why not; ``None`` if not tried yet)."""
    name = _ext_name()
    return ExtensionStatus(bool(_ext_loaded), _ext_error, name, _ext_build_dir(name))


def load_extension(build: bool = True) -> bool:
    """Load the C++ kernel, compiling it first if needed (20-60 s, once per machine, torch version and source).

    Returns ``False`` instead of raising when there is no compiler, the build fails, or (with
    ``build=False``) it has not been built yet; :func:`extension_status` has the reason. A failed build is
    not retried in the same process.
    """
    global _ext_loaded, _ext_error
    if _ext_loaded is not None and _ext_error != _NOT_BUILT:  # loaded, or failed for good
        return _ext_loaded
    with _ext_lock:
        if _ext_loaded is not None and _ext_error != _NOT_BUILT:
            return _ext_loaded
        name = _ext_name()
        build_dir = _ext_build_dir(name)
        if not build and not os.path.exists(os.path.join(build_dir, f"{name}.so")):
            _ext_loaded, _ext_error = False, _NOT_BUILT
            return False
        try:
            _build_inline_extension(name, _CPP_SOURCE, build_dir)
            torch.ops.pl_actsparse_ext.sparse_gemv  # noqa: B018  (fails if the library did not register)
        except Exception as exc:  # any failure (no compiler, no ninja, compile or load error) -> torch path
            _ext_loaded, _ext_error = False, f"{type(exc).__name__}: {exc}".strip()[:2000]
            log.debug("pl_actsparse: C++ kernel unavailable", exc_info=True)
            return False
        _ext_loaded, _ext_error = True, None
        return True


def _resolve_for_call() -> str:
    backend = _backend if _backend is not None else get_backend()
    if backend == "torch":
        return "torch"
    if _ext_loaded:  # fast path: a few attribute reads per call
        return "cpp"
    global _ext_warned
    backend = resolve_backend(build=True)
    if backend == "torch" and not _ext_warned:
        _ext_warned = True
        warnings.warn(
            "pl_actsparse: the C++ CPU sparse kernel is unavailable, using the slower pure-PyTorch "
            f"embedding_bag kernel ({_ext_error}). Set {_ENV_BACKEND}=torch to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return backend


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch kernel
# --------------------------------------------------------------------------------------------------


_MIN_PARALLEL_BYTES = 1 << 19  # as kMinParallelBytes in the C++ kernel
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # others (fp64) take the torch path


def _num_bags(out_features: int, read_bytes: int) -> int:
    # embedding_bag parallelises over bags: one column block per thread, and the block count must divide
    # out_features so that W^T can be viewed (not copied) as [in * P, out / P]. Small products use one bag.
    if read_bytes < _MIN_PARALLEL_BYTES:
        return 1
    threads = max(1, torch.get_num_threads())
    for p in range(threads, 0, -1):
        if out_features % p == 0:
            return p
    return 1


@functools.lru_cache(maxsize=64)
def _bag_starts(p: int) -> Tensor:
    return torch.arange(p).unsqueeze(1)


def _sparse_linear_torch(x2: Tensor, t: float, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    ntok, in_f = x2.shape
    out_f = weight_t.shape[1]
    drop = x2.abs() <= t  # NaN is kept, as in masked_fill(|x| <= t)
    if ntok == 1:
        idx = drop[0].logical_not_().nonzero().squeeze(1)
        n = idx.numel()
        p = _num_bags(out_f, n * out_f * weight_t.element_size())
        vals = x2[0].index_select(0, idx)
        if p == 1:
            ind, offsets = idx, idx.new_zeros(1)
        else:
            ind = (idx * p + _bag_starts(p)).flatten()  # bag q reads rows i * p + q
            offsets = torch.arange(0, p * n, max(n, 1))
            vals = vals.repeat(p)
        table = weight_t.view(in_f * p, out_f // p)  # row i * p + q = W^T[i, q * cw:(q + 1) * cw]
        y = F.embedding_bag(ind, table, offsets, per_sample_weights=vals, mode="sum").view(1, out_f)
    else:
        tok, idx = drop.logical_not_().nonzero().unbind(1)
        n = idx.numel()
        p = _num_bags(out_f, n * out_f * weight_t.element_size())
        vals = x2[tok, idx]
        counts = torch.bincount(tok, minlength=ntok)
        starts = torch.cumsum(counts, 0) - counts
        ind = (idx * p + _bag_starts(p)).flatten()  # bags ordered (q, token)
        offsets = (_bag_starts(p) * n + starts).flatten()
        table = weight_t.view(in_f * p, out_f // p)
        y = F.embedding_bag(ind, table, offsets, per_sample_weights=vals.repeat(p), mode="sum")
        y = y.view(p, ntok, out_f // p).transpose(0, 1).reshape(ntok, out_f)
    if bias is not None:
        y = y + bias
    return y


# --------------------------------------------------------------------------------------------------
# The custom op
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pl_actsparse::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x.masked_fill(|x| <= threshold, 0), weight_t.T, bias)`` reading only the needed rows.

    ``x`` is ``[..., in]``, ``weight_t`` the kernel layout ``[in, out]`` (see :func:`to_kernel_layout`),
    ``threshold`` a 0-dim tensor compared in ``x.dtype``. Meant for a few tokens; the work grows with the
    number of tokens (see :data:`DEFAULT_MAX_SPARSE_TOKENS`). On non-CPU devices this computes the masked
    dense product.
    """
    if x.shape[-1] != weight_t.shape[0]:
        raise ValueError(f"sparse_linear: x has {x.shape[-1]} features, weight_t is {tuple(weight_t.shape)}")
    thr = threshold.to(x.device) if threshold.device != x.device else threshold
    return F.linear(x.masked_fill(x.abs() <= thr, 0), weight_t.t(), bias)


def _checked_kernel_args(kernel: str, x: Tensor, weight_t: Tensor) -> Tensor:
    """Validate ``x`` against ``weight_t`` (``[in, out]``) for a sparse kernel; return ``weight_t`` contiguous."""
    in_f = weight_t.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"{kernel}: x has {x.shape[-1]} features, weight_t is {tuple(weight_t.shape)}")
    if x.dtype != weight_t.dtype:
        raise TypeError(f"{kernel}: x is {x.dtype} but weight_t is {weight_t.dtype}")
    return weight_t if weight_t.is_contiguous() else weight_t.contiguous()


def sparse_linear_cpu(x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The CPU implementation of :func:`sparse_linear`, callable without the custom-op wrappers.

    Eager callers save ~40 us per call this way (the custom op's Python dispatch layers); under
    ``torch.compile`` use :func:`sparse_linear` so that the call stays one opaque graph node.
    """
    weight_t = _checked_kernel_args("sparse_linear", x, weight_t)
    in_f, out_f = weight_t.shape
    if x.dtype in _CPP_DTYPES and _resolve_for_call() == "cpp":
        return torch.ops.pl_actsparse_ext.sparse_gemv(x, threshold, weight_t, bias, 0)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    if x2.shape[0] == 0:
        return F.linear(x, weight_t.t(), bias)
    y = _sparse_linear_torch(x2, effective_threshold(threshold, x.dtype), weight_t, bias)
    return y.reshape(*lead, out_f)


sparse_linear.register_kernel("cpu")(sparse_linear_cpu)


@sparse_linear.register_kernel("cuda")
def _sparse_linear_cuda(x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    # Imported on first CUDA call only: CPU users never import triton.
    from pl_actsparse.kernels.cuda import sparse_linear_cuda

    return sparse_linear_cuda(x, threshold, weight_t, bias)


@sparse_linear.register_fake
def _sparse_linear_fake(x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    torch._check(x.shape[-1] == weight_t.shape[0])
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


# --------------------------------------------------------------------------------------------------
# C++ source of the optional extension (kept in this file so that it ships without package data)
# --------------------------------------------------------------------------------------------------

_CPP_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PLAS_AVX2 1
#endif

namespace {

// Rows of W^T accumulated together: 8 independent row streams keep enough loads in flight for the
// memory system (4 rows reach ~85-90% of the bandwidth of 8 on a 2-core EPYC; 2 rows ~75%).
constexpr int64_t kU = 8;
// Below this many weight bytes to read, one thread does the whole product.
constexpr int64_t kMinParallelBytes = 1 << 19;

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

#ifdef PLAS_AVX2
template <typename T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <> inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// acc[t * n + j] += sum_k vals[k * ntok + t] * wt[rows[k], j0 + j]   for j in [0, n), t in [0, ntok)
template <typename T>
void accumulate(const T* wt, int64_t ld, int64_t j0, int64_t n, const int64_t* rows,
                const float* vals, int64_t nr, int64_t ntok, float* acc) {
  int64_t k = 0;
  for (; k + kU <= nr; k += kU) {
    const T* r[kU];
    for (int64_t u = 0; u < kU; ++u) r[u] = wt + rows[k + u] * ld + j0;
    const float* v = vals + k * ntok;
    int64_t j = 0;
#ifdef PLAS_AVX2
    if (ntok == 1) {
      __m256 vb[kU];
      for (int64_t u = 0; u < kU; ++u) vb[u] = _mm256_set1_ps(v[u]);
      for (; j + 8 <= n; j += 8) {
        __m256 s = _mm256_loadu_ps(acc + j);
        for (int64_t u = 0; u < kU; ++u) s = _mm256_fmadd_ps(vb[u], load8(r[u] + j), s);
        _mm256_storeu_ps(acc + j, s);
      }
    } else {
      for (; j + 8 <= n; j += 8) {
        __m256 w[kU];
        for (int64_t u = 0; u < kU; ++u) w[u] = load8(r[u] + j);
        for (int64_t t = 0; t < ntok; ++t) {
          float* a = acc + t * n + j;
          __m256 s = _mm256_loadu_ps(a);
          for (int64_t u = 0; u < kU; ++u) s = _mm256_fmadd_ps(_mm256_set1_ps(v[u * ntok + t]), w[u], s);
          _mm256_storeu_ps(a, s);
        }
      }
    }
#endif
    for (; j < n; ++j) {
      float w[kU];
      for (int64_t u = 0; u < kU; ++u) w[u] = to_f(r[u][j]);
      for (int64_t t = 0; t < ntok; ++t) {
        float s = acc[t * n + j];
        for (int64_t u = 0; u < kU; ++u) s += v[u * ntok + t] * w[u];
        acc[t * n + j] = s;
      }
    }
  }
  for (; k < nr; ++k) {
    const T* r0 = wt + rows[k] * ld + j0;
    for (int64_t t = 0; t < ntok; ++t) {
      const float v0 = vals[k * ntok + t];
      float* a = acc + t * n;
      int64_t j = 0;
#ifdef PLAS_AVX2
      const __m256 vb = _mm256_set1_ps(v0);
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(a + j, _mm256_fmadd_ps(vb, load8(r0 + j), _mm256_loadu_ps(a + j)));
#endif
      for (; j < n; ++j) a[j] += v0 * to_f(r0[j]);
    }
  }
}

template <typename T>
void run(const T* wt, int64_t out_f, const std::vector<int64_t>& rows, const std::vector<float>& vals,
         int64_t ntok, const float* bias, T* out, int64_t tile) {
  const int64_t nr = static_cast<int64_t>(rows.size());
  // One contiguous column chunk per thread (no reduction across threads); chunk edges on 64-byte lines.
  // Small products (tiny layers, very sparse inputs) run on the calling thread: waking the pool costs
  // more than it saves, and a descheduled worker on a busy machine stalls the whole call.
  int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  if (nr * out_f * static_cast<int64_t>(sizeof(T)) < kMinParallelBytes) nthreads = 1;
  int64_t chunk = (out_f + nthreads - 1) / nthreads;
  chunk = std::max<int64_t>(256, (chunk + 31) / 32 * 32);
  const int64_t nchunks = (out_f + chunk - 1) / chunk;
  if (tile <= 0) {
    // One token: the whole chunk (longest contiguous row segments). Several tokens: keep the
    // accumulators (ntok x tile floats) within L2.
    tile = ntok == 1 ? chunk : std::max<int64_t>(512, (131072 / ntok) / 32 * 32);
  }
  auto body = [&](int64_t cb, int64_t ce) {
    std::vector<float> accv;
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t c0 = c * chunk, c1 = std::min(out_f, c0 + chunk);
      for (int64_t j0 = c0; j0 < c1; j0 += tile) {
        const int64_t n = std::min(c1, j0 + tile) - j0;
        accv.assign(static_cast<size_t>(ntok * n), 0.f);
        float* acc = accv.data();
        accumulate<T>(wt, out_f, j0, n, rows.data(), vals.data(), nr, ntok, acc);
        for (int64_t t = 0; t < ntok; ++t) {
          T* o = out + t * out_f + j0;
          const float* a = acc + t * n;
          if (bias) {
            for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(a[j] + bias[j0 + j]);
          } else {
            for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(a[j]);
          }
        }
      }
    }
  };
  if (nchunks == 1) {
    body(0, 1);
  } else {
    at::parallel_for(0, nchunks, 1, body);
  }
}

// The threshold as the reference `x.abs() <= t` applies it: type promotion casts a 0-dim fp32/fp64 `t`
// to x's dtype (round to nearest even), so compare against that rounded value.
float threshold_in_dtype(const at::Tensor& threshold, at::ScalarType st) {
  TORCH_CHECK(threshold.numel() == 1, "sparse_gemv: threshold must hold one value, got ", threshold.sizes());
  const float t = static_cast<float>(threshold.item<double>());
  if (st == at::kBFloat16) return static_cast<float>(c10::BFloat16(t));
  if (st == at::kHalf) return static_cast<float>(c10::Half(t));
  return t;
}

at::Tensor sparse_gemv(const at::Tensor& x_in, const at::Tensor& threshold, const at::Tensor& weight_t,
                       const c10::optional<at::Tensor>& bias, int64_t tile) {
  TORCH_CHECK(x_in.dim() >= 1, "sparse_gemv: x must be [..., in]");
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.is_contiguous(),
              "sparse_gemv: weight_t must be a contiguous [in, out]");
  TORCH_CHECK(x_in.size(-1) == weight_t.size(0),
              "sparse_gemv: x has ", x_in.size(-1), " features, weight_t ", weight_t.size(0));
  TORCH_CHECK(x_in.device().is_cpu() && weight_t.device().is_cpu(), "sparse_gemv: CPU tensors only");
  const auto st = weight_t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "sparse_gemv: unsupported dtype ", st);
  TORCH_CHECK(x_in.scalar_type() == st, "sparse_gemv: x is ", x_in.scalar_type(), " but weight_t is ", st);
  const int64_t in_f = weight_t.size(0), out_f = weight_t.size(1);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = out_f;
  const at::Tensor x = x_in.reshape({-1, in_f});
  const int64_t ntok = x.size(0);
  at::Tensor out = at::empty(out_shape, weight_t.options());
  if (ntok == 0 || out_f == 0) return out;
  const float t = threshold_in_dtype(threshold, x.scalar_type());
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  // Union of the rows any token needs; a value is kept unless |x| <= t (NaN is kept, as masked_fill would).
  std::vector<int64_t> rows;
  std::vector<float> vals;
  rows.reserve(in_f);
  vals.reserve(in_f * ntok);
  if (ntok == 1) {
    for (int64_t i = 0; i < in_f; ++i) {
      if (!(std::fabs(xp[i]) <= t)) {
        rows.push_back(i);
        vals.push_back(xp[i]);
      }
    }
  } else {
    for (int64_t i = 0; i < in_f; ++i) {
      bool any = false;
      for (int64_t s = 0; s < ntok; ++s) any |= !(std::fabs(xp[s * in_f + i]) <= t);
      if (!any) continue;
      rows.push_back(i);
      for (int64_t s = 0; s < ntok; ++s) {
        const float v = xp[s * in_f + i];
        vals.push_back(std::fabs(v) <= t ? 0.f : v);
      }
    }
  }
  at::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_f, "sparse_gemv: bias has ", bias->numel(), " elements, expected ", out_f);
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  if (st == at::kFloat) {
    run<float>(weight_t.data_ptr<float>(), out_f, rows, vals, ntok, bp, out.data_ptr<float>(), tile);
  } else if (st == at::kBFloat16) {
    run<c10::BFloat16>(weight_t.data_ptr<c10::BFloat16>(), out_f, rows, vals, ntok, bp,
                       out.data_ptr<c10::BFloat16>(), tile);
  } else {
    run<c10::Half>(weight_t.data_ptr<c10::Half>(), out_f, rows, vals, ntok, bp, out.data_ptr<c10::Half>(), tile);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(pl_actsparse_ext, m) {
  m.def("sparse_gemv(Tensor x, Tensor threshold, Tensor weight_t, Tensor? bias, int tile=0) -> Tensor", &sparse_gemv);
}
"""
