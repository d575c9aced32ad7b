// center_syrk on CUDA: exact column mean and population covariance of W, without copying W.
//
// Input: W (N, d) bf16/fp16/fp32 on a CUDA device, any strides. Output: mean fp64 (d,), covariance
// fp32 (d, d), symmetric and full. Four kernels run on the current stream with no host
// synchronisation and no atomics, so the result is bitwise identical from run to run on a given
// device (only the number of row splits of pass 2 depends on the device: its SM count).
//
// Pass 1 (column_sum_kernel, mean_finalize_kernel): exact fp64 column sums and sums of squares,
// merged in a fixed order; each column's fp32 center (center.h) from them.
// Pass 2 (syrk_kernel): Gram matrix of the centered rows, upper-triangle 128 x 128 tiles only.
// Pass 3 (reduce_mirror_kernel): fixed-order sum of the row splits, divide by N, write both halves.
// REFFRAME_CUDA_KERNEL=mma hands bf16 and fp16 W, after pass 1's sums, to the tensor-core path
// (center_syrk_mma.cu), which has its own centers, pass 2 and pass 3.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../center.h"
#include "center_syrk_common.cuh"
#include "w_checks.cuh"

namespace refframe::cuda {
namespace {

constexpr int kBK = 16;           // rows of W staged in shared memory per step
constexpr int kFlushSteps = 8;    // steps summed in fp32 before each fp64 flush (128 rows)
constexpr int kStageFloats = 2 * 2 * kBK * kTile;  // two buffers of the A and B row panels
constexpr size_t kSmemBase = (kStageFloats + 2 * kTile) * sizeof(float);
constexpr size_t kSmemWithAcc = kSmemBase + sizeof(double) * kPerThread * kThreads;

constexpr int kSumCols = 32;      // pass 1: columns per block ...
constexpr int kSumLanes = 8;      // ... and row lanes per column

// Row (or column) inside a tile of output m (0..7) of the thread at position t (0..15) along it:
// two groups of 4, 64 apart, so that each thread reads its A and B values as two float4.
__host__ __device__ inline int micro_offset(int t, int m) { return (m / 4) * 64 + t * 4 + (m % 4); }

// Column sums of W and of its squares in fp64, and its minimum and maximum, one row split per
// blockIdx.y.
//
// Block: 32 columns x 8 row lanes; each lane sums its rows in order, the lanes are merged in order,
// and partial[q * splits + split][j] receives the split's sum (q = 0), sum of squares (1), minimum
// (2) and maximum (3). Unit column stride gives coalesced row reads. NaN is left out of the minimum
// and maximum, but not out of the sums, so a NaN column still ends with a NaN mean.
template <typename T>
__global__ void column_sum_kernel(const T* __restrict__ w, int64_t n, int64_t d, int64_t s0, int64_t s1,
                                  int64_t rows_per_split, double* __restrict__ partial) {
  __shared__ double lanes[4][kSumLanes][kSumCols];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < n ? r0 + rows_per_split : n;
  double s = 0.0, q = 0.0;
  float lo = INFINITY, hi = -INFINITY;
  if (j < d) {
    const T* col = w + j * s1;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kSumLanes) {
      const float v = static_cast<float>(col[r * s0]);
      const double x = static_cast<double>(v);
      s += x;
      q += x * x;  // exact in fp64
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  }
  lanes[0][threadIdx.y][threadIdx.x] = s;
  lanes[1][threadIdx.y][threadIdx.x] = q;
  lanes[2][threadIdx.y][threadIdx.x] = lo;
  lanes[3][threadIdx.y][threadIdx.x] = hi;
  __syncthreads();
  if (threadIdx.y == 0 && j < d) {
    double t = 0.0, u = 0.0, a = INFINITY, b = -INFINITY;
#pragma unroll
    for (int y = 0; y < kSumLanes; ++y) {
      t += lanes[0][y][threadIdx.x];
      u += lanes[1][y][threadIdx.x];
      a = fmin(a, lanes[2][y][threadIdx.x]);
      b = fmax(b, lanes[3][y][threadIdx.x]);
    }
    const int64_t splits = gridDim.y;
    partial[blockIdx.y * d + j] = t;
    partial[(splits + blockIdx.y) * d + j] = u;
    partial[(2 * splits + blockIdx.y) * d + j] = a;
    partial[(3 * splits + blockIdx.y) * d + j] = b;
  }
}

// mean64[j] = (sum of the split partials of column j, in split order) / N; mean32 = the fp32
// center of the column (center.h), from the mean and the sum of squares.
template <typename T>
__global__ void mean_finalize_kernel(const double* __restrict__ partial, int64_t splits, int64_t n, int64_t d,
                                     double* __restrict__ mean64, float* __restrict__ mean32) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const ColumnSums sums = merge_column_sums(partial, splits, d, j);
  const double m = sums.sum / static_cast<double>(n);
  mean64[j] = m;
  mean32[j] = refframe::center_of<T>(m, sums.sq, n);
}

// Gram matrix of the centered rows of one row split, for one upper-triangle 128 x 128 tile.
//
// Layout: W (N, d) with strides (s0, s1); tile (ti, tj) from blockIdx.x, rows
// [blockIdx.y * rows_per_split, ...) of W. Each step stages 16 rows of the A columns (ti) and the
// B columns (tj), converted and centered once (fp32(x) - the column's center) and zero outside W, in a
// double-buffered shared-memory panel; the next step's chunks are already in flight in registers.
// Each thread holds an 8 x 8 block of the tile (two 4 x 4 groups 64 apart: conflict-free float4
// reads) and forms all 64 x 16 products of a step with one fp32 FMA each.
//
// Precision: fp32 FMA chains only 16 products long (one step, starting from the first product),
// added into an fp32 sum of 8 steps (128 rows) that is then flushed into fp64 accumulators (in
// shared memory when the device offers 161 KiB per block, else in this block's slice of `partial`).
// Emulated on the CPU, the error against fp64 is the floor set by rounding the result to fp32
// (docs/design/cpu-covariance.md has the figures).
//
// Output: partial[split][tile][e * 256 + thread] (fp64, e = 8 * row + col of the thread's block).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 1)
    syrk_kernel(const T* __restrict__ w, int64_t n, int64_t d, int64_t s0, int64_t s1,
                const float* __restrict__ mean32, int64_t rows_per_split, int64_t tiles, bool smem_acc,
                double* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* stage = reinterpret_cast<float*>(smem_raw);
  float* mean_s = stage + kStageFloats;  // [0, 128): A columns, [128, 256): B columns
  double* acc_s = reinterpret_cast<double*>(mean_s + 2 * kTile);

  const int tid = threadIdx.x;
  const int ty = tid / 16, tx = tid % 16;  // compute position: rows by ty, columns by tx
  const int lr = tid / 16, lc = (tid % 16) * 8;  // load position: row lr of a step, columns lc..lc+7

  const BlockWork work = block_work(n, rows_per_split, tiles, partial);
  const int64_t i0 = work.i0, j0 = work.j0, row_begin = work.row_begin, row_end = work.row_end;
  const int64_t steps = ceil_div(row_end - row_begin, kBK);

  double* out = work.out;
  double* acc = smem_acc ? acc_s : out;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) acc[e * kThreads + tid] = 0.0;

