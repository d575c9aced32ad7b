// AVX-512 building blocks of project / radii (project_kernel.h). Only this file is compiled with
// -mavx512f/bw/vl/dq; it is used only after a run-time CPU check (active_project_kernels()). The
// avx512bf16 and amx CPU kernel sets use it too.
#include <immintrin.h>

#include <algorithm>

#include "project_kernel.h"
#include "syrk_avx512_common.h"

namespace refframe::cpu {
namespace {

constexpr int64_t MR = 6;           // rows of a tile
constexpr int64_t PANEL = 64;       // basis columns of a panel: up to 4 vectors of a tile
constexpr int64_t CHUNK = 64;       // terms of d per fp32 sum
constexpr int64_t ROWS = 192;       // rows per block: 32 tiles share each panel chunk (16 KB, L1)
constexpr int64_t DR = 4, DG = 4;   // dot: rows x basis columns of a group
constexpr int64_t DOT_LANES = 16;

// Exact conversion to fp32 of up to 16 consecutive values; masked-off lanes are neither read nor
// nonzero.
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) { return load_bf16(p, m); }
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

template <typename T>
void center_avx512(const T* src, int64_t d, const float* c, int64_t ld, float* dst) {
  int64_t l = 0;
  for (; l + 16 <= d; l += 16)
    _mm512_store_ps(dst + l, _mm512_sub_ps(load16(src + l, 0xFFFF), _mm512_loadu_ps(c + l)));
  for (; l < ld; l += 16) {
    const __mmask16 m = lanes(d - l);
    _mm512_store_ps(dst + l, _mm512_sub_ps(load16(src + l, m), _mm512_maskz_loadu_ps(m, c + l)));
  }
}

// acc[0..16) = double(x) lane by lane.
inline void store16_f64(double* acc, __m512 x) {
  _mm512_storeu_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
  _mm512_storeu_pd(acc + 8, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
}

// One tile: MR rows of t (ld apart) times NV vectors of a panel chunk v (PANEL floats per l), len
// terms. 6 x NV zmm accumulators; per l, NV loads and 6 broadcasts feed 6 NV FMAs. The fp32 sums are
// stored into (first chunk) or added to the tile's fp64 sums in acc (ldc doubles per row).
template <int NV>
void tile_run(const float* t, int64_t ld, const float* v, int64_t len, double* acc, int64_t ldc, bool first) {
  __m512 c[MR][NV];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) c[r][q] = _mm512_setzero_ps();
  for (int64_t l = 0; l < len; ++l, v += PANEL) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) b[q] = _mm512_load_ps(v + 16 * q);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(t[r * ld + l]);
#pragma GCC unroll 4
      for (int q = 0; q < NV; ++q) c[r][q] = _mm512_fmadd_ps(a, b[q], c[r][q]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) {
      if (first) store16_f64(acc + r * ldc + 16 * q, c[r][q]);
      else add16_f64(acc + r * ldc + 16 * q, c[r][q]);
    }
}

// Panel by panel; within a panel, chunks of d in l order (every fp64 sum receives its chunks in that
// order), each panel chunk (16 KB) read from L1 by all the block's tiles; the block's t (192 rows:
// 2 MB at d = 2,560) and the panel's fp64 sums (96 KB) stream from L2 / L3.
void tile_avx512(const float* t, int64_t ld, int64_t n, const float* vp, int64_t k, double* acc, float* out) {
  const int64_t panels = (k + PANEL - 1) / PANEL, ldc = panels * PANEL, tiles = (n + MR - 1) / MR;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t nv = std::min<int64_t>(PANEL / 16, (k - p * PANEL + 15) / 16);
    for (int64_t c0 = 0; c0 < ld; c0 += CHUNK) {
      const int64_t len = std::min(CHUNK, ld - c0);
      const float* v = vp + (p * ld + c0) * PANEL;
      for (int64_t i = 0; i < tiles; ++i) {
        const float* ti = t + i * MR * ld + c0;
        double* a = acc + i * MR * ldc + p * PANEL;
        switch (nv) {
          case 1: tile_run<1>(ti, ld, v, len, a, ldc, c0 == 0); break;
          case 2: tile_run<2>(ti, ld, v, len, a, ldc, c0 == 0); break;
          case 3: tile_run<3>(ti, ld, v, len, a, ldc, c0 == 0); break;
          default: tile_run<4>(ti, ld, v, len, a, ldc, c0 == 0); break;
        }
      }
    }
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < k; ++j) out[r * k + j] = static_cast<float>(acc[r * ldc + j]);
}

