// project / radii on CPU: rows of W seen from a frame, without an fp32 or centered copy of W.
//
// Input: W (N, d) bf16/fp16/fp32 (unit column stride and any row stride, such as a memory-mapped
// file, is read in place with the kernel set's SIMD code; other strides element by element);
// center fp32 (d,); for project a basis fp32 (d, k), 1 <= k <= d, made contiguous once; ids an
// optional 1-D integer tensor of row ids, repeats allowed (None: every row, in order).
// Output: project fp32 (n, k) = (W[ids] - center) @ basis; radii fp32 (n,) = ||W[ids] - center||;
// n = len(ids), or N.
//
// Each row is centered first, t = float(x) - c (exact conversion, one fp32 subtraction: the center
// comes off before any product, so a column far from zero costs nothing), then multiplied by the
// basis on one of two paths, by k:
//   dot   (k <= the set's dot_max_k)  rows read in place and centered in registers; vector lanes
//                                     along d, each lane summing 64 products in fp32 before it
//                                     adds them to its fp64 sum; the lanes added in fp64
//   tile  (larger k)                  blocks of rows centered into an fp32 buffer; register tiles
//                                     of rows x basis columns, fp32 FMAs over 64 consecutive terms
//                                     of d added into fp64; the basis packed once into column
//                                     panels, each panel chunk read from L1 by all the block's tiles
// Every output is rounded once from fp64 to fp32. radii sums the exact fp64 squares of the centered
// values, read in place. Threads take fixed blocks of rows; a row's arithmetic depends neither on
// its block nor on the thread, so the results are bitwise the same for any thread count, and a
// row's results do not depend on the other rows selected.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "project_kernel.h"
#include "row_ids.h"

