// Portable building blocks of center_syrk: plain C++ that any compiler vectorises, with the same
// arithmetic as the SIMD sets (see syrk_kernel.h).
#include <cmath>

#include "syrk_kernel.h"

namespace refframe::cpu {
namespace {

constexpr int64_t MR = 16;
constexpr int64_t NR = 6;

template <typename T>
void pack_portable(const T* src, int64_t stride, int64_t kc, const float* mean, int64_t width,
                   int64_t panel, float* dst) {
  for (int64_t k = 0; k < kc; ++k, src += stride, dst += panel) {
    for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<float>(src[c]) - mean[c];
    for (int64_t c = width; c < panel; ++c) dst[c] = 0.0f;
  }
}

template <typename T>
void accumulate_portable(const T* src, int64_t d, double* sum, double* sq) {
  for (int64_t j = 0; j < d; ++j) {
    const double x = static_cast<double>(static_cast<float>(src[j]));
    sum[j] += x;
    sq[j] += x * x;  // exact product: the same bits with or without a fused multiply-add
  }
}

void micro_portable(int64_t kc, const float* a, const float* b, double* c, const double*) {
  float acc[NR][MR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const float* ak = a + k * MR;
    const float* bk = b + k * NR;
    for (int64_t col = 0; col < NR; ++col) {
      const float bv = bk[col];
      for (int64_t row = 0; row < MR; ++row) acc[col][row] = std::fma(ak[row], bv, acc[col][row]);
    }
  }
  for (int64_t col = 0; col < NR; ++col)
    for (int64_t row = 0; row < MR; ++row) c[col * MR + row] += static_cast<double>(acc[col][row]);
}

}  // namespace

const KernelSet& portable_kernels() {
  static const KernelSet set{"portable", MR, NR, /*kc=*/512, /*mc_cols=*/128, /*jb_cols=*/144, /*b_in_a=*/false,
                             pack_portable<c10::BFloat16>, pack_portable<c10::Half>,
                             pack_portable<float>, accumulate_portable<c10::BFloat16>,
                             accumulate_portable<c10::Half>, accumulate_portable<float>,
                             micro_portable};
  return set;
}

}  // namespace refframe::cpu
