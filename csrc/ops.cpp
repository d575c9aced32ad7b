// Operator schemas of the refframe library. Each backend registers its kernels for them in its own
// files (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); module.cpp is the Python module whose import
// runs these static registrations.
#include <torch/library.h>

TORCH_LIBRARY(refframe, m) {
  // Mean of the rows W[ids] as fp32 (d,), accumulated in fp64, without materialising W[ids].
  m.def("gather_mean(Tensor W, Tensor ids) -> Tensor");
  // Means of K segments of rows: segment k is W[ids[offsets[k]:offsets[k+1]]]. fp32 (K, d).
  m.def("segment_mean(Tensor W, Tensor ids, Tensor offsets) -> Tensor");
  // Exact fp64 column mean (d,) and population covariance Wc^T Wc / N as fp32 (d, d).
  m.def("center_syrk(Tensor W) -> (Tensor, Tensor)");
  // center_syrk's steps for W's rows split between processes (W: rows [row_offset, row_offset + n)
  // of a whole of total_rows rows; csrc/cpu/center_syrk.cpp): a share's pass 1 statistics, fp64
  // (4, d), reduced by sum, sum, max, min; its runs of identical rows, int64 (r, 3); the fp64 packed
  // upper triangle of its products around the plan of the reduced statistics, reduced by sum; and
  // from the reduced statistics and triangle, the exact fp64 mean (d,) and fp32 covariance (d, d).
  m.def("center_stats(Tensor W, int row_offset, int total_rows, bool exact) -> Tensor");
  m.def("center_row_runs(Tensor W) -> Tensor");
  m.def("center_syrk_partial(Tensor W, Tensor stats, Tensor runs, int row_offset, int total_rows, bool exact) -> Tensor");
  m.def("center_syrk_finish(Tensor sums, Tensor stats, int total_rows, ScalarType dtype, bool exact) -> (Tensor, Tensor)");
  // Coordinates of the rows W[ids] (all rows when ids is None) in a frame: (W[ids] - center) @ basis
  // as fp32 (n, k), for center fp32 (d,) and basis fp32 (d, k), without materialising W[ids].
  m.def("project(Tensor W, Tensor center, Tensor basis, Tensor? ids) -> Tensor");
  // Distances of the rows W[ids] (all rows when ids is None) from center: fp32 (n,).
  m.def("radii(Tensor W, Tensor center, Tensor? ids) -> Tensor");
}
