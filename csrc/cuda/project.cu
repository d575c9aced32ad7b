// project / radii on CUDA: the coordinates of rows of W in a frame, and their distances from its
// center, without an fp32 or centered copy of W.
//
// Input: W (N, d) bf16/fp16/fp32 on a CUDA device, any strides (unit column stride gives coalesced
// reads); center fp32 (d,) and basis fp32 (d, k), k >= 1, on W's device; ids None (every row, in
// order) or a 1-D integer tensor of rows of W on W's device, repeats allowed. Output, fp32:
// project (n, k) = (W[ids] - center) @ basis; radii (n,) = ||W[ids] - center||_2.
//
// Index checks: ids are checked on the host before any launch (their minimum and maximum, one
// synchronisation of the stream), so an id outside [0, N) is a RuntimeError. A device-side assert,
// as in gather_mean.cu, would leave the CUDA context unusable for the rest of the process.
//
// Precision: every value of W converts exactly to fp32 and is centered by one fp32 subtraction.
// project: each coordinate is a chain of fp32 FMAs over 64 consecutive columns of d, started from
// zero, added into an fp64 accumulator chunk after chunk in column order, rounded once to fp32.
// radii: the square of each centered value is exact in fp64 and summed there; a fixed butterfly
// merges a warp's lanes; the root is taken in fp64 and rounded once.
//
// No atomics: each output has one owner (a thread for project, a warp for radii) that sums in a
// fixed order, so the result is bitwise reproducible. The order of project's sums does not depend on
// the tile shape either: the same bits for any k (a coordinate does not change when columns are
// added to the basis), for strided or contiguous W, and for a row given by ids or taken in order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

#include "w_checks.cuh"

