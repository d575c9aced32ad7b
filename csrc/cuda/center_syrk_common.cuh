// What the CUDA covariance files share: center_syrk.cu (pass 1, the fp32 SIMT kernel, the launch)
// and center_syrk_mma.cu (the tensor-core kernel, REFFRAME_CUDA_KERNEL=mma). Both cover the upper
// triangle of the covariance in kTile x kTile tiles, one block of kThreads threads per tile and row
// split, each block writing its own fp64 partials, which a reduction kernel then sums in split
// order: no atomics, so the result is bitwise reproducible on a given device.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace refframe::cuda {

constexpr int kTile = 128;      // covariance tile edge: one thread block per tile and row split
constexpr int kThreads = 256;   // threads per block (simt: 16 x 16, each owning 8 x 8 outputs; mma: 8 warps)
constexpr int kPerThread = 64;  // outputs of a tile per thread

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Linear index t of an upper-triangle tile (ti <= tj), column by column: t = tj (tj + 1) / 2 + ti.
__host__ __device__ inline void tile_coords(int64_t t, int64_t& ti, int64_t& tj) {
  int64_t c = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (c * (c + 1) / 2 > t) --c;
  while ((c + 1) * (c + 2) / 2 <= t) ++c;
  tj = c;
  ti = t - c * (c + 1) / 2;
}

// What one block of a covariance kernel works on: upper-triangle tile blockIdx.x (first rows i0,
// j0 of its A and B columns), rows [row_begin, row_end) of W (row split blockIdx.y), and its fp64
// slice of `partial`.
struct BlockWork {
  int64_t i0, j0, row_begin, row_end;
  double* out;
};

__device__ inline BlockWork block_work(int64_t n, int64_t rows_per_split, int64_t tiles, double* partial) {
  int64_t ti, tj;
  tile_coords(blockIdx.x, ti, tj);
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = row_begin + rows_per_split < n ? row_begin + rows_per_split : n;
  double* out = partial + (static_cast<int64_t>(blockIdx.y) * tiles + blockIdx.x) * kTile * kTile;
  return {ti * kTile, tj * kTile, row_begin, row_end, out};
}

// Element e (0..7) of eight packed elements of type T, converted exactly to fp32.
template <typename T>
__device__ __forceinline__ float unpack(const uint32_t* words, int e);
template <>
__device__ __forceinline__ float unpack<float>(const uint32_t* words, int e) {
  return __uint_as_float(words[e]);
}
template <>
__device__ __forceinline__ float unpack<c10::BFloat16>(const uint32_t* words, int e) {
  const auto bits = static_cast<uint16_t>(words[e / 2] >> (16 * (e % 2)));
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}
template <>
__device__ __forceinline__ float unpack<c10::Half>(const uint32_t* words, int e) {
  const auto bits = static_cast<uint16_t>(words[e / 2] >> (16 * (e % 2)));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Eight consecutive columns of one row of W, held in registers between the load and the store to
// shared memory (so the load latency overlaps a whole step of products).
// kVec: 16-byte loads, kept raw and converted on use; needs unit column stride and every chunk
// 16-byte aligned. Otherwise: strided element loads of the first `count` columns, the rest zero.
template <typename T, bool kVec>
struct Chunk;

template <typename T>
struct Chunk<T, true> {
  static constexpr int kWords = 2 * static_cast<int>(sizeof(T));
  uint32_t words[kWords];
  __device__ __forceinline__ void load(const T* p, int64_t, int) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const uint4 v = __ldg(q + i);
      words[4 * i] = v.x;
      words[4 * i + 1] = v.y;
      words[4 * i + 2] = v.z;
      words[4 * i + 3] = v.w;
    }
  }
  __device__ __forceinline__ float get(int e) const { return unpack<T>(words, e); }
};

template <typename T>
struct Chunk<T, false> {
  float v[8];
  __device__ __forceinline__ void load(const T* p, int64_t col_stride, int count) {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = e < count ? static_cast<float>(p[e * col_stride]) : 0.0f;
  }
  __device__ __forceinline__ float get(int e) const { return v[e]; }
};

// Pass 1's result for column j, merged in split order from column_sum_kernel's partials
// (partial[q * splits + split][j]: sum, sum of squares, minimum, maximum for q = 0..3).
struct ColumnSums {
  double sum, sq, lo, hi;
};

__device__ inline ColumnSums merge_column_sums(const double* __restrict__ partial, int64_t splits, int64_t d,
                                               int64_t j) {
  double s = 0.0, q = 0.0, lo = INFINITY, hi = -INFINITY;
  for (int64_t sp = 0; sp < splits; ++sp) {
    s += partial[sp * d + j];
    q += partial[(splits + sp) * d + j];
    lo = fmin(lo, partial[(2 * splits + sp) * d + j]);
    hi = fmax(hi, partial[(3 * splits + sp) * d + j]);
  }
  return {s, q, lo, hi};
}

// Row splits of pass 2: the fewest that fill at least 90% of the device's block slots in the last
// wave of tiles x splits blocks (or the best fill found), each split keeping >= kMinSplitRows rows
// and, beyond one split, the fp64 workspace (splits x tiles x 128 KiB) within kMaxWorkspaceTiles.
constexpr int64_t kMinSplitRows = 1024;
constexpr int64_t kMaxWorkspaceTiles = 2048;

struct SyrkPlan {
  int64_t splits;
  int64_t rows_per_split;
};

inline SyrkPlan plan_syrk(int64_t n, int64_t tiles, int64_t slots) {
  const int64_t max_splits =
      std::max<int64_t>(1, std::min(n / kMinSplitRows, kMaxWorkspaceTiles / tiles));
  int64_t best = 1;
  double best_fill = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t blocks = tiles * s;
    const double fill = static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, slots) * slots);
    if (fill > best_fill) {
      best = s;
      best_fill = fill;
    }
    if (fill >= 0.9) break;
  }
  const int64_t rows = ceil_div(n, best);
  return {ceil_div(n, rows), rows};
}

struct DeviceInfo {
  int device = 0, sms = 0, smem_optin = 0, major = 0;
};

inline DeviceInfo device_info() {
  DeviceInfo info;
  C10_CUDA_CHECK(cudaGetDevice(&info.device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, info.device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, info.device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, info.device));
  return info;
}

// The row splits of a covariance kernel launched with `smem` bytes of dynamic shared memory.
template <typename Kernel>
SyrkPlan plan_for(Kernel kernel, size_t smem, int64_t n, int64_t tiles, const DeviceInfo& info) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  TORCH_CHECK(per_sm > 0, "center_syrk (CUDA): the covariance kernel does not fit on device ", info.device);
  return plan_syrk(n, tiles, static_cast<int64_t>(info.sms) * per_sm);
}

// The tensor-core path (center_syrk_mma.cu). mma_fits: the device can run its kernel (compute
// capability 7.0 and up, enough shared memory). center_syrk_mma: everything after pass 1's sums
// for bf16 or fp16 W (n x d, strides s0, s1; vec: the 16-byte loads of Chunk<T, true> allowed) with
// `tiles` upper-triangle tiles: each column's center and scale, the products on the tensor cores,
// the reduction into mean (fp64, d) and cov (fp32, d x d, both halves).
bool mma_fits(const DeviceInfo& info);

template <typename T>
void center_syrk_mma(const T* w, int64_t n, int64_t d, int64_t s0, int64_t s1, bool vec, int64_t tiles,
                     const at::Tensor& mean_partial, int64_t mean_splits, at::Tensor& mean, at::Tensor& cov,
                     const DeviceInfo& info, cudaStream_t stream);

}  // namespace refframe::cuda
