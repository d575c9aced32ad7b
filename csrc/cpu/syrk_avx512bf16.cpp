// AVX512_BF16 building blocks of center_syrk, for bf16 W (AMD Zen 4 and later, Intel Cooper Lake and
// later). Only this file is compiled with -mavx512bf16; it is used only after a run-time CPU check.
//
// The product of two bf16 numbers is exact in fp32, and vdpbf16ps adds two such products into each
// fp32 lane per instruction: twice the multiply-adds per cycle of an fp32 FMA. bf16 W can be
// multiplied this way without losing anything, as long as the numbers multiplied are still bf16:
//  - each column j is scaled by a power of two, 2^-e_j, from its largest |x| (exact; products then
//    neither underflow nor overflow);
//  - a column whose mean is small against its spread (|mean| <= 3 sd / 4) is not centered: its
//    values stay bf16, and the mean is taken out in fp64 at the end. Its products with other such
//    columns then have a mean of their own, so their fp32 run sums drift; where that matters, every
//    16 pairs of rows one more step adds the exact products -32 mb_i mb_j (mb: the mean on a
//    coarse bf16 grid) and the driver takes them out in fp64 (plan_exact_columns in
//    center_syrk.cpp has the rule, docs/design/cpu-covariance.md the measurements);
//  - a column whose mean is larger is centered on its scaled mean rounded to bf16, t = x 2^-e -
//    shift, exact in fp32, and t is split into two bf16 parts that hold it exactly, t = h + m (the
//    rounding error of a bf16 sum is a bf16 number). h stays in the column, m becomes an extra
//    column of the matrix multiplied, so the extended product holds every partial product h h',
//    h m', m h', m m', and the driver adds them in fp64.
// The diagonal is not taken from the products: the squares of bf16 numbers have biased low bits
// (squares modulo 2^k take only some values), so their fp32 sums round low
// (docs/design/cpu-covariance.md). It comes from fp64 sums of t^2 instead: for an uncentered
// column t is x scaled, so pass 1's sum of x^2 serves; the packs add t^2 of centered columns as
// they convert.
// The driver (center_syrk.cpp) takes the fp32 avx512 set instead when W is not bf16, or when there
// would be more than d / 4 extra columns (they would cost more than the doubled rate gains).
//
// The fp32 sums of 256 rows (128 vdpbf16ps, 136 with the drift-cancelling steps) are added into
// fp64 as in the other sets, so the result is bitwise the same for any thread count; it is not the
// fp32 sets' bits (different products, different sums).
// Note that vdpbf16ps treats bf16 subnormal inputs and fp32 subnormal results as zero; after the
// scaling those are below 2^-126 of a column's largest value.
//
// Micro-tile: 48 x 8 like the avx512 set, B read from the A panels; per pair of rows 3 loads and 8
// broadcasts of 32-bit pairs feed 24 vdpbf16ps.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "syrk_avx512_common.h"
#include "syrk_kernel.h"

