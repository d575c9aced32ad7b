// center_syrk on CPU: exact column mean and population covariance of W without copying W.
//
// Input: W (N, d), bf16/fp16/fp32, unit column stride (any row stride, e.g. a memory-mapped file).
// Output: mean fp64 (d,), covariance fp32 (d, d), symmetric and full.
//
// Two passes over W. Pass 1 sums each column and its squares in fp64 (the exact mean, whatever the
// offset, and the spread, which picks the fp32 value each column is centered on: center.h). Pass 2
// takes blocks of KC rows; each block is converted, centered and packed once into MR-wide (A) and
// NR-wide (B) column panels (L2/L3 resident, in the kernel set's layout: fp32 rows for the 16 x 6
// AVX2 and 48 x 8 AVX-512 tiles, where AVX-512 reads B from the A panels; split bf16 tiles for the
// 16 x 32 AMX tile), then MR x NR tiles of the upper triangle accumulate RUN rows of products at a
// time in fp32 and add them into an fp64 tile accumulator. So no fp32 or centered copy of W exists,
// only one triangle is computed, and no fp32 sum is longer than RUN terms (128; AMX and avx512bf16
// 256, plus 8 drift-cancelling terms on some avx512bf16 tiles; relative
// error ~5e-8 against fp64, where one long fp32 sum reaches 2-4e-7).
//
// Threads split the triangle's tiles (not the rows), taking work items as they become free, and
// pack the next block while the current one is multiplied. Each fp64 tile always receives its block
// sums in the same order (runs of RUN rows from row 0, whatever KC or the tile shape), so the result
// is bitwise identical for any thread count or timing, and across the portable, AVX2 and AVX-512
// sets (the AMX set rounds in its own way: bitwise reproducible and within the same error, but not the
// same bits).
//
// A set with exact bf16 products (avx512bf16, for bf16 W) changes three things: pass 1 also finds
// each column's largest |x|, from which a plan (plan_exact) scales every column by a power of two
// and picks the columns to center; pass 2 multiplies an extended matrix, W's columns followed by
// an extra part of each centered column, packed as bf16 row pairs, with the run sums of uncentered
// columns with moderate means kept from drifting (see plan_exact); and the covariance is
// assembled from the extended product's partial products, with the diagonal taken from fp64 sums
// of squares (pass 1's for uncentered columns, the packs' for centered ones). When the plan refuses
// (non-finite values, more than d / 4 extra columns) or W is not bf16, the set's fallback
// (avx512) does everything.
//
// Runs of 8 or more identical consecutive rows (identical_runs) are left out of the packs of the
// sets whose packs the driver can blank (all but AMX) and added in fp64 at the end: the fp32 run
// sums of one number repeated round with a bias.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "../center.h"
#include "status.h"
#include "syrk_kernel.h"

namespace refframe::cpu {
namespace {

// The tiles of the upper triangle for an MR x NR micro-tile (MR, NR: the kernel set's).
struct Triangle {
  int64_t d, MR, NR, TILE, pa, pb;
  std::vector<int64_t> first_tile;  // per B panel: index of its tile (0, jb); tiles ia < rows(jb)
  int64_t tiles = 0;