namespace refframe::cuda {
namespace {

constexpr int kThreads = 256;        // threads per block of project
constexpr int kBK = 32;              // columns of d (terms of each dot product) staged per step
constexpr int kFlushSteps = 2;       // steps chained in fp32 before each fp64 flush: 64 terms
constexpr int kPad = 4;              // floats after each staged row: 16-byte rows, no bank conflicts
constexpr int kLoadRows = kThreads / kBK;  // rows of W one pass of the block's loads covers
constexpr int kRadiiWarps = 8;       // rows per block of radii (one warp each)

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float lane_of(const float4& v, int u) {
  return u == 0 ? v.x : u == 1 ? v.y : u == 2 ? v.z : v.w;
}

// One BM x BN tile of project's output: rows r0.. of the selection, basis columns c0...
//
// Grid: one block per tile, blockIdx.x = row tile * col_tiles + column tile (the blocks that read the
// same rows of W run side by side and share them in L2). Each step stages, for kBK columns of d,
// the tile's rows of W, converted and centered (fp32(x) - center, zero outside W), as As[row][col],
// and the basis rows as Bs[col][basis column]; the next step's values are loaded into registers
// while the current step is multiplied. Loads: a warp reads 32 consecutive columns of one row
// (coalesced with unit column stride) and 32 consecutive basis values.
//
// Each thread owns TM x TN outputs: rows ty + i * (BM / TM), columns tx * 4 + 4 * (BN / TN) * g + e
// (float4 groups g), so its reads of As and Bs are float4s without bank conflicts. Products are
// fp32 FMAs chained over kFlushSteps * kBK = 64 columns from zero, then added into fp64 registers.
template <typename T, int BM, int BN, int TM, int TN>
__global__ void __launch_bounds__(kThreads)
    project_kernel(const T* __restrict__ w, int64_t s0, int64_t s1, int64_t d, const int64_t* __restrict__ ids,
                   int64_t n, const float* __restrict__ center, const float* __restrict__ basis, int64_t k,
                   int64_t col_tiles, float* __restrict__ out) {
  constexpr int kColThreads = BN / TN;
  constexpr int kRowThreads = kThreads / kColThreads;
  constexpr int kGroups = TN / 4;
  constexpr int kLoads = BM / kLoadRows;                        // values of W per thread and step
  constexpr int kBLoads = (kBK * BN + kThreads - 1) / kThreads;  // basis values per thread and step
  static_assert(TN % 4 == 0 && BN % TN == 0 && kRowThreads * TM == BM && BM % kLoadRows == 0, "tile shape");

  __shared__ __align__(16) float As[BM][kBK + kPad];
  __shared__ __align__(16) float Bs[kBK][BN];
  __shared__ int64_t row_start[BM];

  const int tid = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) / col_tiles * BM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) % col_tiles * BN;
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t row = r0 + r < n ? r0 + r : n - 1;
    row_start[r] = (ids != nullptr ? ids[row] : row) * s0;
  }

  const int lc = tid % kBK, lr = tid / kBK;  // load position: column lc of rows lr + kLoadRows * p
  T wv[kLoads];
  float cv = 0.0f;
  float bv[kBLoads];
  auto fetch = [&](int64_t j0) {
    const int64_t col = j0 + lc;
    if (col < d) {
      cv = center[col];
#pragma unroll
      for (int p = 0; p < kLoads; ++p) wv[p] = w[row_start[lr + kLoadRows * p] + col * s1];
    }
#pragma unroll
    for (int q = 0; q < kBLoads; ++q) {
      const int e = tid + kThreads * q;
      const int64_t bt = j0 + e / BN, bc = c0 + e % BN;
      bv[q] = e < kBK * BN && bt < d && bc < k ? basis[bt * k + bc] : 0.0f;
    }
  };
  auto stage = [&](int64_t j0) {
    const bool live = j0 + lc < d;
#pragma unroll
    for (int p = 0; p < kLoads; ++p) {
      As[lr + kLoadRows * p][lc] = live ? static_cast<float>(wv[p]) - cv : 0.0f;
    }
#pragma unroll
    for (int q = 0; q < kBLoads; ++q) {
      const int e = tid + kThreads * q;
      if (e < kBK * BN) Bs[e / BN][e % BN] = bv[q];
    }
  };

  const int tx = tid % kColThreads, ty = tid / kColThreads;
  float run[TM][TN];
  double acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      run[i][j] = 0.0f;
      acc[i][j] = 0.0;
    }

  __syncthreads();  // row_start
  const int64_t steps = ceil_div(d, kBK);
  if (steps > 0) fetch(0);
  for (int64_t step = 0; step < steps; ++step) {
    stage(step * kBK);
    __syncthreads();
    if (step + 1 < steps) fetch((step + 1) * kBK);
#pragma unroll
    for (int t = 0; t < kBK; t += 4) {
      float4 a[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = *reinterpret_cast<const float4*>(&As[ty + i * kRowThreads][t]);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float b[TN];
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          const float4 v = *reinterpret_cast<const float4*>(&Bs[t + u][tx * 4 + g * 4 * kColThreads]);
          b[4 * g] = v.x;
          b[4 * g + 1] = v.y;
          b[4 * g + 2] = v.z;
          b[4 * g + 3] = v.w;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const float x = lane_of(a[i], u);
#pragma unroll
          for (int j = 0; j < TN; ++j) run[i][j] = fmaf(x, b[j], run[i][j]);
        }
      }
    }
    if ((step + 1) % kFlushSteps == 0 || step + 1 == steps) {
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          acc[i][j] += static_cast<double>(run[i][j]);
          run[i][j] = 0.0f;
        }
    }
    __syncthreads();  // every thread has read As and Bs before the next stage overwrites them
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = r0 + ty + i * kRowThreads;
    if (row >= n) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = c0 + tx * 4 + (j / 4) * 4 * kColThreads + j % 4;
      if (col < k) out[row * k + col] = static_cast<float>(acc[i][j]);
    }
  }
}

