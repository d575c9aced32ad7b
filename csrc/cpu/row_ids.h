// Row ids as the CPU kernels take them (gather_mean, segment_mean, project, radii).
#pragma once

#include <ATen/ATen.h>

namespace refframe::cpu {

// ids (1-D, any integer dtype, any device) as a contiguous int64 CPU tensor, each checked to lie in
// [0, n); the messages name the op.
inline at::Tensor checked_ids(const at::Tensor& ids, int64_t n, const char* op) {
  TORCH_CHECK(ids.dim() == 1, op, ": ids must be 1-D, got shape ", ids.sizes());
  TORCH_CHECK(at::isIntegralType(ids.scalar_type(), /*includeBool=*/false), op,
              ": ids must have an integer dtype, got ", ids.scalar_type());
  at::Tensor ids64 = ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = ids64.const_data_ptr<int64_t>();
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < ids64.numel(); ++i) {
    if (p[i] < 0 || p[i] >= n) {
      if (bad++ == 0) first = i;
    }
  }
  TORCH_CHECK(bad == 0, op, ": ", bad, " id(s) outside [0, ", n, "); first: ids[", first, "] = ",
              bad ? p[first] : 0);
  return ids64;
}

}  // namespace refframe::cpu