  Triangle(int64_t d_, int64_t mr, int64_t nr)
      : d(d_), MR(mr), NR(nr), TILE(mr * nr), pa((d_ + mr - 1) / mr), pb((d_ + nr - 1) / nr) {
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

std::vector<WorkItem> items_of(const Triangle& t, int64_t mc_panels, int64_t jb_chunk) {
  std::vector<WorkItem> items;
  for (int64_t ia0 = 0; ia0 < t.pa; ia0 += mc_panels) {
    const int64_t ia1 = std::min(t.pa, ia0 + mc_panels);
    for (int64_t jb0 = t.first_col(ia0); jb0 < t.pb; jb0 += jb_chunk) {
      const int64_t jb1 = std::min(t.pb, jb0 + jb_chunk);
      int64_t cost = 0;
      for (int64_t jb = jb0; jb < jb1; ++jb) cost += std::max<int64_t>(0, std::min(ia1, t.rows(jb)) - ia0);
      if (cost > 0) items.push_back({ia0, ia1, jb0, jb1, cost});
    }
  }
  // Largest first, so the last items the threads take are the small ones near the diagonal.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& x, const WorkItem& y) { return x.cost > y.cost; });
  return items;
}
// Work items of about mc_cols x jb_cols of the triangle (the kernel set's sizes), made smaller
// while there are fewer than 4 per thread.
std::vector<WorkItem> make_items(const Triangle& t, int64_t mc_cols, int64_t jb_cols, int64_t threads) {
  int64_t mc_panels = std::max<int64_t>(1, mc_cols / t.MR), jb_chunk = std::max<int64_t>(1, jb_cols / t.NR);
  for (;;) {
    std::vector<WorkItem> items = items_of(t, mc_panels, jb_chunk);
    if (static_cast<int64_t>(items.size()) >= 4 * threads || (mc_panels == 1 && jb_chunk == 1)) return items;
    if (jb_chunk == 1 || (mc_panels > 1 && mc_panels * t.MR >= jb_chunk * t.NR)) mc_panels /= 2;
    else jb_chunk /= 2;
  }
}

template <typename T>
struct Typed;
template <>
struct Typed<c10::BFloat16> {
  static auto pack(const KernelSet& k) { return k.pack_bf16; }
  static auto pack_pair(const KernelSet& k) { return k.pack_pair_bf16; }
  static auto accumulate(const KernelSet& k) { return k.accumulate_bf16; }
};
template <>
struct Typed<c10::Half> {
  static auto pack(const KernelSet& k) { return k.pack_f16; }
  static auto pack_pair(const KernelSet& k) { return k.pack_pair_f16; }
  static auto accumulate(const KernelSet& k) { return k.accumulate_f16; }
};
template <>
struct Typed<float> {
  static auto pack(const KernelSet& k) { return k.pack_f32; }
  static auto pack_pair(const KernelSet& k) { return k.pack_pair_f32; }
  static auto accumulate(const KernelSet& k) { return k.accumulate_f32; }
};

// Pass 1: column sums in fp64, columns split across threads in groups of 64; add(r0, r1, j0, j1) adds
// rows [r0, r1) of columns [j0, j1) into mean (and whatever else the caller sums), each column in row
// order. Blocks of PASS1_ROWS rows keep the rows a thread reads in its L2 while it goes through
// its columns. mean ends as the sums over n.
constexpr int64_t PASS1_ROWS = 256;
template <typename Add>
void column_pass(int64_t n, int64_t d, double* mean, const Add& add) {
  at::parallel_for(0, (d + 63) / 64, 1, [&](int64_t b, int64_t e) {
    const int64_t j0 = b * 64, j1 = std::min(d, e * 64);
    std::fill(mean + j0, mean + j1, 0.0);
    for (int64_t r0 = 0; r0 < n; r0 += PASS1_ROWS) add(r0, std::min(n, r0 + PASS1_ROWS), j0, j1);
    for (int64_t j = j0; j < j1; ++j) mean[j] /= static_cast<double>(n);
  });
}

// Pass 1 of the fp32 sets: the mean and the sums of squares (into sq, zero on entry), which
// center_of (center.h) needs.
template <typename T>
void column_moments(const T* w, int64_t n, int64_t d, int64_t row_stride, const KernelSet& ks, double* mean,
                    double* sq) {
  const auto accumulate = Typed<T>::accumulate(ks);
  column_pass(n, d, mean, [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    for (int64_t r = r0; r < r1; ++r) accumulate(w + r * row_stride + j0, j1 - j0, mean + j0, sq + j0);
  });
}

// The finest power-of-two grid of each column's values in an even sample of up to 4,096 rows (0
// where the sample is all zero), for center_of (center.h): columns of 0/1 indicators or small
// integers are centered on that grid. A sample is enough: the center only steers rounding.
template <typename T>
void sample_grid(const T* w, int64_t n, int64_t d, int64_t row_stride, std::vector<double>& grid) {
  const int64_t step = std::max<int64_t>(1, n / 4096);
  std::vector<int> lsb(d, std::numeric_limits<int>::max());
  at::parallel_for(0, (d + 63) / 64, 1, [&](int64_t b, int64_t e) {
    const int64_t j0 = b * 64, j1 = std::min(d, e * 64);
    for (int64_t r = 0; r < n; r += step) {
      const T* row = w + r * row_stride;
      for (int64_t j = j0; j < j1; ++j) {
        uint32_t u;
        const float x = static_cast<float>(row[j]);
        std::memcpy(&u, &x, sizeof u);
        const uint32_t ex = (u >> 23) & 0xFFu, man = u & 0x7FFFFFu;
        if ((u & 0x7FFFFFFFu) == 0 || ex == 0xFFu) continue;
        // |x| = M 2^(E - 150), M the 24-bit significand with its implicit bit (subnormals: E = 1).
        const uint32_t m = ex == 0 ? man : (man | 0x800000u);
        const int v = (ex == 0 ? -149 : static_cast<int>(ex) - 150) + __builtin_ctz(m);
        lsb[j] = std::min(lsb[j], v);
      }
    }
  });
  grid.assign(d, 0.0);
  for (int64_t j = 0; j < d; ++j)
    if (lsb[j] != std::numeric_limits<int>::max()) grid[j] = std::ldexp(1.0, lsb[j]);
}

// Runs of identical consecutive rows: the padded or reserved tokens at the end of a vocabulary, rows
// of zeros, a row repeated. In such a run a product is the same number in every row, so an fp32
// run sum adds that number to itself again and again and its rounding errors do not cancel: 1/3 of
// W in one run gave 5.9e-7 on the fp32 sets, 1 % of it 1.2e-7. The driver leaves these rows out of
// the packs (zeros) and adds k u u^T in fp64 instead (u the row centered as the packs center it, k the
// rows of every run of that row). Runs shorter than MIN_RUN rows are left in; of the distinct rows
// that runs repeat, those with MIN_COUNT or more rows in runs are taken, at most MAX_ROWS, the
// ones with the most (each costs d^2 / 2 fp64 products at the end); runs of the others stay in the
// packs (a few short runs of different rows do not show: 750 runs of 8 rows, 3.0e-8).
struct RowRun {
  int64_t begin, end;
  int64_t row;  // its index in RowRuns::rows
};
struct RowRuns {
  std::vector<RowRun> runs;  // by first row
  std::vector<int64_t> rows, count;  // per distinct row: a row of W that holds it, and k
};
constexpr int64_t MIN_RUN = 8;
constexpr int64_t MIN_COUNT = 32;
constexpr int64_t MAX_ROWS = 64;
template <typename T>
RowRuns identical_runs(const T* w, int64_t n, int64_t d, int64_t row_stride) {
  RowRuns out;
  if (n < MIN_RUN) return out;
  const auto row = [&](int64_t r) { return w + r * row_stride; };
  const auto equal = [&](int64_t r, int64_t q) { return std::memcmp(row(r), row(q), d * sizeof(T)) == 0; };
  // Most rows differ from the previous one in their first bytes: this reads little more than a
  // cache line per row.
  std::vector<uint8_t> same(n, 0);
  at::parallel_for(1, n, 2048, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) same[r] = equal(r, r - 1);
  });
  std::vector<RowRun> runs;
  for (int64_t r = 0; r < n;) {
    int64_t e = r + 1;
    while (e < n && same[e]) ++e;
    if (e - r >= MIN_RUN) runs.push_back({r, e, -1});
    r = e;
  }
  // Which distinct row each run repeats: runs are grouped by a hash of their row, and a run joins
  // a row of its group only if their bytes are equal (one comparison in the usual case).
  const auto nr = static_cast<int64_t>(runs.size());
  std::vector<uint64_t> hash(nr);
  at::parallel_for(0, nr, 16, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const auto* bytes = reinterpret_cast<const unsigned char*>(row(runs[q].begin));
      uint64_t h = 0x9E3779B97F4A7C15ull;
      for (size_t i = 0; i < d * sizeof(T); i += 8) {
        uint64_t word = 0;
        std::memcpy(&word, bytes + i, std::min<size_t>(8, d * sizeof(T) - i));
        h = (h ^ word) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
      }
      hash[q] = h;
    }
  });
  std::vector<int64_t> rows, count;
  std::unordered_map<uint64_t, std::vector<int64_t>> by_hash;
  for (int64_t q = 0; q < nr; ++q) {
    std::vector<int64_t>& group = by_hash[hash[q]];
    int64_t v = -1;
    for (const int64_t u : group)
      if (equal(rows[u], runs[q].begin)) {
        v = u;
        break;
      }
    if (v < 0) {
      v = static_cast<int64_t>(rows.size());
      group.push_back(v);
      rows.push_back(runs[q].begin);
      count.push_back(0);
    }
    count[v] += runs[q].end - runs[q].begin;
    runs[q].row = v;
  }
  // Of the distinct rows with MIN_COUNT rows in runs or more, the MAX_ROWS with the most (ties: the
  // first seen), in order seen.
  std::vector<int64_t> order;
  for (size_t v = 0; v < rows.size(); ++v)
    if (count[v] >= MIN_COUNT) order.push_back(static_cast<int64_t>(v));
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return count[x] > count[y]; });
  if (order.size() > static_cast<size_t>(MAX_ROWS)) order.resize(MAX_ROWS);
  std::sort(order.begin(), order.end());
  std::vector<int64_t> index(rows.size(), -1);
  for (const int64_t v : order) {
    index[v] = static_cast<int64_t>(out.rows.size());
    out.rows.push_back(rows[v]);
    out.count.push_back(count[v]);
  }
  for (const RowRun& run : runs)
    if (index[run.row] >= 0) out.runs.push_back({run.begin, run.end, index[run.row]});
  return out;
}

