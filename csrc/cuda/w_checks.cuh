// The checks every CUDA op makes of W, with the op's name in each message: a 2-D bfloat16, float16
// or float32 tensor on a CUDA device. Each op adds its own (rows, columns) after them.
#pragma once

#include <ATen/ATen.h>

namespace refframe::cuda {

inline void check_cuda_w(const at::Tensor& W, const char* op) {
  TORCH_CHECK(W.is_cuda(), op, " (CUDA): W must be a CUDA tensor, got device ", W.device());
  TORCH_CHECK(W.dim() == 2, op, " (CUDA): W must be 2-D (N, d), got shape ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kBFloat16 || W.scalar_type() == at::kHalf || W.scalar_type() == at::kFloat,
              op, " (CUDA): W must be bfloat16, float16 or float32, got ", W.scalar_type());
}

}  // namespace refframe::cuda