  {
    const int64_t col = (tid < kTile ? i0 : j0) + tid % kTile;
    mean_s[tid] = col < d ? mean32[col] : 0.0f;
  }
  __syncthreads();

  const int64_t a_left = d - (i0 + lc), b_left = d - (j0 + lc);
  const int a_count = a_left <= 0 ? 0 : (a_left >= 8 ? 8 : static_cast<int>(a_left));
  const int b_count = b_left <= 0 ? 0 : (b_left >= 8 ? 8 : static_cast<int>(b_left));
  // This thread's chunks of the current step, and the rows of the split left from its row on.
  const T* a_src = w + (row_begin + lr) * s0 + (i0 + lc) * s1;
  const T* b_src = w + (row_begin + lr) * s0 + (j0 + lc) * s1;
  const int64_t step_stride = kBK * s0;
  int64_t rows_left = row_end - row_begin - lr;

  Chunk<T, kVec> ra, rb;
  auto fetch = [&] {
    if (rows_left > 0 && a_count > 0) ra.load(a_src, s1, a_count);
    if (rows_left > 0 && b_count > 0) rb.load(b_src, s1, b_count);
  };
  auto advance = [&] {
    a_src += step_stride;
    b_src += step_stride;
    rows_left -= kBK;
  };

  float run[8][8];
  float mid[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) mid[i][j] = 0.0f;