// How a set with exact bf16 products (ExactBf16, syrk_avx512bf16.cpp) multiplies W: the columns
// of the extended matrix (W's d columns, then the extra parts of each centered column) and, per
// column of W, its power-of-two scale, its shift (0, or its mean scaled and rounded to bf16; a
// constant column's value) and what remains to be taken out in fp64 at the end.
struct ExactPlan {
  int64_t dp = 0;                    // columns of the extended matrix
  std::vector<int32_t> cols, parts;  // per extended column: its column of W and its part
  std::vector<int32_t> extra;        // per column of W: its first extra column, or -1 ...
  std::vector<int8_t> extras;        // ... and how many it has (0 or 1)
  std::vector<float> scale, shift;
  std::vector<double> unscale, delta;  // 1 / scale; mean * scale - shift
  std::vector<double> diag;            // sum of t^2 over the rows: from pass 1, or (centered) the packs
  // Drift cancellation (ExactBf16::micro_shift) for uncentered columns whose mean is more than
  // sd / 4: per column of W its shift mean mb (its scaled mean on a coarse grid, bf16; 0 for every
  // other column), and per extended column the words of the extra pair step, bf16 of -2 G mb on
  // the A side and bf16 of mb on the B side (G = shift_pairs; low halves, high halves zero).
  std::vector<double> mb, mb_sd;  // mb_sd: |mean| / sd of a column with mb != 0, else 0
  std::vector<uint32_t> shift_a, shift_b;
};