namespace refframe::cpu {
namespace {

constexpr int64_t MRB = 48;
constexpr int64_t NRB = 8;

inline __m512 transform(__m512 x, __m512 scale, __m512 shift) { return _mm512_sub_ps(_mm512_mul_ps(x, scale), shift); }

// Columns [0, width) of rows [0, rows), 64 columns at a time with their sums held in registers;
// every column is still summed in row order, so the sums have the bits of a row-by-row pass.
void moments_bf16(const c10::BFloat16* src, int64_t stride, int64_t rows, int64_t width, double* sum, double* sq,
                  float* amax) {
  constexpr int G = 4;  // groups of 16 columns
  for (int64_t j = 0; j < width; j += 16 * G) {
    __mmask16 m[G];
    __mmask8 lo_m[G], hi_m[G];
    __m512d s[2 * G], q[2 * G];
    __m512 a[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const int64_t c = j + 16 * g;
      m[g] = lanes(width - c);
      lo_m[g] = static_cast<__mmask8>(m[g] & 0xFF);
      hi_m[g] = static_cast<__mmask8>(m[g] >> 8);
      s[2 * g] = _mm512_maskz_loadu_pd(lo_m[g], sum + c);
      s[2 * g + 1] = _mm512_maskz_loadu_pd(hi_m[g], sum + c + 8);
      q[2 * g] = _mm512_maskz_loadu_pd(lo_m[g], sq + c);
      q[2 * g + 1] = _mm512_maskz_loadu_pd(hi_m[g], sq + c + 8);
      a[g] = _mm512_maskz_loadu_ps(m[g], amax + c);
    }
    const c10::BFloat16* p = src + j;
    // The hardware does not foresee this walk down 128-byte pieces of rows: each row's next 64
    // columns are asked for while these are summed (the last columns ask for the first ones of the
    // rows after these). Without it the pass ran at 4 GB/s per core; prefetches never fault.
    constexpr auto E = static_cast<int64_t>(sizeof(c10::BFloat16));
    const uintptr_t next = reinterpret_cast<uintptr_t>(src) +
                           static_cast<uintptr_t>(j + 16 * G < width ? (j + 16 * G) * E : rows * stride * E);
    for (int64_t r = 0; r < rows; ++r, p += stride) {
      const uintptr_t f = next + static_cast<uintptr_t>(r * stride * E);
      _mm_prefetch(reinterpret_cast<const char*>(f), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(f + 64), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m512 x = load_bf16(p + 16 * g, m[g]);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
        s[2 * g] = _mm512_add_pd(s[2 * g], lo);
        s[2 * g + 1] = _mm512_add_pd(s[2 * g + 1], hi);
        q[2 * g] = _mm512_fmadd_pd(lo, lo, q[2 * g]);
        q[2 * g + 1] = _mm512_fmadd_pd(hi, hi, q[2 * g + 1]);
        a[g] = _mm512_max_ps(a[g], _mm512_abs_ps(x));
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const int64_t c = j + 16 * g;
      _mm512_mask_storeu_pd(sum + c, lo_m[g], s[2 * g]);
      _mm512_mask_storeu_pd(sum + c + 8, hi_m[g], s[2 * g + 1]);
      _mm512_mask_storeu_pd(sq + c, lo_m[g], q[2 * g]);
      _mm512_mask_storeu_pd(sq + c + 8, hi_m[g], q[2 * g + 1]);
      _mm512_mask_storeu_ps(amax + c, m[g], a[g]);
    }
  }
}

// sq[c] += t^2 in fp64 over the rows, for the lanes of in.
inline void add_squares(__m512 t, __m512d& lo, __m512d& hi) {
  const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(t));
  const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
  lo = _mm512_fmadd_pd(a, a, lo);
  hi = _mm512_fmadd_pd(b, b, hi);
}

template <bool Squares>
void pack_group(const c10::BFloat16* src, int64_t stride, int64_t kc, __m512 sc, __m512 sh, __mmask16 in,
                __mmask16 out, int64_t panel, uint32_t* o, __m512d& lo, __m512d& hi) {
  int64_t k = 0;
  for (; k + 1 < kc; k += 2, o += panel) {
    const c10::BFloat16* s = src + k * stride;
    const __m512 t0 = transform(load_bf16(s, in), sc, sh), t1 = transform(load_bf16(s + stride, in), sc, sh);
    if (Squares) {
      add_squares(t0, lo, hi);
      add_squares(t1, lo, hi);
    }
    _mm512_mask_storeu_epi32(o, out, pair(round_bf16(_mm512_castps_si512(t0)), round_bf16(_mm512_castps_si512(t1))));
  }
  if (k < kc) {
    const __m512 t0 = transform(load_bf16(src + k * stride, in), sc, sh);
    if (Squares) add_squares(t0, lo, hi);
    _mm512_mask_storeu_epi32(o, out, pair(round_bf16(_mm512_castps_si512(t0)), _mm512_setzero_si512()));
  }
}

void pack_bf16(const c10::BFloat16* src, int64_t stride, int64_t kc, const float* scale, const float* shift,
               int64_t width, int64_t panel, void* dst_v, double* sq) {
  auto* dst = static_cast<uint32_t*>(dst_v);
  for (int64_t g = 0; g < panel; g += 16) {
    const __mmask16 in = lanes(width - g), out = lanes(panel - g);
    const __m512 sc = _mm512_maskz_loadu_ps(in, scale + g), sh = _mm512_maskz_loadu_ps(in, shift + g);
    // Only centered columns (shift != 0) need their squares summed here.
    const __mmask16 centered = _mm512_mask_cmpneq_ps_mask(in, sh, _mm512_setzero_ps());
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    if (centered == 0) {
      pack_group<false>(src + g, stride, kc, sc, sh, in, out, panel, dst + g, lo, hi);
      continue;
    }
    pack_group<true>(src + g, stride, kc, sc, sh, in, out, panel, dst + g, lo, hi);
    const __mmask8 c_lo = static_cast<__mmask8>(centered & 0xFF), c_hi = static_cast<__mmask8>(centered >> 8);
    _mm512_mask_storeu_pd(sq + g, c_lo, _mm512_add_pd(_mm512_maskz_loadu_pd(c_lo, sq + g), lo));
    _mm512_mask_storeu_pd(sq + g + 8, c_hi, _mm512_add_pd(_mm512_maskz_loadu_pd(c_hi, sq + g + 8), hi));
  }
}

// Part parts[c] (0: h = bf16(t), 1: bf16(t - h)) of each lane's t, t as in pack_bf16.
inline __m512i part_of(__m512 t, __m512i parts) {
  const __m512i h = round_bf16(_mm512_castps_si512(t));
  const __m512i m = round_bf16(_mm512_castps_si512(_mm512_sub_ps(t, _mm512_castsi512_ps(h))));
  return _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(parts, _mm512_set1_epi32(1)), h, m);
}

void pack_parts_bf16(const c10::BFloat16* row0, int64_t stride, int64_t kc, const int32_t* cols,
                     const int32_t* parts, const float* scale, const float* shift, int64_t width, int64_t panel,
                     void* dst_v, double* sq) {
  auto* dst = static_cast<uint32_t*>(dst_v);
  const auto* base = reinterpret_cast<const uint16_t*>(row0);
  for (int64_t g = 0; g < panel; g += 16) {
    const __mmask16 in = lanes(width - g), out = lanes(panel - g);
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, width - g));
    alignas(64) float sc_a[16] = {}, sh_a[16] = {};
    alignas(64) int32_t ix[16] = {};
    for (int64_t c = 0; c < n; ++c) {
      ix[c] = cols[g + c];
      sc_a[c] = scale[ix[c]];
      sh_a[c] = shift[ix[c]];
    }
    const __m512 sc = _mm512_load_ps(sc_a), sh = _mm512_load_ps(sh_a);
    const __m512i pt = _mm512_maskz_loadu_epi32(in, parts + g);
    uint32_t* o = dst + g;
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    for (int64_t k = 0; k < kc; k += 2, o += panel) {
      __m512i w[2];
      for (int e = 0; e < 2; ++e) {
        if (k + e >= kc) {
          w[e] = _mm512_setzero_si512();
          continue;
        }
        alignas(64) uint32_t raw[16];
        const uint16_t* r = base + (k + e) * stride;
        for (int64_t c = 0; c < 16; ++c) raw[c] = c < n ? static_cast<uint32_t>(r[ix[c]]) << 16 : 0u;
        const __m512 t = transform(_mm512_castsi512_ps(_mm512_load_si512(raw)), sc, sh);
        add_squares(t, lo, hi);
        w[e] = part_of(t, pt);
      }
      _mm512_mask_storeu_epi32(o, out, pair(w[0], w[1]));
    }
    alignas(64) double q[16];
    _mm512_store_pd(q, lo);
    _mm512_store_pd(q + 8, hi);
    for (int64_t c = 0; c < n; ++c)
      if (parts[g + c] == 0 && sh_a[c] != 0.0f) sq[ix[c]] += q[c];
  }
}