  fetch();
  for (int64_t step = 0; step < steps; ++step) {
    float* As = stage + (step & 1) * 2 * kBK * kTile;
    float* Bs = As + kBK * kTile;
    {
      const bool a_live = rows_left > 0 && a_count > 0, b_live = rows_left > 0 && b_count > 0;
      float va[8], vb[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        va[e] = a_live ? ra.get(e) - mean_s[lc + e] : 0.0f;
        vb[e] = b_live ? rb.get(e) - mean_s[kTile + lc + e] : 0.0f;
      }
      float4* a_dst = reinterpret_cast<float4*>(As + lr * kTile + lc);
      float4* b_dst = reinterpret_cast<float4*>(Bs + lr * kTile + lc);
      a_dst[0] = make_float4(va[0], va[1], va[2], va[3]);
      a_dst[1] = make_float4(va[4], va[5], va[6], va[7]);
      b_dst[0] = make_float4(vb[0], vb[1], vb[2], vb[3]);
      b_dst[1] = make_float4(vb[4], vb[5], vb[6], vb[7]);
    }
    __syncthreads();
    advance();
    if (step + 1 < steps) fetch();

#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      const float4 a_lo = *reinterpret_cast<const float4*>(As + k * kTile + ty * 4);
      const float4 a_hi = *reinterpret_cast<const float4*>(As + k * kTile + 64 + ty * 4);
      const float4 b_lo = *reinterpret_cast<const float4*>(Bs + k * kTile + tx * 4);
      const float4 b_hi = *reinterpret_cast<const float4*>(Bs + k * kTile + 64 + tx * 4);
      const float a[8] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
      const float b[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) run[i][j] = k == 0 ? a[i] * b[j] : fmaf(a[i], b[j], run[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) mid[i][j] += run[i][j];

    if ((step + 1) % kFlushSteps == 0 || step + 1 == steps) {
      // One row of the 8 x 8 block at a time: __syncwarp() orders the accumulator accesses, so the
      // compiler does not load all 64 fp64 accumulators at once (that would spill registers).
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          acc[(i * 8 + j) * kThreads + tid] += static_cast<double>(mid[i][j]);
          mid[i][j] = 0.0f;
        }
        __syncwarp();
      }
    }
  }

  if (smem_acc) {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) out[e * kThreads + tid] = acc_s[e * kThreads + tid];
  }
}

// The entry (i, j) of W's columns that block blockIdx.x's thread holds in the row splits' partials
// (one block per (tile, e)), and its fp64 sum over the splits in split order; false outside the
// upper triangle.
struct SplitEntry {
  int64_t i, j;
  double sum;
};
__device__ inline bool split_entry(const double* __restrict__ partial, int64_t tiles, int64_t splits, int64_t d,
                                   SplitEntry& out) {
  const int64_t tile = blockIdx.x / kPerThread;
  const int e = blockIdx.x % kPerThread;
  const int tid = threadIdx.x;
  int64_t ti, tj;
  tile_coords(tile, ti, tj);
  out.i = ti * kTile + micro_offset(tid / 16, e / 8);
  out.j = tj * kTile + micro_offset(tid % 16, e % 8);
  if (out.i >= d || out.j >= d || out.i > out.j) return false;
  const double* p = partial + tile * kTile * kTile + e * kThreads + tid;
  out.sum = 0.0;
  for (int64_t sp = 0; sp < splits; ++sp) out.sum += p[sp * tiles * kTile * kTile];
  return true;
}

