// center_syrk on CPU: exact column mean and population covariance of W without copying W.
//
// Input: W (N, d), bf16/fp16/fp32, unit column stride (any row stride, e.g. a memory-mapped file).
// Output: mean fp64 (d,), covariance fp32 (d, d), symmetric and full.
//
// The driver (center_syrk_impl) runs named steps:
//   column_stats               pass 1: per column, fp64 sums of x and x^2 (exact set: also max |x|)
//   plan_exact / plan_fp32     the kernel set, the columns multiplied and what each is centered on
//   accumulate                 pass 2: blocks of rows packed (BlockPacker) and multiplied
//                              (multiply_item) into fp64 sums of the centered rows' products
//   finish_exact / finish_fp32 the centers' offset from the mean taken out, / N, rounded to fp32
// Pass 1's statistics of disjoint sets of rows add up; pass 2's sums are sums over the rows it is
// given, around centers the plan fixed beforehand, not yet divided by N. So the rows could be
// split between processes: one reduction of the statistics, one of the sums, then one finish.
//
// Pass 1 sums each column and its squares in fp64 (the exact mean, whatever the offset, and the
// spread, which picks the fp32 value each column is centered on: center.h). Pass 2 takes blocks of
// KC rows; each block is converted, centered and packed once into MR-wide (A) and NR-wide (B)
// column panels (L2/L3 resident, in the kernel set's layout: fp32 rows for the 16 x 6 AVX2 and
// 48 x 8 AVX-512 tiles, where AVX-512 reads B from the A panels; split bf16 tiles for the 16 x 32
// AMX tile), then MR x NR tiles of the upper triangle accumulate RUN rows of products at a time in
// fp32 and add them into an fp64 tile accumulator. So no fp32 or centered copy of W exists, only
// one triangle is computed, and no fp32 sum is longer than RUN terms (128; AMX and avx512bf16 256,
// plus 8 drift-cancelling terms on some avx512bf16 tiles), which keeps the error far below that of
// one long fp32 sum (docs/design/cpu-covariance.md has the figures).
//
// Threads split the triangle's tiles (not the rows), taking work items as they become free, and
// pack the next block while the current one is multiplied. Each fp64 tile always receives its block
// sums in the same order (runs of RUN rows from row 0, whatever KC or the tile shape), so the result
// is bitwise identical for any thread count or timing, and across the portable, AVX2 and AVX-512
// sets (the AMX set rounds in its own way: bitwise reproducible and within the same error, but not
// the same bits).
//
// A set with exact bf16 products (avx512bf16, for bf16 W) changes three things: pass 1 also finds
// each column's largest |x|, from which a plan (plan_exact) scales every column by a power of two
// and picks the columns to center; pass 2 multiplies an extended matrix, W's columns followed by
// an extra part of each centered column, packed as bf16 row pairs, with the run sums of uncentered
// columns with moderate means kept from drifting (see plan_exact_columns); and the covariance is
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
#include <limits>
#include <optional>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../center.h"
#include "status.h"
#include "syrk_kernel.h"

namespace refframe::cpu {
namespace {

// The rows of W a call reads: n rows of d elements, stride elements apart, unit column stride.
template <typename T>
struct Rows {
  const T* w;
  int64_t n, d, stride;
  const T* row(int64_t r) const { return w + r * stride; }
};

// ---- Tiles of the upper triangle and the threads' work items ------------------------------------

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

// A kernel set's building blocks for W's element type T (null where the set has none).
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

// ---- Pass 1: column statistics ------------------------------------------------------------------

// Pass 1's result for a set of rows: per column, the sum of its values and the sum of their
// squares, each in fp64 in row order, and (from an exact set's pass 1 only) its largest |x|.
// Statistics of disjoint sets of rows combine: rows, sum and sq add, amax takes the larger.
struct ColumnStats {
  int64_t rows = 0;
  std::vector<double> sum, sq;
  std::vector<float> amax;  // empty unless an exact set's pass 1 ran
  int64_t columns() const { return static_cast<int64_t>(sum.size()); }
};

// Pass 1 with the set that asks for it: an exact set's moments (bf16 W; they also give amax), or
// an fp32 set's accumulate; both give the same sums, bit for bit. Columns are split across threads
// in groups of 64 and each column is summed in row order, so the bits depend on neither the
// thread count nor the set. Blocks of PASS1_ROWS rows keep the rows a thread reads in its L2 while
// it goes through its columns.
constexpr int64_t PASS1_ROWS = 256;
template <typename T>
ColumnStats column_stats(const Rows<T>& rows, const KernelSet& ks) {
  const int64_t n = rows.n, d = rows.d;
  const ExactBf16* exact = ks.exact;
  const auto accumulate = Typed<T>::accumulate(ks);
  ColumnStats s;
  s.rows = n;
  s.sum.assign(d, 0.0);
  s.sq.assign(d, 0.0);
  if (exact != nullptr) s.amax.assign(d, 0.0f);
  at::parallel_for(0, (d + 63) / 64, 1, [&](int64_t b, int64_t e) {
    const int64_t j0 = b * 64, j1 = std::min(d, e * 64);
    double* sum = s.sum.data() + j0;
    double* sq = s.sq.data() + j0;
    for (int64_t r0 = 0; r0 < n; r0 += PASS1_ROWS) {
      const int64_t r1 = std::min(n, r0 + PASS1_ROWS);
      if (exact != nullptr)
        exact->moments(reinterpret_cast<const c10::BFloat16*>(rows.row(r0)) + j0, rows.stride, r1 - r0, j1 - j0, sum,
                       sq, s.amax.data() + j0);
      else
        for (int64_t r = r0; r < r1; ++r) accumulate(rows.row(r) + j0, j1 - j0, sum, sq);
    }
  });
  return s;
}

// The exact column means, sum / N in fp64: the op's first output.
void column_means(const ColumnStats& s, double* mean) {
  for (int64_t j = 0; j < s.columns(); ++j) mean[j] = s.sum[j] / static_cast<double>(s.rows);
}

// Where a call's rows sit in the whole W (rows split between processes): the index of its first
// row and the whole's row count. A single process has {0, n}.
struct Placement {
  int64_t offset, total;
};

// The exponent of the finest power-of-two grid of each column's values in an even sample of the
// whole W's rows (every max(1, total / 4096)-th row, counted from the whole's row 0), or INT_MAX
// where the sample is all zero: for center_of (center.h), columns of 0/1 indicators or small
// integers are centered on that grid. A sample is enough: the center only steers rounding. Rows
// split between processes each sample their own rows of the whole's sample; the smallest exponent
// over them is the whole's.
template <typename T>
std::vector<int> sample_lsb(const Rows<T>& rows, Placement at) {
  const int64_t n = rows.n, d = rows.d;
  const int64_t step = std::max<int64_t>(1, at.total / 4096);
  const int64_t first = (step - at.offset % step) % step;
  std::vector<int> lsb(d, std::numeric_limits<int>::max());
  at::parallel_for(0, (d + 63) / 64, 1, [&](int64_t b, int64_t e) {
    const int64_t j0 = b * 64, j1 = std::min(d, e * 64);
    for (int64_t r = first; r < n; r += step) {
      const T* row = rows.row(r);
      for (int64_t j = j0; j < j1; ++j) lsb[j] = std::min(lsb[j], refframe::grid_exponent(static_cast<float>(row[j])));
    }
  });
  return lsb;
}

// The grid itself (0 for an all-zero sample).
std::vector<double> grid_of(const std::vector<int>& lsb) {
  std::vector<double> grid(lsb.size(), 0.0);
  for (size_t j = 0; j < lsb.size(); ++j)
    if (lsb[j] != std::numeric_limits<int>::max()) grid[j] = std::ldexp(1.0, lsb[j]);
  return grid;
}

// ---- Runs of identical rows ---------------------------------------------------------------------

// Runs of identical consecutive rows: the padded or reserved tokens at the end of a vocabulary, rows
// of zeros, a row repeated. In such a run a product is the same number in every row, so an fp32
// run sum adds that number to itself again and again and its rounding errors do not cancel. The
// driver leaves these rows out of the packs (zeros) and adds k u u^T in fp64 instead (u the row
// centered as the packs center it, k the rows of every run of that row). Runs shorter than MIN_RUN
// rows are left in; of the distinct rows that runs repeat, those with MIN_COUNT or more rows in
// runs are taken, at most MAX_ROWS, the ones with the most (each costs d^2 / 2 fp64 products at
// the end); runs of the others stay in the packs (a few short runs of different rows do not show
// in the error: docs/design/cpu-covariance.md).
struct RowRun {
  int64_t begin, end;
  int64_t row;  // its index in RowRuns::rows (maximal_runs: the hash of its row's bytes)
};
struct RowRuns {
  std::vector<RowRun> runs;  // by first row
  std::vector<int64_t> rows, count;  // per distinct row: a row of W that holds it, and k
};
constexpr int64_t MIN_RUN = 8;
constexpr int64_t MIN_COUNT = 32;
constexpr int64_t MAX_ROWS = 64;

template <typename T>
bool rows_equal(const Rows<T>& w, int64_t r, int64_t q) {
  return std::memcmp(w.row(r), w.row(q), w.d * sizeof(T)) == 0;
}

template <typename T>
uint64_t row_hash(const Rows<T>& w, int64_t r) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(w.row(r));
  const size_t nbytes = w.d * sizeof(T);
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < nbytes; i += 8) {
    uint64_t word = 0;
    std::memcpy(&word, bytes + i, std::min<size_t>(8, nbytes - i));
    h = (h ^ word) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
  }
  return h;
}

