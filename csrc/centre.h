// The fp32 value a column of W is centred on before its products are formed in fp32 (the CPU fp32
// kernel sets and the CUDA kernel; x - centre is formed in fp32 and the mean's remainder, mean -
// centre, is taken out in fp64 at the end, so any centre gives the covariance, some more precisely).
//
// On CUDA usually fp32(mean), whose 24 bits mostly make the rows' low bits irregular (not always:
// one randn bf16 column with a mean of -1.22e-4 kept a 4.3e-7 variance error); the CPU sets use the
// sd grid described further down instead, with fp64 variances. A column far from zero
// for its spread is different: its values lie on the input type's grid near the mean, coarse compared
// with the spread, and centred on fp32(mean) every row carries the same fp32 remainder; the fp32
// sums of such rows' products then round with a bias, 2-8e-7 of the covariance when many columns
// sit 5-300 sd off zero (a few such columns do not show). Where the grid spacing at the mean is at
// least sd / 128, the centre is the mean rounded to the input type instead: x - centre is then a
// small multiple of that spacing, and the products and their run sums are exact or nearly so (4-6e-8
// in the same tests; centring on a grid finer than the input type's brings the bias back).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace refframe {

// Significand bits of W's element type (its spacing at x is 2^(e - bits) for |x| in [2^(e-1), 2^e)).
template <typename T>
constexpr int significand_bits = std::is_same_v<T, float> ? 24 : std::is_same_v<T, c10::Half> ? 11 : 8;
// log2 of the type's smallest subnormal: the spacing of its subnormals and of its smallest normals.
template <typename T>
constexpr int min_spacing_exp = std::is_same_v<T, float> ? -149 : std::is_same_v<T, c10::Half> ? -24 : -133;

// mean: the exact column mean; sq: the sum of x^2 over the column's n values (fp64).
//
// With sd_grid (the CPU sets), a column within 16 sd of zero that the rule above leaves on
// fp32(mean) is centred on its mean rounded to a grid of sd / 128 to sd / 64 instead, and
// *on_sd_grid is set: its x - centre then carry only the values' own low bits, with no remainder
// shared by every row. Values on a coarse grid of their own (0/1 indicators, small integers) give
// short x - centre and exact products and run sums, where fp32(mean) biased them (6.8-8.5e-7 for
// 0/1 columns, 1.1-3.7e-7 for small integers), and so do their products with other columns
// (a shared remainder times 0/1 survives intact). The squares of such short values have biased low
// bits, so the caller takes those columns' variances from fp64 sums instead (sq / n - mean^2, which
// loses at most (mean / sd)^2 = 256 times fp64's rounding here).
template <typename T>
C10_HOST_DEVICE inline float centre_of(double mean, double sq, int64_t n, bool sd_grid = false,
                                       bool* on_sd_grid = nullptr) {
  if (on_sd_grid != nullptr) *on_sd_grid = false;
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
  if (sd_grid && sd > 0.0 && std::fabs(mean) <= 16.0 * sd) {
    int se = 0;
    std::frexp(sd, &se);  // sd = f 2^se, f in [0.5, 1)
    const double grid = std::ldexp(1.0, se - 7);
    if (on_sd_grid != nullptr) *on_sd_grid = true;
    return static_cast<float>(std::floor(mean / grid + 0.5) * grid);  // at most 2^12 steps: exact
  }
  return fp32_mean;
}

}  // namespace refframe