inline __m512bh as_bh(__m512i x) {
  __m512bh r;
  std::memcpy(&r, &x, sizeof r);
  return r;
}

// c[col * 48 + row] += double(fp32 sum over the kc rows (pairs of rows, the last one zero-padded) of
// the products); a and b are pair words, B rows 48 words apart. pf as in the other sets. With Shift,
// after every SHIFT_PAIRS pairs one more step multiplies the words pa[0..48) by pb[0..8): the
// drift-cancelling term of ExactBf16::micro_shift.
constexpr int64_t SHIFT_PAIRS = 16;

template <bool Shift>
void micro_bf16(int64_t kc, const float* a_f, const float* b_f, double* c, const double* pf, const uint32_t* pa,
                const uint32_t* pb) {
  const auto* a = reinterpret_cast<const __m512i*>(a_f);
  const auto* b = reinterpret_cast<const int32_t*>(b_f);
  __m512 c0[NRB], c1[NRB], c2[NRB];
#pragma GCC unroll 8
  for (int j = 0; j < NRB; ++j) c0[j] = c1[j] = c2[j] = _mm512_setzero_ps();
  const auto step = [&](const __m512i* av, const int32_t* bv_p) __attribute__((always_inline)) {
    const __m512bh a0 = as_bh(_mm512_loadu_si512(av)), a1 = as_bh(_mm512_loadu_si512(av + 1));
    const __m512bh a2 = as_bh(_mm512_loadu_si512(av + 2));
#pragma GCC unroll 8
    for (int j = 0; j < NRB; ++j) {
      const __m512bh bv = as_bh(_mm512_set1_epi32(bv_p[j]));
      c0[j] = _mm512_dpbf16_ps(c0[j], a0, bv);
      c1[j] = _mm512_dpbf16_ps(c1[j], a1, bv);
      c2[j] = _mm512_dpbf16_ps(c2[j], a2, bv);
    }
  };
  const auto pair_step = [&](int64_t q) __attribute__((always_inline)) { step(a + 3 * q, b + q * MRB); };
  const auto* sa = reinterpret_cast<const __m512i*>(pa);
  const auto* sb = reinterpret_cast<const int32_t*>(pb);
  const int64_t pairs = (kc + 1) / 2;
  int64_t q = 0;
  if (pf != nullptr) {
    constexpr int64_t lines = MRB * NRB / 8;
    for (; q < pairs && q < lines; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + 8 * q), _MM_HINT_T0);
      pair_step(q);
      if (Shift && (q + 1) % SHIFT_PAIRS == 0) step(sa, sb);
    }
  }
  if (Shift) {
    // Whole groups of SHIFT_PAIRS (the prefetching loop stops at a group's end), then the rest.
    static_assert(MRB * NRB / 8 % SHIFT_PAIRS == 0, "the prefetching loop must end a group");
    for (; q + SHIFT_PAIRS <= pairs; q += SHIFT_PAIRS) {
      for (int64_t g = 0; g < SHIFT_PAIRS; ++g) pair_step(q + g);
      step(sa, sb);
    }
  }
  for (; q < pairs; ++q) pair_step(q);