// The maximal runs of identical consecutive rows of MIN_RUN rows or more, by first row, each with
// the hash of its row in `row`. With edges, also the runs that hold the first and the last row,
// whatever their length: rows split between processes can continue a run across their boundary.
template <typename T>
std::vector<RowRun> maximal_runs(const Rows<T>& w, bool edges) {
  const int64_t n = w.n;
  std::vector<RowRun> runs;
  if (n < (edges ? 1 : MIN_RUN)) return runs;
  // Most rows differ from the previous one in their first bytes: this reads little more than a
  // cache line per row.
  std::vector<uint8_t> same(n, 0);
  at::parallel_for(1, n, 2048, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) same[r] = rows_equal(w, r, r - 1);
  });
  for (int64_t r = 0; r < n;) {
    int64_t e = r + 1;
    while (e < n && same[e]) ++e;
    if (e - r >= MIN_RUN || (edges && (r == 0 || e == n))) runs.push_back({r, e, 0});
    r = e;
  }
  const auto nr = static_cast<int64_t>(runs.size());
  at::parallel_for(0, nr, 16, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) runs[q].row = static_cast<int64_t>(row_hash(w, runs[q].begin));
  });
  return runs;
}

// Runs with a distinct-row label each (runs[q].row), grouped into the distinct rows they repeat:
// a run joins the first distinct row of its label whose bytes equal its own (one comparison in the
// usual case), in the order first seen. Gives the rows and their counts; runs[q].row becomes the
// index of its distinct row.
template <typename T>
RowRuns group_runs(const Rows<T>& w, std::vector<RowRun> runs) {
  RowRuns out;
  std::unordered_map<int64_t, std::vector<int64_t>> by_label;
  for (RowRun& run : runs) {
    std::vector<int64_t>& group = by_label[run.row];
    int64_t v = -1;
    for (const int64_t u : group)
      if (rows_equal(w, out.rows[u], run.begin)) {
        v = u;
        break;
      }
    if (v < 0) {
      v = static_cast<int64_t>(out.rows.size());
      group.push_back(v);
      out.rows.push_back(run.begin);
      out.count.push_back(0);
    }
    out.count[v] += run.end - run.begin;
    run.row = v;
  }
  out.runs = std::move(runs);
  return out;
}

// The runs of one process's W: of the distinct rows with MIN_COUNT rows in runs or more, the
// MAX_ROWS with the most (ties: the first seen), in order seen.
template <typename T>
RowRuns identical_runs(const Rows<T>& w) {
  const RowRuns all = group_runs(w, maximal_runs(w, false));
  RowRuns out;
  std::vector<int64_t> order;
  for (size_t v = 0; v < all.rows.size(); ++v)
    if (all.count[v] >= MIN_COUNT) order.push_back(static_cast<int64_t>(v));
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return all.count[x] > all.count[y]; });
  if (order.size() > static_cast<size_t>(MAX_ROWS)) order.resize(MAX_ROWS);
  std::sort(order.begin(), order.end());
  std::vector<int64_t> index(all.rows.size(), -1);
  for (const int64_t v : order) {
    index[v] = static_cast<int64_t>(out.rows.size());
    out.rows.push_back(all.rows[v]);
    out.count.push_back(all.count[v]);
  }
  for (const RowRun& run : all.runs)
    if (index[run.row] >= 0) out.runs.push_back({run.begin, run.end, index[run.row]});
  return out;
}

// ---- The plan -----------------------------------------------------------------------------------

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
  // Drift cancellation (ExactBf16::micro_shift) for uncentered columns whose mean is more than
  // sd / 4: per column of W its shift mean mb (its scaled mean on a coarse grid, bf16; 0 for every
  // other column), and per extended column the words of the extra pair step, bf16 of -2 G mb on
  // the A side and bf16 of mb on the B side (G = shift_pairs; low halves, high halves zero).
  std::vector<double> mb, mb_sd;  // mb_sd: |mean| / sd of a column with mb != 0, else 0
  std::vector<uint32_t> shift_a, shift_b;

  // Every member but extras sized for d columns of W and dp extended ones (with room for the
  // packs' reads past the last panel), all zero but extra (-1) and unscale (1).
  void allocate(int64_t d) {
    const int64_t pad = 64;
    cols.assign(dp + pad, 0);
    parts.assign(dp + pad, 0);
    extra.assign(d, -1);
    scale.assign(d + pad, 0.0f);
    shift.assign(d + pad, 0.0f);
    unscale.assign(d, 1.0);
    delta.assign(d, 0.0);
    mb.assign(d, 0.0);
    mb_sd.assign(d, 0.0);
    shift_a.assign(dp + pad, 0u);
    shift_b.assign(dp + pad, 0u);
  }
};

