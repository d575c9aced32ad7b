// Run-time choice of the CPU kernel set of center_syrk (active_kernels(), syrk_kernel.h): the CPU's
// instruction sets, checked with cpuid, and the REFFRAME_CPU_KERNEL override; project / radii take
// the set of the same instruction set (active_project_kernels(), project_kernel.h). This file is compiled
// without ISA flags; the sets it hands out live in their own translation units, each built with
// the flags of its instruction set, and are called only after the checks here.
#include <cstdlib>
#include <cstring>

#if defined(REFFRAME_HAVE_AMX_TU) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "project_kernel.h"
#include "syrk_kernel.h"

namespace refframe::cpu {

#ifdef REFFRAME_HAVE_AMX_TU
namespace {

#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
// XCR0, the state components the OS has enabled (xgetbv needs the xsave target, not the file's).
__attribute__((target("xsave"))) unsigned long long enabled_xstate() { return _xgetbv(0); }
#endif

// The CPU has AMX-TILE and AMX-BF16 and this process may use them.
bool amx_usable() {
#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
  static const bool usable = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
    if (!tile || !bf16) return false;
    __cpuid_count(1, 0, a, b, c, d);
    if (!((c >> 27) & 1u)) return false;  // OSXSAVE
    // The kernel enables the tile state (XCR0 bits 17, 18) and grants it per process on request.
    if ((enabled_xstate() & (3ull << 17)) != (3ull << 17)) return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

}  // namespace
#endif

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

const ProjectKernels& active_project_kernels() {
#ifdef REFFRAME_HAVE_AVX2_TU
  const char* name = active_kernels().name;
  if (std::strcmp(name, "avx2") == 0) return avx2_project();
  if (std::strcmp(name, "portable") != 0) return avx512_project();
#endif
  return portable_project();
}

}  // namespace refframe::cpu
