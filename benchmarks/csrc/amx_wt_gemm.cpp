// Study kernel for benchmarks/prefill_amx_study.py (not part of the package): a bf16 AMX GEMM
// y[M, N] = x[M, K] @ Wt[K, N] that reads W^T (the exported layers' one stored layout) directly.
// AMX's B operand must hold pairs of K rows interleaved (VNNI), so each chunk of Kc rows x Np columns
// of W^T is repacked into an L2-resident buffer, then multiplied with 2x2 tiles (C 32x32 fp32).
// `mode` separates the phases to find where the time goes:
//   0 full: pack chunk, multiply chunk            1 pack only (no multiply)
//   2 multiply only (first chunk packed once)     3 tile multiplies only (no tile loads in the loop)
//   4 full + software prefetch (L2) of the next chunk while multiplying
//   5 full, the next chunk packed in slices between tile steps (double buffer)
// Modes 1-3 give wrong results by design (timing only). Shapes: M, K, N multiples of 32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdlib>
#include <vector>

#define T_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))

namespace {

bool amx_ready() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!((d >> 24) & 1) || !((d >> 22) & 1) || !__builtin_cpu_supports("avx512bw")) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ok;
}

struct alignas(64) TileCfg {
  uint8_t palette = 1, start_row = 0, reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

struct Chunk { int64_t k0, kc, n0, np; };

// Pairs [p0, p1) x 32-column segments of a chunk: unit u = (pair u / segs, segment u % segs).
// Layout: buf[segment][kstep][tile t][16 rows][32], t = 16-column half, row r = pair r of the k step.
T_AMX void pack_units(const uint16_t* B, int64_t N, const Chunk& ch, uint16_t* buf, int64_t u0, int64_t u1) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                      55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  const int64_t segs = ch.np / 32, ksteps = ch.kc / 32;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t k = 2 * (u / segs), j = (u % segs) * 32;
    const uint16_t* ra = B + (ch.k0 + k) * N + ch.n0 + j;
    const __m512i a = _mm512_loadu_si512(ra), b = _mm512_loadu_si512(ra + N);
    uint16_t* dst = buf + ((j / 32) * ksteps + k / 32) * 1024 + ((k % 32) / 2) * 32;
    _mm512_store_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_store_si512(dst + 512, _mm512_permutex2var_epi16(a, hi, b));
  }
}

T_AMX __m256i to_bf16(__m512 v) {  // round to nearest even
  __m512i i = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  i = _mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(i, 16));
}