// Fills the exact set's plan from the column statistics; false when the fallback set should run
// instead: a value that is not finite, or more than d / 4 extra columns (those would cost more
// than the faster products gain).
// A column is centered when |mean| > 3 sd / 4. Left uncentered, its products with another such
// column have a mean of their own, mb_i mb_j, so each fp32 run sum drifts by that much per row and
// rounds more as it grows. Drift cancellation keeps those sums small: after every G = 16 pairs of
// rows the micro-kernel adds one more pair step, -2 G mb_i mb_j, exact (bf16 products), and the
// driver takes the same amount out in fp64 at the end. mb is the scaled mean rounded to a grid of
// 2^-7 of its sd (or of itself, if larger): values on a finer grid than the data's would leave low
// bits in every run sum that the data's products do not have (an exact bf16(mean) does worse on
// zero-mean columns than no cancellation at all). What is left is the products' spread, which
// grows with the mean too; up to 3 sd / 4 the error stays within the worst case of columns within
// sd / 2 without cancellation, so columns past it are centered (docs/design/cpu-covariance.md has
// the measurements). Columns within sd / 4 of zero keep mb = 0. A tile takes the extra steps (one
// more product per 16 pairs of rows) only where some product of its columns' |mean| / sd exceeds
// 1/4, so W whose means all lie within sd / 2 keeps its bits and its speed.
// A centered column's shift is its scaled mean rounded to bf16, so t = a - shift (a: x scaled) is
// the difference of two bf16 numbers, exact in fp32, and two parts hold it: h = bf16(t), and
// t - h, the rounding error of a bf16 sum, is a bf16 number itself. That is one extra column.
// (Where a and the shift lie more than 2^15 apart, fp32 rounds t, by at most 2^-24 |t|, as the
// fp32 sets round their x - center.) Far from zero the shift can sit several sd from the mean (its
// bf16 spacing there is |mean| / 256 or more), but the values lie on that same grid, so t is a
// small multiple of the spacing and the run sums of its products are exact: a finer, fp32 shift
// would give every row the same fp32 remainder and bias those sums.
// A constant column is centered without parts: its mean is its value (an exact fp64 sum divided by
// N), so t is 0 and costs nothing.
bool plan_exact_columns(const ColumnStats& s, const double* mean, int64_t shift_pairs, ExactPlan& p) {
  const int64_t n = s.rows, d = s.columns();
  const double* sq = s.sq.data();
  const float* amax = s.amax.data();
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
  p.allocate(d);
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


// How pass 2 multiplies and how the finish assembles: the kernel set, the matrix multiplied (its
// columns and the tiles of its upper triangle) and what each column is centered on. It is made
// from the column statistics alone (and, for the fp32 sets, the rows' sampled grid), so processes
// that agree on those make the same plan.
struct CovariancePlan {
  const KernelSet& ks;
  bool exact;
  Triangle tri;  // tri.d: the columns multiplied (d, or the exact set's extended dp)
  // fp32 sets: each column's fp32 center (center.h), zero up to whole A and B panels and beyond;
  // and the columns that take their variance from pass 1's fp64 sums instead of the products.
  std::vector<float> center;
  std::vector<char> fp64_var;
  // The exact set: its columns, and per A and B panel the largest |mean| / sd of its shifted
  // columns (a tile takes the drift-cancelling steps when the product of its two exceeds 1/4).
  ExactPlan x;
  std::vector<double> shift_pa, shift_pb;

  CovariancePlan(const KernelSet& set, bool exact_set, int64_t columns)
      : ks(set), exact(exact_set), tri(columns, set.mr, set.nr), shift_pa(tri.pa, 0.0), shift_pb(tri.pb, 0.0) {}
  bool shifted_tile(int64_t ia, int64_t jb) const { return shift_pa[ia] * shift_pb[jb] > 0.25; }
};

// What the driver assumes of a kernel set: blocks made of whole runs (the results must not depend
// on the block length), runs made of whole pack rows, B panels that lie inside one A panel when
// they are read from there, and the packs its path needs.
template <typename T>
void check_set(const KernelSet& ks, bool exact) {
  const auto pack = Typed<T>::pack(ks);
  const auto pack_pair = Typed<T>::pack_pair(ks);
  TORCH_INTERNAL_ASSERT(ks.run > 0 && ks.kc % ks.run == 0 && ks.run % ks.kalign == 0 &&
                            (!ks.b_in_a || ks.mr % ks.nr == 0) &&
                            (exact ? ks.b_in_a
                                   : pack_pair == nullptr ? pack != nullptr : !ks.b_in_a && ks.nr % ks.mr == 0),
                        "center_syrk: kernel set ", ks.name, " has an invalid tile or block length");
}

// The plan of a set with exact bf16 products for bf16 W, or none where plan_exact_columns refuses.
std::optional<CovariancePlan> plan_exact(const ColumnStats& stats, const double* mean, const KernelSet& ks) {
  ExactPlan x;
  if (!plan_exact_columns(stats, mean, ks.exact->shift_pairs, x)) return std::nullopt;
  check_set<c10::BFloat16>(ks, true);
  std::optional<CovariancePlan> p(std::in_place, ks, true, x.dp);
  p->x = std::move(x);
  const ExactPlan& px = p->x;
  if (std::any_of(px.mb.begin(), px.mb.end(), [](double v) { return v != 0.0; })) {
    const int64_t MR = p->tri.MR, NR = p->tri.NR;
    for (int64_t j = 0; j < stats.columns(); ++j) {
      p->shift_pa[j / MR] = std::max(p->shift_pa[j / MR], px.mb_sd[j]);
      p->shift_pb[j / NR] = std::max(p->shift_pb[j / NR], px.mb_sd[j]);
    }
  }
  return p;
}

// The plan of an fp32 set: W's columns as they are, each centered on center_of (center.h) of its
// mean, sum of squares and sampled grid; columns within 16 sd of zero take their variance from
// pass 1's fp64 sums.
template <typename T>
CovariancePlan plan_fp32(const ColumnStats& stats, const double* mean, const std::vector<double>& grid,
                         const KernelSet& ks) {
  check_set<T>(ks, false);
  const int64_t d = stats.columns();
  CovariancePlan p(ks, false, d);
  p.center.assign(std::max(p.tri.pa * p.tri.MR, p.tri.pb * p.tri.NR) + 16, 0.0f);
  p.fp64_var.assign(d, 0);
  for (int64_t j = 0; j < d; ++j) {
    bool from_fp64 = false;
    p.center[j] = refframe::center_of<T>(mean[j], stats.sq[j], stats.rows, grid[j], &from_fp64);
    p.fp64_var[j] = from_fp64;
  }
  return p;
}

// ---- Pass 2: the products of the centered rows --------------------------------------------------

// The rows of the runs identical_runs found, in fp64: per distinct row q and column j, u (the row
// centered as the packs center it: x - center, or x scale - shift for the exact set; unrounded)
// and k u (k: its rows in runs), at [j * count + q].
struct RunTerms {
  int64_t count = 0;
  std::vector<double> u, ku;
  // What the runs' rows add to entry (i, j) of the sums.
  double sum(int64_t i, int64_t j) const {
    double s = 0.0;
    for (int64_t q = 0; q < count; ++q) s += u[i * count + q] * ku[j * count + q];
    return s;
  }
};

template <typename T>
RunTerms run_terms(const Rows<T>& rows, const RowRuns& repeated, const CovariancePlan& plan) {
  const int64_t d = rows.d;
  RunTerms t;
  t.count = static_cast<int64_t>(repeated.rows.size());
  t.u.resize(d * t.count);
  t.ku.resize(d * t.count);
  for (int64_t q = 0; q < t.count; ++q) {
    const T* row = rows.row(repeated.rows[q]);
    const auto k = static_cast<double>(repeated.count[q]);
    for (int64_t j = 0; j < d; ++j) {
      const auto x = static_cast<double>(static_cast<float>(row[j]));
      const double u = plan.exact ? x * static_cast<double>(plan.x.scale[j]) - static_cast<double>(plan.x.shift[j])
                                  : x - static_cast<double>(plan.center[j]);
      t.u[j * t.count + q] = u;
      t.ku[j * t.count + q] = k * u;
    }
  }
  return t;
}

// Pass 2's result for a set of rows: sums over those rows of the products of their columns,
// centered as the plan centers them, in fp64 and not yet divided by N. The packed rows' products
// sit in the fp64 tiles of the upper triangle (plan.tri: tile (ia, jb) at (first_tile[jb] + ia)
// TILE, its entry (r, c) at c MR + r); the rows left out of the packs come as run terms. The exact
// set adds the packs' fp64 sums of t^2 of its centered columns (the diagonal) and the number of
// drift-cancelling steps each shifted tile took. Results for disjoint sets of rows combine by
// adding tiles, diag and shift_steps and joining the run terms.
struct RowProducts {
  at::Tensor tiles;
  std::vector<double> diag;
  int64_t shift_steps = 0;
  RunTerms runs;
  const double* acc() const { return tiles.const_data_ptr<double>(); }
};

// Pass 2's blocks of rows: KC rows each, aligned to the whole W's rows (the first block of rows that
// start at `offset` in the whole ends where the whole's block would), and in each block the runs
// of RUN rows whose products are summed in fp32, aligned the same way. So rows split between
// processes are summed as one process sums them where a split falls on a multiple of KC (every
// set's KC divides 4,096). Sets that pack kalign rows together align to a multiple of kalign rows.
struct Block {
  int64_t r0, kc, phase;  // first row (of this call's), rows, position in the whole's block
  int64_t run_end(int64_t k0, int64_t run) const {  // end of the run that starts at row k0 of the block
    return std::min(kc, (phase + k0) / run * run + run - phase);
  }
};
std::vector<Block> blocks_of(int64_t n, int64_t offset, const KernelSet& ks) {
  std::vector<Block> blocks;
  const int64_t phase = offset % ks.kc / ks.kalign * ks.kalign;
  for (int64_t r0 = 0, p = phase; r0 < n; p = 0) {
    const int64_t kc = std::min(ks.kc - p, n - r0);
    blocks.push_back({r0, kc, p});
    r0 += kc;
  }
  return blocks;
}

// The drift-cancelling steps micro_shift adds to a tile over a block: one per shift_pairs pairs of
// rows of each run.
int64_t drift_steps(const KernelSet& ks, const Block& block) {
  int64_t steps = 0;
  for (int64_t k0 = 0; k0 < block.kc; k0 = block.run_end(k0, ks.run))
    steps += (block.run_end(k0, ks.run) - k0 + 1) / 2 / ks.exact->shift_pairs;
  return steps;
}

// Pass 2's packs: two sets (the block being multiplied and the next one, packed meanwhile) of A and
// B panels, 64-byte aligned. Offsets are in bytes: EB bytes per element, blocks of kcp = kc rows
// rounded up to the set's kalign rows; in a set, A panel ia starts at ia kcp MR EB and B panel jb
// at (pa MR + jb NR) kcp EB. With b_in_a, B panel jb is read from the A panels (columns jb NR ..
// jb NR + NR of a row of A panel jb NR / MR, BC bytes apart, rows MR elements apart) and only A
// panels are packed.
struct PackSets {
  int64_t MR, NR, EB, BC, kalign, pa, pb;
  bool b_in_a;
  int64_t set_bytes;
  at::Tensor storage;
  char* base;

  PackSets(const KernelSet& ks, const Triangle& tri)
      : MR(tri.MR), NR(tri.NR), EB(ks.pack_bytes), BC(ks.b_col_bytes > 0 ? ks.b_col_bytes : ks.pack_bytes),
        kalign(ks.kalign), pa(tri.pa), pb(tri.pb), b_in_a(ks.b_in_a),
        set_bytes((pa * MR + (b_in_a ? 0 : pb * NR)) * padded(ks.kc) * EB),
        storage(at::empty({2 * set_bytes + 64}, at::TensorOptions().dtype(at::kByte))),
        base(reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(storage.data_ptr<uint8_t>()) + 63) & ~uintptr_t{63})) {}
  int64_t padded(int64_t kc) const { return (kc + kalign - 1) / kalign * kalign; }
  char* set(int64_t blk) const { return base + (blk & 1) * set_bytes; }  // the packs of block blk
  char* a_panel(char* set, int64_t kcp, int64_t ia) const { return set + ia * kcp * MR * EB; }
  char* b_panel(char* set, int64_t kcp, int64_t jb) const { return set + (pa * MR + jb * NR) * kcp * EB; }
  // Where the micro-kernel reads B panel jb, and the bytes from one of its rows to the next.
  const char* b_read(const char* set, int64_t kcp, int64_t jb) const {
    return b_in_a ? set + (jb * NR / MR) * kcp * MR * EB + ((jb * NR) % MR) * BC : set + (pa * MR + jb * NR) * kcp * EB;
  }
  int64_t b_row_bytes() const { return (b_in_a ? MR : NR) * EB; }
};

