// gather_mean / segment_mean on CUDA: means of selected rows of W, without materialising W[ids].
//
// Input: W (N, d) bf16/fp16/fp32 on a CUDA device with any strides (unit column stride gives
// coalesced row reads); ids (L,) of any integer dtype and, for segment_mean, offsets (K+1,) on the
// same device (converted to int64 once: they are small). Output: fp32 (d,) or (K, d).
//
// Index checks: looking at ids or offsets on the host would synchronise the stream, so callers are
// expected to validate them first (refframe.build_frame does, through check_ids). Inside the kernels
// an id outside [0, N) or offsets that do not rise strictly from 0 to L trip a device-side assert,
// as torch's own indexing kernels do: a bad index is never read silently.
//
// Every sum is fp64 in a fixed order (row lanes, then lanes, then pieces): bitwise deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "w_checks.cuh"

namespace refframe::cuda {
namespace {

constexpr int kCols = 32;   // columns per block (one per thread of a warp)
constexpr int kLanes = 8;   // row lanes per block

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sum of the rows W[ids[p]] of one piece of one segment, for 32 columns.
//
// Grid: blockIdx.x = segment * pieces + piece, blockIdx.y = column block. A segment's ids are cut
// into `pieces` equal pieces so that one long segment (gather_mean of a large cluster) still fills
// the device. offsets == nullptr means a single segment holding all num_ids ids. Each row lane sums
// its rows in order in fp64; the lanes are merged in order. With one piece the block writes the
// mean (fp32) straight into out[segment]; otherwise the piece's fp64 sum goes to partial[blockIdx.x].
template <typename T>
__global__ void segment_sum_kernel(const T* __restrict__ w, int64_t n, int64_t d, int64_t s0, int64_t s1,
                                   const int64_t* __restrict__ ids, const int64_t* __restrict__ offsets,
                                   int64_t num_ids, int64_t segments, int64_t pieces,
                                   double* __restrict__ partial, float* __restrict__ out) {
  __shared__ double lanes[kLanes][kCols];
  const int64_t segment = blockIdx.x / pieces, piece = blockIdx.x % pieces;
  const int64_t begin = offsets ? offsets[segment] : 0;
  const int64_t end = offsets ? offsets[segment + 1] : num_ids;
  CUDA_KERNEL_ASSERT_MSG(0 <= begin && begin < end && end <= num_ids && (segment > 0 || begin == 0) &&
                             (segment + 1 < segments || end == num_ids),
                         "segment_mean: offsets must rise strictly from 0 to len(ids)");
  const int64_t len = end - begin;
  const int64_t p0 = begin + len * piece / pieces, p1 = begin + len * (piece + 1) / pieces;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kCols + threadIdx.x;
  double s = 0.0;
  for (int64_t p = p0 + threadIdx.y; p < p1; p += kLanes) {
    const int64_t id = ids[p];
    CUDA_KERNEL_ASSERT_MSG(0 <= id && id < n, "gather_mean/segment_mean: an id is outside [0, N)");
    if (j < d) s += static_cast<double>(static_cast<float>(w[id * s0 + j * s1]));
  }
  lanes[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || j >= d) return;
  double t = 0.0;
#pragma unroll
  for (int y = 0; y < kLanes; ++y) t += lanes[y][threadIdx.x];
  if (pieces == 1) {
    out[segment * d + j] = static_cast<float>(t / static_cast<double>(len));
  } else {
    partial[static_cast<int64_t>(blockIdx.x) * d + j] = t;
  }
}

// out[k][j] = fp32((sum over pieces, in order, of partial[k * pieces + piece][j]) / len_k).
__global__ void segment_finalize_kernel(const double* __restrict__ partial, const int64_t* __restrict__ offsets,
                                        int64_t num_ids, int64_t segments, int64_t pieces, int64_t d,
                                        float* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= segments * d) return;
  const int64_t segment = idx / d, j = idx % d;
  const int64_t len = offsets ? offsets[segment + 1] - offsets[segment] : num_ids;
  double s = 0.0;
  for (int64_t piece = 0; piece < pieces; ++piece) s += partial[(segment * pieces + piece) * d + j];
  out[idx] = static_cast<float>(s / static_cast<double>(len));
}

}  // namespace

