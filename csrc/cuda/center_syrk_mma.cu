// center_syrk on CUDA, tensor-core path (REFFRAME_CUDA_KERNEL=mma; bf16 and fp16 W): everything
// after pass 1's sums (center_syrk.cu launches pass 1 and hands over its partials).
//
// The same tiles, row splits and fp64 partials as syrk_kernel (center_syrk.cu), with the products
// on the tensor cores (16 x 16 x 16 fp16 wmma, fp32 results). Each centered, scaled value is
// staged as two fp16 numbers, y = hi + lo exactly (mma_scale_of), and y_i y_j = hi_i hi_j +
// (lo_i lo_j + lo_i hi_j + hi_i lo_j): four products per pair of values, chained on the tensor
// cores into two fragments per 16 x 16 block over 256 rows and then flushed into fp64. `big` takes
// the hi hi products: integers whose running sum stays within 2^24, so it is exact. `small` takes
// the other three, about 2^-8 of big, so the tensor cores' rounding of its sums (toward zero, or
// not) stays far below fp32's rounding of the result: emulated on the CPU (products exact, small's
// sums rounded toward zero at every product), the error against fp64 is that of rounding the
// result to fp32 (docs/design/cpu-covariance.md has the figures). fp32 W stays on syrk_kernel (its
// 24 bits do not split into two fp16 numbers).
//
// Block: 8 warps, each owning a 64 x 32 part of the 128 x 128 tile (4 x 2 fragments of 16 x 16).
// The fp64 sums are kept per fragment element in the fragments' own (unspecified) element order:
// slot ((warp * 8 + fragment) * 8 + element) * 32 + lane. mma_layout_kernel records where each
// element of an accumulator fragment sits in its 16 x 16 block, and the reduction uses that map.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "center_syrk_common.cuh"

namespace refframe::cuda {
namespace {

// Center and scale of a column for the tensor-core kernel (syrk_mma_kernel). The scale G is the
// smallest power of two with 255 G >= max |x - mean| over the column, the center c the mean rounded
// to a multiple of G (then to fp32, which keeps it one: the columns here are bf16 or fp16, so c is
// far from needing more than 24 bits). Then y = (x - c) / G lies in [-255.5, 255.5], and because
// c / G is an integer, y splits exactly into hi = rint(y), an integer of at most 256, and
// lo = y - hi, whose significant bits are those of x below G: at most 11, so lo is exact in fp16
// (unless tiny enough to be subnormal there). x - c itself is exact in fp32 for every x of at
// least G / 64 in magnitude (bf16: G / 512), and off by at most 2^-16 G below that. Products of
// two hi are integers of at most 2^16, so the tensor cores sum 256 rows of them exactly, whatever
// their rounding mode.
struct MmaScale {
  float center;
  float inv_scale;  // 1 / G
  double scale;     // G
};

__device__ inline MmaScale mma_scale_of(double mean, double lo, double hi) {
  const double spread = fmax(hi - mean, mean - lo);
  if (!isfinite(spread) || !(spread > 0.0)) {
    // A constant column (its mean is its value, exactly) or a non-finite one (NaN propagates).
    return {static_cast<float>(mean), 1.0f, 1.0};
  }
  int e = 0;
  const double f = frexp(spread / 255.0, &e);  // spread / 255 = f 2^e, f in [0.5, 1)
  int g = f == 0.5 ? e - 1 : e;                 // G = 2^g >= spread / 255
  g = g < -126 ? -126 : (g > 126 ? 126 : g);     // 2^g and 2^-g both normal fp32 numbers
  const double grid = ldexp(1.0, g);
  const double center = rint(mean / grid) * grid;
  return {static_cast<float>(center), static_cast<float>(ldexp(1.0, -g)), ldexp(1.0, g)};
}

// mean64[j] = (pass 1's sum of column j) / N, as in center_syrk.cu; center, inv_scale and scale:
// the column's MmaScale, from that mean and the column's range.
__global__ void mma_finalize_kernel(const double* __restrict__ partial, int64_t splits, int64_t n, int64_t d,
                                    double* __restrict__ mean64, float* __restrict__ center,
                                    float* __restrict__ inv_scale, double* __restrict__ scale) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const ColumnSums sums = merge_column_sums(partial, splits, d, j);
  const double m = sums.sum / static_cast<double>(n);
  mean64[j] = m;
  const MmaScale c = mma_scale_of(m, sums.lo, sums.hi);
  center[j] = c.center;
  inv_scale[j] = c.inv_scale;
  scale[j] = c.scale;
}

namespace wmma = nvcuda::wmma;
using MmaA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::col_major>;
using MmaB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major>;
using MmaAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

constexpr int kMmaRows = 32;                      // rows of W staged per buffer: two 16-row steps
constexpr int kMmaLd = kTile + 8;                 // halves per staged row (16 bytes of padding)
constexpr int kMmaPanel = kMmaRows * kMmaLd;      // halves per panel; 4 panels: A hi, A lo, B hi, B lo
constexpr int kMmaFlushStages = 8;                // staged buffers (256 rows: big stays < 2^24) per flush
constexpr int kMmaFrags = 8;                      // accumulator fragments per warp
constexpr int kMmaChunks = kMmaRows * 2 * kTile / 8 / kThreads;  // 8-value chunks each thread stages
constexpr size_t kMmaSmemBase = 2 * 4 * kMmaPanel * sizeof(__half) + 2 * 2 * kTile * sizeof(float);
constexpr size_t kMmaSmemWithAcc = kMmaSmemBase + sizeof(double) * kTile * kTile;
static_assert(kMmaChunks == 4, "staging assumes 4 chunks of 8 values per thread");

// map[slot] = 16 * row + column of element slot / 32 of lane slot % 32 of an accumulator fragment,
// for slot < 256. One warp.
__global__ void mma_layout_kernel(int* __restrict__ map) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  __shared__ __align__(32) float block[16 * 16];
  MmaAcc f;
  static_assert(MmaAcc::num_elements == 8, "an accumulator fragment holds 8 elements per lane");
  const int lane = threadIdx.x;
#pragma unroll
  for (int t = 0; t < MmaAcc::num_elements; ++t) f.x[t] = static_cast<float>(t * 32 + lane);
  wmma::store_matrix_sync(block, f, 16, wmma::mem_row_major);
  __syncwarp();
  for (int p = lane; p < 256; p += 32) map[static_cast<int>(block[p])] = p;
#else
  __trap();  // built for a target without wmma: fail loudly (the self-check then falls back)
#endif
}