// Step "pack a block": panel p of the block of kc rows at r0, converted,
// centered and packed into a pack set in the kernel set's layout, and the rows of the identical
// runs in it blanked. Panels [0, pa) are A panels, then B; with pack_pair, panel p is B panel p
// together with the A panels of its columns; the exact set packs A panels only (a panel with extra
// columns takes the general pack_parts) and adds the t^2 of its centered columns into diag.
template <typename T>
class BlockPacker {
 public:
  BlockPacker(const Rows<T>& rows, const CovariancePlan& plan, const PackSets& packs, const std::vector<RowRun>& runs)
      : rows_(rows), plan_(plan), packs_(packs), runs_(runs), pack_(Typed<T>::pack(plan.ks)),
        pack_pair_(Typed<T>::pack_pair(plan.ks)) {}

  int64_t panels() const {
    if (plan_.exact) return plan_.tri.pa;
    return pack_pair_ != nullptr ? plan_.tri.pb : plan_.tri.pa + (packs_.b_in_a ? 0 : plan_.tri.pb);
  }

  void pack_panel(int64_t r0, int64_t kc, char* set, int64_t p, double* diag) const {
    const int64_t MR = packs_.MR, NR = packs_.NR, EB = packs_.EB, d = rows_.d, stride = rows_.stride;
    const int64_t kcp = packs_.padded(kc);
    const T* src = rows_.row(r0);
    if (plan_.exact) {
      const ExactPlan& x = plan_.x;
      const auto* bsrc = reinterpret_cast<const c10::BFloat16*>(src);
      const int64_t col = p * MR, width = std::min(MR, x.dp - col);
      char* dst = packs_.a_panel(set, kcp, p);
      if (col + width <= d)
        plan_.ks.exact->pack(bsrc + col, stride, kc, x.scale.data() + col, x.shift.data() + col, width, MR, dst,
                             diag + col);
      else
        plan_.ks.exact->pack_parts(bsrc, stride, kc, x.cols.data() + col, x.parts.data() + col, x.scale.data(),
                                   x.shift.data(), width, MR, dst, diag);
      blank_runs(r0, kc, dst, MR);
      return;
    }
    const float* center = plan_.center.data();
    if (pack_pair_ != nullptr) {
      const int64_t col = p * NR;
      pack_pair_(src + col, stride, kc, center + col, std::min(NR, d - col),
                 reinterpret_cast<float*>(packs_.b_panel(set, kcp, p)), reinterpret_cast<float*>(set + col * kcp * EB),
                 kcp * MR * EB);
      return;
    }
    const bool is_a = p < packs_.pa;
    const int64_t panel = is_a ? MR : NR;
    const int64_t col = is_a ? p * MR : (p - packs_.pa) * NR;
    char* dst = is_a ? packs_.a_panel(set, kcp, p) : packs_.b_panel(set, kcp, p - packs_.pa);
    pack_(src + col, stride, kc, center + col, std::min(panel, d - col), panel, reinterpret_cast<float*>(dst));
    blank_runs(r0, kc, dst, panel);
  }