// cov[i][j] = cov[j][i] = fp32((sum over splits, in order, of the fp64 partials) / N), i <= j.
//
// One block per (tile, e): thread t reads partial entry e * 256 + t of every split (coalesced) and
// writes its upper-triangle element and the mirror. Writes are strided, but this pass moves only
// d^2 floats against the N d^2 / 2 products of pass 2.
__global__ void reduce_mirror_kernel(const double* __restrict__ partial, int64_t tiles, int64_t splits, int64_t n,
                                     int64_t d, const double* __restrict__ mean64,
                                     const float* __restrict__ mean32, float* __restrict__ cov) {
  SplitEntry x;
  if (!split_entry(partial, tiles, splits, d, x)) return;
  const int64_t i = x.i, j = x.j;
  const double s = x.sum;
  // The rows were centered on mean32, not on the exact mean: remove the resulting rank-one term.
  const double di = mean64[i] - static_cast<double>(mean32[i]), dj = mean64[j] - static_cast<double>(mean32[j]);
  const float v = static_cast<float>(s / static_cast<double>(n) - di * dj);
  cov[i * d + j] = v;
  if (i < j) cov[j * d + i] = v;
}

constexpr int64_t kMaxMeanSplits = 64;
constexpr int64_t kMinMeanRows = 256;

// REFFRAME_CUDA_KERNEL=simt (the default) or mma asks for a covariance kernel; read at every call.
// mma applies to bf16 and fp16 W on devices of compute capability 7.0 and up; fp32 W stays on simt.
bool mma_requested() {
  const char* ask = std::getenv("REFFRAME_CUDA_KERNEL");
  if (ask == nullptr || *ask == '\0' || std::strcmp(ask, "simt") == 0) return false;
  TORCH_CHECK(std::strcmp(ask, "mma") == 0, "center_syrk (CUDA): REFFRAME_CUDA_KERNEL must be 'simt' or 'mma', got '",
              ask, "'");
  return true;
}

// W (N, d) on a CUDA device, as the launches below read it: its rows, the upper-triangle tiles of
// its columns, and whether the 16-byte loads of Chunk<T, true> are allowed.
template <typename T>
struct Matrix {
  const T* w;
  int64_t n, d, s0, s1, tiles;
  bool vec;
  Matrix(const at::Tensor& W, const char* op)
      : w(W.const_data_ptr<T>()), n(W.size(0)), d(W.size(1)), s0(W.stride(0)), s1(W.stride(1)) {
    const int64_t per_side = ceil_div(d, kTile);
    tiles = per_side * (per_side + 1) / 2;
    TORCH_CHECK(tiles * kPerThread <= INT32_MAX, op, " (CUDA): d = ", d, " is too large");
    vec = s1 == 1 && s0 % 8 == 0 && d % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
  }
};

// A pass's fp64 partials, one slice per row split.
struct SplitPartials {
  at::Tensor partial;
  int64_t splits;
};

// Pass 1: exact fp64 column sums, sums of squares and ranges, per row split: column_sum_kernel's
// partials (4 * splits, d).
template <typename T>
SplitPartials column_sums_launch(const Matrix<T>& m, const at::TensorOptions& f64,
                                                  cudaStream_t stream) {
  const int64_t rows = std::max(kMinMeanRows, ceil_div(m.n, kMaxMeanSplits));
  const int64_t splits = ceil_div(m.n, rows);
  at::Tensor partial = at::empty({4 * splits, m.d}, f64);
  column_sum_kernel<T><<<dim3(ceil_div(m.d, kSumCols), splits), dim3(kSumCols, kSumLanes), 0, stream>>>(
      m.w, m.n, m.d, m.s0, m.s1, rows, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partial, splits};
}

