// AVX2/FMA/F16C building blocks of project / radii (project_kernel.h). Only this file is compiled
// with -mavx2 -mfma -mf16c; it is used only after a run-time CPU check (active_project_kernels()).
#include <immintrin.h>

#include <algorithm>

#include "project_kernel.h"

namespace refframe::cpu {
namespace {

constexpr int64_t MR = 6;           // rows of a tile
constexpr int64_t PANEL = 16;       // basis columns of a panel: 2 vectors
constexpr int64_t CHUNK = 64;       // terms of d per fp32 sum
constexpr int64_t ROWS = 192;       // rows per block: 32 tiles share each panel chunk (4 KB)
constexpr int64_t DR = 4, DG = 2;   // dot: rows x basis columns of a group
constexpr int64_t DOT_LANES = 8;

// Exact conversions to fp32 of 8 consecutive values (bf16 -> fp32 is a 16-bit left shift).
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

template <typename T>
void center_avx2(const T* src, int64_t d, const float* c, int64_t ld, float* dst) {
  int64_t l = 0;
  for (; l + 8 <= d; l += 8) _mm256_store_ps(dst + l, _mm256_sub_ps(load8(src + l), _mm256_loadu_ps(c + l)));
  for (; l < d; ++l) dst[l] = static_cast<float>(src[l]) - c[l];
  for (; l < ld; ++l) dst[l] = 0.0f;
}

// acc[0..8) = / += double(x) lane by lane.
inline void store8_f64(double* acc, __m256 x) {
  _mm256_storeu_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
  _mm256_storeu_pd(acc + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
}
inline void add8_f64(double* acc, __m256 x) {
  _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), _mm256_cvtps_pd(_mm256_castps256_ps128(x))));
  _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
}

// One tile: MR rows of t times NV vectors of a panel chunk (PANEL floats per l), len terms;
// 6 x NV ymm accumulators, stored into (first chunk) or added to the fp64 sums in acc.
template <int NV>
void tile_run(const float* t, int64_t ld, const float* v, int64_t len, double* acc, int64_t ldc, bool first) {
  __m256 c[MR][NV];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < NV; ++q) c[r][q] = _mm256_setzero_ps();
  for (int64_t l = 0; l < len; ++l, v += PANEL) {
    __m256 b[NV];
#pragma GCC unroll 2
    for (int q = 0; q < NV; ++q) b[q] = _mm256_load_ps(v + 8 * q);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(t + r * ld + l);
#pragma GCC unroll 2
      for (int q = 0; q < NV; ++q) c[r][q] = _mm256_fmadd_ps(a, b[q], c[r][q]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < NV; ++q) {
      if (first) store8_f64(acc + r * ldc + 8 * q, c[r][q]);
      else add8_f64(acc + r * ldc + 8 * q, c[r][q]);
    }
}

// Panel by panel, chunks of d in l order within a panel (as tile_avx512).
void tile_avx2(const float* t, int64_t ld, int64_t n, const float* vp, int64_t k, double* acc, float* out) {
  const int64_t panels = (k + PANEL - 1) / PANEL, ldc = panels * PANEL, tiles = (n + MR - 1) / MR;
  for (int64_t p = 0; p < panels; ++p) {
    const bool one = k - p * PANEL <= 8;
    for (int64_t c0 = 0; c0 < ld; c0 += CHUNK) {
      const int64_t len = std::min(CHUNK, ld - c0);
      const float* v = vp + (p * ld + c0) * PANEL;
      for (int64_t i = 0; i < tiles; ++i) {
        const float* ti = t + i * MR * ld + c0;
        double* a = acc + i * MR * ldc + p * PANEL;
        if (one) tile_run<1>(ti, ld, v, len, a, ldc, c0 == 0);
        else tile_run<2>(ti, ld, v, len, a, ldc, c0 == 0);
      }
    }
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < k; ++j) out[r * k + j] = static_cast<float>(acc[r * ldc + j]);
}

