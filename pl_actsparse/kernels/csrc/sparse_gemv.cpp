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
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define PLAS_AVX512 1  // compiled for AVX-512 by function attribute, used only where the CPU has it
#define PLAS_T512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
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

// Checked at run time: the build may be shared by AVX2-only and AVX-512 machines (no -march=native).
bool has_avx512() {
#ifdef PLAS_AVX512
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

#ifdef PLAS_AVX512
template <typename T> PLAS_T512 inline __m512 load16(const T* p);
template <> PLAS_T512 inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> PLAS_T512 inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <> PLAS_T512 inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One token, AVX-512: acc[j] += sum_u v[u] * r[u][j] for the 16-wide part of [0, n); returns where it stopped.
// Prefetches `next` (the next group's rows) as the AVX2 loop does. Same speed as AVX2 on weights streamed
// from memory; 1.01-1.23x on cache-resident layers (docs/inference.md).
template <typename T>
PLAS_T512 int64_t accumulate1_avx512(const T* const* r, const T* const* next, const float* v, int64_t n, float* acc) {
  __m512 vb[kU];
  for (int64_t u = 0; u < kU; ++u) vb[u] = _mm512_set1_ps(v[u]);
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    if (next != nullptr && j % kLine == 0) {
      for (int64_t u = 0; u < kU; ++u) _mm_prefetch(reinterpret_cast<const char*>(next[u] + j), _MM_HINT_T0);
    }
    __m512 s = _mm512_loadu_ps(acc + j);
    for (int64_t u = 0; u < kU; ++u) s = _mm512_fmadd_ps(vb[u], load16(r[u] + j), s);
    _mm512_storeu_ps(acc + j, s);
  }
  return j;
}
#endif

