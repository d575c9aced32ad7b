// AVX-512 building blocks of center_syrk. Only this file is compiled with -mavx512f/bw/vl/dq; it is
// called only after a run-time CPU check (see active_kernels()). Same arithmetic as the portable and
// AVX2 sets (syrk_kernel.h), on a 48 x 8 register tile whose B panels are read from the A panels.
#include <immintrin.h>

#include "syrk_avx512_common.h"
#include "syrk_kernel.h"

namespace refframe::cpu {
namespace {

constexpr int64_t MR512 = 48;
constexpr int64_t NR512 = 8;

// Exact conversions to fp32 of up to 16 consecutive values; masked-off lanes are neither read nor
// nonzero. bf16 -> fp32 is a 16-bit left shift of the bits.
struct LoadBF16 {
  using T = c10::BFloat16;
  static __m512 load(const T* p, __mmask16 m) { return load_bf16(p, m); }
};
struct LoadF16 {
  using T = c10::Half;
  static __m512 load(const T* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};
struct LoadF32 {
  using T = float;
  static __m512 load(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};

// Any width <= panel: each 16-lane group is loaded masked (lanes past the width read nothing and
// become 0 - 0 = 0) and stored masked to the panel's own columns.
template <typename L>
void pack_avx512(const typename L::T* src, int64_t stride, int64_t kc, const float* mean, int64_t width,
                 int64_t panel, float* dst) {
  if (width == 48 && panel == 48) {
    const __m512 m0 = _mm512_loadu_ps(mean), m1 = _mm512_loadu_ps(mean + 16), m2 = _mm512_loadu_ps(mean + 32);
    for (int64_t k = 0; k < kc; ++k, src += stride, dst += 48) {
      _mm512_store_ps(dst, _mm512_sub_ps(L::load(src, 0xFFFF), m0));
      _mm512_store_ps(dst + 16, _mm512_sub_ps(L::load(src + 16, 0xFFFF), m1));
      _mm512_store_ps(dst + 32, _mm512_sub_ps(L::load(src + 32, 0xFFFF), m2));
    }
    return;
  }
  for (int64_t g = 0; g < panel; g += 16) {
    const __mmask16 in = lanes(width - g < 0 ? 0 : width - g);
    const __mmask16 out = lanes(panel - g);
    const __m512 m = _mm512_maskz_loadu_ps(in, mean + g);
    const typename L::T* s = src + g;
    float* o = dst + g;
    for (int64_t k = 0; k < kc; ++k, s += stride, o += panel)
      _mm512_mask_storeu_ps(o, out, _mm512_sub_ps(L::load(s, in), m));
  }
}

// 48x8 register tile: 24 zmm accumulators, 3 for the A column, 1 for the broadcast B value.
// Per k: 3 loads + 8 broadcasts feed 24 FMAs. The lines of the next call's fp64 tile (pf) are
// prefetched one per k, so its flush does not wait on the cache.
// B rows are MR512 apart: this set reads B from its A panels.
void micro_avx512(int64_t kc, const float* a, const float* b, double* c, const double* pf) {
  __m512 c0[NR512], c1[NR512], c2[NR512];
#pragma GCC unroll 8
  for (int j = 0; j < NR512; ++j) c0[j] = c1[j] = c2[j] = _mm512_setzero_ps();
  const auto step = [&](int64_t k) __attribute__((always_inline)) {
    const __m512 a0 = _mm512_load_ps(a + k * MR512), a1 = _mm512_load_ps(a + k * MR512 + 16);
    const __m512 a2 = _mm512_load_ps(a + k * MR512 + 32);
#pragma GCC unroll 8
    for (int j = 0; j < NR512; ++j) {
      const __m512 bv = _mm512_set1_ps(b[k * MR512 + j]);
      c0[j] = _mm512_fmadd_ps(a0, bv, c0[j]);
      c1[j] = _mm512_fmadd_ps(a1, bv, c1[j]);
      c2[j] = _mm512_fmadd_ps(a2, bv, c2[j]);
    }
  };
  int64_t k = 0;
  if (pf != nullptr) {
    constexpr int64_t lines = MR512 * NR512 / 8;
    for (; k < kc && k < lines; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + 8 * k), _MM_HINT_T0);
      step(k);
    }
  }
  for (; k < kc; ++k) step(k);
#pragma GCC unroll 8
  for (int j = 0; j < NR512; ++j) {
    add16_f64(c + j * MR512, c0[j]);
    add16_f64(c + j * MR512 + 16, c1[j]);
    add16_f64(c + j * MR512 + 32, c2[j]);
  }
}

}  // namespace

const KernelSet& avx512_kernels() {
  // 128-row blocks (1.3 MB of packs per block at d = 2560: they stay in a 2 MB L2), large work
  // items, no separate B panels: the tuning is in docs/design/cpu-covariance.md. The mean pass is
  // memory-bound: it uses the AVX2 set's column sums (every AVX-512 CPU here has AVX2).
  const KernelSet& avx2 = avx2_kernels();
  static const KernelSet set{"avx512",
                             MR512,
                             NR512,
                             /*kc=*/128,
                             /*mc_cols=*/768,
                             /*jb_cols=*/864,
                             /*b_in_a=*/true,
                             pack_avx512<LoadBF16>,
                             pack_avx512<LoadF16>,
                             pack_avx512<LoadF32>,
                             avx2.accumulate_bf16,
                             avx2.accumulate_f16,
                             avx2.accumulate_f32,
                             micro_avx512};
  return set;
}

}  // namespace refframe::cpu
