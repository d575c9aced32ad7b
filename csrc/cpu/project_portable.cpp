// Portable building blocks of project / radii (project_kernel.h): plain C++ that the compiler
// vectorises, for CPUs without AVX2. A product and an addition per term (rounded each, or fused where
// the compiler contracts them): the bound of project_kernel.h holds either way.
#include <algorithm>

#include "project_kernel.h"

namespace refframe::cpu {
namespace {

constexpr int64_t MR = 2;       // rows of a tile (2 x 16 accumulators fit 16 SSE registers)
constexpr int64_t PANEL = 16;   // basis columns of a panel
constexpr int64_t CHUNK = 64;   // terms of d per fp32 sum
constexpr int64_t ROWS = 48;    // rows per block

template <typename T>
void center_portable(const T* src, int64_t d, const float* c, int64_t ld, float* dst) {
  for (int64_t l = 0; l < d; ++l) dst[l] = static_cast<float>(src[l]) - c[l];
  for (int64_t l = d; l < ld; ++l) dst[l] = 0.0f;
}

void tile_run(const float* t, int64_t ld, const float* v, int64_t len, double* acc, int64_t ldc, bool first) {
  float c[MR][PANEL] = {};
  for (int64_t l = 0; l < len; ++l, v += PANEL)
    for (int64_t r = 0; r < MR; ++r) {
      const float a = t[r * ld + l];
      for (int64_t q = 0; q < PANEL; ++q) c[r][q] += a * v[q];
    }
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t q = 0; q < PANEL; ++q)
      acc[r * ldc + q] = (first ? 0.0 : acc[r * ldc + q]) + static_cast<double>(c[r][q]);
}

void tile_portable(const float* t, int64_t ld, int64_t n, const float* vp, int64_t k, double* acc, float* out) {
  const int64_t panels = (k + PANEL - 1) / PANEL, ldc = panels * PANEL, tiles = (n + MR - 1) / MR;
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t c0 = 0; c0 < ld; c0 += CHUNK) {
      const int64_t len = std::min(CHUNK, ld - c0);
      for (int64_t i = 0; i < tiles; ++i)
        tile_run(t + i * MR * ld + c0, ld, vp + (p * ld + c0) * PANEL, len, acc + i * MR * ldc + p * PANEL, ldc,
                 c0 == 0);
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < k; ++j) out[r * k + j] = static_cast<float>(acc[r * ldc + j]);
}

template <typename T>
double sum_squares_portable(const T* src, int64_t d, const float* c) {
  double s = 0.0;
  for (int64_t l = 0; l < d; ++l) {
    const double x = static_cast<double>(static_cast<float>(src[l]) - c[l]);
    s += x * x;
  }
  return s;
}

}  // namespace

const ProjectKernels& portable_project() {
  static const ProjectKernels set{"portable",
                                  ROWS,
                                  /*align=*/MR,
                                  PANEL,
                                  /*dot_max_k=*/0,
                                  center_portable<c10::BFloat16>,
                                  center_portable<c10::Half>,
                                  center_portable<float>,
                                  tile_portable,
                                  /*dot_bf16=*/nullptr,
                                  /*dot_f16=*/nullptr,
                                  /*dot_f32=*/nullptr,
                                  /*dot_scratch=*/0,
                                  sum_squares_portable<c10::BFloat16>,
                                  sum_squares_portable<c10::Half>,
                                  sum_squares_portable<float>};
  return set;
}

}  // namespace refframe::cpu