// Fills the plan; false when the fallback set should run instead: a value that is not finite, or
// more than d / 4 extra columns (those would cost more than the faster products gain).
// A column is centered when |mean| > 3 sd / 4. Left uncentered, its products with another such
// column have a mean of their own, mb_i mb_j, so each fp32 run sum drifts by that much per row and
// rounds more as it grows (1.5x the error of centered columns at sd / 2 and 4x at 0.9 sd, measured
// on correlated bf16 columns; about 25x at 2 sd, emulated). Drift cancellation keeps those sums small:
// after every G = 16 pairs of rows the micro-kernel adds one more pair step, -2 G mb_i mb_j, exact
// (bf16 products), and the driver takes the same amount out in fp64 at the end. mb is the scaled
// mean rounded to a grid of 2^-7 of its sd (or of itself, if larger): values on a finer grid than
// the data's would leave low bits in every run sum that the data's products do not have (an exact
// bf16(mean) measured 3x the error of no cancellation at all on zero-mean columns). What is left
// is the products' spread, which grows with the mean too. Measured at 151,936 x 2,560 (the demo
// W, every column moved): 2.4e-8 at 0, 5.6e-8 at 0.73 sd, 7.6e-8 at 0.9 sd, 8.9e-8 at 0.98 sd,
// 1.3e-7 at 1.5 sd (the fp32 avx512 set: 4.6-4.9e-8), so 3 sd / 4 keeps the worst case where it
// was before, at sd / 2 without cancellation (5.8e-8 at 0.45 sd); columns past it are centered.
// Columns within sd / 4 of zero keep mb = 0. A tile takes the extra steps (6 % more products) only
// where some product of its columns' |mean| / sd exceeds 1/4, so W whose means all lie within
// sd / 2 keeps its bits and its speed.
// A centered column's shift is its scaled mean rounded to bf16, so
// t = a - shift (a: x scaled) is the difference of two bf16 numbers, exact in fp32, and two parts
// hold it: h = bf16(t), and t - h, the rounding error of a bf16 sum, is a bf16 number itself. That
// is one extra column. (Where a and the shift lie more than 2^15 apart, fp32 rounds t, by at most
// 2^-24 |t|, as the fp32 sets round their x - center.) Far from zero the shift can sit several sd
// from the mean (its bf16 spacing there is |mean| / 256 or more), but the values lie on that same
// grid, so t is a small multiple of the spacing and the run sums of its products are exact: a
// finer, fp32 shift would give every row the same fp32 remainder and bias those sums (1.7e-7 of
// the block of columns 700 sd off zero).
// A constant column is centered without parts: its mean is its value (an exact fp64 sum divided by
// N), so t is 0 and costs nothing.
bool plan_exact(const double* mean, const double* sq, const float* amax, int64_t n, int64_t d, int64_t shift_pairs,
                ExactPlan& p) {
  p.extras.assign(d, 0);
  std::vector<char> center(d, 0);
  std::vector<double> var(d, 0.0);
  int64_t extras = 0;
  for (int64_t j = 0; j < d; ++j) {
    if (!std::isfinite(mean[j]) || !std::isfinite(sq[j])) return false;
    var[j] = std::max(0.0, sq[j] / static_cast<double>(n) - mean[j] * mean[j]);
    center[j] = mean[j] != 0.0 && 16.0 * mean[j] * mean[j] > 9.0 * var[j];
    // Every |x| <= amax, so a mean of +-amax means every x equals it.
    if (center[j] && std::fabs(mean[j]) != static_cast<double>(amax[j])) p.extras[j] = 1;
    extras += p.extras[j];
  }
  if (4 * extras > d) return false;
  p.dp = d + extras;
  const int64_t pad = 64;
  p.cols.assign(p.dp + pad, 0);
  p.parts.assign(p.dp + pad, 0);
  p.extra.assign(d, -1);
  p.scale.assign(d + pad, 0.0f);
  p.shift.assign(d + pad, 0.0f);
  p.unscale.assign(d, 1.0);
  p.delta.assign(d, 0.0);
  p.diag.assign(d, 0.0);
  p.mb.assign(d, 0.0);
  p.mb_sd.assign(d, 0.0);
  p.shift_a.assign(p.dp + pad, 0u);
  p.shift_b.assign(p.dp + pad, 0u);
  const auto bits = [](double v) {  // v is a bf16 number
    const c10::BFloat16 h(static_cast<float>(v));
    TORCH_INTERNAL_ASSERT(static_cast<double>(static_cast<float>(h)) == v, "center_syrk: shift mean is not bf16");
    return static_cast<uint32_t>(h.x);
  };
  int64_t next = d;
  for (int64_t j = 0; j < d; ++j) {
    int e = 0;
    if (amax[j] > 0.0f) std::frexp(amax[j], &e);  // amax = f 2^e, f in [0.5, 1)
    e = std::clamp(e, -120, 120);
    p.scale[j] = std::ldexp(1.0f, -e);
    p.unscale[j] = std::ldexp(1.0, e);
    const double m = mean[j] * static_cast<double>(p.scale[j]);  // exact
    const auto m32 = static_cast<float>(m);
    p.shift[j] = !center[j] ? 0.0f : p.extras[j] == 1 ? static_cast<float>(c10::BFloat16(m32)) : m32;
    p.delta[j] = m - static_cast<double>(p.shift[j]);
    // Uncentered (shift 0), t is x scaled exactly: the sum of its squares is pass 1's, scaled.
    if (p.shift[j] == 0.0f) p.diag[j] = sq[j] * static_cast<double>(p.scale[j]) * static_cast<double>(p.scale[j]);
    const double sd = std::sqrt(var[j]) * static_cast<double>(p.scale[j]);
    if (!center[j] && m != 0.0 && 16.0 * m * m > sd * sd) {
      // m rounded to a grid of 2^-7 of max(sd, |m|): at most 2^8 steps, so a bf16 number.
      const double q = std::ldexp(1.0, std::max(std::ilogb(sd), std::ilogb(m)) - 7);
      const double mb = std::nearbyint(m / q) * q;
      // Zero below 2^-63: products of two shift means stay normal fp32 (vdpbf16ps flushes others).
      if (std::fabs(mb) >= std::ldexp(1.0, -63)) {
        p.mb[j] = mb;
        p.mb_sd[j] = std::fabs(m) / sd;
        p.shift_a[j] = bits(-2.0 * static_cast<double>(shift_pairs) * mb);
        p.shift_b[j] = bits(mb);
      }
    }
    p.cols[j] = static_cast<int32_t>(j);
    if (p.extras[j] > 0) {
      p.extra[j] = static_cast<int32_t>(next);
      for (int q = 1; q <= p.extras[j]; ++q, ++next) {
        p.cols[next] = static_cast<int32_t>(j);
        p.parts[next] = q;
      }
    }
  }
  return true;
}

