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
constexpr int64_t kPf = 512;                 // prefetch distance, bytes (of 256-2048 tried, 512 was best)

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
      // Software prefetch kPf bytes ahead in the stream of kept rows, into the next group's rows near the end of
      // this one: the rows are scattered, so the hardware prefetcher would start each row cold (docs/int8.md).
      const int8_t* next[kU];
      const bool more = k + 2 * kU <= nr;
      for (int64_t u = 0; u < kU && more; ++u) next[u] = q + rows[k + kU + u] * ld + j0;
      __m256 vb[kU];
      for (int64_t u = 0; u < kU; ++u) vb[u] = _mm256_set1_ps(v[u]);
      for (; j + 16 <= n; j += 16) {
        if (j % 64 == 0) {  // one line per row: kPf bytes ahead in this group's rows, or past them in the next's
          const int64_t d = j + kPf, o = d < n ? d : d - n;
          const int8_t* const* p = d < n ? r : more ? next : nullptr;
          for (int64_t u = 0; p && u < kU; ++u) _mm_prefetch(reinterpret_cast<const char*>(p[u] + o), _MM_HINT_T0);
        }
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

// Kept rows (any token's |x| > thr(i), NaN kept), their values v = x * rs (0 where a token drops it), and per token
// A = sum v * rz and B = sum v. `thr` inlines: one value or one per channel.
template <typename Thr>
void select_rows(const float* xp, int64_t ntok, int64_t in_f, Thr thr, const float* rs, const float* rz,
                 std::vector<int64_t>& rows, std::vector<float>& vals, std::vector<float>& A, std::vector<float>& B) {
  for (int64_t i = 0; i < in_f; ++i) {
    const float t = thr(i);
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
}

// y[t, j] = cs[j] * (sum_i v[t, i] q[i, j] - A[t] - cz[j] * B[t]) + bias[j], v[t, i] = x[t, i] * rs[i] (kept).
// `threshold` is compared with fp32 |x| as it is (the caller rounds it to x's dtype); `channel_threshold`, when
// given, replaces it with one fp32 value per input (pl_actsparse.kernels.effective_threshold of a 1-D threshold).
at::Tensor int8_sparse_gemv(const at::Tensor& x, double threshold, const at::Tensor& qweight_t,
                            const c10::optional<at::Tensor>& row_scale, const c10::optional<at::Tensor>& row_zero,
                            const c10::optional<at::Tensor>& col_scale, const c10::optional<at::Tensor>& col_zero,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& channel_threshold) {
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
  const float* tp = opt_ptr(channel_threshold, in_f, "channel_threshold");
  at::Tensor out = at::empty({ntok, out_f}, x.options().dtype(at::kFloat));
  if (ntok == 0 || out_f == 0) return out;
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<int64_t> rows;
  std::vector<float> vals;
  std::vector<float> A(ntok, 0.f), B(ntok, 0.f);
  rows.reserve(in_f);
  vals.reserve(in_f * ntok);
  if (tp != nullptr) {
    select_rows(xp, ntok, in_f, [tp](int64_t i) { return tp[i]; }, rs, rz, rows, vals, A, B);
  } else {
    select_rows(xp, ntok, in_f, [t = static_cast<float>(threshold)](int64_t) { return t; }, rs, rz, rows, vals, A, B);
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
        "Tensor? col_scale, Tensor? col_zero, Tensor? bias, Tensor? channel_threshold=None) -> Tensor", &int8_sparse_gemv);
}
