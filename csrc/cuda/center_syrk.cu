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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "../center.h"

namespace refframe::cuda {
namespace {

constexpr int kTile = 128;        // covariance tile edge: one thread block per tile and row split
constexpr int kBK = 16;           // rows of W staged in shared memory per step
constexpr int kThreads = 256;     // 16 x 16 threads, each owning 8 x 8 outputs of the tile
constexpr int kPerThread = 64;    // outputs per thread
constexpr int kFlushSteps = 8;    // steps summed in fp32 before each fp64 flush (128 rows)
constexpr int kStageFloats = 2 * 2 * kBK * kTile;  // two buffers of the A and B row panels
constexpr size_t kSmemBase = (kStageFloats + 2 * kTile) * sizeof(float);
constexpr size_t kSmemWithAcc = kSmemBase + sizeof(double) * kPerThread * kThreads;

constexpr int kSumCols = 32;      // pass 1: columns per block ...
constexpr int kSumLanes = 8;      // ... and row lanes per column

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Linear index t of an upper-triangle tile (ti <= tj), column by column: t = tj (tj + 1) / 2 + ti.
__host__ __device__ inline void tile_coords(int64_t t, int64_t& ti, int64_t& tj) {
  int64_t c = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (c * (c + 1) / 2 > t) --c;
  while ((c + 1) * (c + 2) / 2 <= t) ++c;
  tj = c;
  ti = t - c * (c + 1) / 2;
}

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

// mean64[j] = (sum of the split partials of column j, in split order) / N; mean32 = the fp32
// center of the column (center.h), from the mean and the sum of squares. With mma (non-null), the
// tensor-core kernel's center and scale instead, from the mean and the column's range.
template <typename T>
__global__ void mean_finalize_kernel(const double* __restrict__ partial, int64_t splits, int64_t n, int64_t d,
                                     double* __restrict__ mean64, float* __restrict__ mean32,
                                     float* __restrict__ inv_scale, double* __restrict__ scale) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  double s = 0.0, q = 0.0, lo = INFINITY, hi = -INFINITY;
  for (int64_t sp = 0; sp < splits; ++sp) {
    s += partial[sp * d + j];
    q += partial[(splits + sp) * d + j];
    lo = fmin(lo, partial[(2 * splits + sp) * d + j]);
    hi = fmax(hi, partial[(3 * splits + sp) * d + j]);
  }
  const double m = s / static_cast<double>(n);
  mean64[j] = m;
  if (scale != nullptr) {
    const MmaScale c = mma_scale_of(m, lo, hi);
    mean32[j] = c.center;
    inv_scale[j] = c.inv_scale;
    scale[j] = c.scale;
  } else {
    mean32[j] = refframe::center_of<T>(m, q, n);
  }
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
// Emulated on the CPU, the relative Frobenius error against float64 is ~2.6e-8 from 20000 rows on,
// the floor set by rounding the result to fp32, and below 1e-7 on tiny matrices with d > 1.
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

// ---- Tensor-core kernel (REFFRAME_CUDA_KERNEL=mma; bf16 and fp16 W) ----------------------------
//
// The same tiles, row splits and fp64 partials as syrk_kernel, with the products on the tensor
// cores (16 x 16 x 16 fp16 wmma, fp32 results). Each centered, scaled value is staged as two fp16
// numbers, y = hi + lo exactly (mma_scale_of), and y_i y_j = hi_i hi_j + (lo_i lo_j + lo_i hi_j +
// hi_i lo_j): four products per pair of values, chained on the tensor cores into two fragments per
// 16 x 16 block over 256 rows and then flushed into fp64. `big` takes the hi hi products: integers
// whose running sum stays within 2^24, so it is exact. `small` takes the other three, about 2^-8
// of big, so the tensor cores' rounding of its sums (toward zero, or not) stays far below fp32's
// rounding of the result. Emulated on the CPU (products exact, small's sums rounded toward zero at
// every product), the relative Frobenius error against float64 is 2.1-2.6e-8 on the CUDA tests'
// matrices, on a real 32,000 x 256 embedding and with one row up to 1000x longer than the rest:
// the rounding of the result to fp32. fp32 W stays on syrk_kernel (its 24 bits do not split into
// two fp16 numbers).
//
// Block: 8 warps, each owning a 64 x 32 part of the 128 x 128 tile (4 x 2 fragments of 16 x 16).
// The fp64 sums are kept per fragment element in the fragments' own (unspecified) element order:
// slot ((warp * 8 + fragment) * 8 + element) * 32 + lane. mma_layout_kernel records where each
// element of an accumulator fragment sits in its 16 x 16 block, and the reduction uses that map.
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

// cov[i][j] = cov[j][i] = fp32((sum over splits, in order, of the fp64 partials) / N), i <= j.
//
// One block per (tile, e): thread t reads partial entry e * 256 + t of every split (coalesced) and
// writes its upper-triangle element and the mirror. Writes are strided, but this pass moves only
// d^2 floats against the N d^2 / 2 products of pass 2.
__global__ void reduce_mirror_kernel(const double* __restrict__ partial, int64_t tiles, int64_t splits, int64_t n,
                                     int64_t d, const double* __restrict__ mean64,
                                     const float* __restrict__ mean32, float* __restrict__ cov) {
  const int64_t tile = blockIdx.x / kPerThread;
  const int e = blockIdx.x % kPerThread;
  const int tid = threadIdx.x;
  int64_t ti, tj;
  tile_coords(tile, ti, tj);
  const int64_t i = ti * kTile + micro_offset(tid / 16, e / 8);
  const int64_t j = tj * kTile + micro_offset(tid % 16, e % 8);
  if (i >= d || j >= d || i > j) return;
  const double* p = partial + tile * kTile * kTile + e * kThreads + tid;
  double s = 0.0;
  for (int64_t sp = 0; sp < splits; ++sp) s += p[sp * tiles * kTile * kTile];
  // The rows were centered on mean32, not on the exact mean: remove the resulting rank-one term.
  const double di = mean64[i] - static_cast<double>(mean32[i]), dj = mean64[j] - static_cast<double>(mean32[j]);
  const float v = static_cast<float>(s / static_cast<double>(n) - di * dj);
  cov[i * d + j] = v;
  if (i < j) cov[j * d + i] = v;
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

SyrkPlan plan_syrk(int64_t n, int64_t tiles, int64_t slots) {
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

}  // namespace

namespace {

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

struct DeviceInfo {
  int device = 0, sms = 0, smem_optin = 0, major = 0;
};

DeviceInfo device_info() {
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

template <typename T>
void center_syrk_launch(const at::Tensor& W, at::Tensor& mean, at::Tensor& cov) {
  const int64_t n = W.size(0), d = W.size(1), s0 = W.stride(0), s1 = W.stride(1);
  const T* w = W.const_data_ptr<T>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = W.options().dtype(at::kDouble);
  const auto f32 = W.options().dtype(at::kFloat);
  const DeviceInfo info = device_info();
  const bool asked_mma = mma_requested();  // checked for every dtype: a bad value is an error
  const bool mma = asked_mma && !std::is_same_v<T, float> && info.major >= 7 &&
                   static_cast<size_t>(info.smem_optin) >= kMmaSmemBase;

  // Pass 1: exact mean, and the sums of squares (simt) or the range (mma) that pick each column's
  // fp32 center.
  const int64_t mean_rows = std::max(kMinMeanRows, ceil_div(n, kMaxMeanSplits));
  const int64_t mean_splits = ceil_div(n, mean_rows);
  at::Tensor mean_partial = at::empty({4 * mean_splits, d}, f64);
  at::Tensor mean32 = at::empty({d}, f32);
  at::Tensor inv_scale = mma ? at::empty({d}, f32) : at::Tensor();
  at::Tensor scale = mma ? at::empty({d}, f64) : at::Tensor();
  column_sum_kernel<T><<<dim3(ceil_div(d, kSumCols), mean_splits), dim3(kSumCols, kSumLanes), 0, stream>>>(
      w, n, d, s0, s1, mean_rows, mean_partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  mean_finalize_kernel<T><<<ceil_div(d, kThreads), kThreads, 0, stream>>>(
      mean_partial.const_data_ptr<double>(), mean_splits, n, d, mean.data_ptr<double>(), mean32.data_ptr<float>(),
      mma ? inv_scale.data_ptr<float>() : nullptr, mma ? scale.data_ptr<double>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Pass 2: Gram matrix of the centered rows, upper-triangle tiles, split over rows.
  const int64_t per_side = ceil_div(d, kTile);
  const int64_t tiles = per_side * (per_side + 1) / 2;
  TORCH_CHECK(tiles * kPerThread <= INT32_MAX, "center_syrk (CUDA): d = ", d, " is too large");
  const bool vec = s1 == 1 && s0 % 8 == 0 && d % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;

  if constexpr (!std::is_same_v<T, float>) {
    if (mma) {
      at::Tensor map = at::empty({256}, W.options().dtype(at::kInt));
      mma_layout_kernel<<<1, 32, 0, stream>>>(map.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const bool smem_acc = static_cast<size_t>(info.smem_optin) >= kMmaSmemWithAcc;
      const size_t smem = smem_acc ? kMmaSmemWithAcc : kMmaSmemBase;
      const auto kernel = vec ? syrk_mma_kernel<T, true> : syrk_mma_kernel<T, false>;
      const SyrkPlan plan = plan_for(kernel, smem, n, tiles, info);
      at::Tensor partial = at::empty({plan.splits * tiles * kTile * kTile}, f64);
      kernel<<<dim3(tiles, plan.splits), kThreads, smem, stream>>>(
          w, n, d, s0, s1, mean32.const_data_ptr<float>(), inv_scale.const_data_ptr<float>(), plan.rows_per_split,
          tiles, smem_acc, partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce_mma_kernel<<<tiles * (kTile * kTile / kThreads), kThreads, 0, stream>>>(
          partial.const_data_ptr<double>(), map.const_data_ptr<int>(), tiles, plan.splits, n, d,
          mean.const_data_ptr<double>(), mean32.const_data_ptr<float>(), scale.const_data_ptr<double>(),
          cov.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }

  const bool smem_acc = static_cast<size_t>(info.smem_optin) >= kSmemWithAcc;
  const size_t smem = smem_acc ? kSmemWithAcc : kSmemBase;
  const auto kernel = vec ? syrk_kernel<T, true> : syrk_kernel<T, false>;
  const SyrkPlan plan = plan_for(kernel, smem, n, tiles, info);
  at::Tensor partial = at::empty({plan.splits * tiles * kTile * kTile}, f64);
  kernel<<<dim3(tiles, plan.splits), kThreads, smem, stream>>>(
      w, n, d, s0, s1, mean32.const_data_ptr<float>(), plan.rows_per_split, tiles, smem_acc,
      partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Pass 3: merge the splits, scale, mirror.
  reduce_mirror_kernel<<<tiles * kPerThread, kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), tiles, plan.splits, n, d, mean.const_data_ptr<double>(),
      mean32.const_data_ptr<float>(), cov.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> center_syrk_cuda(const at::Tensor& W) {
  TORCH_CHECK(W.is_cuda(), "center_syrk (CUDA): W must be a CUDA tensor, got device ", W.device());
  TORCH_CHECK(W.dim() == 2, "center_syrk (CUDA): W must be 2-D (N, d), got shape ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kBFloat16 || W.scalar_type() == at::kHalf ||
                  W.scalar_type() == at::kFloat,
              "center_syrk (CUDA): W must be bfloat16, float16 or float32, got ", W.scalar_type());
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

}  // namespace
}  // namespace refframe::cuda

TORCH_LIBRARY_IMPL(refframe, CUDA, m) {
  m.impl("center_syrk", &refframe::cuda::center_syrk_cuda);
}
