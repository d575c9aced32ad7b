// AMX building blocks of center_syrk (Intel AMX-BF16 tile units, e.g. Sapphire Rapids and later).
// Only this file is compiled with -mamx-tile -mamx-bf16; it is used only after a run-time check
// (amx_usable(), kernel_select.cpp) that the CPU has the tile units and the kernel lets this process
// use them.
//
// The tile units multiply bf16 numbers (products exact in fp32, sums in fp32), about sixteen times
// as many per cycle as the fp32 FMA units. To keep fp32 precision, every converted and centered
// value x (fp32, the same value the other sets compute) is split into three bf16 numbers,
// x = h + m + l up to a relative 2^-27 (h = bf16(x), m = bf16(x - h), l = bf16(x - h - m)), and a
// product x y is taken as h h' + (h m' + m h' + m m' + h l' + l h'), dropping the terms of relative
// size 2^-26 and below. The leading term and the sum of the small ones are accumulated in separate
// fp32 tiles, so the small terms add no rounding at the size of the leading one; after each run of
// rows both are added into the fp64 tile. The result is not bitwise that of the other sets (the
// tile units round their sums in their own order), but within the same error against fp64
// (docs/design/cpu-covariance.md), and bitwise the same for any thread count (runs start at row 0
// and each tile's runs are added in row order).
//
// Micro-tile: 16 rows (i, the "A" panels of the driver, in the tile units' pair-interleaved B
// layout) x 32 columns (j, the driver's "B" panels, transposed: one tile row per column). Panels
// hold blocks of 32 rows of W; per block and part, the A panel is one 1 KiB tile, the B panel two.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "syrk_avx512_common.h"
#include "syrk_kernel.h"

