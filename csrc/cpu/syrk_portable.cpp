// Portable building blocks of center_syrk: plain C++ that any compiler vectorises, with the same
// arithmetic as the SIMD sets (see syrk_kernel.h).
#include <cmath>
#include <cstdlib>
#include <cstring>

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

const KernelSet& active_kernels() {
  const char* ask = std::getenv("REFFRAME_CPU_KERNEL");
  const auto asked = [ask](const char* name) { return ask != nullptr && std::strcmp(ask, name) == 0; };
  if (asked("portable")) return portable_kernels();
#if defined(REFFRAME_HAVE_AVX2_TU) && (defined(__GNUC__) || defined(__clang__))
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                               __builtin_cpu_supports("f16c");
  static const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                                 __builtin_cpu_supports("avx512dq");
#ifdef REFFRAME_HAVE_AMX_TU
  if (has_avx512 && !asked("avx2") && !asked("avx512") && !asked("avx512bf16") && amx_usable()) return amx_kernels();
#endif
#ifdef REFFRAME_HAVE_AVX512BF16_TU
  static const bool has_avx512bf16 = has_avx512 && __builtin_cpu_supports("avx512bf16");
  if (has_avx512bf16 && !asked("avx2") && !asked("avx512")) return avx512bf16_kernels();
#endif
  if (has_avx512 && !asked("avx2")) return avx512_kernels();
  if (has_avx2) return avx2_kernels();
#endif
  return portable_kernels();
}

}  // namespace refframe::cpu