template <typename T>
void center_syrk_impl(const T* w, int64_t n, int64_t d, int64_t row_stride, double* mean64, float* cov) {
  const ProgressScope progress(n);
  const uint64_t caller = thread_key();
  const KernelSet& chosen = active_kernels();
  // A set with exact bf16 products runs on bf16 W whose plan allows it; otherwise its fallback does.
  // Its pass 1 also sums squares and finds each column's largest |x| (the mean gets the same bits).
  const bool try_exact = chosen.exact != nullptr && std::is_same_v<T, c10::BFloat16>;
  ExactPlan plan;
  bool exact = false;
  std::vector<double> sq(d, 0.0);
  if (try_exact) {
    const auto* wb = reinterpret_cast<const c10::BFloat16*>(w);
    std::vector<float> amax(d, 0.0f);
    column_pass(n, d, mean64, [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
      chosen.exact->moments(wb + r0 * row_stride + j0, row_stride, r1 - r0, j1 - j0, mean64 + j0, sq.data() + j0,
                            amax.data() + j0);
    });
    exact = plan_exact(mean64, sq.data(), amax.data(), n, d, chosen.exact->shift_pairs, plan);
  }
  const KernelSet& ks = exact ? chosen : chosen.exact != nullptr ? chosen.exact->fallback() : chosen;
  const auto pack = Typed<T>::pack(ks);
  const auto pack_pair = Typed<T>::pack_pair(ks);
  if (!try_exact) column_moments(w, n, d, row_stride, ks, mean64, sq.data());
  const int64_t dp = exact ? plan.dp : d;  // columns of the matrix multiplied
  last_covariance().set.store(ks.name);
  last_covariance().columns.store(dp);

  // A kernel set's own constants: blocks made of whole runs (the results must not depend on the
  // block length), runs made of whole pack rows, and B panels that lie inside one A panel when they
  // are read from there.
  const int64_t RUN = ks.run, KC = ks.kc, EB = ks.pack_bytes, BC = ks.b_col_bytes > 0 ? ks.b_col_bytes : EB;
  TORCH_INTERNAL_ASSERT(RUN > 0 && KC % RUN == 0 && RUN % ks.kalign == 0 && (!ks.b_in_a || ks.mr % ks.nr == 0) &&
                            (exact ? ks.b_in_a
                                   : pack_pair == nullptr ? pack != nullptr : !ks.b_in_a && ks.nr % ks.mr == 0),
                        "center_syrk: kernel set ", ks.name, " has an invalid tile or block length");
  const Triangle tri(dp, ks.mr, ks.nr);
  const int64_t MR = tri.MR, NR = tri.NR, TILE = tri.TILE;
  // Drift cancellation: the largest |mean| / sd of the shifted columns of each A and B panel (a tile
  // takes the extra steps when the product of its two exceeds 1/4), and how many extra steps every
  // such tile gets in all.
  std::vector<double> shift_pa(tri.pa, 0.0), shift_pb(tri.pb, 0.0);
  const auto shifted_tile = [&](int64_t ia, int64_t jb) { return shift_pa[ia] * shift_pb[jb] > 0.25; };
  int64_t shift_steps = 0;
  if (exact && std::any_of(plan.mb.begin(), plan.mb.end(), [](double v) { return v != 0.0; })) {
    for (int64_t j = 0; j < d; ++j) {
      shift_pa[j / MR] = std::max(shift_pa[j / MR], plan.mb_sd[j]);
      shift_pb[j / NR] = std::max(shift_pb[j / NR], plan.mb_sd[j]);
    }
    for (int64_t r0 = 0; r0 < n; r0 += ks.kc) {
      const int64_t kc = std::min(ks.kc, n - r0);
      for (int64_t k0 = 0; k0 < kc; k0 += ks.run) shift_steps += (std::min(ks.run, kc - k0) + 1) / 2 / ks.exact->shift_pairs;
    }
  }
  std::vector<float> mean32(std::max(tri.pa * MR, tri.pb * NR) + 16, 0.0f);
  // Columns within 16 sd of zero (center.h) take their variance from the fp64 sums of pass 1.
  std::vector<char> fp64_var(d, 0);
  if (!exact) {
    std::vector<double> grid;
    sample_grid(w, n, d, row_stride, grid);
    for (int64_t j = 0; j < d; ++j) {
      bool from_fp64 = false;
      mean32[j] = refframe::center_of<T>(mean64[j], sq[j], n, grid[j], &from_fp64);
      fp64_var[j] = from_fp64;
    }
  }
  // Runs of identical rows (identical_runs), for the sets whose packs the driver can blank (fp32
  // rows, or the exact set's bf16 row pairs): per distinct row and column, u (the row centered as
  // the packs center it, x - center or x scale - shift, here unrounded) and k u (k: its rows in
  // runs), in fp64.
  const bool blankable = exact || (pack_pair == nullptr && EB == 4 && ks.kalign == 1);
  const RowRuns repeated = blankable ? identical_runs(w, n, d, row_stride) : RowRuns{};
  const std::vector<RowRun>& runs = repeated.runs;
  const auto nruns = static_cast<int64_t>(repeated.rows.size());
  std::vector<double> run_u(d * nruns), run_ku(d * nruns);
  for (int64_t q = 0; q < nruns; ++q) {
    const T* row = w + repeated.rows[q] * row_stride;
    const auto k = static_cast<double>(repeated.count[q]);
    for (int64_t j = 0; j < d; ++j) {
      const auto x = static_cast<double>(static_cast<float>(row[j]));
      const double u = exact ? x * static_cast<double>(plan.scale[j]) - static_cast<double>(plan.shift[j])
                             : x - static_cast<double>(mean32[j]);
      run_u[j * nruns + q] = u;
      run_ku[j * nruns + q] = k * u;
    }
  }
  // What the runs' rows add to entry (i, j) of the sums.
  const auto run_sum = [&](int64_t i, int64_t j) {
    double s = 0.0;
    for (int64_t q = 0; q < nruns; ++q) s += run_u[i * nruns + q] * run_ku[j * nruns + q];
    return s;
  };

  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const auto items = make_items(tri, ks.mc_cols, ks.jb_cols, nthreads);

  // 64-byte aligned scratch: two sets of A and B packs (the block being multiplied and the next one,
  // packed meanwhile) and the fp64 tile accumulator. Pack offsets are in bytes: EB bytes per
  // element, blocks of kcp = kc rounded up to the set's kalign rows.
  // With b_in_a, B panel jb is read from the A panels (columns jb NR .. jb NR + NR of a row of A
  // panel jb NR / MR, BC bytes apart, rows MR elements apart) and only A panels are packed.
  const bool b_in_a = ks.b_in_a;
  const auto padded = [&](int64_t kc) { return (kc + ks.kalign - 1) / ks.kalign * ks.kalign; };
  const int64_t pack_set_bytes = (tri.pa * MR + (b_in_a ? 0 : tri.pb * NR)) * padded(KC) * EB;
  at::Tensor pack_t = at::empty({2 * pack_set_bytes + 64}, at::TensorOptions().dtype(at::kByte));
  at::Tensor acc_t = at::zeros({tri.tiles * TILE}, at::TensorOptions().dtype(at::kDouble));
  double* acc = acc_t.data_ptr<double>();
  char* const pack_base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(pack_t.data_ptr<uint8_t>()) + 63) & ~uintptr_t{63});

  // The rows of the block at r0 (kc rows) that lie in a run become zeros in a panel just packed
  // (panel columns wide), so they add nothing to the fp32 sums.
  auto blank_runs = [&](int64_t r0, int64_t kc, char* dst, int64_t panel) {
    auto q = std::upper_bound(runs.begin(), runs.end(), r0, [](int64_t r, const RowRun& x) { return r < x.end; });
    for (; q != runs.end() && q->begin < r0 + kc; ++q) {
      const int64_t k0 = std::max(q->begin, r0) - r0, k1 = std::min(q->end, r0 + kc) - r0;
      if (exact) {
        // bf16 row pairs (x86, little-endian): row k is half k % 2 of the words of pair row k / 2.
        auto* h = reinterpret_cast<uint16_t*>(dst);
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t c = 0; c < panel; ++c) h[(k / 2) * 2 * panel + 2 * c + k % 2] = 0;
      } else {
        std::memset(dst + k0 * panel * EB, 0, static_cast<size_t>((k1 - k0) * panel * EB));
      }
    }
  };
  // Panel p of the block starting at row r0 into pack set s. Panels [0, pa) are A panels, then B;
  // with pack_pair, panel p is B panel p together with the A panels of its columns.
  auto pack_panel = [&](int64_t r0, int64_t s, int64_t p) {
    const int64_t kc = std::min(KC, n - r0), kcp = padded(kc);
    char* base = pack_base + s * pack_set_bytes;
    const T* src = w + r0 * row_stride;
    if (exact) {
      // A panels only; a panel with extra columns takes the general pack.
      const auto* bsrc = reinterpret_cast<const c10::BFloat16*>(src);
      const int64_t col = p * MR, width = std::min(MR, dp - col);
      char* dst = base + p * kcp * MR * EB;
      if (col + width <= d)
        ks.exact->pack(bsrc + col, row_stride, kc, plan.scale.data() + col, plan.shift.data() + col, width, MR, dst,
                       plan.diag.data() + col);
      else
        ks.exact->pack_parts(bsrc, row_stride, kc, plan.cols.data() + col, plan.parts.data() + col,
                             plan.scale.data(), plan.shift.data(), width, MR, dst, plan.diag.data());
      blank_runs(r0, kc, dst, MR);
      return;
    }
    if (pack_pair != nullptr) {
      const int64_t col = p * NR;
      pack_pair(src + col, row_stride, kc, mean32.data() + col, std::min(NR, d - col),
                reinterpret_cast<float*>(base + (tri.pa * MR + p * NR) * kcp * EB),
                reinterpret_cast<float*>(base + col * kcp * EB), kcp * MR * EB);
      return;
    }
    const bool is_a = p < tri.pa;
    const int64_t panel = is_a ? MR : NR;
    const int64_t col = is_a ? p * MR : (p - tri.pa) * NR;
    char* dst = is_a ? base + p * kcp * MR * EB : base + (tri.pa * MR + (p - tri.pa) * NR) * kcp * EB;
    pack(src + col, row_stride, kc, mean32.data() + col, std::min(panel, d - col), panel, reinterpret_cast<float*>(dst));
    blank_runs(r0, kc, dst, panel);
  };
  constexpr int64_t PACK_CHUNK = 8;  // panels per grab
  const int64_t npanels = pack_pair != nullptr ? tri.pb : tri.pa + (b_in_a ? 0 : tri.pb);
  const int64_t pack_chunks = (npanels + PACK_CHUNK - 1) / PACK_CHUNK;
  auto pack_chunk = [&](int64_t r0, int64_t s, int64_t c) {
    for (int64_t p = c * PACK_CHUNK; p < std::min(npanels, (c + 1) * PACK_CHUNK); ++p) pack_panel(r0, s, p);
  };

  at::parallel_for(0, pack_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) pack_chunk(0, 0, c);
  });

  // One parallel region per block: whoever is free grabs the next chunk of panels of block b + 1 to
  // pack, then the next work item of block b's tiles. Grabbing order does not change any result:
  // within a block each tile is computed by exactly one thread, and the blocks are added into the
  // fp64 tiles in row order (the region ends before the next block starts).
  const int64_t nblocks = (n + KC - 1) / KC;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t r0 = blk * KC, kc = std::min(KC, n - r0), kcp = padded(kc);
    TORCH_CHECK(!cancel_requested(caller), "center_syrk: cancelled");
    const bool pack_next = blk + 1 < nblocks;
    const char* apack = pack_base + (blk & 1) * pack_set_bytes;
    const char* bpack = apack + tri.pa * MR * kcp * EB;
    const int64_t bstep = (b_in_a ? MR : NR) * EB;  // bytes per row of a B panel
    std::atomic<int64_t> next_pack{0}, next_item{0};
    const int64_t item_count = static_cast<int64_t>(items.size());
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      if (pack_next) {
        for (int64_t c; (c = next_pack.fetch_add(1, std::memory_order_relaxed)) < pack_chunks;)
          pack_chunk(r0 + KC, (blk + 1) & 1, c);
      }
      bool begun = false;
      for (int64_t i; (i = next_item.fetch_add(1, std::memory_order_relaxed)) < item_count;) {
        if (!begun && ks.thread_begin != nullptr) ks.thread_begin();
        begun = true;
        const WorkItem& it = items[i];
        for (int64_t jb = it.jb0; jb < it.jb1; ++jb) {
          const char* b = b_in_a ? apack + (jb * NR / MR) * kcp * MR * EB + ((jb * NR) % MR) * BC : bpack + jb * kcp * NR * EB;
          const int64_t ia_end = std::min(it.ia1, tri.rows(jb));
          for (int64_t ia = it.ia0; ia < ia_end; ++ia) {
            const char* a = apack + ia * kcp * MR * EB;
            double* c = acc + (tri.first_tile[jb] + ia) * TILE;
            // The tile after this one in the item, whose fp64 lines our first run prefetches.
            const double* next = nullptr;
            if (ia + 1 < ia_end) next = c + TILE;
            else if (jb + 1 < it.jb1) next = acc + (tri.first_tile[jb + 1] + it.ia0) * TILE;
            const bool shift = shifted_tile(ia, jb);
            for (int64_t k0 = 0; k0 < kc; k0 += RUN) {
              const auto* ak = reinterpret_cast<const float*>(a + k0 * MR * EB);
              const auto* bk = reinterpret_cast<const float*>(b + k0 * bstep);
              const double* pf = k0 == 0 ? next : nullptr;
              if (shift)
                ks.exact->micro_shift(std::min(RUN, kc - k0), ak, bk, c, pf, plan.shift_a.data() + ia * MR,
                                      plan.shift_b.data() + jb * NR);
              else
                ks.micro(std::min(RUN, kc - k0), ak, bk, c, pf);
            }
          }
        }
      }
      if (begun && ks.thread_end != nullptr) ks.thread_end();
    });
    progress.advance(r0 + kc);
  }

  const double inv_n = 1.0 / static_cast<double>(n);
  if (exact) {
    // Entry (a, b) of the extended product, a <= b or not. The diagonal comes from the packs' fp64
    // sums of squares (see syrk_avx512bf16.cpp).
    const int64_t shift_g = ks.exact->shift_pairs;
    const auto gram = [&](int64_t a, int64_t b) {
      if (a > b) std::swap(a, b);
      return acc[(tri.first_tile[b / NR] + a / MR) * TILE + (b % NR) * MR + a % MR];
    };
    // Column j has j entries above the diagonal: columns p and d - 1 - p go together, so every
    // chunk of pairs has the same work.
    at::parallel_for(0, (d + 1) / 2, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t q = 2 * p0; q < 2 * p1; ++q) {
        const int64_t j = q % 2 == 0 ? q / 2 : d - 1 - q / 2;
        if (q % 2 == 1 && j == q / 2) continue;  // the middle column of an odd d, done once
        const int64_t xj = plan.extra[j], nj = plan.extras[j];
        const double dj = plan.delta[j], uj = plan.unscale[j];
        cov[j * d + j] = static_cast<float>((plan.diag[j] * inv_n - dj * dj) * uj * uj);
        for (int64_t i = 0; i < j; ++i) {
          const int64_t xi = plan.extra[i], ni = plan.extras[i];
          // Every partial product of the parts of columns i and j, in a fixed order.
          double s = gram(i, j);
          // The extra steps added shift_steps times -2 G mb_i mb_j (exact in fp64); take it out.
          if (shifted_tile(i / MR, j / NR)) s += static_cast<double>(shift_steps * 2 * shift_g) * plan.mb[i] * plan.mb[j];
          for (int64_t b = 0; b < nj; ++b) s += gram(i, xj + b);
          for (int64_t a = 0; a < ni; ++a) s += gram(xi + a, j);
          for (int64_t a = 0; a < ni; ++a)
            for (int64_t b = 0; b < nj; ++b) s += gram(xi + a, xj + b);
          s += run_sum(i, j);
          const double v = (s * inv_n - plan.delta[i] * plan.delta[j]) * plan.unscale[i] * plan.unscale[j];
          cov[i * d + j] = static_cast<float>(v);
          cov[j * d + i] = static_cast<float>(v);
        }
      }
    });
    return;
  }
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
            // The rows were centered on mean32, not on the exact mean: remove the rank-one term
            // (mean64 - mean32)(mean64 - mean32)^T that this adds to the sums.
            const double di = mean64[i] - static_cast<double>(mean32[i]);
            const double dj = mean64[j] - static_cast<double>(mean32[j]);
            const float v = i == j && fp64_var[j] ? static_cast<float>(sq[j] * inv_n - mean64[j] * mean64[j])
                                                  : static_cast<float>((tile[c * MR + r] + run_sum(i, j)) * inv_n - di * dj);
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