// out[r] = ||W[row r] - center||_2, one warp per row.
//
// Block: kRadiiWarps warps, one row each. Lane l takes columns l, l + 32, ... (coalesced with unit
// column stride); each centered value is fp32(x) - center, its square exact in fp64 and added to the
// lane's fp64 sum in column order; the lanes are merged by a fixed xor butterfly (every lane ends
// with the same bits); sqrt in fp64, rounded once to fp32.
template <typename T>
__global__ void __launch_bounds__(kRadiiWarps * 32)
    radii_kernel(const T* __restrict__ w, int64_t s0, int64_t s1, int64_t d, const int64_t* __restrict__ ids,
                 int64_t n, const float* __restrict__ center, float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRadiiWarps + threadIdx.x / 32;
  if (r >= n) return;  // the whole warp leaves together
  const T* row = w + (ids != nullptr ? ids[r] : r) * s0;
  double s = 0.0;
#pragma unroll 4
  for (int64_t j = lane; j < d; j += 32) {
    const double x = static_cast<double>(static_cast<float>(row[j * s1]) - center[j]);
    s = fma(x, x, s);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (lane == 0) out[r] = static_cast<float>(sqrt(s));
}

}  // namespace

namespace {

// center, contiguous: fp32 (d,) on W's device.
at::Tensor checked_center(const at::Tensor& center, const at::Tensor& W, const char* op) {
  TORCH_CHECK(center.device() == W.device(), op, " (CUDA): center must be on W's device ", W.device(), ", got ",
              center.device());
  TORCH_CHECK(center.scalar_type() == at::kFloat, op, " (CUDA): center must be float32, got ",
              center.scalar_type());
  TORCH_CHECK(center.dim() == 1 && center.size(0) == W.size(1), op, " (CUDA): center must have shape (d,) = (",
              W.size(1), ",) for W of shape ", W.sizes(), ", got ", center.sizes());
  return center.contiguous();
}

// basis, contiguous: fp32 (d, k), k >= 1, on W's device.
at::Tensor checked_basis(const at::Tensor& basis, const at::Tensor& W) {
  TORCH_CHECK(basis.device() == W.device(), "project (CUDA): basis must be on W's device ", W.device(), ", got ",
              basis.device());
  TORCH_CHECK(basis.scalar_type() == at::kFloat, "project (CUDA): basis must be float32, got ",
              basis.scalar_type());
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == W.size(1) && basis.size(1) >= 1,
              "project (CUDA): basis must have shape (d, k) with d = ", W.size(1), " and k >= 1 for W of shape ",
              W.sizes(), ", got ", basis.sizes());
  return basis.contiguous();
}

// ids as a contiguous int64 tensor (undefined for None), every id checked to lie in [0, N) on the
// host, before anything is launched.
at::Tensor checked_ids(const std::optional<at::Tensor>& ids, const at::Tensor& W, const char* op) {
  if (!ids.has_value()) return at::Tensor();
  const at::Tensor& t = *ids;
  TORCH_CHECK(t.device() == W.device(), op, " (CUDA): ids must be on W's device ", W.device(), ", got ",
              t.device());
  TORCH_CHECK(t.dim() == 1, op, " (CUDA): ids must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op,
              " (CUDA): ids must have an integer dtype, got ", t.scalar_type());
  at::Tensor ids64 = t.to(at::kLong).contiguous();
  if (ids64.numel() > 0) {
    const auto [lo, hi] = at::aminmax(ids64);
    const at::Tensor range = at::stack({lo, hi}).cpu();  // waits for the stream
    const int64_t first = range.const_data_ptr<int64_t>()[0], last = range.const_data_ptr<int64_t>()[1];
    TORCH_CHECK(first >= 0 && last < W.size(0), op, " (CUDA): ids must lie in [0, N) = [0, ", W.size(0),
                ") for W of shape ", W.sizes(), ", got ids from ", first, " to ", last);
  }
  return ids64;
}