// Pass 2: Gram matrix of the rows centered on `centers` (fp32, d, on the device), upper-triangle
// tiles, split over rows.
template <typename T>
SplitPartials gram_launch(const Matrix<T>& m, const float* centers, const DeviceInfo& info,
                                           const at::TensorOptions& f64, cudaStream_t stream) {
  const bool smem_acc = static_cast<size_t>(info.smem_optin) >= kSmemWithAcc;
  const size_t smem = smem_acc ? kSmemWithAcc : kSmemBase;
  const auto kernel = m.vec ? syrk_kernel<T, true> : syrk_kernel<T, false>;
  const SyrkPlan plan = plan_for(kernel, smem, m.n, m.tiles, info);
  at::Tensor partial = at::empty({plan.splits * m.tiles * kTile * kTile}, f64);
  kernel<<<dim3(m.tiles, plan.splits), kThreads, smem, stream>>>(m.w, m.n, m.d, m.s0, m.s1, centers,
                                                                 plan.rows_per_split, m.tiles, smem_acc,
                                                                 partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partial, plan.splits};
}

// f(T{}) for W's element type (bf16, fp16 or fp32, checked by the caller).
template <typename F>
void with_type(const at::Tensor& W, const F& f) {
  if (W.scalar_type() == at::kBFloat16) f(c10::BFloat16{});
  else if (W.scalar_type() == at::kHalf) f(c10::Half{});
  else f(float{});
}