namespace {

constexpr int64_t kRowsPerPiece = 1024;  // average rows per (segment, piece) before splitting further
constexpr int64_t kMaxPieces = 64;
constexpr int kFinalizeThreads = 256;

void check_w(const at::Tensor& W, const char* op) {
  check_cuda_w(W, op);
  TORCH_CHECK(ceil_div(W.size(1), kCols) <= 65535, op, " (CUDA): W has too many columns (", W.size(1), ")");
}

// int64 copy (or the tensor itself) of a 1-D integer index tensor on W's device.
at::Tensor index_tensor(const at::Tensor& t, const at::Tensor& W, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1, op, " (CUDA): ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op, " (CUDA): ", name,
              " must have an integer dtype, got ", t.scalar_type());
  TORCH_CHECK(t.device() == W.device(), op, " (CUDA): ", name, " must be on W's device ", W.device(),
              ", got ", t.device());
  return t.to(at::kLong).contiguous();
}

template <typename T>
void segment_mean_launch(const at::Tensor& W, const at::Tensor& ids, const int64_t* offsets, int64_t segments,
                         at::Tensor& out) {
  const int64_t n = W.size(0), d = W.size(1), num_ids = ids.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pieces = std::clamp<int64_t>(num_ids / (segments * kRowsPerPiece), 1, kMaxPieces);
  TORCH_CHECK(segments * pieces <= INT32_MAX, "segment_mean (CUDA): too many segments (", segments, ")");
  at::Tensor partial;
  if (pieces > 1) partial = at::empty({segments * pieces, d}, W.options().dtype(at::kDouble));
  segment_sum_kernel<T><<<dim3(segments * pieces, ceil_div(d, kCols)), dim3(kCols, kLanes), 0, stream>>>(
      W.const_data_ptr<T>(), n, d, W.stride(0), W.stride(1), ids.const_data_ptr<int64_t>(), offsets, num_ids,
      segments, pieces, pieces > 1 ? partial.data_ptr<double>() : nullptr, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (pieces > 1) {
    segment_finalize_kernel<<<ceil_div(segments * d, kFinalizeThreads), kFinalizeThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), offsets, num_ids, segments, pieces, d, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void dispatch_segment_mean(const at::Tensor& W, const at::Tensor& ids, const int64_t* offsets, int64_t segments,
                           at::Tensor& out) {
  if (W.size(1) == 0) return;  // nothing to average (and a grid with no columns would not launch)
  AT_DISPATCH_SWITCH(W.scalar_type(), "segment_mean_cuda",
      AT_DISPATCH_CASE(at::kBFloat16, [&] { segment_mean_launch<scalar_t>(W, ids, offsets, segments, out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { segment_mean_launch<scalar_t>(W, ids, offsets, segments, out); })
      AT_DISPATCH_CASE(at::kFloat, [&] { segment_mean_launch<scalar_t>(W, ids, offsets, segments, out); }));
}

at::Tensor segment_mean_cuda(const at::Tensor& W, const at::Tensor& ids, const at::Tensor& offsets) {
  check_w(W, "segment_mean");
  const c10::cuda::CUDAGuard device_guard(W.device());
  const at::Tensor ids64 = index_tensor(ids, W, "segment_mean", "ids");
  const at::Tensor off64 = index_tensor(offsets, W, "segment_mean", "offsets");
  const int64_t segments = off64.numel() - 1;
  TORCH_CHECK(segments >= 1, "segment_mean (CUDA): offsets must have at least 2 entries (K+1 for K segments), "
              "got shape ", offsets.sizes());
  TORCH_CHECK(ids64.numel() >= segments, "segment_mean (CUDA): ", segments, " segments need at least as many ids, "
              "got ", ids64.numel(), " (every segment must be non-empty)");
  at::Tensor out = at::empty({segments, W.size(1)}, W.options().dtype(at::kFloat));
  dispatch_segment_mean(W, ids64, off64.const_data_ptr<int64_t>(), segments, out);
  return out;
}

at::Tensor gather_mean_cuda(const at::Tensor& W, const at::Tensor& ids) {
  check_w(W, "gather_mean");
  const c10::cuda::CUDAGuard device_guard(W.device());
  const at::Tensor ids64 = index_tensor(ids, W, "gather_mean", "ids");
  TORCH_CHECK(ids64.numel() > 0, "gather_mean (CUDA): ids is empty; the mean of no rows is undefined");
  at::Tensor out = at::empty({W.size(1)}, W.options().dtype(at::kFloat));
  dispatch_segment_mean(W, ids64, nullptr, 1, out);
  return out;
}

}  // namespace
}  // namespace refframe::cuda

TORCH_LIBRARY_IMPL(refframe, CUDA, m) {
  m.impl("gather_mean", &refframe::cuda::gather_mean_cuda);
  m.impl("segment_mean", &refframe::cuda::segment_mean_cuda);
}