template <typename T, int BM, int BN, int TM, int TN>
void project_launch(const at::Tensor& W, const at::Tensor& center, const at::Tensor& basis, const at::Tensor& ids,
                    int64_t n, at::Tensor& out) {
  const int64_t k = basis.size(1);
  const int64_t col_tiles = ceil_div(k, BN), blocks = ceil_div(n, BM) * col_tiles;
  TORCH_CHECK(blocks <= INT32_MAX, "project (CUDA): too many rows (", n, ") and basis columns (", k, ")");
  project_kernel<T, BM, BN, TM, TN><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      W.const_data_ptr<T>(), W.stride(0), W.stride(1), W.size(1),
      ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr, n, center.const_data_ptr<float>(),
      basis.const_data_ptr<float>(), k, col_tiles, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tile for k: the narrowest of 4, 16, 64 basis columns that holds k (one pass over W, the
// basis chunk in shared memory), else 128-column tiles (a GEMM over column tiles).
template <typename T>
void project_dispatch_k(const at::Tensor& W, const at::Tensor& center, const at::Tensor& basis,
                        const at::Tensor& ids, int64_t n, at::Tensor& out) {
  const int64_t k = basis.size(1);
  if (k <= 4) {
    project_launch<T, 256, 4, 1, 4>(W, center, basis, ids, n, out);
  } else if (k <= 16) {
    project_launch<T, 128, 16, 2, 4>(W, center, basis, ids, n, out);
  } else if (k <= 64) {
    project_launch<T, 64, 64, 4, 4>(W, center, basis, ids, n, out);
  } else {
    project_launch<T, 64, 128, 4, 8>(W, center, basis, ids, n, out);
  }
}

at::Tensor project_cuda(const at::Tensor& W, const at::Tensor& center, const at::Tensor& basis,
                        const std::optional<at::Tensor>& ids) {
  check_cuda_w(W, "project");
  const c10::cuda::CUDAGuard device_guard(W.device());
  const at::Tensor c = checked_center(center, W, "project");
  const at::Tensor V = checked_basis(basis, W);
  const at::Tensor ids64 = checked_ids(ids, W, "project");
  const int64_t n = ids64.defined() ? ids64.numel() : W.size(0);
  at::Tensor out = at::empty({n, V.size(1)}, W.options().dtype(at::kFloat));
  if (n == 0) return out;
  AT_DISPATCH_SWITCH(W.scalar_type(), "project_cuda",
      AT_DISPATCH_CASE(at::kBFloat16, [&] { project_dispatch_k<scalar_t>(W, c, V, ids64, n, out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { project_dispatch_k<scalar_t>(W, c, V, ids64, n, out); })
      AT_DISPATCH_CASE(at::kFloat, [&] { project_dispatch_k<scalar_t>(W, c, V, ids64, n, out); }));
  return out;
}

template <typename T>
void radii_launch(const at::Tensor& W, const at::Tensor& center, const at::Tensor& ids, int64_t n,
                  at::Tensor& out) {
  const int64_t blocks = ceil_div(n, kRadiiWarps);
  TORCH_CHECK(blocks <= INT32_MAX, "radii (CUDA): too many rows (", n, ")");
  radii_kernel<T><<<blocks, kRadiiWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      W.const_data_ptr<T>(), W.stride(0), W.stride(1), W.size(1),
      ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr, n, center.const_data_ptr<float>(),
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor radii_cuda(const at::Tensor& W, const at::Tensor& center, const std::optional<at::Tensor>& ids) {
  check_cuda_w(W, "radii");
  const c10::cuda::CUDAGuard device_guard(W.device());
  const at::Tensor c = checked_center(center, W, "radii");
  const at::Tensor ids64 = checked_ids(ids, W, "radii");
  const int64_t n = ids64.defined() ? ids64.numel() : W.size(0);
  at::Tensor out = at::empty({n}, W.options().dtype(at::kFloat));
  if (n == 0) return out;
  AT_DISPATCH_SWITCH(W.scalar_type(), "radii_cuda",
      AT_DISPATCH_CASE(at::kBFloat16, [&] { radii_launch<scalar_t>(W, c, ids64, n, out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { radii_launch<scalar_t>(W, c, ids64, n, out); })
      AT_DISPATCH_CASE(at::kFloat, [&] { radii_launch<scalar_t>(W, c, ids64, n, out); }));
  return out;
}

}  // namespace
}  // namespace refframe::cuda

TORCH_LIBRARY_IMPL(refframe, CUDA, m) {
  m.impl("project", &refframe::cuda::project_cuda);
  m.impl("radii", &refframe::cuda::radii_cuda);
}