 private:
  // The rows of the block at r0 (kc rows) that lie in a run become zeros in a panel just packed
  // (panel columns wide), so they add nothing to the fp32 sums.
  void blank_runs(int64_t r0, int64_t kc, char* dst, int64_t panel) const {
    const int64_t EB = packs_.EB;
    auto q = std::upper_bound(runs_.begin(), runs_.end(), r0, [](int64_t r, const RowRun& x) { return r < x.end; });
    for (; q != runs_.end() && q->begin < r0 + kc; ++q) {
      const int64_t k0 = std::max(q->begin, r0) - r0, k1 = std::min(q->end, r0 + kc) - r0;
      if (plan_.exact) {
        // bf16 row pairs (x86, little-endian): row k is half k % 2 of the words of pair row k / 2.
        auto* h = reinterpret_cast<uint16_t*>(dst);
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t c = 0; c < panel; ++c) h[(k / 2) * 2 * panel + 2 * c + k % 2] = 0;
      } else {
        std::memset(dst + k0 * panel * EB, 0, static_cast<size_t>((k1 - k0) * panel * EB));
      }
    }
  }

  using Pack = decltype(Typed<T>::pack(std::declval<const KernelSet&>()));
  using PackPair = decltype(Typed<T>::pack_pair(std::declval<const KernelSet&>()));
  const Rows<T>& rows_;
  const CovariancePlan& plan_;
  const PackSets& packs_;
  const std::vector<RowRun>& runs_;
  const Pack pack_;
  const PackPair pack_pair_;
};

// Step "multiply a block": work item `it` of the block packed in `set`. Each of its tiles of the
// upper triangle takes the products of the block's rows, one run (block.run_end) per micro call
// summed in fp32 and added into the tile's fp64 sums in acc (micro_shift on the tiles the plan
// shifts).
void multiply_item(const CovariancePlan& plan, const PackSets& packs, char* set, const Block& block,
                   const WorkItem& it, double* acc) {
  const KernelSet& ks = plan.ks;
  const Triangle& tri = plan.tri;
  const int64_t MR = tri.MR, NR = tri.NR, TILE = tri.TILE, EB = packs.EB, kc = block.kc;
  const int64_t kcp = packs.padded(kc), bstep = packs.b_row_bytes();
  for (int64_t jb = it.jb0; jb < it.jb1; ++jb) {
    const char* b = packs.b_read(set, kcp, jb);
    const int64_t ia_end = std::min(it.ia1, tri.rows(jb));
    for (int64_t ia = it.ia0; ia < ia_end; ++ia) {
      const char* a = packs.a_panel(set, kcp, ia);
      double* c = acc + (tri.first_tile[jb] + ia) * TILE;
      // The tile after this one in the item, whose fp64 lines our first run prefetches.
      const double* next = nullptr;
      if (ia + 1 < ia_end) next = c + TILE;
      else if (jb + 1 < it.jb1) next = acc + (tri.first_tile[jb + 1] + it.ia0) * TILE;
      const bool shift = plan.shifted_tile(ia, jb);
      for (int64_t k0 = 0; k0 < kc; k0 = block.run_end(k0, ks.run)) {
        const int64_t len = block.run_end(k0, ks.run) - k0;
        const auto* ak = reinterpret_cast<const float*>(a + k0 * MR * EB);
        const auto* bk = reinterpret_cast<const float*>(b + k0 * bstep);
        const double* pf = k0 == 0 ? next : nullptr;
        if (shift)
          ks.exact->micro_shift(len, ak, bk, c, pf, plan.x.shift_a.data() + ia * MR, plan.x.shift_b.data() + jb * NR);
        else
          ks.micro(len, ak, bk, c, pf);
      }
    }
  }
}

// Pass 2 over a set of rows: blocks of KC rows, each packed (BlockPacker) while the block before it
// is multiplied (multiply_item). Stops with "center_syrk: cancelled" before a block when the
// caller's thread was asked to (status.h); advances the progress after each block.
//
// One parallel region per block: whoever is free grabs the next chunk of panels of block b + 1 to
// pack, then the next work item of block b's tiles. Grabbing order does not change any result:
// within a block each tile is computed by exactly one thread, and the blocks are added into the
// fp64 tiles in row order (the region ends before the next block starts).
template <typename T>
RowProducts accumulate(const Rows<T>& rows, const CovariancePlan& plan, const RowRuns& repeated, int64_t offset,
                       uint64_t caller, const ProgressScope& progress) {
  const KernelSet& ks = plan.ks;
  const PackSets packs(ks, plan.tri);
  const BlockPacker<T> packer(rows, plan, packs, repeated.runs);
  RowProducts out;
  out.runs = run_terms(rows, repeated, plan);
  out.tiles = at::zeros({plan.tri.tiles * plan.tri.TILE}, at::TensorOptions().dtype(at::kDouble));
  out.diag.assign(plan.exact ? rows.d : 0, 0.0);
  double* acc = out.tiles.data_ptr<double>();
  double* diag = out.diag.data();

  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const auto items = make_items(plan.tri, ks.mc_cols, ks.jb_cols, nthreads);
  const auto item_count = static_cast<int64_t>(items.size());
  constexpr int64_t PACK_CHUNK = 8;  // panels per grab
  const int64_t npanels = packer.panels(), pack_chunks = (npanels + PACK_CHUNK - 1) / PACK_CHUNK;
  const auto pack_chunk = [&](const Block& block, char* set, int64_t c) {
    for (int64_t p = c * PACK_CHUNK; p < std::min(npanels, (c + 1) * PACK_CHUNK); ++p)
      packer.pack_panel(block.r0, block.kc, set, p, diag);
  };

  const std::vector<Block> blocks = blocks_of(rows.n, offset, ks);
  const auto nblocks = static_cast<int64_t>(blocks.size());
  if (nblocks > 0)
    at::parallel_for(0, pack_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) pack_chunk(blocks[0], packs.set(0), c);
    });
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const Block& block = blocks[blk];
    TORCH_CHECK(!cancel_requested(caller), "center_syrk: cancelled");
    const bool pack_next = blk + 1 < nblocks;
    std::atomic<int64_t> next_pack{0}, next_item{0};
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      if (pack_next) {
        for (int64_t c; (c = next_pack.fetch_add(1, std::memory_order_relaxed)) < pack_chunks;)
          pack_chunk(blocks[blk + 1], packs.set(blk + 1), c);
      }
      bool begun = false;
      for (int64_t i; (i = next_item.fetch_add(1, std::memory_order_relaxed)) < item_count;) {
        if (!begun && ks.thread_begin != nullptr) ks.thread_begin();
        begun = true;
        multiply_item(plan, packs, packs.set(blk), block, items[i], acc);
      }
      if (begun && ks.thread_end != nullptr) ks.thread_end();
    });
    if (plan.exact) out.shift_steps += drift_steps(ks, block);
    progress.advance(block.r0 + block.kc);
  }
  return out;
}

