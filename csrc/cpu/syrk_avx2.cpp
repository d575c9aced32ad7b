// AVX2/FMA/F16C building blocks of center_syrk. Only this file is compiled with -mavx2 -mfma -mf16c;
// it is called only after a run-time CPU check (see active_kernels()).
#include <immintrin.h>

#include "syrk_kernel.h"

namespace refframe::cpu {
namespace {

constexpr int64_t MR = 16;
constexpr int64_t NR = 6;

// Exact conversions to fp32 of 8 consecutive values, or of the first 6 (masked: never reads past
// them, so the last row of a matrix is safe). bf16 -> fp32 is a 16-bit left shift of the bits.
inline __m256 bf16_to_f32(__m128i raw) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m128i load6_u16(const void* p) {
  return _mm_maskload_epi32(static_cast<const int*>(p), _mm_setr_epi32(-1, -1, -1, 0));
}

struct LoadBF16 {
  using T = c10::BFloat16;
  static __m256 load8(const T* p) { return bf16_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static __m256 load6(const T* p) { return bf16_to_f32(load6_u16(p)); }
};
struct LoadF16 {
  using T = c10::Half;
  static __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static __m256 load6(const T* p) { return _mm256_cvtph_ps(load6_u16(p)); }
};
struct LoadF32 {
  using T = float;
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static __m256 load6(const T* p) {
    return _mm256_maskload_ps(p, _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0));
  }
};

// Full panels take the vector paths; a partial last panel falls back to scalar code. The 6-wide
// path stores 8 floats per row, the 2 extra being overwritten by the next row; the last row is
// stored masked, so nothing outside the panel is touched.
template <typename L>
void pack_avx2(const typename L::T* src, int64_t stride, int64_t kc, const float* mean, int64_t width,
               int64_t panel, float* dst) {
  if (width == 16 && panel == 16) {
    const __m256 m0 = _mm256_loadu_ps(mean), m1 = _mm256_loadu_ps(mean + 8);
    for (int64_t k = 0; k < kc; ++k, src += stride, dst += 16) {
      _mm256_store_ps(dst, _mm256_sub_ps(L::load8(src), m0));
      _mm256_store_ps(dst + 8, _mm256_sub_ps(L::load8(src + 8), m1));
    }
  } else if (width == 6 && panel == 6) {
    const __m256i six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    const __m256 m = _mm256_maskload_ps(mean, six);
    for (int64_t k = 0; k + 1 < kc; ++k, src += stride, dst += 6)
      _mm256_storeu_ps(dst, _mm256_sub_ps(L::load6(src), m));
    _mm256_maskstore_ps(dst, six, _mm256_sub_ps(L::load6(src), m));
  } else {
    for (int64_t k = 0; k < kc; ++k, src += stride, dst += panel) {
      for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<float>(src[c]) - mean[c];
      for (int64_t c = width; c < panel; ++c) dst[c] = 0.0f;
    }
  }
}

inline void add8_f64(double* acc, __m256 x) {
  _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), _mm256_cvtps_pd(_mm256_castps256_ps128(x))));
  _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4),
                                          _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
}

// sum += x and sq += x^2 in fp64 for 8 values (x^2 is exact in fp64 for bf16, fp16 and fp32 x).
inline void add8_moments(double* sum, double* sq, __m256 x) {
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
  _mm256_storeu_pd(sum, _mm256_add_pd(_mm256_loadu_pd(sum), lo));
  _mm256_storeu_pd(sum + 4, _mm256_add_pd(_mm256_loadu_pd(sum + 4), hi));
  _mm256_storeu_pd(sq, _mm256_fmadd_pd(lo, lo, _mm256_loadu_pd(sq)));
  _mm256_storeu_pd(sq + 4, _mm256_fmadd_pd(hi, hi, _mm256_loadu_pd(sq + 4)));
}

template <typename L>
void accumulate_avx2(const typename L::T* src, int64_t d, double* sum, double* sq) {
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) add8_moments(sum + j, sq + j, L::load8(src + j));
  for (; j < d; ++j) {
    const double x = static_cast<double>(static_cast<float>(src[j]));
    sum[j] += x;
    sq[j] += x * x;
  }
}