// DR rows of W (x[r], centered here: the same bits as center_avx512) times G rows of vt (ld floats
// apart), lanes along l: each lane sums CHUNK products in fp32, then adds them to its fp64 lane sum
// in s; the 16 lanes are added at the end. Writes the first `rows` rows of out (k floats apart).
template <typename T, int G>
void dot_group(const T* const* x, int64_t d, const float* c, const float* vt, int64_t ld, int64_t rows, double* s,
               float* out, int64_t k) {
  for (int64_t c0 = 0; c0 < d; c0 += CHUNK * DOT_LANES) {
    const int64_t c1 = std::min(d, c0 + CHUNK * DOT_LANES);
    __m512 a[DR][G];
#pragma GCC unroll 4
    for (int r = 0; r < DR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) a[r][j] = _mm512_setzero_ps();
    const auto step = [&](int64_t l, __mmask16 m) __attribute__((always_inline)) {
      __m512 v[G];
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) v[j] = _mm512_load_ps(vt + j * ld + l);
      const __m512 cl = _mm512_maskz_loadu_ps(m, c + l);
#pragma GCC unroll 4
      for (int r = 0; r < DR; ++r) {
        const __m512 xr = _mm512_sub_ps(load16(x[r] + l, m), cl);
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) a[r][j] = _mm512_fmadd_ps(xr, v[j], a[r][j]);
      }
    };
    int64_t l = c0;
    for (; l + DOT_LANES <= c1; l += DOT_LANES) step(l, 0xFFFF);
    if (l < c1) step(l, lanes(c1 - l));
#pragma GCC unroll 4
    for (int r = 0; r < DR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) {
        if (c0 == 0) store16_f64(s + (r * G + j) * 16, a[r][j]);
        else add16_f64(s + (r * G + j) * 16, a[r][j]);
      }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < G; ++j) {
      const double* sj = s + (r * G + j) * 16;
      out[r * k + j] = static_cast<float>(_mm512_reduce_add_pd(_mm512_add_pd(_mm512_loadu_pd(sj), _mm512_loadu_pd(sj + 8))));
    }
}

template <typename T>
void dot_avx512(const T* const* x, int64_t n, int64_t d, const float* c, const float* vt, int64_t ld, int64_t k,
                double* acc, float* out) {
  for (int64_t i = 0; i < n; i += DR) {
    const int64_t rows = std::min(DR, n - i);
    const T* xi[DR];
    for (int64_t r = 0; r < DR; ++r) xi[r] = x[std::min(i + r, n - 1)];
    for (int64_t j0 = 0; j0 < k; j0 += DG) {
      const float* vj = vt + j0 * ld;
      float* o = out + i * k + j0;
      switch (std::min(DG, k - j0)) {
        case 1: dot_group<T, 1>(xi, d, c, vj, ld, rows, acc, o, k); break;
        case 2: dot_group<T, 2>(xi, d, c, vj, ld, rows, acc, o, k); break;
        case 3: dot_group<T, 3>(xi, d, c, vj, ld, rows, acc, o, k); break;
        default: dot_group<T, 4>(xi, d, c, vj, ld, rows, acc, o, k); break;
      }
    }
  }
}

// Four fp64 chains (two 16-value steps per iteration), so the loop runs at the pace of its loads,
// not of the FMA latency.
template <typename T>
double sum_squares_avx512(const T* src, int64_t d, const float* c) {
  __m512d s[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
  const auto step = [&](int64_t l, __mmask16 m, int h) __attribute__((always_inline)) {
    const __m512 x = _mm512_sub_ps(load16(src + l, m), _mm512_maskz_loadu_ps(m, c + l));
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    s[2 * h] = _mm512_fmadd_pd(lo, lo, s[2 * h]);
    s[2 * h + 1] = _mm512_fmadd_pd(hi, hi, s[2 * h + 1]);
  };
  int64_t l = 0;
  for (; l + 32 <= d; l += 32) {
    step(l, 0xFFFF, 0);
    step(l + 16, 0xFFFF, 1);
  }
  for (; l < d; l += 16) step(l, lanes(d - l), 0);
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s[0], s[1]), _mm512_add_pd(s[2], s[3])));
}

}  // namespace

// dot up to k = 40: faster than the tiles there on Zen 4 (at k = 48 and 64 the two are level; a tile
// of fewer than 4 vectors leaves FMAs idle). 192-row blocks: at k = d = 2,560 the basis (26 MB)
// is read from L3 once per block, 8 % faster than with 48 rows.
const ProjectKernels& avx512_project() {
  static const ProjectKernels set{"avx512",
                                  ROWS,
                                  /*align=*/MR,
                                  PANEL,
                                  /*dot_max_k=*/40,
                                  center_avx512<c10::BFloat16>,
                                  center_avx512<c10::Half>,
                                  center_avx512<float>,
                                  tile_avx512,
                                  dot_avx512<c10::BFloat16>,
                                  dot_avx512<c10::Half>,
                                  dot_avx512<float>,
                                  /*dot_scratch=*/DR * DG * DOT_LANES,
                                  sum_squares_avx512<c10::BFloat16>,
                                  sum_squares_avx512<c10::Half>,
                                  sum_squares_avx512<float>};
  return set;
}

}  // namespace refframe::cpu