T_AMX void run_columns(const uint16_t* A, const uint16_t* B, uint16_t* O, int64_t M, int64_t N, int64_t K,
                       int64_t c0, int64_t c1, int64_t kc_max, int64_t np_max, int mode) {
  kc_max = std::min(kc_max, K);
  np_max = std::min(np_max, c1 - c0);
  std::vector<Chunk> chunks;
  for (int64_t n0 = c0; n0 < c1; n0 += np_max)
    for (int64_t k0 = 0; k0 < K; k0 += kc_max)
      chunks.push_back({k0, std::min(kc_max, K - k0), n0, std::min(np_max, c1 - n0)});
  uint16_t* bufs[2] = {static_cast<uint16_t*>(std::aligned_alloc(64, kc_max * np_max * 2)),
                       static_cast<uint16_t*>(std::aligned_alloc(64, kc_max * np_max * 2))};
  float* acc = static_cast<float*>(std::aligned_alloc(64, M * np_max * 4));
  TileCfg cfg;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
  auto units = [](const Chunk& c) { return c.kc / 2 * (c.np / 32); };
  if (mode == 5 || mode == 2 || mode == 3) pack_units(B, N, chunks[0], bufs[0], 0, units(chunks[0]));
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const Chunk& ch = chunks[ci];
    uint16_t* buf = bufs[mode == 5 ? ci % 2 : 0];
    if (mode == 0 || mode == 1 || mode == 4) pack_units(B, N, ch, buf, 0, units(ch));
    if (mode == 1) continue;
    const bool next = ci + 1 < chunks.size();
    const Chunk nx = next ? chunks[ci + 1] : Chunk{0, 0, 0, 32};
    const int64_t ksteps = ch.kc / 32, np = ch.np;
    const int64_t steps = (M / 32) * (np / 32) * ksteps;
    const int64_t work = (mode == 4) ? nx.kc * (nx.np / 32) : (mode == 5 ? units(nx) : 0);
    const int64_t per = (work + steps - 1) / steps;
    int64_t done = 0;
    for (int64_t m = 0; m < M; m += 32) {
      const uint16_t* a0 = A + m * K + ch.k0;
      for (int64_t j = 0; j < np; j += 32) {
        float* c = acc + m * np + j;
        if (ch.k0 == 0) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }
        else {
          _tile_loadd(0, c, np * 4); _tile_loadd(1, c + 16, np * 4);
          _tile_loadd(2, c + 16 * np, np * 4); _tile_loadd(3, c + 16 * np + 16, np * 4);
        }
        const uint16_t* bp = buf + (j / 32) * ksteps * 1024;
        if (mode == 3) { _tile_loadd(4, a0, K * 2); _tile_loadd(5, a0 + 16 * K, K * 2); _tile_loadd(6, bp, 64); _tile_loadd(7, bp + 512, 64); }
        for (int64_t s = 0; s < ksteps; ++s) {
          if (mode != 3) {
            _tile_loadd(4, a0 + s * 32, K * 2);
            _tile_loadd(5, a0 + 16 * K + s * 32, K * 2);
            _tile_loadd(6, bp + s * 1024, 64);
            _tile_loadd(7, bp + s * 1024 + 512, 64);
          }
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
          if (done < work) {
            const int64_t end = std::min(work, done + per);
            if (mode == 4) {
              const int64_t segs = nx.np / 32;
              for (; done < end; ++done)
                _mm_prefetch(reinterpret_cast<const char*>(B + (nx.k0 + done / segs) * N + nx.n0 + (done % segs) * 32), _MM_HINT_T1);
            } else {
              pack_units(B, N, nx, bufs[(ci + 1) % 2], done, end);
              done = end;
            }
          }
        }
        _tile_stored(0, c, np * 4); _tile_stored(1, c + 16, np * 4);
        _tile_stored(2, c + 16 * np, np * 4); _tile_stored(3, c + 16 * np + 16, np * 4);
      }
    }
    if (mode == 5 && done < work) pack_units(B, N, nx, bufs[(ci + 1) % 2], done, work);
    if (ch.k0 + ch.kc >= K)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < np; j += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(O + m * N + ch.n0 + j), to_bf16(_mm512_load_ps(acc + m * np + j)));
  }
  _tile_release();
  std::free(bufs[0]); std::free(bufs[1]); std::free(acc);
}

}  // namespace

bool amx_available() { return amx_ready(); }

at::Tensor amx_linear_wt(at::Tensor x, at::Tensor wt, int64_t kc, int64_t np, int64_t mode) {
  TORCH_CHECK(amx_ready(), "this CPU (or kernel) does not offer AMX-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wt.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(mode >= 0 && mode <= 5, "mode 0-5");
  x = x.contiguous();
  wt = wt.contiguous();
  const int64_t K = wt.size(0), N = wt.size(1), M = x.numel() / K;
  TORCH_CHECK(K % 32 == 0 && N % 32 == 0 && M % 32 == 0 && kc % 32 == 0 && np % 32 == 0 && kc > 0 && np > 0,
              "M, K, N, kc and np must be positive multiples of 32");
  auto out = at::empty({M, N}, x.options());
  const auto* A = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* B = reinterpret_cast<const uint16_t*>(wt.data_ptr());
  auto* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t blocks = N / 32, nt = std::min<int64_t>(at::get_num_threads(), blocks);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      run_columns(A, B, O, M, N, K, blocks * t / nt * 32, blocks * (t + 1) / nt * 32, kc, np, static_cast<int>(mode));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_available", &amx_available);
  m.def("amx_linear_wt", &amx_linear_wt);
}