#pragma GCC unroll 8
  for (int j = 0; j < NRB; ++j) {
    add16_f64(c + j * MRB, c0[j]);
    add16_f64(c + j * MRB + 16, c1[j]);
    add16_f64(c + j * MRB + 32, c2[j]);
  }
}

void micro_plain(int64_t kc, const float* a, const float* b, double* c, const double* pf) {
  micro_bf16<false>(kc, a, b, c, pf, nullptr, nullptr);
}

void micro_shifted(int64_t kc, const float* a, const float* b, double* c, const double* pf, const uint32_t* pa,
                   const uint32_t* pb) {
  micro_bf16<true>(kc, a, b, c, pf, pa, pb);
}

const ExactBf16 exact_ops{moments_bf16, pack_bf16, pack_parts_bf16, micro_shifted, SHIFT_PAIRS, avx512_kernels};

}  // namespace

const KernelSet& avx512bf16_kernels() {
  static const KernelSet set = [] {
    KernelSet s = avx512_kernels();  // its block and work-item sizes
    s.name = "avx512bf16";
    // No fp32 building blocks: W that is not bf16 goes to the fallback, which brings its own.
    s.pack_bf16 = nullptr;
    s.pack_f16 = nullptr;
    s.pack_f32 = nullptr;
    s.accumulate_bf16 = nullptr;
    s.accumulate_f16 = nullptr;
    s.accumulate_f32 = nullptr;
    s.mr = MRB;
    s.nr = NRB;
    s.kc = 256;
    s.b_in_a = true;
    s.micro = micro_plain;
    s.run = 256;  // half the fp64 additions of 128, at about the same error (docs/design/cpu-covariance.md)
    s.kalign = 2;
    s.pack_bytes = 2;
    s.b_col_bytes = 4;
    s.exact = &exact_ops;
    return s;
  }();
  return set;
}

}  // namespace refframe::cpu