// Whether the plan's packs can be blanked for runs of identical rows (fp32 rows, or the exact set's
// bf16 row pairs; not the AMX set's split tiles).
template <typename T>
bool blankable(const CovariancePlan& plan) {
  return plan.exact || (Typed<T>::pack_pair(plan.ks) == nullptr && plan.ks.pack_bytes == 4 && plan.ks.kalign == 1);
}

// ---- The sums as a plain triangle ---------------------------------------------------------------

// Entry (i, j), i <= j, of a packed upper triangle of d columns: (0, 0), (0, 1), ..., (0, d - 1),
// (1, 1), ... in that order.
inline int64_t upper_index(int64_t d, int64_t i, int64_t j) { return i * d - i * (i - 1) / 2 + (j - i); }

// Column j has j entries above the diagonal: columns p and d - 1 - p go together, so every chunk of
// pairs has the same work. f(j) is called once per column.
template <typename F>
void for_columns_balanced(int64_t d, const F& f) {
  at::parallel_for(0, (d + 1) / 2, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t q = 2 * p0; q < 2 * p1; ++q) {
      const int64_t j = q % 2 == 0 ? q / 2 : d - 1 - q / 2;
      if (q % 2 == 1 && j == q / 2) continue;  // the middle column of an odd d, done once
      f(j);
    }
  });
}

// Entry (i, j), i < j, of the exact set's sums S: every partial product of the parts of columns i
// and j of W (h h', h m', m h', m m', from the extended product's tiles), in a fixed order, less the
// drift-cancelling steps' -2 G mb_i mb_j (exact in fp64) where the tile took them, plus the runs.
double exact_sum(const CovariancePlan& plan, const RowProducts& sums, int64_t i, int64_t j) {
  const Triangle& tri = plan.tri;
  const ExactPlan& x = plan.x;
  const double* acc = sums.acc();
  // Entry (a, b) of the extended product's sums, a <= b or not.
  const auto gram = [&](int64_t a, int64_t b) {
    if (a > b) std::swap(a, b);
    return acc[(tri.first_tile[b / tri.NR] + a / tri.MR) * tri.TILE + (b % tri.NR) * tri.MR + a % tri.MR];
  };
  const int64_t xi = x.extra[i], ni = x.extras[i], xj = x.extra[j], nj = x.extras[j];
  double s = gram(i, j);
  if (plan.shifted_tile(i / tri.MR, j / tri.NR))
    s += static_cast<double>(sums.shift_steps * 2 * plan.ks.exact->shift_pairs) * x.mb[i] * x.mb[j];
  for (int64_t b = 0; b < nj; ++b) s += gram(i, xj + b);
  for (int64_t a = 0; a < ni; ++a) s += gram(xi + a, j);
  for (int64_t a = 0; a < ni; ++a)
    for (int64_t b = 0; b < nj; ++b) s += gram(xi + a, xj + b);
  return s + sums.runs.sum(i, j);
}

// Pass 2's sums as a plain fp64 packed upper triangle S of W's d columns (upper_index), not divided
// by N: for the fp32 sets the sums of (x_i - c_i)(x_j - c_j) around the plan's centers (tiles plus
// runs); for the exact set the sums of t_i t_j (t: x scaled, less the shift; exact_sum), with the
// packs' fp64 sums of t^2 on the diagonal of centered columns. The diagonal of a column whose
// variance comes from pass 1 (fp64_var; the exact set's uncentered columns) holds its products'
// sum, which the finish does not use. Triangles of disjoint sets of rows around the same plan add
// up to the triangle of their union.
at::Tensor upper_sums(const CovariancePlan& plan, const RowProducts& sums, int64_t d) {
  at::Tensor out = at::empty({d * (d + 1) / 2}, at::TensorOptions().dtype(at::kDouble));
  double* S = out.data_ptr<double>();
  const Triangle& tri = plan.tri;
  const double* acc = sums.acc();
  for_columns_balanced(d, [&](int64_t j) {
    for (int64_t i = 0; i <= j; ++i) {
      double s;
      if (plan.exact)
        s = i == j && plan.x.shift[j] != 0.0f ? sums.diag[j] : exact_sum(plan, sums, i, j);
      else
        s = acc[(tri.first_tile[j / tri.NR] + i / tri.MR) * tri.TILE + (j % tri.NR) * tri.MR + i % tri.MR] +
            sums.runs.sum(i, j);
      S[upper_index(d, i, j)] = s;
    }
  });
  return out;
}

// ---- Finish -------------------------------------------------------------------------------------

// Finish for the fp32 sets: cov = fp32(S / N - (mean - center)(mean - center)^T), S from
// upper_sums: the rows were centered on the fp32 centers, not on the exact mean, which adds that
// rank-one term to S / N. A column the plan marks fp64_var takes its variance from pass 1's fp64
// sums instead, sq / N - mean^2. Both halves of cov are written.
void finish_fp32(const CovariancePlan& plan, const ColumnStats& stats, const double* mean, const double* S,
                 float* cov) {
  const int64_t d = stats.columns();
  const double inv_n = 1.0 / static_cast<double>(stats.rows);
  const float* center = plan.center.data();
  for_columns_balanced(d, [&](int64_t j) {
    const double dj = mean[j] - static_cast<double>(center[j]);
    for (int64_t i = 0; i <= j; ++i) {
      const double di = mean[i] - static_cast<double>(center[i]);
      const float v = i == j && plan.fp64_var[j] ? static_cast<float>(stats.sq[j] * inv_n - mean[j] * mean[j])
                                                 : static_cast<float>(S[upper_index(d, i, j)] * inv_n - di * dj);
      cov[i * d + j] = v;
      cov[j * d + i] = v;
    }
  });
}

