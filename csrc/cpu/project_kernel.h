// Interface between the project / radii driver (project.cpp) and its SIMD-specific building blocks.
//
// Every path centers first, t[l] = float(x[l]) - c[l] (exact conversion, one IEEE subtraction: the
// same bits in every set), then multiplies t by the basis in the set's own register layout: products
// are fp32 FMAs (the portable set: a product and an addition, or what the compiler contracts), no
// fp32 sum covers more than 64 terms of d before it is added into fp64, and each output is rounded
// once to fp32. A row's arithmetic never depends on the other rows of its block or on the thread
// that runs it, so the results are bitwise the same for any thread count; the sets differ from one
// another in the order of their fp32 and fp64 sums (last bits only).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace refframe::cpu {

struct ProjectKernels {
  const char* name;
  // Rows the driver centers per call of tile, at most; tile also reads the rows of t past the n
  // given up to a multiple of align (finite values; their results are dropped). rows is a multiple
  // of align.
  int64_t rows, align;
  // Basis columns per panel of the tile layout: panel p holds columns [p * panel, p * panel + panel)
  // of the basis, row l of the panel at vp[(p * ld + l) * panel], zero past k and from d to ld.
  int64_t panel;
  // k up to which dot is used instead of tile (0: never).
  int64_t dot_max_k;
  // A row of t for tile: dst[l] = float(src[l]) - c[l] for l < d, 0 for d <= l < ld (ld: d rounded
  // up to a multiple of 16); dst is 64-byte aligned.
  void (*center_bf16)(const c10::BFloat16* src, int64_t d, const float* c, int64_t ld, float* dst);
  void (*center_f16)(const c10::Half* src, int64_t d, const float* c, int64_t ld, float* dst);
  void (*center_f32)(const float* src, int64_t d, const float* c, int64_t ld, float* dst);
  // out[r * k + j] = fp32(sum over l < ld of t[r * ld + l] * vp(l, j)) for r < n (n <= rows), with
  // vp the panel layout above: per tile of the set's rows x panel columns, fp32 FMAs over 64
  // consecutive l, each such sum added into fp64 in acc (n rounded up to align, times panels *
  // panel doubles), in l order.
  void (*tile)(const float* t, int64_t ld, int64_t n, const float* vp, int64_t k, double* acc, float* out);
  // For k <= dot_max_k, from the rows of W themselves: out[r * k + j] for r < n, the row x[r]
  // centered as center_* does it (t = float(x) - c) times vt's row j (the transposed basis, ld
  // floats a row, zero from d), with vector lanes along l: each lane sums 64 products in fp32, then
  // adds them to its fp64 lane sum; the lanes are added in fp64 at the end. A row of t with c = 0
  // gives the bits of the row it was centered from. acc: at least dot_scratch doubles.
  void (*dot_bf16)(const c10::BFloat16* const* x, int64_t n, int64_t d, const float* c, const float* vt, int64_t ld,
                   int64_t k, double* acc, float* out);
  void (*dot_f16)(const c10::Half* const* x, int64_t n, int64_t d, const float* c, const float* vt, int64_t ld,
                  int64_t k, double* acc, float* out);
  void (*dot_f32)(const float* const* x, int64_t n, int64_t d, const float* c, const float* vt, int64_t ld,
                  int64_t k, double* acc, float* out);
  int64_t dot_scratch;
  // The sum over l < d of double(float(src[l]) - c[l])^2: the centered value as center_* makes it,
  // its square exact in fp64, the squares added in fp64 in the set's lane order. src = a row of t
  // with c = 0 gives the same number as the row it was centered from.
  double (*sum_squares_bf16)(const c10::BFloat16* src, int64_t d, const float* c);
  double (*sum_squares_f16)(const c10::Half* src, int64_t d, const float* c);
  double (*sum_squares_f32)(const float* src, int64_t d, const float* c);
};

const ProjectKernels& portable_project();
#ifdef REFFRAME_HAVE_AVX2_TU
const ProjectKernels& avx2_project();
const ProjectKernels& avx512_project();
#endif

// The set of the CPU kernel set active_kernels() picks (syrk_kernel.h: REFFRAME_CPU_KERNEL and
// the CPU checks): portable, avx2, or avx512 for avx512, avx512bf16 and amx (their bf16 products
// and tiles do not fit fp32 basis values, so they take the AVX-512 fp32 kernels).
const ProjectKernels& active_project_kernels();

}  // namespace refframe::cpu