// Two fp32 values rounded to fp16, packed low half first (the order of two adjacent columns in memory).
__device__ __forceinline__ uint32_t half_pair(float a, float b) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(a))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(b))) << 16);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 1)
    syrk_mma_kernel(const T* __restrict__ w, int64_t n, int64_t d, int64_t s0, int64_t s1,
                    const float* __restrict__ center, const float* __restrict__ inv_scale,
                    int64_t rows_per_split, int64_t tiles, bool smem_acc, double* __restrict__ partial) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  extern __shared__ __align__(128) unsigned char mma_smem[];
  __half* stage = reinterpret_cast<__half*>(mma_smem);
  float* center_s = reinterpret_cast<float*>(stage + 2 * 4 * kMmaPanel);  // [0, 128): A, [128, 256): B
  float* inv_s = center_s + 2 * kTile;
  double* acc_s = reinterpret_cast<double*>(inv_s + 2 * kTile);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp % 2, wn = warp / 2;  // rows 64 wm .. +64, columns 32 wn .. +32 of the tile

  const BlockWork work = block_work(n, rows_per_split, tiles, partial);
  const int64_t i0 = work.i0, j0 = work.j0, row_begin = work.row_begin, row_end = work.row_end;
  const int64_t stages = ceil_div(row_end - row_begin, kMmaRows);

  double* out = work.out;
  double* acc = (smem_acc ? acc_s : out) + warp * kMmaFrags * 8 * 32 + lane;
#pragma unroll
  for (int e = 0; e < kMmaFrags * 8; ++e) acc[e * 32] = 0.0;
  {
    // Stored as [e][chunk] (chunk = tid / 8 of the 32 chunks of 8 columns): the staging loop's
    // lanes then read consecutive words (no bank conflicts).
    const int64_t col = (tid < kTile ? i0 : j0) + tid % kTile;
    const int at = (tid % 8) * 32 + tid / 8;
    center_s[at] = col < d ? center[col] : 0.0f;
    inv_s[at] = col < d ? inv_scale[col] : 0.0f;
  }
  __syncthreads();

  // Chunk u of this thread: row (tid + 256 u) / 32 of the buffer, chunk (tid % 32) of its 256
  // columns (A's 128, then B's 128), 8 values each. A warp reads 256 contiguous bytes of each side.
  const int chunk = tid % 32;
  const int side = chunk / 16, col8 = (chunk % 16) * 8;
  const int64_t col0 = (side == 0 ? i0 : j0) + col8;
  const int64_t left = d - col0;
  const int count = left <= 0 ? 0 : (left >= 8 ? 8 : static_cast<int>(left));
  const int first_row = tid / 32;  // rows first_row + 8 u
  const T* src = w + (row_begin + first_row) * s0 + col0 * s1;
  int64_t rows_left = row_end - row_begin - first_row;  // rows of the split from this thread's first row on

  Chunk<T, kVec> raw[kMmaChunks];
  auto fetch = [&] {
#pragma unroll
    for (int u = 0; u < kMmaChunks; ++u)
      if (rows_left > 8 * u && count > 0) raw[u].load(src + 8 * u * s0, s1, count);
  };

  MmaAcc big[kMmaFrags], small[kMmaFrags];