// Finish for the exact set: cov = fp32((S / N - delta_i delta_j) unscale_i unscale_j), S from
// upper_sums; the diagonal of an uncentered column takes S from pass 1's fp64 sq, scaled (the
// squares of bf16 numbers have biased low bits, so their fp32 sums would round low:
// syrk_avx512bf16.cpp).
void finish_exact(const CovariancePlan& plan, const ColumnStats& stats, const double* S, float* cov) {
  const ExactPlan& x = plan.x;
  const int64_t d = stats.columns();
  const double inv_n = 1.0 / static_cast<double>(stats.rows);
  for_columns_balanced(d, [&](int64_t j) {
    const double dj = x.delta[j], uj = x.unscale[j];
    const double sq = x.shift[j] == 0.0f
                          ? stats.sq[j] * static_cast<double>(x.scale[j]) * static_cast<double>(x.scale[j])
                          : S[upper_index(d, j, j)];
    cov[j * d + j] = static_cast<float>((sq * inv_n - dj * dj) * uj * uj);
    for (int64_t i = 0; i < j; ++i) {
      const double v = (S[upper_index(d, i, j)] * inv_n - x.delta[i] * dj) * x.unscale[i] * uj;
      cov[i * d + j] = static_cast<float>(v);
      cov[j * d + i] = static_cast<float>(v);
    }
  });
}

// ---- The driver ---------------------------------------------------------------------------------

// The set whose pass 1 runs: a set with exact bf16 products where it may run on W (bf16, and
// allowed: rows split between processes use it only where every process has it), else the fp32 set.
template <typename T>
const KernelSet& stats_set(bool allow_exact) {
  const KernelSet& chosen = active_kernels();
  if (chosen.exact == nullptr) return chosen;
  return allow_exact && std::is_same_v<T, c10::BFloat16> ? chosen : chosen.exact->fallback();
}

// The plan from the whole W's column statistics (and sampled grids): the exact set's where it may
// run and its plan allows, else the fp32 set's.
template <typename T>
CovariancePlan make_plan(const ColumnStats& stats, const double* mean, const std::vector<int>& lsb, bool allow_exact) {
  const KernelSet& set = stats_set<T>(allow_exact);
  if (set.exact != nullptr) {
    std::optional<CovariancePlan> p = plan_exact(stats, mean, set);
    if (p) return std::move(*p);
  }
  return plan_fp32<T>(stats, mean, grid_of(lsb), set.exact != nullptr ? set.exact->fallback() : set);
}

void finish(const CovariancePlan& plan, const ColumnStats& stats, const double* mean, const at::Tensor& S,
            float* cov) {
  if (plan.exact)
    finish_exact(plan, stats, S.const_data_ptr<double>(), cov);
  else
    finish_fp32(plan, stats, mean, S.const_data_ptr<double>(), cov);
}

// Pass 2 and the triangle of its sums, the kernel set noted for native_status.
template <typename T>
at::Tensor products(const Rows<T>& rows, const CovariancePlan& plan, const RowRuns& runs, int64_t offset,
                    const ProgressScope& progress) {
  last_covariance().set.store(plan.ks.name);
  last_covariance().columns.store(plan.tri.d);
  return upper_sums(plan, accumulate(rows, plan, runs, offset, thread_key(), progress), rows.d);
}

// center_syrk for W's rows: mean (d,) and cov (d, d) are the op's outputs. A set with exact bf16
// products runs on bf16 W whose plan allows it; otherwise its fallback does (its pass 1 then
// already ran, with the same sums).
template <typename T>
void center_syrk_impl(const Rows<T>& rows, double* mean, float* cov) {
  const ProgressScope progress(rows.n);
  const ColumnStats stats = column_stats(rows, stats_set<T>(true));
  column_means(stats, mean);
  const CovariancePlan plan = make_plan<T>(stats, mean, sample_lsb(rows, Placement{0, rows.n}), true);
  const RowRuns runs = blankable<T>(plan) ? identical_runs(rows) : RowRuns{};
  finish(plan, stats, mean, products(rows, plan, runs, 0, progress), cov);
}

// W's rows as Rows<T> for f (row-strided W used as is, anything else made contiguous once), after
// the checks every CPU covariance op makes; min_rows 0 for a process's share, which may be empty.
template <typename F>
void with_rows(const at::Tensor& W, const char* op, int64_t min_rows, const F& f) {
  TORCH_CHECK(W.dim() == 2, op, ": W must be 2-D (N, d), got shape ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kBFloat16 || W.scalar_type() == at::kHalf ||
                  W.scalar_type() == at::kFloat,
              op, ": W must be bfloat16, float16 or float32, got ", W.scalar_type());
  const int64_t n = W.size(0), d = W.size(1);
  TORCH_CHECK(n >= min_rows && d >= 1, op, ": W must have at least ", min_rows > 0 ? "one row and " : "",
              "one column, got shape ", W.sizes());
  const at::Tensor w = (W.stride(1) == 1 && W.stride(0) >= d) ? W : W.contiguous();
  AT_DISPATCH_SWITCH(w.scalar_type(), "center_syrk_cpu",
      AT_DISPATCH_CASE(at::kBFloat16, [&] { f(Rows<c10::BFloat16>{w.const_data_ptr<c10::BFloat16>(), n, d, w.stride(0)}); })
      AT_DISPATCH_CASE(at::kHalf, [&] { f(Rows<c10::Half>{w.const_data_ptr<c10::Half>(), n, d, w.stride(0)}); })
      AT_DISPATCH_CASE(at::kFloat, [&] { f(Rows<float>{w.const_data_ptr<float>(), n, d, w.stride(0)}); }));
}

std::tuple<at::Tensor, at::Tensor> center_syrk_cpu(const at::Tensor& W) {
  at::Tensor mean, cov;
  with_rows(W, "center_syrk", 1, [&](const auto& rows) {
    mean = at::empty({rows.d}, W.options().dtype(at::kDouble));
    cov = at::empty({rows.d, rows.d}, W.options().dtype(at::kFloat));
    center_syrk_impl(rows, mean.data_ptr<double>(), cov.data_ptr<float>());
  });
  return {mean, cov};
}

// ---- Rows split between processes ---------------------------------------------------------------
//
// The steps of center_syrk as ops, for a W whose rows are split between processes (each holds the
// rows [row_offset, row_offset + n) of a whole of total_rows rows): center_stats gives a share's
// pass 1 statistics, which the processes reduce; center_row_runs its runs of identical rows, which
// they agree on; center_syrk_partial the triangle of its products around the plan the reduced
// statistics fix, which they add up; center_syrk_finish the mean and covariance from the reduced
// triangle. `exact` says whether the set with exact bf16 products may run (every process has it).

// A share's statistics as one fp64 tensor (4, d): the column sums and sums of squares (reduced by
// adding), the largest |x| (by the maximum; 0 unless the exact set's pass 1 ran) and the exponent
// of the finest grid of its sampled values (by the minimum; +inf for none).
at::Tensor center_stats_cpu(const at::Tensor& W, int64_t row_offset, int64_t total_rows, bool exact) {
  at::Tensor out;
  with_rows(W, "center_stats", 0, [&](const auto& rows) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(rows.w)>>;
    TORCH_CHECK(row_offset >= 0 && total_rows >= row_offset + rows.n, "center_stats: rows [", row_offset, ", ",
                row_offset + rows.n, ") do not lie in a whole of ", total_rows, " rows");
    const ColumnStats st = column_stats(rows, stats_set<T>(exact));
    const std::vector<int> lsb = sample_lsb(rows, Placement{row_offset, total_rows});
    out = at::zeros({4, rows.d}, at::TensorOptions().dtype(at::kDouble));
    auto o = out.accessor<double, 2>();
    for (int64_t j = 0; j < rows.d; ++j) {
      o[0][j] = st.sum[j];
      o[1][j] = st.sq[j];
      o[2][j] = st.amax.empty() ? 0.0 : static_cast<double>(st.amax[j]);
      o[3][j] = lsb[j] == std::numeric_limits<int>::max() ? std::numeric_limits<double>::infinity() : lsb[j];
    }
  });
  return out;
}

