// The fp32 value a column of W is centered on before its products are formed in fp32 (the CPU fp32
// kernel sets and the CUDA kernel; x - center is formed in fp32 and the mean's remainder, mean -
// center, is taken out in fp64 at the end, so any center gives the covariance, some more precisely).
//
// Usually fp32(mean), whose 24 bits mostly make the rows' low bits irregular (not always: a column
// with a small mean can keep a variance error, which the CPU sets' fp64 variances below remove). A
// column far from zero for its spread is different: its values lie on the input type's grid near
// the mean, coarse compared with the spread, and centered on fp32(mean) every row carries the same
// fp32 remainder; the fp32 sums of such rows' products then round with a bias, which shows when
// many columns sit several sd or more off zero. Where the grid spacing at the mean is at least
// sd / 128, the center is the mean rounded to the input type instead: x - center is then a small
// multiple of that spacing, and the products and their run sums are exact or nearly so (centering
// on a grid finer than the input type's brings the bias back). docs/design/cpu-covariance.md has
// the measurements behind these rules.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace refframe {

// Significand bits of W's element type (its spacing at x is 2^(e - bits) for |x| in [2^(e-1), 2^e)).
template <typename T>
constexpr int significand_bits = std::is_same_v<T, float> ? 24 : std::is_same_v<T, c10::Half> ? 11 : 8;
// log2 of the type's smallest subnormal: the spacing of its subnormals and of its smallest normals.
template <typename T>
constexpr int min_spacing_exp = std::is_same_v<T, float> ? -149 : std::is_same_v<T, c10::Half> ? -24 : -133;

// The exponent of the finest power of two that x is a multiple of (|x| = M 2^(E - 150), M the 24-bit
// significand with its implicit bit; subnormals: E = 1), or INT_MAX for 0, Inf and NaN: the grid of
// a column's values is the smallest of these over its (sampled) values.
C10_HOST_DEVICE inline int grid_exponent(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t ex = (u >> 23) & 0xFFu, man = u & 0x7FFFFFu;
  if ((u & 0x7FFFFFFFu) == 0 || ex == 0xFFu) return 2147483647;
  const uint32_t m = ex == 0 ? man : (man | 0x800000u);
  int tz = 0;
  for (uint32_t b = m; (b & 1u) == 0u; b >>= 1) ++tz;
  return (ex == 0 ? -149 : static_cast<int>(ex) - 150) + tz;
}

// mean: the exact column mean; sq: the sum of x^2 over the column's n values (fp64).
//
// With fp64_variance (the CPU sets; CUDA passes none), for a column within 16 sd of zero that the
// rule above leaves on fp32(mean), *fp64_variance is set: the caller takes its variance from fp64
// sums (sq / n - mean^2, which loses at most 257 times fp64's rounding here). And where every value
// seen of the column is a multiple of grid (a power of two from a sample of rows) and
// grid >= sd / 64 (0/1 indicators, small integers), the center is the mean rounded to that grid:
// x - center is a short multiple of it, and products and run sums are exact or nearly so, where
// fp32(mean) gave every row the same long remainder and biased them. Continuous columns keep
// fp32(mean): centered on a short value, their squares' biased low bits would show, also in the
// products of a column with a copy of itself.
template <typename T>
C10_HOST_DEVICE inline float center_of(double mean, double sq, int64_t n, double grid = 0.0,
                                       bool* fp64_variance = nullptr) {
  if (fp64_variance != nullptr) *fp64_variance = false;
  const auto fp32_mean = static_cast<float>(mean);
  const auto coarse = static_cast<float>(static_cast<T>(fp32_mean));
  const double var = sq / static_cast<double>(n) - mean * mean;
  const double sd = std::sqrt(var > 0.0 ? var : 0.0);
  if (!std::isfinite(coarse) || !std::isfinite(sd) || coarse == 0.0f) return fp32_mean;
  int e = 0;
  std::frexp(coarse, &e);  // |coarse| = f 2^e, f in [0.5, 1)
  const int spacing_exp = e - significand_bits<T>;
  const double spacing = std::ldexp(1.0, spacing_exp > min_spacing_exp<T> ? spacing_exp : min_spacing_exp<T>);
  if (128.0 * spacing >= sd) return coarse;
  if (fp64_variance != nullptr && sd > 0.0 && std::fabs(mean) <= 16.0 * sd) {
    *fp64_variance = true;
    // grid >= sd / 64: at most 2^11 steps to the mean, so the rounded mean is exact in fp32.
    if (grid > 0.0 && 64.0 * grid >= sd) return static_cast<float>(std::floor(mean / grid + 0.5) * grid);
  }
  return fp32_mean;
}

}  // namespace refframe
