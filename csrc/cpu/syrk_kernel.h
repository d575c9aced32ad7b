// Interface between the center-and-syrk driver and its SIMD-specific building blocks.
//
// The portable, AVX2 and AVX-512 kernel sets perform bit-for-bit the same arithmetic (exact
// conversions, one IEEE subtraction, one fused multiply-add per product in the same order), so they
// give identical covariances; only their speed (and tile shape) differs. The AMX set multiplies on
// the tile units with split bf16 operands: as precise, but its own bits (see syrk_amx.cpp). The
// avx512bf16 set multiplies bf16 W in bf16 itself, exactly, on an extended matrix (see
// syrk_avx512bf16.cpp and ExactBf16): also its own bits.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace refframe::cpu {

struct KernelSet;

// A set that multiplies bf16 W in bf16 itself (exact products, see syrk_avx512bf16.cpp) has these
// extra building blocks. Its packs hold pairs of rows: pair row q of a panel is one 32-bit word per
// column, bf16 of row 2q in the low half and of row 2q + 1 in the high half.
struct ExactBf16 {
  // For each column j < width and row r < rows of src (rows stride elements apart), in row order:
  // sum[j] += double(x), sq[j] += x^2 in fp64 (both bitwise the other sets' accumulate_bf16),
  // amax[j] = max(amax[j], |x|).
  void (*moments)(const c10::BFloat16* src, int64_t stride, int64_t rows, int64_t width, double* sum, double* sq,
                  float* amax);
  // Column c < width of kc rows (zero rows up to an even count, zero columns up to panel):
  // bf16(t) with t = float(src[c]) * scale[c] - shift[c] in fp32 (a product and a subtraction, each
  // rounded to nearest), bf16 rounding to nearest even; for a centered column (shift[c] != 0)
  // sq[c] += the sum of t^2 over the rows, in fp64 in row order.
  void (*pack)(const c10::BFloat16* src, int64_t stride, int64_t kc, const float* scale, const float* shift,
               int64_t width, int64_t panel, void* dst, double* sq);
  // The same for any columns: column c of the panel is part parts[c] (0 or 1: h or m of
  // t = h + m, h = bf16(t), m = t - h, itself a bf16 number) of column cols[c] of the rows
  // starting at row0; scale, shift and sq (added to for centered part-0 columns only) are indexed by
  // that column. Part 0 gives pack's bits.
  void (*pack_parts)(const c10::BFloat16* row0, int64_t stride, int64_t kc, const int32_t* cols,
                     const int32_t* parts, const float* scale, const float* shift, int64_t width, int64_t panel,
                     void* dst, double* sq);
  // micro with drift cancellation: the same sums, except that after every shift_pairs pairs of
  // rows one more pair step adds the products of the words pa[0..mr) (the A panel's columns) and
  // pb[0..nr) (the B panel's), so each sum also holds (pairs / shift_pairs) times those products
  // (pairs = (kc + 1) / 2). Used on the tiles the driver picks (see plan_exact_columns).
  void (*micro_shift)(int64_t kc, const float* a, const float* b, double* c, const double* pf, const uint32_t* pa,
                      const uint32_t* pb);
  int64_t shift_pairs;
  // The set that takes over when W is not bf16, or when too many of its columns would need parts.
  const KernelSet& (*fallback)();
};