// acc[t * n + j] += sum_k vals[k * ntok + t] * wt[rows[k], j0 + j]   for j in [0, n), t in [0, ntok)
template <typename T>
void accumulate(const T* wt, int64_t ld, int64_t j0, int64_t n, const int64_t* rows,
                const float* vals, int64_t nr, int64_t ntok, float* acc, bool avx512) {
  int64_t k = 0;
  for (; k + kU <= nr; k += kU) {
    const T* r[kU];
    for (int64_t u = 0; u < kU; ++u) r[u] = wt + rows[k + u] * ld + j0;
    const float* v = vals + k * ntok;
    int64_t j = 0;
    // One token: while reading this group of rows, prefetch the same columns of the next group (the rows
    // of kept inputs are scattered, so the hardware prefetcher would start each new row cold): 1.10-1.32x
    // on weights streamed from memory (Xeon, docs/inference.md).
    const T* next[kU];
    const bool more = ntok == 1 && k + 2 * kU <= nr;
    for (int64_t u = 0; u < kU && more; ++u) next[u] = wt + rows[k + kU + u] * ld + j0;
#ifdef PLAS_AVX512
    if (ntok == 1 && avx512) j = accumulate1_avx512<T>(r, more ? next : nullptr, v, n, acc);
#endif
#ifdef PLAS_AVX2
    if (ntok == 1) {
      __m256 vb[kU];
      for (int64_t u = 0; u < kU; ++u) vb[u] = _mm256_set1_ps(v[u]);
      constexpr int64_t kLine = 64 / sizeof(T);
      for (; j + 8 <= n; j += 8) {
        if (more && j % kLine == 0) {
          for (int64_t u = 0; u < kU; ++u) _mm_prefetch(reinterpret_cast<const char*>(next[u] + j), _MM_HINT_T0);
        }
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
         int64_t ntok, const float* bias, T* out, int64_t tile, bool avx512) {
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
        accumulate<T>(wt, out_f, j0, n, rows.data(), vals.data(), nr, ntok, acc, avx512);
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

// The threshold as the reference `x.abs() <= t` applies it. A 0-dim `t`: type promotion casts it to x's dtype
// (round to nearest even), so compare against that rounded value (`scalar`). A 1-D `t` (per channel: in_f values,
// or 1) promotes x instead: the caller passes fp32 values that fp32 |x| is compared with as they are
// (pl_actsparse.kernels.effective_threshold); `channel` points at them, or is null with one value.
struct Thresholds {
  float scalar = 0.f;
  const float* channel = nullptr;
};

Thresholds read_threshold(const at::Tensor& threshold, at::ScalarType st, int64_t in_f, const char* op) {
  if (threshold.dim() == 0) {
    const float t = static_cast<float>(threshold.item<double>());
    if (st == at::kBFloat16) return {static_cast<float>(c10::BFloat16(t)), nullptr};
    if (st == at::kHalf) return {static_cast<float>(c10::Half(t)), nullptr};
    return {t, nullptr};
  }
  TORCH_CHECK(threshold.numel() == 1 || threshold.numel() == in_f, op, ": threshold must hold 1 or ", in_f,
              " (in_features) values, got shape ", threshold.sizes());
  TORCH_CHECK(threshold.scalar_type() == at::kFloat && threshold.is_contiguous() && threshold.device().is_cpu(), op,
              ": a 1-D threshold must be a contiguous fp32 CPU tensor, got ", threshold.scalar_type());
  const float* p = threshold.data_ptr<float>();
  if (threshold.numel() == 1) return {p[0], nullptr};
  return {0.f, p};
}

// Union of the rows any token needs, and per row the tokens' values (0 where a token drops it); a value is kept
// unless |x| <= thr(i) (NaN is kept, as masked_fill would). `thr` inlines: one value or one per channel.
template <typename Thr>
void select_rows(const float* xp, int64_t ntok, int64_t in_f, Thr thr, std::vector<int64_t>& rows,
                 std::vector<float>& vals) {
  if (ntok == 1) {
    for (int64_t i = 0; i < in_f; ++i) {
      if (!(std::fabs(xp[i]) <= thr(i))) {
        rows.push_back(i);
        vals.push_back(xp[i]);
      }
    }
    return;
  }
  for (int64_t i = 0; i < in_f; ++i) {
    const float t = thr(i);
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

at::Tensor sparse_gemv(const at::Tensor& x_in, const at::Tensor& threshold, const at::Tensor& weight_t,
                       const c10::optional<at::Tensor>& bias, int64_t tile, int64_t isa) {
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
  const Thresholds th = read_threshold(threshold, st, in_f, "sparse_gemv");
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<int64_t> rows;
  std::vector<float> vals;
  rows.reserve(in_f);
  vals.reserve(in_f * ntok);
  if (th.channel != nullptr) {
    select_rows(xp, ntok, in_f, [p = th.channel](int64_t i) { return p[i]; }, rows, vals);
  } else {
    select_rows(xp, ntok, in_f, [t = th.scalar](int64_t) { return t; }, rows, vals);
  }
  at::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_f, "sparse_gemv: bias has ", bias->numel(), " elements, expected ", out_f);
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  // isa: 0 = the best this CPU has, 1 = AVX2 (or scalar) only, for comparisons
  TORCH_CHECK(isa == 0 || isa == 1, "sparse_gemv: isa must be 0 (best) or 1 (AVX2), got ", isa);
  const bool avx512 = isa == 0 && has_avx512();
  if (st == at::kFloat) {
    run<float>(weight_t.data_ptr<float>(), out_f, rows, vals, ntok, bp, out.data_ptr<float>(), tile, avx512);
  } else if (st == at::kBFloat16) {
    run<c10::BFloat16>(weight_t.data_ptr<c10::BFloat16>(), out_f, rows, vals, ntok, bp,
                       out.data_ptr<c10::BFloat16>(), tile, avx512);
  } else {
    run<c10::Half>(weight_t.data_ptr<c10::Half>(), out_f, rows, vals, ntok, bp, out.data_ptr<c10::Half>(), tile, avx512);
  }
  return out;
}

// x.masked_fill(|x| <= t, 0) in one pass, t rounded to x's dtype as the reference compares. Every float
// format here is sign-magnitude, so |x| <= t (t >= 0) is an unsigned compare of the magnitude bits: NaN
// (magnitude above +inf's) is kept, and the loop vectorizes (4-5x F.hardshrink's bf16 pass; prefill feeds
// every exported layer's input through it).
template <typename U>
void mask_bits(const U* in, U* out, int64_t n, U tbits, U magnitude) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = static_cast<U>(in[i] & magnitude) <= tbits ? U(0) : in[i];
  });
}

// Per channel (x [..., cols], fp32 thresholds compared in fp32): |x| <= t holds exactly when x's magnitude bits are
// <= those of the largest value of x's dtype that is <= t; -1 (nothing zeroed) for a negative or NaN t.
int32_t floor_bits(float t, at::ScalarType st) {
  if (!(t >= 0.f)) return -1;
  if (st == at::kFloat) {
    uint32_t b;
    std::memcpy(&b, &t, 4);
    return static_cast<int32_t>(b);
  }
  uint16_t b = st == at::kBFloat16 ? c10::BFloat16(t).x : c10::Half(t).x;  // nearest; one step down if above t
  const float back = st == at::kBFloat16 ? static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()))
                                         : static_cast<float>(c10::Half(b, c10::Half::from_bits()));
  return back > t ? b - 1 : b;
}

