// gather_mean / segment_mean on CPU: means of selected rows of W, without materialising W[ids].
//
// Input: W (N, d) bf16/fp16/fp32 with any strides; ids of any integer dtype (1-D); for segment_mean,
// offsets (K+1,) non-decreasing, offsets[0] == 0, offsets[K] == len(ids). Output: fp32 (d,) or (K, d).
// Each output column is accumulated in fp64 in the order the ids are given, so the result does not
// depend on the thread count. Threads split the columns: every selected row is read once in total.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "row_ids.h"

namespace refframe::cpu {
namespace {

template <typename T>
void segment_mean_impl(const T* w, int64_t s0, int64_t s1, int64_t d, const int64_t* ids,
                       const int64_t* offsets, int64_t k, float* out) {
  constexpr int64_t COLS = 256;
  at::parallel_for(0, (d + COLS - 1) / COLS, 1, [&](int64_t b, int64_t e) {
    std::vector<double> acc(COLS);
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t j0 = blk * COLS, width = std::min(COLS, d - j0);
      for (int64_t s = 0; s < k; ++s) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t i = offsets[s]; i < offsets[s + 1]; ++i) {
          const T* row = w + ids[i] * s0 + j0 * s1;
          if (s1 == 1) {
            for (int64_t j = 0; j < width; ++j) acc[j] += static_cast<double>(static_cast<float>(row[j]));
          } else {
            for (int64_t j = 0; j < width; ++j)
              acc[j] += static_cast<double>(static_cast<float>(row[j * s1]));
          }
        }
        const double count = static_cast<double>(offsets[s + 1] - offsets[s]);
        for (int64_t j = 0; j < width; ++j) out[s * d + j0 + j] = static_cast<float>(acc[j] / count);
      }
    }
  });
}

void check_w(const at::Tensor& W, const char* op) {
  TORCH_CHECK(W.dim() == 2, op, ": W must be 2-D (N, d), got shape ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kBFloat16 || W.scalar_type() == at::kHalf ||
                  W.scalar_type() == at::kFloat,
              op, ": W must be bfloat16, float16 or float32, got ", W.scalar_type());
}

at::Tensor segment_mean_cpu(const at::Tensor& W, const at::Tensor& ids, const at::Tensor& offsets) {
  check_w(W, "segment_mean");
  const int64_t n = W.size(0), d = W.size(1);
  const at::Tensor ids64 = checked_ids(ids, n, "segment_mean");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 2, "segment_mean: offsets must be 1-D with at "
              "least 2 entries (K+1 for K segments), got shape ", offsets.sizes());
  TORCH_CHECK(at::isIntegralType(offsets.scalar_type(), false),
              "segment_mean: offsets must have an integer dtype, got ", offsets.scalar_type());
  const at::Tensor off64 = offsets.to(at::kCPU, at::kLong).contiguous();
  const int64_t* off = off64.const_data_ptr<int64_t>();
  const int64_t k = off64.numel() - 1;
  TORCH_CHECK(off[0] == 0 && off[k] == ids64.numel(), "segment_mean: offsets must start at 0 and end at "
              "len(ids) = ", ids64.numel(), ", got ", off[0], " and ", off[k]);
  for (int64_t s = 0; s < k; ++s)
    TORCH_CHECK(off[s + 1] > off[s], "segment_mean: segment ", s, " is empty or offsets decrease (offsets[",
                s, "] = ", off[s], ", offsets[", s + 1, "] = ", off[s + 1], ")");
  at::Tensor out = at::empty({k, d}, W.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(W.scalar_type(), "segment_mean_cpu",
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        segment_mean_impl(W.const_data_ptr<c10::BFloat16>(), W.stride(0), W.stride(1), d,
                          ids64.const_data_ptr<int64_t>(), off, k, out.data_ptr<float>());
      })
      AT_DISPATCH_CASE(at::kHalf, [&] {
        segment_mean_impl(W.const_data_ptr<c10::Half>(), W.stride(0), W.stride(1), d,
                          ids64.const_data_ptr<int64_t>(), off, k, out.data_ptr<float>());
      })
      AT_DISPATCH_CASE(at::kFloat, [&] {
        segment_mean_impl(W.const_data_ptr<float>(), W.stride(0), W.stride(1), d,
                          ids64.const_data_ptr<int64_t>(), off, k, out.data_ptr<float>());
      }));
  return out;
}

at::Tensor gather_mean_cpu(const at::Tensor& W, const at::Tensor& ids) {
  check_w(W, "gather_mean");
  TORCH_CHECK(ids.numel() > 0, "gather_mean: ids is empty; the mean of no rows is undefined");
  const at::Tensor offsets = at::tensor({int64_t{0}, ids.numel()}, at::kLong);
  return segment_mean_cpu(W, ids, offsets).view({W.size(1)});
}

}  // namespace
}  // namespace refframe::cpu

TORCH_LIBRARY_IMPL(refframe, CPU, m) {
  m.impl("gather_mean", &refframe::cpu::gather_mean_cpu);
  m.impl("segment_mean", &refframe::cpu::segment_mean_cpu);
}