template <typename T>
void center_syrk_launch(const at::Tensor& W, at::Tensor& mean, at::Tensor& cov) {
  const Matrix<T> m(W, "center_syrk");
  const int64_t n = m.n, d = m.d, tiles = m.tiles;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = W.options().dtype(at::kDouble);
  const auto f32 = W.options().dtype(at::kFloat);
  const DeviceInfo info = device_info();
  const bool asked_mma = mma_requested();  // checked for every dtype: a bad value is an error
  const bool mma = asked_mma && !std::is_same_v<T, float> && mma_fits(info);

  const SplitPartials pass1 = column_sums_launch(m, f64, stream);
  const at::Tensor& mean_partial = pass1.partial;
  const int64_t mean_splits = pass1.splits;

  if constexpr (!std::is_same_v<T, float>) {
    if (mma) {
      center_syrk_mma<T>(m.w, n, d, m.s0, m.s1, m.vec, tiles, mean_partial, mean_splits, mean, cov, info, stream);
      return;
    }
  }

  // The end of pass 1: the mean, and each column's fp32 center from its sum of squares.
  at::Tensor mean32 = at::empty({d}, f32);
  mean_finalize_kernel<T><<<ceil_div(d, kThreads), kThreads, 0, stream>>>(
      mean_partial.const_data_ptr<double>(), mean_splits, n, d, mean.data_ptr<double>(), mean32.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const SplitPartials pass2 = gram_launch(m, mean32.const_data_ptr<float>(), info, f64, stream);

  // Pass 3: merge the splits, scale, mirror.
  reduce_mirror_kernel<<<tiles * kPerThread, kThreads, 0, stream>>>(
      pass2.partial.const_data_ptr<double>(), tiles, pass2.splits, n, d, mean.const_data_ptr<double>(),
      mean32.const_data_ptr<float>(), cov.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> center_syrk_cuda(const at::Tensor& W) {
  check_cuda_w(W, "center_syrk");
  const int64_t n = W.size(0), d = W.size(1);
  TORCH_CHECK(n >= 1 && d >= 1, "center_syrk (CUDA): W must have at least one row and one column, got shape ",
              W.sizes());
  const c10::cuda::CUDAGuard device_guard(W.device());
  at::Tensor mean = at::empty({d}, W.options().dtype(at::kDouble));
  at::Tensor cov = at::empty({d, d}, W.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(W.scalar_type(), "center_syrk_cuda",
      AT_DISPATCH_CASE(at::kBFloat16, [&] { center_syrk_launch<scalar_t>(W, mean, cov); })
      AT_DISPATCH_CASE(at::kHalf, [&] { center_syrk_launch<scalar_t>(W, mean, cov); })
      AT_DISPATCH_CASE(at::kFloat, [&] { center_syrk_launch<scalar_t>(W, mean, cov); }));
  return {mean, cov};
}

// ---- Rows split between processes -----------------------------------------------------------------
//
// center_syrk's steps for a W whose rows are split between processes (csrc/ops.cpp), on CUDA: the
// share's statistics and the triangle of its products; the ranks combine them and the CPU op
// center_syrk_finish, with exact = false, finishes. The plan is the CPU fp32 sets' (so CUDA and CPU
// shares can be combined): each column centered on center_of (center.h) of the whole's mean, sum
// of squares and sampled grid. Runs of identical rows stay in the sums (this kernel's fp32 runs are
// 128 rows long). Compiled, not yet run on a GPU.

// Row q of the share's statistics (4, d), from column_sum_kernel's partials: sums and sums of
// squares merged in split order, and the largest |x|.
__global__ void stats_merge_kernel(const double* __restrict__ partial, int64_t splits, int64_t d,
                                   double* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const ColumnSums s = merge_column_sums(partial, splits, d, j);
  out[j] = s.sum;
  out[d + j] = s.sq;
  out[2 * d + j] = fmax(fabs(s.lo), fabs(s.hi));
}

// The packed upper triangle (entry (i, j), i <= j, at i d - i (i - 1) / 2 + j - i) of the row
// splits' fp64 sums, added in split order; not divided by N.
__global__ void reduce_packed_kernel(const double* __restrict__ partial, int64_t tiles, int64_t splits, int64_t d,
                                     double* __restrict__ out) {
  SplitEntry x;
  if (split_entry(partial, tiles, splits, d, x)) out[x.i * d - x.i * (x.i - 1) / 2 + (x.j - x.i)] = x.sum;
}

void check_share(const at::Tensor& W, const char* op, int64_t row_offset, int64_t total_rows) {
  check_cuda_w(W, op);
  TORCH_CHECK(W.size(1) >= 1, op, " (CUDA): W must have at least one column, got shape ", W.sizes());
  TORCH_CHECK(row_offset >= 0 && total_rows >= row_offset + W.size(0), op, " (CUDA): rows [", row_offset, ", ",
              row_offset + W.size(0), ") do not lie in a whole of ", total_rows, " rows");
}

// Row 3 of the statistics: the finest grid exponent of the share's rows in the whole's sample
// (every max(1, total / 4096)-th row from the whole's row 0), found on the host (a few MB of rows).
at::Tensor sample_lsb_row(const at::Tensor& W, int64_t row_offset, int64_t total_rows) {
  const int64_t n = W.size(0), d = W.size(1);
  const int64_t step = std::max<int64_t>(1, total_rows / 4096);
  const int64_t first = (step - row_offset % step) % step;
  at::Tensor row = at::full({d}, std::numeric_limits<double>::infinity(), at::TensorOptions().dtype(at::kDouble));
  if (first >= n) return row;
  const at::Tensor idx = at::arange(first, n, step, W.options().dtype(at::kLong));
  const at::Tensor rows = W.index_select(0, idx).to(at::kCPU, at::kFloat).contiguous();
  const float* x = rows.const_data_ptr<float>();
  double* out = row.data_ptr<double>();
  for (int64_t r = 0; r < rows.size(0); ++r)
    for (int64_t j = 0; j < d; ++j) {
      const int v = refframe::grid_exponent(x[r * d + j]);
      if (v != std::numeric_limits<int>::max()) out[j] = std::min(out[j], static_cast<double>(v));
    }
  return row;
}

at::Tensor center_stats_cuda(const at::Tensor& W, int64_t row_offset, int64_t total_rows, bool /*exact*/) {
  check_share(W, "center_stats", row_offset, total_rows);
  const c10::cuda::CUDAGuard device_guard(W.device());
  const int64_t n = W.size(0), d = W.size(1);
  at::Tensor out = at::zeros({4, d}, W.options().dtype(at::kDouble));
  if (n > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    with_type(W, [&](auto tag) {
      const SplitPartials pass1 =
          column_sums_launch(Matrix<decltype(tag)>(W, "center_stats"), W.options().dtype(at::kDouble), stream);
      stats_merge_kernel<<<ceil_div(d, kThreads), kThreads, 0, stream>>>(pass1.partial.const_data_ptr<double>(),
                                                                        pass1.splits, d, out.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  out[3].copy_(sample_lsb_row(W, row_offset, total_rows));
  return out;
}

at::Tensor center_row_runs_cuda(const at::Tensor& W) {
  check_cuda_w(W, "center_row_runs");
  return at::empty({0, 3}, W.options().dtype(at::kLong));  // the CUDA kernels leave no runs out
}

// The fp32 centers of the CPU fp32 sets' plan, from the whole's statistics (on the host).
template <typename T>
at::Tensor plan_centers(const at::Tensor& stats, int64_t d, int64_t total_rows) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 4 && stats.size(1) == d && stats.scalar_type() == at::kDouble,
              "center_syrk_partial (CUDA): stats must be float64 of shape (4, ", d, "), got ", stats.scalar_type(),
              " ", stats.sizes());
  TORCH_CHECK(total_rows >= 1, "center_syrk_partial (CUDA): total_rows must be at least 1, got ", total_rows);
  const at::Tensor st = stats.to(at::kCPU).contiguous();
  const double* s = st.const_data_ptr<double>();
  at::Tensor centers = at::empty({d}, at::TensorOptions().dtype(at::kFloat));
  float* c = centers.data_ptr<float>();
  for (int64_t j = 0; j < d; ++j) {
    const double mean = s[j] / static_cast<double>(total_rows);
    const double grid = std::isfinite(s[3 * d + j]) ? std::ldexp(1.0, static_cast<int>(s[3 * d + j])) : 0.0;
    bool fp64_variance = false;
    c[j] = refframe::center_of<T>(mean, s[d + j], total_rows, grid, &fp64_variance);
  }
  return centers;
}

template <typename T>
void partial_launch(const at::Tensor& W, const at::Tensor& centers, at::Tensor& out) {
  const Matrix<T> m(W, "center_syrk_partial");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const SplitPartials pass2 =
      gram_launch(m, centers.const_data_ptr<float>(), device_info(), W.options().dtype(at::kDouble), stream);
  reduce_packed_kernel<<<m.tiles * kPerThread, kThreads, 0, stream>>>(pass2.partial.const_data_ptr<double>(),
                                                                     m.tiles, pass2.splits, m.d,
                                                                     out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor center_syrk_partial_cuda(const at::Tensor& W, const at::Tensor& stats, const at::Tensor& /*runs*/,
                                    int64_t row_offset, int64_t total_rows, bool exact) {
  check_share(W, "center_syrk_partial", row_offset, total_rows);
  TORCH_CHECK(!exact, "center_syrk_partial (CUDA): the CUDA kernels follow the fp32 sets' plan; pass exact=False "
              "(to center_syrk_finish too)");
  const c10::cuda::CUDAGuard device_guard(W.device());
  const int64_t n = W.size(0), d = W.size(1);
  at::Tensor out = at::zeros({d * (d + 1) / 2}, W.options().dtype(at::kDouble));
  if (n == 0) return out;
  with_type(W, [&](auto tag) {
    using T = decltype(tag);
    partial_launch<T>(W, plan_centers<T>(stats, d, total_rows).to(W.device()), out);
  });
  return out;
}

}  // namespace
}  // namespace refframe::cuda

TORCH_LIBRARY_IMPL(refframe, CUDA, m) {
  m.impl("center_syrk", &refframe::cuda::center_syrk_cuda);
  m.impl("center_stats", &refframe::cuda::center_stats_cuda);
  m.impl("center_row_runs", &refframe::cuda::center_row_runs_cuda);
  m.impl("center_syrk_partial", &refframe::cuda::center_syrk_partial_cuda);
}