template <typename U>
void mask_bits_channels(const U* in, U* out, int64_t rows, int64_t cols, const int32_t* tb, U magnitude) {
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 16) / cols), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const U* x = in + r * cols;
      U* o = out + r * cols;
      for (int64_t i = 0; i < cols; ++i) o[i] = static_cast<int32_t>(x[i] & magnitude) <= tb[i] ? U(0) : x[i];
    }
  });
}

at::Tensor mask_small(const at::Tensor& x_in, const at::Tensor& threshold) {
  TORCH_CHECK(x_in.device().is_cpu(), "mask_small: CPU tensors only");
  const auto st = x_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "mask_small: unsupported dtype ", st);
  const int64_t cols = x_in.dim() == 0 ? 1 : x_in.size(-1);
  const Thresholds th = read_threshold(threshold, st, cols, "mask_small");
  const float t = th.scalar;
  if (th.channel == nullptr && !(t >= 0.f)) return x_in.clone();  // a negative or NaN threshold zeroes nothing
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  if (th.channel != nullptr) {
    if (x.numel() == 0) return out;
    std::vector<int32_t> tb(cols);
    for (int64_t i = 0; i < cols; ++i) tb[i] = floor_bits(th.channel[i], st);
    const int64_t rows = x.numel() / cols;
    if (st == at::kFloat) {
      mask_bits_channels<uint32_t>(static_cast<const uint32_t*>(x.data_ptr()), static_cast<uint32_t*>(out.data_ptr()),
                                   rows, cols, tb.data(), 0x7fffffffu);
    } else {
      mask_bits_channels<uint16_t>(static_cast<const uint16_t*>(x.data_ptr()), static_cast<uint16_t*>(out.data_ptr()),
                                   rows, cols, tb.data(), uint16_t(0x7fff));
    }
  } else if (st == at::kFloat) {  // (a 0-dim t is already in x's dtype: floor_bits is then its own bits)
    mask_bits<uint32_t>(static_cast<const uint32_t*>(x.data_ptr()), static_cast<uint32_t*>(out.data_ptr()),
                        x.numel(), static_cast<uint32_t>(floor_bits(t, st)), 0x7fffffffu);
  } else {
    mask_bits<uint16_t>(static_cast<const uint16_t*>(x.data_ptr()), static_cast<uint16_t*>(out.data_ptr()),
                        x.numel(), static_cast<uint16_t>(floor_bits(t, st)), uint16_t(0x7fff));
  }
  return out;
}

// Read every byte of `buf` once (all threads, one contiguous block each) and return a
// checksum: the machine's read bandwidth, the same way the kernel reads (benchmarks/decode.py).
double read_probe(const at::Tensor& buf) {
  TORCH_CHECK(buf.is_contiguous() && buf.device().is_cpu(), "read_probe: a contiguous CPU tensor");
  const auto* p = static_cast<const uint8_t*>(buf.data_ptr());
  const int64_t n = buf.numel() * buf.element_size() / 256;  // 256-byte blocks
  std::vector<double> part(std::max<int64_t>(1, at::get_num_threads()) * 8, 0.0);
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    int64_t x = 0;  // XOR of every 8 bytes: vectorized by the compiler, nothing else to do per byte
    const int64_t* q = reinterpret_cast<const int64_t*>(p + b * 256);
    for (int64_t i = 0; i < (e - b) * 32; ++i) x ^= q[i];
    part[at::get_thread_num() * 8] += static_cast<double>(x & 0xff);
  });
  double sum = 0;
  for (double v : part) sum += v;
  return sum;
}

}  // namespace

TORCH_LIBRARY(pl_actsparse_ext, m) {
  m.def("sparse_gemv(Tensor x, Tensor threshold, Tensor weight_t, Tensor? bias, int tile=0, int isa=0) -> Tensor",
        &sparse_gemv);
  m.def("mask_small(Tensor x, Tensor threshold) -> Tensor", &mask_small);
  m.def("has_avx512() -> bool", &has_avx512);
  m.def("read_probe(Tensor buf) -> float", &read_probe);
}