struct KernelSet {
  const char* name;
  // Micro-tile: mr rows (vector side) x nr columns (broadcast side) of the covariance.
  int64_t mr, nr;
  // Rows per block (a multiple of the driver's 128-row fp32 runs, so the results do not depend on
  // it), and the columns of A and B panels a work item aims for.
  int64_t kc, mc_cols, jb_cols;
  // B panels are read from the A panels (nr divides mr) instead of being packed separately.
  bool b_in_a;
  // Packs one column panel of a block of rows, converted and centered on mean[c] (the driver's
  // fp32 center of each column: its mean, or for some far-off columns a value near it):
  //   dst[k * panel + c] = float(src[k * stride + c]) - mean[c]  for k < kc, c < width,
  //   dst[k * panel + c] = 0                                      for width <= c < panel.
  // panel is mr or nr; width <= panel.
  void (*pack_bf16)(const c10::BFloat16* src, int64_t stride, int64_t kc, const float* mean,
                    int64_t width, int64_t panel, float* dst);
  void (*pack_f16)(const c10::Half* src, int64_t stride, int64_t kc, const float* mean,
                   int64_t width, int64_t panel, float* dst);
  void (*pack_f32)(const float* src, int64_t stride, int64_t kc, const float* mean, int64_t width,
                   int64_t panel, float* dst);
  // sum[j] += x and sq[j] += x * x in fp64 for x = double(src[j]), j < d (exact conversion and
  // square, one fp64 addition each): the same bits in every set.
  void (*accumulate_bf16)(const c10::BFloat16* src, int64_t d, double* sum, double* sq);
  void (*accumulate_f16)(const c10::Half* src, int64_t d, double* sum, double* sq);
  void (*accumulate_f32)(const float* src, int64_t d, double* sum, double* sq);
  // c[col * mr + row] += double(sum over k < kc of a[k * mr + row] * b[k * ldb + col]), the sum
  // taken in fp32 with one fused multiply-add per term, in increasing k; ldb is the set's B row
  // stride, mr with b_in_a, else nr. pf: the fp64 tile of the next call, to be prefetched
  // meanwhile, or null.
  void (*micro)(int64_t kc, const float* a, const float* b, double* c, const double* pf);
  // Rows per micro call (each call's fp32 sums are added into fp64 once): a multiple of kalign that
  // divides kc. The three fp32 sets share 128, which keeps them bitwise identical.
  int64_t run = 128;
  // Packs hold blocks of rows rounded up to a multiple of kalign (the pack zero-fills the extra
  // rows), pack_bytes bytes per element of a panel (4 for fp32; other layouts are the set's own).
  int64_t kalign = 1;
  int64_t pack_bytes = 4;
  // Optional (null for sets without them; pack_* may then be null): pack B panel columns [0, width) and the A panels of the
  // same columns (nr / mr of them, consecutive, a_stride bytes apart; those at or past the last
  // column are not written) in one pass, with the same bytes as pack_* for each panel.
  void (*pack_pair_bf16)(const c10::BFloat16* src, int64_t stride, int64_t kc, const float* mean,
                         int64_t width, float* dst_b, float* dst_a, int64_t a_stride) = nullptr;
  void (*pack_pair_f16)(const c10::Half* src, int64_t stride, int64_t kc, const float* mean, int64_t width,
                        float* dst_b, float* dst_a, int64_t a_stride) = nullptr;
  void (*pack_pair_f32)(const float* src, int64_t stride, int64_t kc, const float* mean, int64_t width,
                        float* dst_b, float* dst_a, int64_t a_stride) = nullptr;
  // Called by each thread before its first micro call of a row block and after its last, or null.
  void (*thread_begin)() = nullptr;
  void (*thread_end)() = nullptr;
  // With b_in_a: bytes from one column of an A panel row to the next (0: pack_bytes).
  int64_t b_col_bytes = 0;
  // Non-null for a set that multiplies bf16 values exactly (see ExactBf16); its fp32 pack and
  // accumulate members are then null, and its fallback's are taken.
  const ExactBf16* exact = nullptr;
};

const KernelSet& portable_kernels();
#ifdef REFFRAME_HAVE_AVX2_TU
const KernelSet& avx2_kernels();
const KernelSet& avx512_kernels();
#endif
#ifdef REFFRAME_HAVE_AMX_TU
const KernelSet& amx_kernels();
#endif
#ifdef REFFRAME_HAVE_AVX512BF16_TU
const KernelSet& avx512bf16_kernels();
#endif

// The set used by center_syrk: AMX when the CPU has AVX-512 and usable AMX-BF16 tiles, else
// avx512bf16 when it has AVX-512 F/BW/VL/DQ and AVX512_BF16, else AVX-512 when it has AVX-512
// F/BW/VL/DQ, else AVX2 when it has AVX2+FMA+F16C, else portable. The environment variable
// REFFRAME_CPU_KERNEL=portable|avx2|avx512|avx512bf16|amx asks for one set (used by the tests to
// compare them); a set this CPU cannot run is not taken, the best one below it is. The checks and
// the override live in kernel_select.cpp.
const KernelSet& active_kernels();

}  // namespace refframe::cpu