#pragma unroll
  for (int f = 0; f < kMmaFrags; ++f) {
    wmma::fill_fragment(big[f], 0.0f);
    wmma::fill_fragment(small[f], 0.0f);
  }

  fetch();
  for (int64_t st = 0; st < stages; ++st) {
    __half* hi_a = stage + (st & 1) * 4 * kMmaPanel;
    __half* lo_a = hi_a + kMmaPanel;
    __half* hi_b = lo_a + kMmaPanel;
    __half* lo_b = hi_b + kMmaPanel;
    {
      __half* hi_dst = side == 0 ? hi_a : hi_b;
      __half* lo_dst = side == 0 ? lo_a : lo_b;
      const float* c_s = center_s + chunk;  // element e at c_s[32 * e]
      const float* v_s = inv_s + chunk;
#pragma unroll
      for (int u = 0; u < kMmaChunks; ++u) {
        const bool live = rows_left > 8 * u && count > 0;
        uint32_t hw[4], lw[4];
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          float h0 = 0.0f, l0 = 0.0f, h1 = 0.0f, l1 = 0.0f;
          if (live && e < count) {
            const float y = (raw[u].get(e) - c_s[32 * e]) * v_s[32 * e];
            h0 = rintf(y);
            l0 = y - h0;
          }
          if (live && e + 1 < count) {
            const float y = (raw[u].get(e + 1) - c_s[32 * (e + 1)]) * v_s[32 * (e + 1)];
            h1 = rintf(y);
            l1 = y - h1;
          }
          hw[e / 2] = half_pair(h0, h1);
          lw[e / 2] = half_pair(l0, l1);
        }
        const int at = (first_row + 8 * u) * kMmaLd + col8;
        *reinterpret_cast<uint4*>(hi_dst + at) = make_uint4(hw[0], hw[1], hw[2], hw[3]);
        *reinterpret_cast<uint4*>(lo_dst + at) = make_uint4(lw[0], lw[1], lw[2], lw[3]);
      }
    }
    __syncthreads();
    src += kMmaRows * s0;
    rows_left -= kMmaRows;
    if (st + 1 < stages) fetch();

#pragma unroll 1
    for (int k = 0; k < kMmaRows / 16; ++k) {
      MmaB bh[2], bl[2];
#pragma unroll
      for (int fn = 0; fn < 2; ++fn) {
        wmma::load_matrix_sync(bh[fn], hi_b + k * 16 * kMmaLd + wn * 32 + fn * 16, kMmaLd);
        wmma::load_matrix_sync(bl[fn], lo_b + k * 16 * kMmaLd + wn * 32 + fn * 16, kMmaLd);
      }
#pragma unroll
      for (int fm = 0; fm < 4; ++fm) {
        MmaA ah, al;
        wmma::load_matrix_sync(ah, hi_a + k * 16 * kMmaLd + wm * 64 + fm * 16, kMmaLd);
        wmma::load_matrix_sync(al, lo_a + k * 16 * kMmaLd + wm * 64 + fm * 16, kMmaLd);
#pragma unroll
        for (int fn = 0; fn < 2; ++fn) {
          const int f = fm * 2 + fn;
          wmma::mma_sync(big[f], ah, bh[fn], big[f]);
          wmma::mma_sync(small[f], al, bl[fn], small[f]);
          wmma::mma_sync(small[f], al, bh[fn], small[f]);
          wmma::mma_sync(small[f], ah, bl[fn], small[f]);
        }
      }
    }

    if ((st + 1) % kMmaFlushStages == 0 || st + 1 == stages) {
#pragma unroll
      for (int f = 0; f < kMmaFrags; ++f) {
#pragma unroll
        for (int t = 0; t < MmaAcc::num_elements; ++t) {
          acc[(f * 8 + t) * 32] += static_cast<double>(big[f].x[t]) + static_cast<double>(small[f].x[t]);
        }
        wmma::fill_fragment(big[f], 0.0f);
        wmma::fill_fragment(small[f], 0.0f);
        __syncwarp();
      }
    }
  }

  if (smem_acc) {
    // Each thread copies the slots it accumulated itself: no other warp's writes are read.
    double* own = out + warp * kMmaFrags * 8 * 32 + lane;
#pragma unroll
    for (int e = 0; e < kMmaFrags * 8; ++e) own[e * 32] = acc[e * 32];
  }
#else
  __trap();  // built for a target without wmma: fail loudly (the self-check then falls back)