namespace refframe::cpu {
namespace {

// The rows a call reads: row i is W's row ids[i] (or i), d elements s1 apart.
template <typename T>
struct RowSource {
  const T* w;
  int64_t d, s0, s1;
  const int64_t* ids;  // null: every row in order
  const T* row(int64_t i) const { return w + (ids != nullptr ? ids[i] : i) * s0; }
};

// The set's building blocks for rows of W's element type.
auto center_fn(const ProjectKernels& ks, const c10::BFloat16*) { return ks.center_bf16; }
auto center_fn(const ProjectKernels& ks, const c10::Half*) { return ks.center_f16; }
auto center_fn(const ProjectKernels& ks, const float*) { return ks.center_f32; }
auto sum_squares_fn(const ProjectKernels& ks, const c10::BFloat16*) { return ks.sum_squares_bf16; }
auto sum_squares_fn(const ProjectKernels& ks, const c10::Half*) { return ks.sum_squares_f16; }
auto sum_squares_fn(const ProjectKernels& ks, const float*) { return ks.sum_squares_f32; }
auto dot_fn(const ProjectKernels& ks, const c10::BFloat16*) { return ks.dot_bf16; }
auto dot_fn(const ProjectKernels& ks, const c10::Half*) { return ks.dot_f16; }
auto dot_fn(const ProjectKernels& ks, const float*) { return ks.dot_f32; }

// t[l] = float(x[l]) - c[l] for row i, zero from d to ld: the set's code for unit column stride,
// else element by element (the same bits).
template <typename T>
void center_row(const RowSource<T>& src, const ProjectKernels& ks, int64_t i, const float* c, int64_t ld, float* t) {
  const T* x = src.row(i);
  if (src.s1 == 1) {
    center_fn(ks, x)(x, src.d, c, ld, t);
    return;
  }
  for (int64_t l = 0; l < src.d; ++l) t[l] = static_cast<float>(x[l * src.s1]) - c[l];
  std::fill(t + src.d, t + ld, 0.0f);
}

int64_t padded(int64_t d) { return (d + 15) / 16 * 16; }

at::Tensor zeros_f32(int64_t n) { return at::zeros({n}, at::TensorOptions().dtype(at::kFloat)); }

// The basis in the dot layout (row j: column j of V, ld floats, zero from d) or the tile layout
// (panels of ks.panel columns: panel p, row l at (p * ld + l) * panel, zero past k and from d).
at::Tensor pack_basis(const at::Tensor& V, const ProjectKernels& ks, bool dot, int64_t ld) {
  const int64_t d = V.size(0), k = V.size(1), P = ks.panel, panels = (k + P - 1) / P;
  const float* v = V.const_data_ptr<float>();
  at::Tensor packed = zeros_f32(dot ? k * ld : panels * ld * P);
  float* dst = packed.data_ptr<float>();
  for (int64_t l = 0; l < d; ++l)
    for (int64_t j = 0; j < k; ++j) {
      if (dot) dst[j * ld + l] = v[l * k + j];
      else dst[((j / P) * ld + l) * P + j % P] = v[l * k + j];
    }
  return packed;
}

// The dot path: blocks of ks.rows rows, read in place (unit column stride) or centered into t first
// and then read with a zero center (the same bits).
template <typename T>
void dot_rows(const RowSource<T>& src, int64_t n, const float* c, const float* vt, int64_t ld, int64_t k,
              const ProjectKernels& ks, float* out) {
  const int64_t R = ks.rows, d = src.d;
  at::parallel_for(0, (n + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    std::vector<const T*> rows(R);
    std::vector<const float*> centered(R);
    std::vector<double> acc(ks.dot_scratch);
    const at::Tensor t = src.s1 == 1 ? at::Tensor() : zeros_f32((R + 1) * ld);  // R rows, then zeros
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * R, m = std::min(R, n - r0);
      if (src.s1 == 1) {
        for (int64_t i = 0; i < m; ++i) rows[i] = src.row(r0 + i);
        dot_fn(ks, src.w)(rows.data(), m, d, c, vt, ld, k, acc.data(), out + r0 * k);
        continue;
      }
      float* tp = t.data_ptr<float>();
      for (int64_t i = 0; i < m; ++i) {
        center_row(src, ks, r0 + i, c, ld, tp + i * ld);
        centered[i] = tp + i * ld;
      }
      ks.dot_f32(centered.data(), m, d, tp + R * ld, vt, ld, k, acc.data(), out + r0 * k);
    }
  });
}

// project for W's rows: the dot path for small k, else blocks of ks.rows rows centered into t and
// multiplied by the packed basis (tile).
template <typename T>
void project_rows(const RowSource<T>& src, int64_t n, const float* c, const at::Tensor& V, const ProjectKernels& ks,
                  float* out) {
  const int64_t k = V.size(1), ld = padded(src.d), R = ks.rows;
  const bool dot = k <= ks.dot_max_k;
  const at::Tensor packed = pack_basis(V, ks, dot, ld);
  const float* vp = packed.const_data_ptr<float>();
  if (dot) {
    dot_rows(src, n, c, vp, ld, k, ks, out);
    return;
  }
  const int64_t t_rows = std::min(R, (n + ks.align - 1) / ks.align * ks.align);
  const int64_t ldc = (k + ks.panel - 1) / ks.panel * ks.panel;
  at::parallel_for(0, (n + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor t = zeros_f32(t_rows * ld);  // rows past a block's last stay finite (zero or older rows)
    std::vector<double> acc(t_rows * ldc);
    float* tp = t.data_ptr<float>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * R, m = std::min(R, n - r0);
      for (int64_t i = 0; i < m; ++i) center_row(src, ks, r0 + i, c, ld, tp + i * ld);
      ks.tile(tp, ld, m, vp, k, acc.data(), out + r0 * k);
    }
  });
}

// One fp64 sum of squares per row, from W (unit column stride) or from the row centered into t.
template <typename T>
void radii_rows(const RowSource<T>& src, int64_t n, const float* c, float* out) {
  const ProjectKernels& ks = active_project_kernels();
  const int64_t ld = padded(src.d);
  at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
    at::Tensor t = zeros_f32(2 * ld);  // a centered row, then zeros (the center of t)
    float* tp = t.data_ptr<float>();
    for (int64_t i = i0; i < i1; ++i) {
      double sq;
      if (src.s1 == 1) {
        sq = sum_squares_fn(ks, src.w)(src.row(i), src.d, c);
      } else {
        center_row(src, ks, i, c, ld, tp);
        sq = ks.sum_squares_f32(tp, src.d, tp + ld);
      }
      out[i] = static_cast<float>(std::sqrt(sq));
    }
  });
}

// ---- Inputs -------------------------------------------------------------------------------------

