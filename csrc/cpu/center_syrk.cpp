// center_syrk on CPU: exact column mean and population covariance of W without copying W.
//
// Input: W (N, d), bf16/fp16/fp32, unit column stride (any row stride, e.g. a memory-mapped file).
// Output: mean fp64 (d,), covariance fp32 (d, d), symmetric and full.
//
// Two passes over W. Pass 1 sums each column in fp64 (the exact mean, whatever the offset). Pass 2
// takes blocks of KC rows; each block is converted, centred and packed once into 16-wide (A) and
// 6-wide (B) column panels (fp32, L2/L3 resident), then 16x6 register tiles of the upper triangle
// accumulate RUN products at a time in fp32 and add them into an fp64 tile accumulator. So no fp32
// or centred copy of W exists, only one triangle is computed, and no fp32 sum is longer than RUN
// terms (relative error ~5e-8 against fp64, where one long fp32 sum reaches 2-4e-7).
//
// Threads split the triangle's tiles (not the rows): each fp64 tile always receives its block sums
// in the same order, so the result is bitwise identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "syrk_kernel.h"

namespace refframe::cpu {
namespace {

constexpr int64_t KC = 512;             // rows per block: one packing, one pass over the triangle
constexpr int64_t RUN = 128;            // rows per fp32 register sum before it is added into fp64
constexpr int64_t MC_PANELS = 8;        // A panels per work item: 128 x KC fp32 = 256 KiB (L2)
constexpr int64_t JB_CHUNK = 24;        // B panels per work item
constexpr int64_t TILE = MR * NR;       // doubles per fp64 tile

struct Triangle {
  int64_t d, pa, pb;
  std::vector<int64_t> first_tile;  // per B panel: index of its tile (0, jb); tiles ia < rows(jb)
  int64_t tiles = 0;

