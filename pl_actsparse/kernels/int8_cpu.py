"""Weight-only INT8 kernels for activation-sparse decoding on CPU.

Layout: the quantized weight is stored as ``W^T`` (``[in, out]``, contiguous, ``int8``), the layout of
:mod:`pl_actsparse.kernels.cpu`, so that skipping a zeroed input skips one contiguous row. Scales come in two
granularities, both free for the sparse kernel:

``"output"`` (per output channel, the usual weight-only INT8, as NNCF's ``compress_weights``)
    ``scale`` and ``zero_point`` have shape ``[1, out]``; ``W^T[i, j] = scale[j] * (q[i, j] - zp[j])``.
    The kernel accumulates ``acc[j] = sum_i x_i q[i, j]`` over the kept rows and applies
    ``y[j] = scale[j] * (acc[j] - zp[j] * sum_i x_i)`` once per output.
``"input"`` (per row of ``W^T``, i.e. per input channel)
    ``scale`` and ``zero_point`` have shape ``[in, 1]``; ``W^T[i, j] = scale[i] * (q[i, j] - zp[i])``.
    The kernel folds ``scale[i]`` into ``x_i`` and subtracts ``sum_i x_i scale[i] zp[i]`` once.

``zero_point`` is ``None`` or all zeros for symmetric quantization.

One custom op, :func:`int8_sparse_linear` (``torch.ops.pl_actsparse.int8_sparse_linear``), computes
``F.linear(x.masked_fill(|x| <= threshold, 0), dequantize(W^T).T, bias)`` reading only the int8 rows of the
kept inputs and dequantizing on the fly (fp32 accumulation). Two implementations, chosen like the float
kernel's (:func:`pl_actsparse.kernels.cpu.set_backend`, ``PL_ACTSPARSE_CPU_KERNEL``):

``"cpp"``
    A small C++ kernel compiled on first use (``torch.utils.cpp_extension.load_inline``, cached; the
    compiler flags are those of the float kernel). Each thread owns a block of output columns and streams
    8 kept int8 rows at a time (AVX2: int8 -> int32 -> fp32 widen + FMA).
``"torch"``
    Pure PyTorch fallback: ``index_select`` of the kept int8 rows, converted to fp32 in blocks, then a
    matmul. Correct, but slower than a dense bf16 ``F.linear`` (measured in ``docs/int8.md``).

:func:`int8_dense_linear` is the dense path (prefill, many tokens): it dequantizes ``W^T`` a block of rows
at a time and uses an fp32 GEMM.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pl_actsparse.kernels import cpu as _cpu

__all__ = [
    "Granularity",
    "QuantMode",
    "dequantize_weight_t",
    "int8_dense_linear",
    "int8_extension_status",
    "int8_masked_linear",
    "int8_sparse_linear",
    "load_int8_extension",
    "quantize_weight_t",
    "resolve_int8_backend",
]

log = logging.getLogger(__name__)

QuantMode = Literal["asym", "sym"]
Granularity = Literal["output", "input"]

# fp32 bytes of dequantized W^T materialised per step by the dense path and the torch fallback.
_BLOCK_BYTES = 8 << 20


# --------------------------------------------------------------------------------------------------
# Quantization in the kernel layout
# --------------------------------------------------------------------------------------------------


def quantize_weight_t(
    weight: Tensor, mode: QuantMode = "asym", granularity: Granularity = "output"
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Quantize a float ``weight`` (``[out, in]``, as in ``nn.Linear``) to int8 in the kernel layout.

    Returns ``(qweight_t, scale, zero_point)``: ``qweight_t`` int8 ``[in, out]`` contiguous; ``scale``
    fp32 ``[1, out]`` (``granularity="output"``) or ``[in, 1]`` (``"input"``); ``zero_point`` fp32 of the
    same shape holding integers in ``[-128, 127]`` (``mode="asym"``) or ``None`` (``"sym"``).

    ``asym``: the range ``[min(w, 0), max(w, 0)]`` maps onto ``[-128, 127]`` (zero is exact).
    ``sym``: ``scale = max|w| / 127``, codes in ``[-127, 127]``. All-zero channels get scale 1.
    """
    if mode not in ("asym", "sym"):
        raise ValueError(f"mode must be 'asym' or 'sym', got {mode!r}")
    if granularity not in ("output", "input"):
        raise ValueError(f"granularity must be 'output' or 'input', got {granularity!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    wt = weight.detach().float().t().clone(memory_format=torch.contiguous_format)  # [in, out], our own copy
    if not bool(torch.isfinite(wt).all()):
        raise ValueError("cannot quantize a weight with NaN or infinite values")
    dim = 0 if granularity == "output" else 1
    # in-place on the copy: a 1B-parameter model would otherwise allocate (and page-fault) ~10 fp32 copies
    if mode == "sym":
        amax = wt.abs().amax(dim=dim, keepdim=True)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = wt.div_(scale).round_().clamp_(-127, 127)
        zp = None
    else:
        lo = wt.amin(dim=dim, keepdim=True).clamp(max=0)
        hi = wt.amax(dim=dim, keepdim=True).clamp(min=0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.round(-128.0 - lo / scale).clamp_(-128, 127)
        q = wt.div_(scale).round_().add_(zp).clamp_(-128, 127)
    return q.to(torch.int8).contiguous(), scale.contiguous(), zp.contiguous() if zp is not None else None


def dequantize_weight_t(
    qweight_t: Tensor, scale: Tensor, zero_point: Optional[Tensor], dtype: torch.dtype = torch.float32
) -> Tensor:
    """``W^T`` (``[in, out]``) from its int8 codes: ``scale * (q - zero_point)``, computed in fp32."""
    w = qweight_t.to(torch.float32)  # a new tensor: update it in place
    if zero_point is not None:
        w.sub_(zero_point.float())
    return w.mul_(scale.float()).to(dtype)


def _check_layout(qweight_t: Tensor, scale: Tensor, zero_point: Optional[Tensor]) -> str:
    if qweight_t.dtype != torch.int8 or qweight_t.dim() != 2:
        raise ValueError(f"qweight_t must be a 2-D int8 tensor [in, out], got {qweight_t.dtype} {tuple(qweight_t.shape)}")
    in_f, out_f = qweight_t.shape
    if tuple(scale.shape) == (1, out_f) and not (in_f == 1 and out_f == 1):
        gran = "output"
    elif tuple(scale.shape) == (in_f, 1):
        gran = "input"
    else:
        raise ValueError(f"scale must have shape [1, {out_f}] or [{in_f}, 1], got {tuple(scale.shape)}")
    if zero_point is not None and zero_point.shape != scale.shape:
        raise ValueError(f"zero_point must have the shape of scale {tuple(scale.shape)}, got {tuple(zero_point.shape)}")
    return gran


def int8_masked_linear(
    x: Tensor,
    threshold: Tensor | float,
    qweight_t: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Reference semantics: dequantize, then ``F.linear(x.masked_fill(|x| <= threshold, 0), W, bias)`` in fp32."""
    w = dequantize_weight_t(qweight_t, scale, zero_point).t()
    xm = x.float().masked_fill(x.abs() <= threshold, 0)
    return F.linear(xm, w, None if bias is None else bias.float()).to(x.dtype)


def int8_dense_linear(
    x: Tensor, qweight_t: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, bias: Optional[Tensor] = None
) -> Tensor:
    """``F.linear(x, dequantize(W^T).T, bias)`` through an fp32 GEMM, dequantizing a block of rows at a time.

    The dense path for prefill; the output has ``x``'s dtype.
    """
    _check_layout(qweight_t, scale, zero_point)
    in_f, out_f = qweight_t.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f).float()
    acc = x2.new_zeros(x2.shape[0], out_f)
    if bias is not None:
        acc += bias.float()
    rows = max(16, _BLOCK_BYTES // (4 * max(out_f, 1)))
    per_row = scale.shape[0] == in_f and scale.shape[1] == 1 and not (in_f == 1 and out_f == 1)
    for i0 in range(0, in_f, rows):
        i1 = min(in_f, i0 + rows)
        s = scale[i0:i1] if per_row else scale
        z = None if zero_point is None else (zero_point[i0:i1] if per_row else zero_point)
        acc.addmm_(x2[:, i0:i1], dequantize_weight_t(qweight_t[i0:i1], s, z))
    return acc.to(x.dtype).reshape(*lead, out_f)


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch sparse fallback
# --------------------------------------------------------------------------------------------------


def _int8_sparse_torch(
    x2: Tensor, t: float, qweight_t: Tensor, scale: Tensor, zero_point: Optional[Tensor], bias: Optional[Tensor], gran: str
) -> Tensor:
    in_f, out_f = qweight_t.shape
    xf = x2.float()
    keep = ~(xf.abs() <= t)  # NaN is kept, as masked_fill(|x| <= t) keeps it
    idx = keep.any(0).nonzero().squeeze(1)  # union of the tokens' rows
    v = (xf * keep)[:, idx]  # [ntok, nr]
    if gran == "input":
        v = v * scale.view(-1)[idx].float()
    acc = xf.new_zeros(xf.shape[0], out_f)
    step = max(16, _BLOCK_BYTES // (4 * max(out_f, 1)))
    for k0 in range(0, idx.numel(), step):
        rows = qweight_t.index_select(0, idx[k0 : k0 + step]).float()
        acc.addmm_(v[:, k0 : k0 + step], rows)
    if gran == "input":
        if zero_point is not None:
            acc -= (v * zero_point.view(-1)[idx].float()).sum(1, keepdim=True)
    else:
        if zero_point is not None:
            acc -= v.sum(1, keepdim=True) * zero_point.view(1, -1).float()
        acc *= scale.view(1, -1).float()
    if bias is not None:
        acc += bias.float()
    return acc


# --------------------------------------------------------------------------------------------------
# The custom op
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pl_actsparse::int8_sparse_linear", mutates_args=())
def int8_sparse_linear(
    x: Tensor,
    threshold: Tensor,
    qweight_t: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``F.linear(x.masked_fill(|x| <= threshold, 0), dequantize(qweight_t).T, bias)`` reading only kept rows.

    ``x`` is ``[..., in]`` (fp32, bf16 or fp16), ``qweight_t`` int8 ``[in, out]`` with ``scale`` /
    ``zero_point`` as returned by :func:`quantize_weight_t`; ``threshold`` a 0-dim tensor (``-inf`` keeps
    every row: a dense int8 GEMV). Accumulates in fp32 and returns ``x``'s dtype. Several tokens read the
    union of their rows once. The threshold is rounded to ``x``'s dtype first, as the reference forward
    compares ``|x| <= t`` in that dtype.
    """
    gran = _check_layout(qweight_t, scale, zero_point)
    in_f, out_f = qweight_t.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, qweight_t has {in_f} rows")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    t = _cpu.effective_threshold(threshold, x.dtype)
    if x.device.type != "cpu":
        y = _int8_sparse_torch(x2, t, qweight_t, scale, zero_point, bias, gran)
    elif _resolve_for_call() == "cpp":
        rs = scale.reshape(-1).float().contiguous() if gran == "input" else None
        cs = scale.reshape(-1).float().contiguous() if gran == "output" else None
        zp = None if zero_point is None else zero_point.reshape(-1).float().contiguous()
        y = torch.ops.pl_actsparse_int8_ext.int8_sparse_gemv(
            x2.contiguous(),
            t,
            qweight_t.contiguous(),
            rs,
            zp if gran == "input" else None,
            cs,
            zp if gran == "output" else None,
            None if bias is None else bias.float().contiguous(),
        )
    else:
        y = _int8_sparse_torch(x2, t, qweight_t, scale, zero_point, bias, gran)
    return y.to(x.dtype).reshape(*lead, out_f)


def int8_sparse_gemv_direct(
    x2: Tensor,
    t: float,
    qweight_t: Tensor,
    row_scale: Optional[Tensor],
    row_zero: Optional[Tensor],
    col_scale: Optional[Tensor],
    col_zero: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """The C++ kernel without the custom op's checks and conversions (for modules that prepared them).

    ``x2`` is ``[tokens, in]`` on the CPU, ``t`` the threshold already rounded to ``x2``'s dtype
    (:func:`pl_actsparse.kernels.cpu.effective_threshold`), the optional vectors contiguous fp32 with
    ``row_*`` of ``in`` and ``col_*``/``bias`` of ``out`` elements. Returns fp32 ``[tokens, out]``.
    Requires :func:`load_int8_extension` to have returned ``True``.
    """
    return torch.ops.pl_actsparse_int8_ext.int8_sparse_gemv(
        x2, t, qweight_t, row_scale, row_zero, col_scale, col_zero, bias
    )


@int8_sparse_linear.register_fake
def _int8_sparse_linear_fake(x, threshold, qweight_t, scale, zero_point=None, bias=None):
    torch._check(x.shape[-1] == qweight_t.shape[0])
    return x.new_empty((*x.shape[:-1], qweight_t.shape[1]))


# --------------------------------------------------------------------------------------------------
# Optional C++ extension (build flags and cache directory shared with the float kernel)
# --------------------------------------------------------------------------------------------------

_ext_lock = threading.Lock()
_ext_loaded: Optional[bool] = None
_ext_error: Optional[str] = None
_ext_warned = False


def _ext_name() -> str:
    return _cpu._ext_name_for("pl_actsparse_int8_", _CPP_SOURCE)


def int8_extension_status() -> _cpu.ExtensionStatus:
    """Whether the int8 C++ kernel is loaded (``error`` says why not; ``None`` if not tried yet)."""
    name = _ext_name()
    return _cpu.ExtensionStatus(bool(_ext_loaded), _ext_error, name, _cpu._ext_build_dir(name))


def load_int8_extension(build: bool = True) -> bool:
    """Load the int8 C++ kernel, compiling it first if needed (once per machine and torch version).

    Returns ``False`` instead of raising when it cannot be built or loaded (or, with ``build=False``, is not
    built yet); :func:`int8_extension_status` has the reason. A failed build is not retried in the process.
    """
    global _ext_loaded, _ext_error
    if _ext_loaded is not None and (_ext_loaded or build or _ext_error != "not built yet"):
        return _ext_loaded
    with _ext_lock:
        if _ext_loaded is not None and (_ext_loaded or build or _ext_error != "not built yet"):
            return _ext_loaded
        name = _ext_name()
        build_dir = _cpu._ext_build_dir(name)
        if not build and not os.path.exists(os.path.join(build_dir, f"{name}.so")):
            _ext_loaded, _ext_error = False, "not built yet"
            return False
        try:
            _cpu._build_inline_extension(name, _CPP_SOURCE, build_dir)
            torch.ops.pl_actsparse_int8_ext.int8_sparse_gemv  # noqa: B018
        except Exception as exc:  # no compiler, no ninja, compile or load error -> torch fallback
            _ext_loaded, _ext_error = False, f"{type(exc).__name__}: {exc}".strip()[:2000]
            log.debug("pl_actsparse: int8 C++ kernel unavailable", exc_info=True)
            return False
        _ext_loaded, _ext_error = True, None
        return True


def resolve_int8_backend(build: bool = True) -> str:
    """The implementation the next int8 call uses: ``"cpp"`` or ``"torch"`` (see the module docstring)."""
    backend = _cpu.get_backend()
    if backend == "torch":
        return "torch"
    if load_int8_extension(build=build):
        return "cpp"
    if backend == "cpp":
        if not build:
            return "cpp"
        raise RuntimeError(
            "pl_actsparse: the int8 C++ CPU kernel was requested (backend='cpp') but is unavailable: "
            f"{int8_extension_status().error}"
        )
    return "torch"


def _resolve_for_call() -> str:
    global _ext_warned
    backend = resolve_int8_backend(build=True)
    if backend == "torch" and _cpu.get_backend() == "auto" and not _ext_warned:
        _ext_warned = True
        warnings.warn(
            "pl_actsparse: the int8 C++ CPU kernel is unavailable, using the slow pure-PyTorch fallback "
            f"({_ext_error}). Set PL_ACTSPARSE_CPU_KERNEL=torch to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return backend


_CPP_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PLAS_I8_AVX2 1
#endif

namespace {

constexpr int64_t kU = 8;                    // int8 rows of W^T accumulated together
constexpr int64_t kMinParallelBytes = 1 << 18;

#ifdef PLAS_I8_AVX2
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// acc[t * n + j] += sum_k vals[k * ntok + t] * q[rows[k], j0 + j]
void accumulate(const int8_t* q, int64_t ld, int64_t j0, int64_t n, const int64_t* rows,
                const float* vals, int64_t nr, int64_t ntok, float* acc) {
  int64_t k = 0;
  for (; k + kU <= nr; k += kU) {
    const int8_t* r[kU];
    for (int64_t u = 0; u < kU; ++u) r[u] = q + rows[k + u] * ld + j0;
    const float* v = vals + k * ntok;
    int64_t j = 0;
#ifdef PLAS_I8_AVX2
    if (ntok == 1) {
      __m256 vb[kU];
      for (int64_t u = 0; u < kU; ++u) vb[u] = _mm256_set1_ps(v[u]);
      for (; j + 16 <= n; j += 16) {
        __m256 s0 = _mm256_loadu_ps(acc + j);
        __m256 s1 = _mm256_loadu_ps(acc + j + 8);
        for (int64_t u = 0; u < kU; ++u) {
          s0 = _mm256_fmadd_ps(vb[u], load8(r[u] + j), s0);
          s1 = _mm256_fmadd_ps(vb[u], load8(r[u] + j + 8), s1);
        }
        _mm256_storeu_ps(acc + j, s0);
        _mm256_storeu_ps(acc + j + 8, s1);
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
      for (int64_t u = 0; u < kU; ++u) w[u] = static_cast<float>(r[u][j]);
      for (int64_t t = 0; t < ntok; ++t) {
        float s = acc[t * n + j];
        for (int64_t u = 0; u < kU; ++u) s += v[u * ntok + t] * w[u];
        acc[t * n + j] = s;
      }
    }
  }
  for (; k < nr; ++k) {
    const int8_t* r0 = q + rows[k] * ld + j0;
    for (int64_t t = 0; t < ntok; ++t) {
      const float v0 = vals[k * ntok + t];
      float* a = acc + t * n;
      int64_t j = 0;
#ifdef PLAS_I8_AVX2
      const __m256 vb = _mm256_set1_ps(v0);
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(a + j, _mm256_fmadd_ps(vb, load8(r0 + j), _mm256_loadu_ps(a + j)));
#endif
      for (; j < n; ++j) a[j] += v0 * static_cast<float>(r0[j]);
    }
  }
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n,
              "int8_sparse_gemv: ", what, " must be a contiguous fp32 tensor of ", n, " elements");
  return t->data_ptr<float>();
}

// y[t, j] = cs[j] * (sum_i v[t, i] q[i, j] - A[t] - cz[j] * B[t]) + bias[j], v[t, i] = x[t, i] * rs[i] (kept)
at::Tensor int8_sparse_gemv(const at::Tensor& x, double threshold, const at::Tensor& qweight_t,
                            const c10::optional<at::Tensor>& row_scale, const c10::optional<at::Tensor>& row_zero,
                            const c10::optional<at::Tensor>& col_scale, const c10::optional<at::Tensor>& col_zero,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "int8_sparse_gemv: x must be [tokens, in], got ", x.sizes());
  TORCH_CHECK(qweight_t.dim() == 2 && qweight_t.is_contiguous() && qweight_t.scalar_type() == at::kChar,
              "int8_sparse_gemv: qweight_t must be a contiguous int8 [in, out]");
  TORCH_CHECK(x.size(1) == qweight_t.size(0), "int8_sparse_gemv: x has ", x.size(1), " features, qweight_t ",
              qweight_t.size(0));
  TORCH_CHECK(x.device().is_cpu() && qweight_t.device().is_cpu(), "int8_sparse_gemv: CPU tensors only");
  const int64_t ntok = x.size(0), in_f = x.size(1), out_f = qweight_t.size(1);
  const float* rs = opt_ptr(row_scale, in_f, "row_scale");
  const float* rz = opt_ptr(row_zero, in_f, "row_zero");
  const float* cs = opt_ptr(col_scale, out_f, "col_scale");
  const float* cz = opt_ptr(col_zero, out_f, "col_zero");
  const float* bp = opt_ptr(bias, out_f, "bias");
  at::Tensor out = at::empty({ntok, out_f}, x.options().dtype(at::kFloat));
  if (ntok == 0 || out_f == 0) return out;
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  const float t = static_cast<float>(threshold);
  std::vector<int64_t> rows;
  std::vector<float> vals;
  std::vector<float> A(ntok, 0.f), B(ntok, 0.f);
  rows.reserve(in_f);
  vals.reserve(in_f * ntok);
  for (int64_t i = 0; i < in_f; ++i) {
    bool any = false;
    for (int64_t s = 0; s < ntok; ++s) any |= !(std::fabs(xp[s * in_f + i]) <= t);
    if (!any) continue;
    rows.push_back(i);
    const float r = rs ? rs[i] : 1.f;
    for (int64_t s = 0; s < ntok; ++s) {
      const float xv = xp[s * in_f + i];
      const float v = std::fabs(xv) <= t ? 0.f : xv * r;
      vals.push_back(v);
      B[s] += v;
      if (rz) A[s] += v * rz[i];
    }
  }
  const int64_t nr = static_cast<int64_t>(rows.size());
  float* op = out.data_ptr<float>();
  int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  if (nr * out_f < kMinParallelBytes) nthreads = 1;
  int64_t chunk = (out_f + nthreads - 1) / nthreads;
  chunk = std::max<int64_t>(256, (chunk + 63) / 64 * 64);
  const int64_t nchunks = (out_f + chunk - 1) / chunk;
  const int64_t tile = ntok == 1 ? chunk : std::max<int64_t>(512, (131072 / ntok) / 64 * 64);
  auto body = [&](int64_t cb, int64_t ce) {
    std::vector<float> accv;
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t c0 = c * chunk, c1 = std::min(out_f, c0 + chunk);
      for (int64_t j0 = c0; j0 < c1; j0 += tile) {
        const int64_t n = std::min(c1, j0 + tile) - j0;
        accv.assign(static_cast<size_t>(ntok * n), 0.f);
        float* acc = accv.data();
        accumulate(qweight_t.data_ptr<int8_t>(), out_f, j0, n, rows.data(), vals.data(), nr, ntok, acc);
        for (int64_t s = 0; s < ntok; ++s) {
          float* o = op + s * out_f + j0;
          const float* a = acc + s * n;
          for (int64_t j = 0; j < n; ++j) {
            const int64_t jj = j0 + j;
            float y = a[j] - A[s];
            if (cz) y -= cz[jj] * B[s];
            if (cs) y *= cs[jj];
            if (bp) y += bp[jj];
            o[j] = y;
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
  return out;
}

}  // namespace

TORCH_LIBRARY(pl_actsparse_int8_ext, m) {
  m.def("int8_sparse_gemv(Tensor x, float threshold, Tensor qweight_t, Tensor? row_scale, Tensor? row_zero, "
        "Tensor? col_scale, Tensor? col_zero, Tensor? bias) -> Tensor", &int8_sparse_gemv);
}
"""