void check_w_and_center(const at::Tensor& W, const at::Tensor& center, const char* op) {
  TORCH_CHECK(W.dim() == 2, op, ": W must be 2-D (N, d), got shape ", W.sizes(), " (", W.scalar_type(), " on ",
              W.device(), ")");
  TORCH_CHECK(W.scalar_type() == at::kBFloat16 || W.scalar_type() == at::kHalf || W.scalar_type() == at::kFloat,
              op, ": W must be bfloat16, float16 or float32, got ", W.scalar_type(), " of shape ", W.sizes());
  const int64_t d = W.size(1);
  TORCH_CHECK(center.dim() == 1 && center.size(0) == d, op, ": center must have shape (d,) = (", d,
              ",) for W of shape ", W.sizes(), ", got shape ", center.sizes());
  TORCH_CHECK(center.scalar_type() == at::kFloat, op, ": center must be float32, got ", center.scalar_type(),
              " of shape ", center.sizes());
  TORCH_CHECK(center.device() == W.device(), op, ": center must be on W's device (", W.device(), "), got ",
              center.device());
}

void check_basis(const at::Tensor& W, const at::Tensor& basis) {
  const int64_t d = W.size(1);
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == d && basis.size(1) >= 1 && basis.size(1) <= d,
              "project: basis must have shape (d, k) with d = ", d, " (W's columns) and 1 <= k <= ", d,
              ", got shape ", basis.sizes());
  TORCH_CHECK(basis.scalar_type() == at::kFloat, "project: basis must be float32, got ", basis.scalar_type(),
              " of shape ", basis.sizes());
  TORCH_CHECK(basis.device() == W.device(), "project: basis must be on W's device (", W.device(), "), got ",
              basis.device());
}

// f(RowSource<T>, n) for W's element type T, with the ids checked (an undefined ids64: all rows).
template <typename F>
void with_rows(const at::Tensor& W, const at::Tensor& ids64, F&& f) {
  const int64_t n = ids64.defined() ? ids64.numel() : W.size(0);
  const int64_t* ids = ids64.defined() ? ids64.const_data_ptr<int64_t>() : nullptr;
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    f(RowSource<T>{W.const_data_ptr<T>(), W.size(1), W.stride(0), W.stride(1), ids}, n);
  };
  AT_DISPATCH_SWITCH(W.scalar_type(), "refframe_rows",
      AT_DISPATCH_CASE(at::kBFloat16, [&] { run(c10::BFloat16()); })
      AT_DISPATCH_CASE(at::kHalf, [&] { run(c10::Half()); })
      AT_DISPATCH_CASE(at::kFloat, [&] { run(0.0f); }));
}

at::Tensor project_cpu(const at::Tensor& W, const at::Tensor& center, const at::Tensor& basis,
                       const std::optional<at::Tensor>& ids) {
  check_w_and_center(W, center, "project");
  check_basis(W, basis);
  const at::Tensor ids64 = ids.has_value() ? checked_ids(*ids, W.size(0), "project") : at::Tensor();
  const at::Tensor c = center.contiguous(), V = basis.contiguous();
  const int64_t n = ids64.defined() ? ids64.numel() : W.size(0), k = V.size(1);
  at::Tensor out = at::empty({n, k}, W.options().dtype(at::kFloat));
  if (n == 0) return out;
  const ProjectKernels& ks = active_project_kernels();
  with_rows(W, ids64, [&](const auto& src, int64_t rows) {
    project_rows(src, rows, c.const_data_ptr<float>(), V, ks, out.data_ptr<float>());
  });
  return out;
}

at::Tensor radii_cpu(const at::Tensor& W, const at::Tensor& center, const std::optional<at::Tensor>& ids) {
  check_w_and_center(W, center, "radii");
  const at::Tensor ids64 = ids.has_value() ? checked_ids(*ids, W.size(0), "radii") : at::Tensor();
  const at::Tensor c = center.contiguous();
  const int64_t n = ids64.defined() ? ids64.numel() : W.size(0);
  at::Tensor out = at::empty({n}, W.options().dtype(at::kFloat));
  if (n == 0) return out;
  with_rows(W, ids64, [&](const auto& src, int64_t rows) {
    radii_rows(src, rows, c.const_data_ptr<float>(), out.data_ptr<float>());
  });
  return out;
}

}  // namespace
}  // namespace refframe::cpu

TORCH_LIBRARY_IMPL(refframe, CPU, m) {
  m.impl("project", &refframe::cpu::project_cpu);
  m.impl("radii", &refframe::cpu::radii_cpu);
}