#endif
}

// The reduction of syrk_mma_kernel's partials (slot order, in units of G_i G_j; see above):
// cov[i][j] = cov[j][i] = fp32(G_i G_j (sum over splits) / N - (mean_i - c_i)(mean_j - c_j)).
__global__ void reduce_mma_kernel(const double* __restrict__ partial, const int* __restrict__ map, int64_t tiles,
                                  int64_t splits, int64_t n, int64_t d, const double* __restrict__ mean64,
                                  const float* __restrict__ center, const double* __restrict__ scale,
                                  float* __restrict__ cov) {
  const int64_t tile = blockIdx.x / (kTile * kTile / kThreads);
  const int slot = static_cast<int>(blockIdx.x % (kTile * kTile / kThreads)) * kThreads + threadIdx.x;
  int64_t ti, tj;
  tile_coords(tile, ti, tj);
  const int warp = slot / (kMmaFrags * 256), frag = (slot / 256) % kMmaFrags;
  const int pos = map[slot % 256];
  const int64_t i = ti * kTile + (warp % 2) * 64 + (frag / 2) * 16 + pos / 16;
  const int64_t j = tj * kTile + (warp / 2) * 32 + (frag % 2) * 16 + pos % 16;
  if (i >= d || j >= d || i > j) return;
  const double* p = partial + tile * kTile * kTile + slot;
  double s = 0.0;
  for (int64_t sp = 0; sp < splits; ++sp) s += p[sp * tiles * kTile * kTile];
  const double di = mean64[i] - static_cast<double>(center[i]), dj = mean64[j] - static_cast<double>(center[j]);
  const float v = static_cast<float>(s * scale[i] * scale[j] / static_cast<double>(n) - di * dj);
  cov[i * d + j] = v;
  if (i < j) cov[j * d + i] = v;
}

}  // namespace

bool mma_fits(const DeviceInfo& info) {
  return info.major >= 7 && static_cast<size_t>(info.smem_optin) >= kMmaSmemBase;
}

template <typename T>
void center_syrk_mma(const T* w, int64_t n, int64_t d, int64_t s0, int64_t s1, bool vec, int64_t tiles,
                     const at::Tensor& mean_partial, int64_t mean_splits, at::Tensor& mean, at::Tensor& cov,
                     const DeviceInfo& info, cudaStream_t stream) {
  const auto f64 = mean.options().dtype(at::kDouble);
  const auto f32 = mean.options().dtype(at::kFloat);
  // The end of pass 1: the mean, and each column's center and scale from its range.
  at::Tensor center = at::empty({d}, f32);
  at::Tensor inv_scale = at::empty({d}, f32);
  at::Tensor scale = at::empty({d}, f64);
  mma_finalize_kernel<<<ceil_div(d, kThreads), kThreads, 0, stream>>>(
      mean_partial.const_data_ptr<double>(), mean_splits, n, d, mean.data_ptr<double>(), center.data_ptr<float>(),
      inv_scale.data_ptr<float>(), scale.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Pass 2 on the tensor cores, then the reduction (pass 3) through the fragment layout map.
  at::Tensor map = at::empty({256}, mean.options().dtype(at::kInt));
  mma_layout_kernel<<<1, 32, 0, stream>>>(map.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool smem_acc = static_cast<size_t>(info.smem_optin) >= kMmaSmemWithAcc;
  const size_t smem = smem_acc ? kMmaSmemWithAcc : kMmaSmemBase;
  const auto kernel = vec ? syrk_mma_kernel<T, true> : syrk_mma_kernel<T, false>;
  const SyrkPlan plan = plan_for(kernel, smem, n, tiles, info);
  at::Tensor partial = at::empty({plan.splits * tiles * kTile * kTile}, f64);
  kernel<<<dim3(tiles, plan.splits), kThreads, smem, stream>>>(
      w, n, d, s0, s1, center.const_data_ptr<float>(), inv_scale.const_data_ptr<float>(), plan.rows_per_split,
      tiles, smem_acc, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_mma_kernel<<<tiles * (kTile * kTile / kThreads), kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), map.const_data_ptr<int>(), tiles, plan.splits, n, d,
      mean.const_data_ptr<double>(), center.const_data_ptr<float>(), scale.const_data_ptr<double>(),
      cov.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void center_syrk_mma<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, bool, int64_t,
                                             const at::Tensor&, int64_t, at::Tensor&, at::Tensor&, const DeviceInfo&,
                                             cudaStream_t);
template void center_syrk_mma<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, int64_t, bool, int64_t,
                                         const at::Tensor&, int64_t, at::Tensor&, at::Tensor&, const DeviceInfo&,
                                         cudaStream_t);

}  // namespace refframe::cuda