// The whole's statistics from the reduced tensor: the ColumnStats, the means and the grid exponents.
struct WholeStats {
  ColumnStats stats;
  std::vector<double> mean;
  std::vector<int> lsb;
};
WholeStats whole_stats(const at::Tensor& t, int64_t d, int64_t total_rows, const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == 4 && t.size(1) == d && t.scalar_type() == at::kDouble,
              op, ": stats must be float64 of shape (4, ", d, "), got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(total_rows >= 1, op, ": total_rows must be at least 1, got ", total_rows);
  const at::Tensor c = t.contiguous();
  auto a = c.accessor<double, 2>();
  WholeStats w;
  w.stats.rows = total_rows;
  w.stats.sum.resize(d);
  w.stats.sq.resize(d);
  w.stats.amax.resize(d);
  w.mean.resize(d);
  w.lsb.resize(d);
  for (int64_t j = 0; j < d; ++j) {
    w.stats.sum[j] = a[0][j];
    w.stats.sq[j] = a[1][j];
    w.stats.amax[j] = static_cast<float>(a[2][j]);
    w.lsb[j] = std::isfinite(a[3][j]) ? static_cast<int>(a[3][j]) : std::numeric_limits<int>::max();
  }
  column_means(w.stats, w.mean.data());
  return w;
}

// A share's runs of identical rows (int64 (r, 3): first row, end, hash of the row's bytes): those of
// 8 rows or more and those at its first and last row, for the processes to join and select.
at::Tensor center_row_runs_cpu(const at::Tensor& W) {
  at::Tensor out;
  with_rows(W, "center_row_runs", 0, [&](const auto& rows) {
    const std::vector<RowRun> runs = maximal_runs(rows, true);
    out = at::empty({static_cast<int64_t>(runs.size()), 3}, at::TensorOptions().dtype(at::kLong));
    auto o = out.accessor<int64_t, 2>();
    for (size_t q = 0; q < runs.size(); ++q) {
      o[q][0] = runs[q].begin;
      o[q][1] = runs[q].end;
      o[q][2] = runs[q].row;
    }
  });
  return out;
}

// The share's rows of the selected runs (int64 (m, 3): first row, end, index of the selected row),
// checked and grouped into the distinct rows they repeat.
template <typename T>
RowRuns selected_runs(const Rows<T>& rows, const at::Tensor& table) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 3 && table.scalar_type() == at::kLong,
              "center_syrk_partial: runs must be int64 of shape (m, 3), got ", table.scalar_type(), " ", table.sizes());
  const at::Tensor c = table.contiguous();
  auto a = c.accessor<int64_t, 2>();
  std::vector<RowRun> runs;
  for (int64_t q = 0; q < table.size(0); ++q) {
    const int64_t begin = a[q][0], end = a[q][1];
    TORCH_CHECK(begin >= (runs.empty() ? 0 : runs.back().end) && end > begin && end <= rows.n,
                "center_syrk_partial: runs must be ordered, disjoint ranges of W's ", rows.n, " rows; run ", q,
                " is [", begin, ", ", end, ")");
    for (int64_t r = begin + 1; r < end; ++r)
      TORCH_CHECK(rows_equal(rows, r, begin), "center_syrk_partial: run ", q, " holds different rows");
    runs.push_back({begin, end, a[q][2]});
  }
  return group_runs(rows, std::move(runs));
}

// The unnormalised fp64 packed upper triangle of a share's products (upper_sums) around the plan
// of the whole's reduced statistics, with the share's rows of the selected runs taken out of the
// packs; its blocks and runs are aligned to the whole's rows (blocks_of).
at::Tensor center_syrk_partial_cpu(const at::Tensor& W, const at::Tensor& stats, const at::Tensor& runs,
                                   int64_t row_offset, int64_t total_rows, bool exact) {
  at::Tensor out;
  with_rows(W, "center_syrk_partial", 0, [&](const auto& rows) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(rows.w)>>;
    TORCH_CHECK(row_offset >= 0 && total_rows >= row_offset + rows.n, "center_syrk_partial: rows [", row_offset,
                ", ", row_offset + rows.n, ") do not lie in a whole of ", total_rows, " rows");
    const WholeStats whole = whole_stats(stats, rows.d, total_rows, "center_syrk_partial");
    const CovariancePlan plan = make_plan<T>(whole.stats, whole.mean.data(), whole.lsb, exact);
    const RowRuns repeated = blankable<T>(plan) ? selected_runs(rows, runs) : RowRuns{};
    const ProgressScope progress(rows.n);
    out = products(rows, plan, repeated, row_offset, progress);
  });
  return out;
}

// The whole's exact fp64 mean and fp32 covariance from its reduced statistics and triangle; dtype is
// W's (it picks the plan, as in the partials).
std::tuple<at::Tensor, at::Tensor> center_syrk_finish_cpu(const at::Tensor& sums, const at::Tensor& stats,
                                                          int64_t total_rows, at::ScalarType dtype, bool exact) {
  TORCH_CHECK(stats.dim() == 2, "center_syrk_finish: stats must be 2-D (4, d), got shape ", stats.sizes());
  const int64_t d = stats.size(1);
  TORCH_CHECK(sums.dim() == 1 && sums.size(0) == d * (d + 1) / 2 && sums.scalar_type() == at::kDouble,
              "center_syrk_finish: sums must be float64 of shape (", d * (d + 1) / 2, ",), got ", sums.scalar_type(),
              " ", sums.sizes());
  const WholeStats whole = whole_stats(stats, d, total_rows, "center_syrk_finish");
  at::Tensor mean = at::empty({d}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor cov = at::empty({d, d}, at::TensorOptions().dtype(at::kFloat));
  std::memcpy(mean.data_ptr<double>(), whole.mean.data(), d * sizeof(double));
  const at::Tensor S = sums.contiguous();
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const CovariancePlan plan = make_plan<T>(whole.stats, whole.mean.data(), whole.lsb, exact);
    finish(plan, whole.stats, whole.mean.data(), S, cov.data_ptr<float>());
  };
  if (dtype == at::kBFloat16) run(c10::BFloat16{});
  else if (dtype == at::kHalf) run(c10::Half{});
  else if (dtype == at::kFloat) run(float{});
  else TORCH_CHECK(false, "center_syrk_finish: dtype must be bfloat16, float16 or float32, got ", dtype);
  return {mean, cov};
}

}  // namespace
}  // namespace refframe::cpu

TORCH_LIBRARY_IMPL(refframe, CPU, m) {
  m.impl("center_syrk", &refframe::cpu::center_syrk_cpu);
  m.impl("center_stats", &refframe::cpu::center_stats_cpu);
  m.impl("center_row_runs", &refframe::cpu::center_row_runs_cpu);
  m.impl("center_syrk_partial", &refframe::cpu::center_syrk_partial_cpu);
  m.impl("center_syrk_finish", &refframe::cpu::center_syrk_finish_cpu);
}