namespace refframe::cpu {
namespace {

constexpr int64_t MRX = 16;    // i side (A panels), one tile of 16 columns
constexpr int64_t NRX = 32;    // j side (B panels), two tiles of 16 columns
constexpr int64_t KQ = 32;     // rows of W per tile product
constexpr int64_t TILE_BYTES = 1024;
constexpr int64_t PARTS = 3;

struct LoadBF16 {
  using T = c10::BFloat16;
  static __m512 load(const T* p, __mmask16 m) { return load_bf16(p, m); }
};
struct LoadF16 {
  using T = c10::Half;
  static __m512 load(const T* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};
struct LoadF32 {
  using T = float;
  static __m512 load(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};

// Pair dwords of the 3 parts for up to 16 columns of rows k0 + 2kk, k0 + 2kk + 1 (kk < 16): rows at
// or past kc, and columns at or past the width, are 0.
template <typename L>
inline void pairs16(const typename L::T* src, int64_t stride, int64_t k0, int64_t kc, const __m512 mean,
                    __mmask16 in, __m512i out[PARTS][16]) {
  for (int kk = 0; kk < 16; ++kk) {
    __m512i p[2][PARTS];
    for (int e = 0; e < 2; ++e) {
      const int64_t k = k0 + 2 * kk + e;
      if (k < kc) {
        const __m512 x = _mm512_maskz_sub_ps(in, L::load(src + k * stride, in), mean);
        split3(x, p[e][0], p[e][1], p[e][2]);
      } else {
        p[e][0] = p[e][1] = p[e][2] = _mm512_setzero_si512();
      }
    }
    for (int q = 0; q < PARTS; ++q) out[q][kk] = pair(p[0][q], p[1][q]);
  }
}

// 16 x 16 transpose of dwords.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Now 128-bit lane L of r[4g + s] holds rows 4g .. 4g + 3 of column 4L + s: gather column 4L + s's
  // four lanes from r[s], r[s + 4], r[s + 8], r[s + 12].
  for (int i = 0; i < 4; ++i) {
    const __m512i a = r[i], b = r[i + 4], c = r[i + 8], d = r[i + 12];
    const __m512i ab_lo = _mm512_shuffle_i32x4(a, b, 0x88), ab_hi = _mm512_shuffle_i32x4(a, b, 0xDD);
    const __m512i cd_lo = _mm512_shuffle_i32x4(c, d, 0x88), cd_hi = _mm512_shuffle_i32x4(c, d, 0xDD);
    t[i] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
    t[i + 8] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);
    t[i + 4] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Packs kc rows (padded with zero rows to a multiple of 32) of B panel columns [0, width) (width
// <= 32) and of the two A panels of the same columns, at dst_a and dst_a + a_stride bytes (the
// second only when width > 16: otherwise it lies past the last column and does not exist). Each
// 16-column group is converted and split once.
// A layout: per 32-row block and part one tile, row kk = the 16 column pairs of rows 2kk, 2kk + 1.
// B layout: per block and part two tiles (columns 0-15, 16-31), row c = column c's 32 rows as 16
// pairs (the A layout transposed).
template <typename L>
void pack_pair_amx(const typename L::T* src, int64_t stride, int64_t kc, const float* mean, int64_t width,
                   float* dst_b_f, float* dst_a_f, int64_t a_stride) {
  auto* dst_b = reinterpret_cast<__m512i*>(dst_b_f);
  __m512i* dst_a[2] = {reinterpret_cast<__m512i*>(dst_a_f),
                       reinterpret_cast<__m512i*>(reinterpret_cast<char*>(dst_a_f) + a_stride)};
  __m512 mv[2];
  __mmask16 in[2];
  for (int64_t g = 0; g < 2; ++g) {
    in[g] = lanes(width - 16 * g);
    mv[g] = _mm512_maskz_loadu_ps(in[g], mean + 16 * g);
  }
  __m512i pr[PARTS][16];
  for (int64_t k0 = 0; k0 < kc; k0 += KQ) {
    for (int64_t g = 0; g < 2; ++g) {
      pairs16<L>(src + 16 * g, stride, k0, kc, mv[g], in[g], pr);
      for (int q = 0; q < PARTS; ++q) {
        if (16 * g < width)
          for (int r = 0; r < 16; ++r) _mm512_store_si512(dst_a[g] + q * 16 + r, pr[q][r]);
        transpose16(pr[q]);
        __m512i* tile = dst_b + (q * 2 + g) * 16;
        for (int r = 0; r < 16; ++r) _mm512_store_si512(tile + r, pr[q][r]);
      }
      dst_a[g] += PARTS * 16;
    }
    dst_b += PARTS * 2 * 16;
  }
}

// Palette 1, all 8 tiles 16 rows x 64 bytes. A constant in memory: built on the stack, GCC 12 may
// drop the stores it does not see the tile-config load read.
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
alignas(64) const TileConfig tile_config = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// A tile's fp32 sums wait here, per thread, to be added into its fp64 tile c while the tile units
// work on the thread's next tile (the adds are memory-bound, the tile products are not).
constexpr int64_t TILE_ELEMS = MRX * NRX;
struct alignas(64) Pending {
  float lead[TILE_ELEMS];
  float small[TILE_ELEMS];
  double* c = nullptr;
};
thread_local Pending pending;

// c[e] += double(lead[e]) + double(small[e]) for e in [e0, e1), a multiple of 16 apart.
inline void add_pending(const Pending& p, int64_t e0, int64_t e1) {
  for (int64_t e = e0; e < e1; e += 16) {
    const __m512 x = _mm512_load_ps(p.lead + e), y = _mm512_load_ps(p.small + e);
    const __m256 xl = _mm512_castps512_ps256(x), yl = _mm512_castps512_ps256(y);
    const __m256 xh = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
    const __m256 yh = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1));
    double* c = p.c + e;
    _mm512_storeu_pd(c, _mm512_add_pd(_mm512_loadu_pd(c), _mm512_add_pd(_mm512_cvtps_pd(xl), _mm512_cvtps_pd(yl))));
    _mm512_storeu_pd(c + 8, _mm512_add_pd(_mm512_loadu_pd(c + 8), _mm512_add_pd(_mm512_cvtps_pd(xh), _mm512_cvtps_pd(yh))));
  }
}

void begin_amx() {
  _tile_loadconfig(&tile_config);
  pending.c = nullptr;
}

// The thread's last tile of the row block is added before the block ends.
void end_amx() {
  if (pending.c != nullptr) add_pending(pending, 0, TILE_ELEMS);
  pending.c = nullptr;
  _tile_release();
}

// c[col * 16 + row] += the 16 x 32 tile's products over kc rows (kc rounded up to 32: the packs
// are zero there), added when the thread's next call (or end_amx) runs; meanwhile this call adds
// the previous call's sums, a slice per 32 rows. Tiles: 0, 1 leading terms (columns 0-15, 16-31),
// 2, 3 the small terms, 4, 5 a part of the B panel, 6, 7 parts of the A panel.
void micro_amx(int64_t kc, const float* a_f, const float* b_f, double* c, const double*) {
  const char* a = reinterpret_cast<const char*>(a_f);
  const char* b = reinterpret_cast<const char*>(b_f);
  Pending& pd = pending;
  constexpr int64_t SLICE = 64;  // elements of the previous tile added per 32 rows
  int64_t added = pd.c != nullptr ? 0 : TILE_ELEMS;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k0 = 0; k0 < kc; k0 += KQ) {
    // A: parts h, m, l at 0, 1, 2 KiB; B: parts at 0, 2, 4 KiB, two tiles each.
    _tile_loadd(4, b, 64);
    _tile_loadd(5, b + TILE_BYTES, 64);
    _tile_loadd(6, a, 64);
    _tile_dpbf16ps(0, 4, 6);  // h h'
    _tile_dpbf16ps(1, 5, 6);
    _tile_loadd(7, a + TILE_BYTES, 64);
    _tile_dpbf16ps(2, 4, 7);  // h m'
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(6, a + 2 * TILE_BYTES, 64);
    _tile_dpbf16ps(2, 4, 6);  // h l'
    _tile_dpbf16ps(3, 5, 6);
    _tile_loadd(4, b + 2 * TILE_BYTES, 64);
    _tile_loadd(5, b + 3 * TILE_BYTES, 64);
    _tile_dpbf16ps(2, 4, 7);  // m m'
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(6, a, 64);
    _tile_dpbf16ps(2, 4, 6);  // m h'
    _tile_dpbf16ps(3, 5, 6);
    _tile_loadd(4, b + 4 * TILE_BYTES, 64);
    _tile_loadd(5, b + 5 * TILE_BYTES, 64);
    _tile_dpbf16ps(2, 4, 6);  // l h'
    _tile_dpbf16ps(3, 5, 6);
    a += PARTS * TILE_BYTES;
    b += 2 * PARTS * TILE_BYTES;
    if (added < TILE_ELEMS) {
      add_pending(pd, added, added + SLICE);
      added += SLICE;
    }
    // This tile's fp64 lines, for the next call's adds.
    const int64_t q = k0 / KQ;
    if (q < TILE_ELEMS / 8 / 8)
      for (int64_t l = 0; l < 8; ++l) _mm_prefetch(reinterpret_cast<const char*>(c + 8 * (8 * q + l)), _MM_HINT_T1);
  }
  if (added < TILE_ELEMS) add_pending(pd, added, TILE_ELEMS);
  _tile_stored(0, pd.lead, 64);
  _tile_stored(1, pd.lead + 256, 64);
  _tile_stored(2, pd.small, 64);
  _tile_stored(3, pd.small + 256, 64);
  pd.c = c;
}

}  // namespace

const KernelSet& amx_kernels() {
  const KernelSet& avx2 = avx2_kernels();
  static const KernelSet set = [&] {
    KernelSet s = avx2;
    s.name = "amx";
    s.mr = MRX;
    s.nr = NRX;
    s.kc = 256;
    s.mc_cols = 512;
    s.jb_cols = 1024;
    s.b_in_a = false;
    s.run = 256;
    s.kalign = KQ;
    s.pack_bytes = 2 * PARTS;
    s.pack_bf16 = nullptr;  // packs only in pairs
    s.pack_f16 = nullptr;
    s.pack_f32 = nullptr;
    s.pack_pair_bf16 = pack_pair_amx<LoadBF16>;
    s.pack_pair_f16 = pack_pair_amx<LoadF16>;
    s.pack_pair_f32 = pack_pair_amx<LoadF32>;
    s.micro = micro_amx;
    s.thread_begin = begin_amx;
    s.thread_end = end_amx;
    return s;
  }();
  return set;
}

}  // namespace refframe::cpu
