// Helpers shared by the AVX-512 translation units of center_syrk (syrk_avx512.cpp,
// syrk_avx512bf16.cpp, syrk_amx.cpp). Include only from files compiled with at least
// -mavx512f/bw/vl/dq. The helpers have internal linkage on purpose: each file keeps its own copy,
// built with its own flags, so the linker can never hand one file a copy built for another file's
// wider instruction set.
#pragma once

#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace refframe::cpu {
namespace {

// The first n of 16 lanes (none for n <= 0, all for n >= 16).
inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}

// Exact conversion to fp32 of up to 16 consecutive bf16 values (a 16-bit left shift of the bits);
// masked-off lanes are neither read nor nonzero.
inline __m512 load_bf16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Round finite fp32 to the nearest bf16 (ties to even), kept as fp32 bits whose low 16 bits are zero.
inline __m512i round_bf16(__m512i u) {
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}

// x = h + m + l; each part is returned as fp32 bits with zero low halves. Both subtractions are
// exact (each remainder is at most half an ulp of the part before it).
inline void split3(__m512 x, __m512i& h, __m512i& m, __m512i& l) {
  h = round_bf16(_mm512_castps_si512(x));
  const __m512 r1 = _mm512_sub_ps(x, _mm512_castsi512_ps(h));
  m = round_bf16(_mm512_castps_si512(r1));
  const __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(m));
  l = round_bf16(_mm512_castps_si512(r2));
}

// The 32-bit words holding bf16 pairs (row 2q in the low half, row 2q + 1 in the high half), from
// both rows as rounded fp32 bits.
inline __m512i pair(__m512i even, __m512i odd) { return _mm512_or_si512(_mm512_srli_epi32(even, 16), odd); }

// acc[0..16) += double(x) lane by lane.
inline void add16_f64(double* acc, __m512 x) {
  const __m256 lo = _mm512_castps512_ps256(x);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
  _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_cvtps_pd(lo)));
  _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), _mm512_cvtps_pd(hi)));
}

}  // namespace
}  // namespace refframe::cpu