// 16x6 register tile: 12 ymm accumulators, 2 ymm for the A column, 1 for the broadcast B value.
// Per k: 2 loads + 6 broadcasts feed 12 FMAs, so the two FMA pipes stay busy.
// B rows are NR apart (this set packs its own B panels); a constant stride keeps the unrolled
// addressing cheaper than a stride argument would.
void micro_avx2(int64_t kc, const float* a, const float* b, double* c, const double* pf) {
  if (pf != nullptr)
    for (int64_t j = 0; j < MR * NR; j += 8) _mm_prefetch(reinterpret_cast<const char*>(pf + j), _MM_HINT_T0);
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c02 = _mm256_setzero_ps();
  __m256 c03 = _mm256_setzero_ps(), c04 = _mm256_setzero_ps(), c05 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(), c12 = _mm256_setzero_ps();
  __m256 c13 = _mm256_setzero_ps(), c14 = _mm256_setzero_ps(), c15 = _mm256_setzero_ps();
#define REFFRAME_STEP(K)                                                   \
  {                                                                        \
    const __m256 a0 = _mm256_load_ps(a + (K) * MR);                        \
    const __m256 a1 = _mm256_load_ps(a + (K) * MR + 8);                    \
    __m256 bv = _mm256_broadcast_ss(b + (K) * NR + 0);                     \
    c00 = _mm256_fmadd_ps(a0, bv, c00);                                    \
    c10 = _mm256_fmadd_ps(a1, bv, c10);                                    \
    bv = _mm256_broadcast_ss(b + (K) * NR + 1);                            \
    c01 = _mm256_fmadd_ps(a0, bv, c01);                                    \
    c11 = _mm256_fmadd_ps(a1, bv, c11);                                    \
    bv = _mm256_broadcast_ss(b + (K) * NR + 2);                            \
    c02 = _mm256_fmadd_ps(a0, bv, c02);                                    \
    c12 = _mm256_fmadd_ps(a1, bv, c12);                                    \
    bv = _mm256_broadcast_ss(b + (K) * NR + 3);                            \
    c03 = _mm256_fmadd_ps(a0, bv, c03);                                    \
    c13 = _mm256_fmadd_ps(a1, bv, c13);                                    \
    bv = _mm256_broadcast_ss(b + (K) * NR + 4);                            \
    c04 = _mm256_fmadd_ps(a0, bv, c04);                                    \
    c14 = _mm256_fmadd_ps(a1, bv, c14);                                    \
    bv = _mm256_broadcast_ss(b + (K) * NR + 5);                            \
    c05 = _mm256_fmadd_ps(a0, bv, c05);                                    \
    c15 = _mm256_fmadd_ps(a1, bv, c15);                                    \
  }
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(a + 8 * MR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(a + 10 * MR), _MM_HINT_T0);
    REFFRAME_STEP(0)
    REFFRAME_STEP(1)
    REFFRAME_STEP(2)
    REFFRAME_STEP(3)
    a += 4 * MR;
    b += 4 * NR;
  }
  for (; k < kc; ++k) {
    REFFRAME_STEP(0)
    a += MR;
    b += NR;
  }
#undef REFFRAME_STEP
  add8_f64(c + 0 * MR, c00);
  add8_f64(c + 0 * MR + 8, c10);
  add8_f64(c + 1 * MR, c01);
  add8_f64(c + 1 * MR + 8, c11);
  add8_f64(c + 2 * MR, c02);
  add8_f64(c + 2 * MR + 8, c12);
  add8_f64(c + 3 * MR, c03);
  add8_f64(c + 3 * MR + 8, c13);
  add8_f64(c + 4 * MR, c04);
  add8_f64(c + 4 * MR + 8, c14);
  add8_f64(c + 5 * MR, c05);
  add8_f64(c + 5 * MR + 8, c15);
}

}  // namespace

const KernelSet& avx2_kernels() {
  static const KernelSet set{"avx2",
                             MR,
                             NR,
                             /*kc=*/512,
                             /*mc_cols=*/128,
                             /*jb_cols=*/144,
                             /*b_in_a=*/false,
                             pack_avx2<LoadBF16>,
                             pack_avx2<LoadF16>,
                             pack_avx2<LoadF32>,
                             accumulate_avx2<LoadBF16>,
                             accumulate_avx2<LoadF16>,
                             accumulate_avx2<LoadF32>,
                             micro_avx2};
  return set;
}

}  // namespace refframe::cpu