  explicit Triangle(int64_t d_) : d(d_), pa((d_ + MR - 1) / MR), pb((d_ + NR - 1) / NR) {
    first_tile.resize(pb);
    for (int64_t jb = 0; jb < pb; ++jb) {
      first_tile[jb] = tiles;
      tiles += rows(jb);
    }
  }
  // Number of A panels whose tile with B panel jb touches the upper triangle (i <= j).
  int64_t rows(int64_t jb) const { return std::min(pa, (NR * jb + NR - 1) / MR + 1); }
  // First B panel whose tiles with A panel ia touch the upper triangle.
  int64_t first_col(int64_t ia) const { return MR * ia / NR; }
};

struct WorkItem {
  int64_t ia0, ia1, jb0, jb1, cost;
};

std::vector<WorkItem> make_items(const Triangle& t) {
  std::vector<WorkItem> items;
  for (int64_t ia0 = 0; ia0 < t.pa; ia0 += MC_PANELS) {
    const int64_t ia1 = std::min(t.pa, ia0 + MC_PANELS);
    for (int64_t jb0 = t.first_col(ia0); jb0 < t.pb; jb0 += JB_CHUNK) {
      const int64_t jb1 = std::min(t.pb, jb0 + JB_CHUNK);
      int64_t cost = 0;
      for (int64_t jb = jb0; jb < jb1; ++jb) cost += std::max<int64_t>(0, std::min(ia1, t.rows(jb)) - ia0);
      if (cost > 0) items.push_back({ia0, ia1, jb0, jb1, cost});
    }
  }
  return items;
}

// Contiguous ranges of items with nearly equal cost, one per thread.
std::vector<int64_t> split_items(const std::vector<WorkItem>& items, int64_t parts) {
  int64_t total = 0;
  for (const auto& it : items) total += it.cost;
  std::vector<int64_t> bounds{0};
  int64_t acc = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) {
    acc += items[i].cost;
    const int64_t p = static_cast<int64_t>(bounds.size());
    if (p < parts && acc * parts >= total * p) bounds.push_back(i + 1);
  }
  while (static_cast<int64_t>(bounds.size()) <= parts) bounds.push_back(static_cast<int64_t>(items.size()));
  return bounds;
}

template <typename T>
struct Typed;
template <>
struct Typed<c10::BFloat16> {
  static auto pack(const KernelSet& k) { return k.pack_bf16; }
  static auto accumulate(const KernelSet& k) { return k.accumulate_bf16; }
};
template <>
struct Typed<c10::Half> {
  static auto pack(const KernelSet& k) { return k.pack_f16; }
  static auto accumulate(const KernelSet& k) { return k.accumulate_f16; }
};
template <>
struct Typed<float> {
  static auto pack(const KernelSet& k) { return k.pack_f32; }
  static auto accumulate(const KernelSet& k) { return k.accumulate_f32; }
};

// Column sums in fp64, columns split across threads; each column is summed in row order.
template <typename T>
void column_mean(const T* w, int64_t n, int64_t d, int64_t row_stride, const KernelSet& ks, double* mean) {
  const auto accumulate = Typed<T>::accumulate(ks);
  at::parallel_for(0, (d + 63) / 64, 1, [&](int64_t b, int64_t e) {
    const int64_t j0 = b * 64, j1 = std::min(d, e * 64);
    std::fill(mean + j0, mean + j1, 0.0);
    for (int64_t r = 0; r < n; ++r) accumulate(w + r * row_stride + j0, j1 - j0, mean + j0);
    for (int64_t j = j0; j < j1; ++j) mean[j] /= static_cast<double>(n);
  });
}

template <typename T>
void center_syrk_impl(const T* w, int64_t n, int64_t d, int64_t row_stride, double* mean64, float* cov) {
  const KernelSet& ks = active_kernels();
  const auto pack = Typed<T>::pack(ks);
  column_mean(w, n, d, row_stride, ks, mean64);

  const Triangle tri(d);
  std::vector<float> mean32(std::max(tri.pa * MR, tri.pb * NR) + 8, 0.0f);
  for (int64_t j = 0; j < d; ++j) mean32[j] = static_cast<float>(mean64[j]);

  const auto items = make_items(tri);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const auto bounds = split_items(items, nthreads);

  // 64-byte aligned scratch: A and B packs of one block, the fp64 tile accumulator.
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor apack_t = at::empty({tri.pa * MR * KC}, opts);
  at::Tensor bpack_t = at::empty({tri.pb * NR * KC}, opts);
  at::Tensor acc_t = at::zeros({tri.tiles * TILE}, opts.dtype(at::kDouble));
  float* apack = apack_t.data_ptr<float>();
  float* bpack = bpack_t.data_ptr<float>();
  double* acc = acc_t.data_ptr<double>();

  for (int64_t r0 = 0; r0 < n; r0 += KC) {
    const int64_t kc = std::min(KC, n - r0);
    // Panel by panel: each panel's rows are read from the (cache-resident) block of W and written
    // sequentially. Indices [0, pa) are A panels, [pa, pa + pb) B panels.
    const T* block = w + r0 * row_stride;
    at::parallel_for(0, tri.pa + tri.pb, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const bool is_a = p < tri.pa;
        const int64_t panel = is_a ? MR : NR;
        const int64_t col = is_a ? p * MR : (p - tri.pa) * NR;
        float* dst = is_a ? apack + p * kc * MR : bpack + (p - tri.pa) * kc * NR;
        pack(block + col, row_stride, kc, mean32.data() + col, std::min(panel, d - col), panel, dst);
      }
    });
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t i = bounds[t]; i < bounds[t + 1]; ++i) {
          const WorkItem& it = items[i];
          for (int64_t jb = it.jb0; jb < it.jb1; ++jb) {
            const float* b = bpack + jb * kc * NR;
            const int64_t ia_end = std::min(it.ia1, tri.rows(jb));
            for (int64_t ia = it.ia0; ia < ia_end; ++ia) {
              const float* a = apack + ia * kc * MR;
              double* c = acc + (tri.first_tile[jb] + ia) * TILE;
              for (int64_t k0 = 0; k0 < kc; k0 += RUN)
                ks.micro(std::min(RUN, kc - k0), a + k0 * MR, b + k0 * NR, c);
            }
          }
        }
      }
    });
  }

  const double inv_n = 1.0 / static_cast<double>(n);
  at::parallel_for(0, tri.pb, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t jb = b0; jb < b1; ++jb) {
      for (int64_t ia = 0; ia < tri.rows(jb); ++ia) {
        const double* tile = acc + (tri.first_tile[jb] + ia) * TILE;
        for (int64_t c = 0; c < NR; ++c) {
          const int64_t j = jb * NR + c;
          if (j >= d) break;
          for (int64_t r = 0; r < MR; ++r) {
            const int64_t i = ia * MR + r;
            if (i > j) break;
            const float v = static_cast<float>(tile[c * MR + r] * inv_n);
            cov[i * d + j] = v;
            cov[j * d + i] = v;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> center_syrk_cpu(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2, "center_syrk: W must be 2-D (N, d), got shape ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kBFloat16 || W.scalar_type() == at::kHalf ||
                  W.scalar_type() == at::kFloat,
              "center_syrk: W must be bfloat16, float16 or float32, got ", W.scalar_type());
  const int64_t n = W.size(0), d = W.size(1);
  TORCH_CHECK(n >= 1 && d >= 1, "center_syrk: W must have at least one row and one column, got shape ",
              W.sizes());
  // Row-strided input (e.g. a slice of a memory-mapped file) is used as is; anything else is made
  // contiguous once.
  const at::Tensor w = (W.stride(1) == 1 && W.stride(0) >= d) ? W : W.contiguous();
  at::Tensor mean = at::empty({d}, W.options().dtype(at::kDouble));
  at::Tensor cov = at::empty({d, d}, W.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(w.scalar_type(), "center_syrk_cpu",
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        center_syrk_impl(w.const_data_ptr<c10::BFloat16>(), n, d, w.stride(0), mean.data_ptr<double>(),
                         cov.data_ptr<float>());
      })
      AT_DISPATCH_CASE(at::kHalf, [&] {
        center_syrk_impl(w.const_data_ptr<c10::Half>(), n, d, w.stride(0), mean.data_ptr<double>(),
                         cov.data_ptr<float>());
      })
      AT_DISPATCH_CASE(at::kFloat, [&] {
        center_syrk_impl(w.const_data_ptr<float>(), n, d, w.stride(0), mean.data_ptr<double>(),
                         cov.data_ptr<float>());
      }));
  return {mean, cov};
}

}  // namespace
}  // namespace refframe::cpu

TORCH_LIBRARY_IMPL(refframe, CPU, m) {
  m.impl("center_syrk", &refframe::cpu::center_syrk_cpu);
}