inline double sum8(const double* s) {
  const __m256d v = _mm256_add_pd(_mm256_loadu_pd(s), _mm256_loadu_pd(s + 4));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

// 8 values of row x from l, centered (as center_avx2 does it); those past d are 0.
template <typename T>
inline __m256 centered8(const T* x, const float* c, int64_t l, int64_t d) {
  if (l + 8 <= d) return _mm256_sub_ps(load8(x + l), _mm256_loadu_ps(c + l));
  alignas(32) float t[8];
  for (int64_t q = 0; q < 8; ++q) t[q] = l + q < d ? static_cast<float>(x[l + q]) - c[l + q] : 0.0f;
  return _mm256_load_ps(t);
}

// DR rows of W (x[r], centered here) times G rows of vt, lanes along l, each lane summing CHUNK
// products in fp32 before they go into its fp64 lane sum in s; the 8 lanes are added at the end.
template <typename T, int G>
void dot_group(const T* const* x, int64_t d, const float* c, const float* vt, int64_t ld, int64_t rows, double* s,
               float* out, int64_t k) {
  for (int64_t c0 = 0; c0 < d; c0 += CHUNK * DOT_LANES) {
    const int64_t c1 = std::min(d, c0 + CHUNK * DOT_LANES);
    __m256 a[DR][G];
#pragma GCC unroll 4
    for (int r = 0; r < DR; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < G; ++j) a[r][j] = _mm256_setzero_ps();
    for (int64_t l = c0; l < c1; l += DOT_LANES) {
      __m256 v[G];
#pragma GCC unroll 2
      for (int j = 0; j < G; ++j) v[j] = _mm256_load_ps(vt + j * ld + l);
#pragma GCC unroll 4
      for (int r = 0; r < DR; ++r) {
        const __m256 xr = centered8(x[r], c, l, d);
#pragma GCC unroll 2
        for (int j = 0; j < G; ++j) a[r][j] = _mm256_fmadd_ps(xr, v[j], a[r][j]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < DR; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < G; ++j) {
        if (c0 == 0) store8_f64(s + (r * G + j) * 8, a[r][j]);
        else add8_f64(s + (r * G + j) * 8, a[r][j]);
      }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < G; ++j) out[r * k + j] = static_cast<float>(sum8(s + (r * G + j) * 8));
}

template <typename T>
void dot_avx2(const T* const* x, int64_t n, int64_t d, const float* c, const float* vt, int64_t ld, int64_t k,
              double* acc, float* out) {
  for (int64_t i = 0; i < n; i += DR) {
    const int64_t rows = std::min(DR, n - i);
    const T* xi[DR];
    for (int64_t r = 0; r < DR; ++r) xi[r] = x[std::min(i + r, n - 1)];
    for (int64_t j0 = 0; j0 < k; j0 += DG) {
      if (k - j0 == 1) dot_group<T, 1>(xi, d, c, vt + j0 * ld, ld, rows, acc, out + i * k + j0, k);
      else dot_group<T, 2>(xi, d, c, vt + j0 * ld, ld, rows, acc, out + i * k + j0, k);
    }
  }
}

// Four fp64 chains (16 values per iteration); the last d % 16 values in a scalar fp64 sum.
template <typename T>
double sum_squares_avx2(const T* src, int64_t d, const float* c) {
  __m256d s[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t l = 0;
  for (; l + 16 <= d; l += 16)
    for (int h = 0; h < 2; ++h) {
      const __m256 x = _mm256_sub_ps(load8(src + l + 8 * h), _mm256_loadu_ps(c + l + 8 * h));
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      s[2 * h] = _mm256_fmadd_pd(lo, lo, s[2 * h]);
      s[2 * h + 1] = _mm256_fmadd_pd(hi, hi, s[2 * h + 1]);
    }
  double tail = 0.0;
  for (; l < d; ++l) {
    const double x = static_cast<double>(static_cast<float>(src[l]) - c[l]);
    tail += x * x;
  }
  alignas(32) double lanes[8];
  _mm256_store_pd(lanes, _mm256_add_pd(s[0], s[2]));
  _mm256_store_pd(lanes + 4, _mm256_add_pd(s[1], s[3]));
  return sum8(lanes) + tail;
}

}  // namespace

// dot up to k = 8: faster than the tiles there (measured with this set on Zen 4).
const ProjectKernels& avx2_project() {
  static const ProjectKernels set{"avx2",
                                  ROWS,
                                  /*align=*/MR,
                                  PANEL,
                                  /*dot_max_k=*/8,
                                  center_avx2<c10::BFloat16>,
                                  center_avx2<c10::Half>,
                                  center_avx2<float>,
                                  tile_avx2,
                                  dot_avx2<c10::BFloat16>,
                                  dot_avx2<c10::Half>,
                                  dot_avx2<float>,
                                  /*dot_scratch=*/DR * DG * DOT_LANES,
                                  sum_squares_avx2<c10::BFloat16>,
                                  sum_squares_avx2<c10::Half>,
                                  sum_squares_avx2<float>};
  return set;
}

}  // namespace refframe::cpu
