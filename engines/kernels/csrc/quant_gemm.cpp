// Weight-only int4 / int8 matmuls for CPU: y = x @ W.T (+ bias), W held quantized and never expanded.
//
// The activations are quantized per block of 32 to int8 (symmetric: one float scale per block), as
// llama.cpp does, so the inner loop is an integer dot product: AVX-512 VNNI's vpdpbusd multiplies 64
// unsigned weight bytes by 64 signed activation bytes per instruction. The reference every path is
// tested against is engines/quant/kernels.py:reference_mm, which performs the same quantization in
// torch and sums in float64.
//
// Weights (built by engines/quant/kernels.py:pack_int4 / pack_int8):
//   int4: packed [n, k/2] uint8. In each chunk of 64 columns byte j holds column j (low nibble) and
//         column j+32 (high nibble); a trailing chunk of 32 holds j and j+16. scale and minimum are
//         float32 [n, k/group] (float16 would round AWQ's and Q4_K's products): w = q * scale + minimum.
//   int8: q [n, k] uint8 storing w + 128 (vpdpbusd wants unsigned weights); scale float32 [n, k/group]:
//         w = (stored - 128) * scale. group = k is one scale per output channel.
// With `wide` the activations are quantized to int16 instead (vpdpwssd), finer than bf16 itself, for
// layers whose outputs are compared near ties (the LM head).
// With `tiled` (larger batches) the activations stay as they are: the weights are dequantized in slabs
// that stay in cache and multiplied by at::mm; the reference is then engines/quant/methods.py:reference_linear.
// Per block b of 32 columns with activation scale dx_b and integer sum sx_b of its quantized activations:
//   y = sum_b scale_g(b) * dx_b * dot_b(q, xq) + sum_b offset_g(b) * dx_b * sx_b
// where offset is the minimum (int4) or -128 * scale (int8).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LMI_VNNI 1
#else
#define LMI_VNNI 0
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRowsTile = 4;  // activation rows sharing one pass over a weight row

// Activations quantized per block of 32: int8 (the default; vpdpbusd) or int16 (vpdpwssd, for layers
// whose outputs are compared near ties, like the LM head: 16 bits keep more precision than bf16 itself).
template <typename Q>
struct QuantizedRows {
  std::vector<Q> q;            // [m, k]
  std::vector<float> scale;    // [m, k/32]
  std::vector<float> lanes;    // [m, k/4]: each block's scale repeated over its 8 int32 lanes (int8 only)
  std::vector<float> sums;     // [m, k/32]: scale * sum of the block's quantized values
};

template <typename Q, typename T>
QuantizedRows<Q> quantize_rows(const T* x, int64_t m, int64_t k) {
  constexpr int32_t limit = std::numeric_limits<Q>::max();  // symmetric: -limit..limit
  const int64_t blocks = k / kBlock;
  QuantizedRows<Q> out{std::vector<Q>(m * k), std::vector<float>(m * blocks),
                       std::vector<float>(sizeof(Q) == 1 ? m * k / 4 : 0), std::vector<float>(m * blocks)};
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const T* src = x + r * k + b * kBlock;
      float values[kBlock];
      float amax = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) {
        values[i] = static_cast<float>(src[i]);
        amax = std::max(amax, std::fabs(values[i]));
      }
      const float d = amax / static_cast<float>(limit);
      const float inverse = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      Q* dst = out.q.data() + r * k + b * kBlock;
      for (int64_t i = 0; i < kBlock; ++i) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(values[i] * inverse));
        dst[i] = static_cast<Q>(std::max(-limit, std::min(limit, q)));
        sum += dst[i];
      }
      out.scale[r * blocks + b] = d;
      out.sums[r * blocks + b] = d * static_cast<float>(sum);
      if (sizeof(Q) == 1) std::fill_n(out.lanes.data() + r * (k / 4) + b * 8, 8, d);
    }
  }
  return out;
}

// One weight row's scales and offsets (the minimum, or -128 * scale for int8).
struct RowScales {
  std::vector<float> scale, offset;  // [groups]
};

inline float dot_floats(const float* a, const float* b, int64_t count) {
  int64_t i = 0;
  float total = 0.f;
#if LMI_VNNI
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= count; i += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), sum);
  if (i < count) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (count - i)) - 1);
    sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + i), _mm512_maskz_loadu_ps(mask, b + i), sum);
    i = count;
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < count; ++i) total += a[i] * b[i];
  return total;
}

// Weight access per format: the 32 unsigned bytes of block b of row n and the row's scales.
struct Int4Rows {
  const uint8_t* packed;
  const float* scale;
  const float* minimum;
  int64_t k, groups, group, rows;
  void load_scales(int64_t n, RowScales& row) const {
    row.scale.assign(scale + n * groups, scale + (n + 1) * groups);
    row.offset.assign(minimum + n * groups, minimum + (n + 1) * groups);
  }
  inline const float* scale_row(int64_t n) const { return scale + n * groups; }
  inline float offset_dot(int64_t n, const float* group_sums) const {
    return dot_floats(minimum + n * groups, group_sums, groups);
  }
  inline void unpack(int64_t n, int64_t b, uint8_t* dst) const {  // the 32 values of block b
    const uint8_t* row = packed + n * (k / 2);
    const int64_t chunk = b / 2, full = k / 64;
    if (chunk < full) {
      const uint8_t* bytes = row + chunk * 32;
      for (int i = 0; i < 32; ++i) dst[i] = (b % 2 == 0) ? (bytes[i] & 0xF) : (bytes[i] >> 4);
    } else {  // the trailing 32-column chunk
      const uint8_t* bytes = row + full * 32;
      for (int i = 0; i < 16; ++i) {
        dst[i] = bytes[i] & 0xF;
        dst[i + 16] = bytes[i] >> 4;
      }
    }
  }
  // the row's 64 values of chunk c, in column order, for vpdpbusd
  inline const uint8_t* row_bytes(int64_t n) const { return packed + n * (k / 2); }
  static constexpr int64_t kChunkBytes = 32;  // stored bytes per 64 columns
};

struct Int8Rows {
  const uint8_t* q;
  const float* scale;
  int64_t k, groups, group, rows;
  void load_scales(int64_t n, RowScales& row) const {
    row.scale.assign(scale + n * groups, scale + (n + 1) * groups);
    row.offset.resize(groups);
    for (int64_t g = 0; g < groups; ++g) row.offset[g] = -128.f * row.scale[g];
  }
  inline const float* scale_row(int64_t n) const { return scale + n * groups; }
  inline float offset_dot(int64_t n, const float* group_sums) const {
    if (groups == 1) return -128.f * scale[n] * group_sums[0];
    return -128.f * dot_floats(scale + n * groups, group_sums, groups);
  }
  inline void unpack(int64_t n, int64_t b, uint8_t* dst) const { std::memcpy(dst, q + n * k + b * kBlock, kBlock); }
  inline const uint8_t* row_bytes(int64_t n) const { return q + n * k; }
  static constexpr int64_t kChunkBytes = 64;
};

template <typename W, typename Q>
void dot_rows_portable(const W& w, const RowScales& rs, const QuantizedRows<Q>& x, int64_t n, int64_t r0, int64_t rows,
                       float* acc) {
  const int64_t k = w.k, blocks = k / kBlock, per_group = w.group / kBlock;
  uint8_t values[kBlock];
  for (int64_t b = 0; b < blocks; ++b) {
    w.unpack(n, b, values);
    const float ws = rs.scale[b / per_group];
    for (int64_t i = 0; i < rows; ++i) {
      const Q* xq = x.q.data() + (r0 + i) * k + b * kBlock;
      int32_t dot = 0;
      for (int64_t j = 0; j < kBlock; ++j) dot += static_cast<int32_t>(values[j]) * xq[j];
      acc[i] += ws * x.scale[(r0 + i) * blocks + b] * static_cast<float>(dot);
    }
  }
}

#if LMI_VNNI
inline __m512 pair_scales(float s0, float s1) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(s0)), _mm256_set1_ps(s1), 1);
}

inline float reduce8(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_hadd_ps(half, half);
  half = _mm_hadd_ps(half, half);
  return _mm_cvtss_f32(half);
}

// 64 weight bytes of chunk c of row n, in column order
inline __m512i chunk64(const Int4Rows& w, int64_t n, int64_t c) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.row_bytes(n) + c * 32));
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(raw, low_mask);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_mask);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

inline __m512i chunk64(const Int8Rows& w, int64_t n, int64_t c) { return _mm512_loadu_si512(w.q + n * w.k + c * 64); }

// Each chunk of 64 columns is two blocks of 32; the weight scale of each lane comes from one of:
// one scale per row (per-channel int8), one per chunk or more (groups of 64, 128), or one per block
// (groups of 32: 16 blocks' scales are loaded every 8 chunks and permuted into place).
template <typename W>
inline __m512 chunk_scales(const W& w, const float* row, int64_t c, __m512& loaded) {
  if (w.groups == 1) return _mm512_set1_ps(row[0]);
  if (w.group != kBlock) return _mm512_set1_ps(row[c / (w.group / 64)]);
  if (c % 8 == 0) {
    const int64_t left = w.groups - 2 * c;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    loaded = _mm512_maskz_loadu_ps(mask, row + 2 * c);
  }
  const int32_t lo = static_cast<int32_t>((2 * c) % 16);
  const __m512i pick = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(lo)), _mm256_set1_epi32(lo + 1), 1);
  return _mm512_permutexvar_ps(pick, loaded);
}

// The tile prefetches the rows kPrefetchBytes ahead of it, chunk by chunk as it computes. A row is short
// (k = 576 is nine cache lines, 4.5 for int4) and the rows of a matrix are one contiguous stream, but
// the hardware prefetcher stops at every 4 KiB page: without this a decode step read its weights at a
// third of the memory bandwidth. Measured on this CPU's SmolLM2 shapes, batch 1 (30 layers from memory):
// one row ahead 16 GB/s, 4 KiB ahead 20, 8 KiB 22 (what torch reads the same bytes at), 32 KiB 21.
constexpr int64_t kPrefetchBytes = 8192;

template <int NT, typename W>
inline int64_t prefetch_rows(const W& w) {  // at least the next tile
  return std::max<int64_t>(NT, kPrefetchBytes / std::max<int64_t>(1, w.k * W::kChunkBytes / 64));  // k >= 32
}

inline void prefetch_chunk(const uint8_t* row, int64_t c, int64_t chunk_bytes) {
  _mm_prefetch(reinterpret_cast<const char*>(row + c * chunk_bytes), _MM_HINT_T0);
}

// NT weight rows x MT activation rows: each weight chunk is loaded once per MT rows and each activation
// chunk once per NT rows.
template <int NT, int MT, typename W>
void dot_tile_vnni(const W& w, int64_t n0, const QuantizedRows<int8_t>& x, int64_t r0, float* acc) {
  const int64_t k = w.k, full = k / 64;
  const int64_t ahead = prefetch_rows<NT>(w);
  __m512 sums[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) sums[j][i] = _mm512_setzero_ps();
  const float* rows[NT];
  __m512 loaded[NT];
  for (int j = 0; j < NT; ++j) {
    rows[j] = w.scale_row(n0 + j);
    loaded[j] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < full; ++c) {
    __m512i xv[MT];
    __m512 dx[MT];
    for (int i = 0; i < MT; ++i) {
      xv[i] = _mm512_loadu_si512(x.q.data() + (r0 + i) * k + c * 64);
      dx[i] = _mm512_loadu_ps(x.lanes.data() + (r0 + i) * (k / 4) + c * 16);
    }
    for (int j = 0; j < NT; ++j) {
      if (n0 + ahead + j < w.rows) prefetch_chunk(w.row_bytes(n0 + ahead + j), c, W::kChunkBytes);
      const __m512i q = chunk64(w, n0 + j, c);
      const __m512 ws = chunk_scales(w, rows[j], c, loaded[j]);
      for (int i = 0; i < MT; ++i) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv[i]);
        sums[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, dx[i]), sums[j][i]);
      }
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) acc[j * kRowsTile + i] += _mm512_reduce_add_ps(sums[j][i]);
  if (k % 64) {  // the trailing block of 32
    const int64_t b = k / kBlock - 1;
    for (int j = 0; j < NT; ++j) {
      uint8_t values[kBlock];
      w.unpack(n0 + j, b, values);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values));
      const float ws = rows[j][b * kBlock / w.group];
      for (int i = 0; i < MT; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + (r0 + i) * k + b * kBlock));
        const float dot = reduce8(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xv)));
        acc[j * kRowsTile + i] += ws * x.scale[(r0 + i) * (k / kBlock) + b] * dot;
      }
    }
  }
}

// int16 activations: each block of 32 weights widened to int16 and multiplied by vpdpwssd (32 products
// into 16 int32 lanes); one float multiply-add per block with the block's activation and weight scales.
template <int NT, int MT, typename W>
void dot_tile_wide(const W& w, int64_t n0, const QuantizedRows<int16_t>& x, int64_t r0, float* acc) {
  const int64_t k = w.k, blocks = k / kBlock, full = k / 64;
  const int64_t ahead = prefetch_rows<NT>(w);
  __m512 sums[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) sums[j][i] = _mm512_setzero_ps();
  auto block = [&](int j, int64_t b, __m512i q16) {
    const float ws = w.scale_row(n0 + j)[b * kBlock / w.group];
    for (int i = 0; i < MT; ++i) {
      const __m512i xv = _mm512_loadu_si512(x.q.data() + (r0 + i) * k + b * kBlock);
      const __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), q16, xv);
      const __m512 scale = _mm512_set1_ps(ws * x.scale[(r0 + i) * blocks + b]);
      sums[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, sums[j][i]);
    }
  };
  for (int64_t c = 0; c < full; ++c) {
    for (int j = 0; j < NT; ++j) {
      if (n0 + ahead + j < w.rows) prefetch_chunk(w.row_bytes(n0 + ahead + j), c, W::kChunkBytes);
      const __m512i q = chunk64(w, n0 + j, c);
      block(j, 2 * c, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(q)));
      block(j, 2 * c + 1, _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(q, 1)));
    }
  }
  if (k % 64) {  // the trailing block of 32
    for (int j = 0; j < NT; ++j) {
      uint8_t values[kBlock];
      w.unpack(n0 + j, blocks - 1, values);
      block(j, blocks - 1, _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(values))));
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) acc[j * kRowsTile + i] += _mm512_reduce_add_ps(sums[j][i]);
}

// The activations' width picks the tile: int8 (vpdpbusd) or int16 (vpdpwssd).
template <int NT, int MT, typename W>
inline void dot_tile(const W& w, int64_t n0, const QuantizedRows<int8_t>& x, int64_t r0, float* acc) {
  dot_tile_vnni<NT, MT>(w, n0, x, r0, acc);
}

template <int NT, int MT, typename W>
inline void dot_tile(const W& w, int64_t n0, const QuantizedRows<int16_t>& x, int64_t r0, float* acc) {
  dot_tile_wide<NT, MT>(w, n0, x, r0, acc);
}

template <int NT, typename W, typename Q>
void dot_tile_rows(const W& w, int64_t n0, const QuantizedRows<Q>& x, int64_t r0, int64_t rows, float* acc) {
  switch (rows) {
    case 1: return dot_tile<NT, 1>(w, n0, x, r0, acc);
    case 2: return dot_tile<NT, 2>(w, n0, x, r0, acc);
    case 3: return dot_tile<NT, 3>(w, n0, x, r0, acc);
    default: return dot_tile<NT, 4>(w, n0, x, r0, acc);
  }
}
#endif

constexpr int64_t kWeightTile = 4;
// Weight rows per tile (NT) when several activation rows share each weight load. A single activation
// row takes one weight row at a time instead: four interleaved rows kept fewer loads in flight, and
// the batch-1 step read its weights at 13 GB/s against 21 GB/s one row at a time (int8, this CPU).

template <typename W, typename T, typename Q>
void matmul(const W& w, const QuantizedRows<Q>& x, int64_t m, int64_t n_total, const T* bias, T* out, bool portable) {
  const int64_t blocks = w.k / kBlock, per_group = w.group / kBlock;
  std::vector<float> group_sums(m * w.groups, 0.f);  // per activation row: its block sums per weight group
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < blocks; ++b) group_sums[r * w.groups + b / per_group] += x.sums[r * blocks + b];
  const int64_t tiles = (n_total + kWeightTile - 1) / kWeightTile;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, 1024 / std::max<int64_t>(m, 1)));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    float acc[kWeightTile * kRowsTile];
    RowScales rs[kWeightTile];  // the portable path's
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kWeightTile, nt = std::min(kWeightTile, n_total - n0);
      if (portable)
        for (int64_t j = 0; j < nt; ++j) w.load_scales(n0 + j, rs[j]);
      for (int64_t r0 = 0; r0 < m; r0 += kRowsTile) {
        const int64_t rows = std::min(kRowsTile, m - r0);
        for (int64_t j = 0; j < nt; ++j)
          for (int64_t i = 0; i < rows; ++i)
            acc[j * kRowsTile + i] = w.offset_dot(n0 + j, group_sums.data() + (r0 + i) * w.groups);
#if LMI_VNNI
        if (!portable) {
          if (nt == kWeightTile && m > 1)
            dot_tile_rows<kWeightTile>(w, n0, x, r0, rows, acc);
          else
            for (int64_t j = 0; j < nt; ++j) dot_tile_rows<1>(w, n0 + j, x, r0, rows, acc + j * kRowsTile);
        } else
#endif
          for (int64_t j = 0; j < nt; ++j) dot_rows_portable(w, rs[j], x, n0 + j, r0, rows, acc + j * kRowsTile);
        for (int64_t j = 0; j < nt; ++j) {
          const float b = bias ? static_cast<float>(bias[n0 + j]) : 0.f;
          for (int64_t i = 0; i < rows; ++i) out[(r0 + i) * n_total + n0 + j] = static_cast<T>(acc[j * kRowsTile + i] + b);
        }
      }
    }
  });
}

// Larger batches: dequantize kTileRows weight rows at a time into x's dtype (a tile that stays in cache,
// never the whole matrix) and multiply with at::mm, which is compute-bound there and beats integer dots.
constexpr int64_t kTileRows = 128;
constexpr int64_t kSlabBytes = 4 << 20;  // a dequantized slab that stays in the last-level cache

#if LMI_VNNI
inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
inline void store16(at::BFloat16* dst, __m512 v) {  // round to nearest even, as static_cast<BFloat16> does
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
#endif
}
#endif

template <typename W, typename T>
void dequantize_rows(const W& w, int64_t n0, int64_t rows, T* dst) {
  const int64_t k = w.k, blocks = k / kBlock, per_group = w.group / kBlock;
  RowScales rs;
  uint8_t values[kBlock];
  for (int64_t j = 0; j < rows; ++j) {
    w.load_scales(n0 + j, rs);
    int64_t b = 0;
#if LMI_VNNI
    for (; b + 1 < blocks; b += 2) {  // a chunk of 64 columns (two blocks) unpacked in registers
      const __m512i chunk = chunk64(w, n0 + j, b / 2);
      T* out = dst + j * k + b * kBlock;
      for (int part = 0; part < 4; ++part) {  // 16 columns each; parts 0-1 are block b, 2-3 block b + 1
        const int64_t g = (b + part / 2) / per_group;
        const __m128i lane = part == 0 ? _mm512_extracti32x4_epi32(chunk, 0)
                           : part == 1 ? _mm512_extracti32x4_epi32(chunk, 1)
                           : part == 2 ? _mm512_extracti32x4_epi32(chunk, 2)
                                       : _mm512_extracti32x4_epi32(chunk, 3);
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lane));
        store16(out + part * 16, _mm512_fmadd_ps(v, _mm512_set1_ps(rs.scale[g]), _mm512_set1_ps(rs.offset[g])));
      }
    }
#endif
    for (; b < blocks; ++b) {
      w.unpack(n0 + j, b, values);
      const float scale = rs.scale[b / per_group], offset = rs.offset[b / per_group];
      T* out = dst + j * k + b * kBlock;
#if LMI_VNNI
      const __m512 vs = _mm512_set1_ps(scale), vo = _mm512_set1_ps(offset);
      for (int64_t i = 0; i < kBlock; i += 16) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values + i));
        const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), vs, vo);
        store16(out + i, v);
      }
#else
      for (int64_t i = 0; i < kBlock; ++i) out[i] = static_cast<T>(static_cast<float>(values[i]) * scale + offset);
#endif
    }
  }
}

template <typename W>
torch::Tensor tiled_mm(const W& w, const torch::Tensor& x, int64_t n, const c10::optional<torch::Tensor>& bias) {
  const int64_t m = x.size(0), k = w.k;
  auto out = torch::empty({m, n}, x.options());
  // A slab of up to kSlabBytes of dequantized rows, filled by every thread, then one at::mm over it
  // (threaded inside): per-tile at::mm calls paid oneDNN's per-call cost about 40 times a layer.
  const int64_t slab = std::min(n, std::max<int64_t>(kTileRows, kSlabBytes / (k * x.element_size()) / kTileRows * kTileRows));
  auto scratch = torch::empty({slab, k}, x.options());
  const bool inference = c10::InferenceMode::is_enabled();  // thread-local: the pool's threads lack it
  for (int64_t n0 = 0; n0 < n; n0 += slab) {
    const int64_t rows = std::min(slab, n - n0);
    at::parallel_for(0, (rows + 15) / 16, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode guard(inference);
      const int64_t r0 = begin * 16, r1 = std::min(rows, end * 16);
      if (x.scalar_type() == at::kFloat)
        dequantize_rows(w, n0 + r0, r1 - r0, scratch.data_ptr<float>() + r0 * k);
      else
        dequantize_rows(w, n0 + r0, r1 - r0, scratch.data_ptr<at::BFloat16>() + r0 * k);
    });
    auto tile = scratch.narrow(0, 0, rows).t();
    if (rows == n) {
      at::mm_out(out, x, tile);
    } else {
      out.narrow(1, n0, rows).copy_(at::mm(x, tile));
    }
  }
  if (bias) out.add_(*bias);
  return out;
}

// ---- int8 in VNNI tiles: every batch size on integer dot products ----
// Layout (engines/quant/kernels.py:pack_int8_tiles): q [ceil(n/16), k/4, 16, 4] uint8 storing w + 128, i.e.
// each tile of 16 output channels is one contiguous stream in which every 64 bytes hold 4 consecutive
// columns of the 16 channels; scale float32 [ceil(n/16), k/group, 16], zero on padded channels.
// One vpdpbusd multiplies such 64 bytes by one activation row's 4 quantized columns (broadcast) into
// 16 int32 sums: a block of 32 columns is 8 of them, converted to float once per block and row. The
// row layout above needs a conversion and two float operations per 64 products per row; this one needs
// them per 512, so larger batches stay on integer products instead of dequantizing slabs.
constexpr int64_t kTileN = 16;
constexpr int kTileRowsMax = 8;  // activation rows sharing each weight load (int32 + float accumulators)

struct Int8Tiles {
  const uint8_t* q;
  const float* scale;
  int64_t k, groups, group, n;
  inline const uint8_t* tile(int64_t t) const { return q + t * k * kTileN; }
  inline const float* scales(int64_t t) const { return scale + t * groups * kTileN; }
  // the portable path's: channel c's weight at column col of a tile, and the offset a group adds
  inline int32_t value(const uint8_t* stream, int64_t c, int64_t col) const {
    return static_cast<int32_t>(stream[(col / 4) * 64 + c * 4 + col % 4]) - 128;
  }
  inline float offset(int64_t, int64_t) const { return 0.f; }
};

// int4 in the same tiles (engines/quant/kernels.py:pack_int4_tiles): q [ceil(n/16), k/8, 16, 4] uint8 in
// which each 64 bytes hold 8 columns of 16 channels, byte j of a channel being column j (low nibble)
// and column j + 4 (high); scale and minimum float32 [ceil(n/16), k/group, 16]: w = q * scale + minimum.
struct Int4Tiles {
  const uint8_t* q;
  const float* scale;
  const float* minimum;
  int64_t k, groups, group, n;
  inline const uint8_t* tile(int64_t t) const { return q + t * k / 2 * kTileN; }
  inline const float* scales(int64_t t) const { return scale + t * groups * kTileN; }
  inline const float* minimums(int64_t t) const { return minimum + t * groups * kTileN; }
  inline int32_t value(const uint8_t* stream, int64_t c, int64_t col) const {
    const uint8_t byte = stream[(col / 8) * 64 + c * 4 + col % 4];
    return col % 8 < 4 ? byte & 0xF : byte >> 4;
  }
  inline float offset(int64_t t, int64_t g) const { return minimums(t)[g]; }  // w = q * scale + minimum
};

// int8 activations per block of 32 without the lanes the row kernel wants; AVX-512 where built. Rows
// are independent: split between threads for prefills. Bitwise the same as quantize_rows<int8_t>.
template <typename T>
QuantizedRows<int8_t> quantize_rows_int8(const T* x, int64_t m, int64_t k) {
  const int64_t blocks = k / kBlock;
  QuantizedRows<int8_t> out{std::vector<int8_t>(m * k), std::vector<float>(m * blocks), {},
                            std::vector<float>(m * blocks)};
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, m, m >= 16 ? 4 : m, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < blocks; ++b) {
        const T* src = x + r * k + b * kBlock;
        int8_t* dst = out.q.data() + r * k + b * kBlock;
#if LMI_VNNI
        __m512 v[2];
        for (int h = 0; h < 2; ++h) {
          if constexpr (std::is_same_v<T, float>) {
            v[h] = _mm512_loadu_ps(src + 16 * h);
          } else {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * h));
            v[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
          }
        }
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        const float d = amax / 127.f;
        const float inverse = d > 0.f ? 1.f / d : 0.f;
        __m512i total = _mm512_setzero_si512();
        for (int h = 0; h < 2; ++h) {  // round half to even, as nearbyint in the default rounding mode
          __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], _mm512_set1_ps(inverse)));
          q = _mm512_max_epi32(_mm512_set1_epi32(-127), _mm512_min_epi32(_mm512_set1_epi32(127), q));
          total = _mm512_add_epi32(total, q);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * h), _mm512_cvtepi32_epi8(q));
        }
        const int32_t sum = _mm512_reduce_add_epi32(total);
#else
        float values[kBlock];
        float amax = 0.f;
        for (int64_t i = 0; i < kBlock; ++i) {
          values[i] = static_cast<float>(src[i]);
          amax = std::max(amax, std::fabs(values[i]));
        }
        const float d = amax / 127.f;
        const float inverse = d > 0.f ? 1.f / d : 0.f;
        int32_t sum = 0;
        for (int64_t i = 0; i < kBlock; ++i) {
          const int32_t q = static_cast<int32_t>(std::nearbyint(values[i] * inverse));
          dst[i] = static_cast<int8_t>(std::max(-127, std::min(127, q)));
          sum += dst[i];
        }
#endif
        out.scale[r * blocks + b] = d;
        out.sums[r * blocks + b] = d * static_cast<float>(sum);
      }
    }
  });
  return out;
}

// Per row i and channel c of the tile: sum over blocks b of (weight scale) * d_b * dot_b(stored, xq),
// minus 128 * (weight scale) * d_b * sum_b(xq) for the stored offset. One scale per channel is applied
// once at the end; grouped scales per block.
#if LMI_VNNI
template <int MR>
void tile_vnni(const Int8Tiles& w, int64_t t, const QuantizedRows<int8_t>& x, int64_t r0, const float* row_sums,
               float* acc) {
  const int64_t k = w.k, blocks = k / kBlock, per_group = w.group / kBlock;
  const uint8_t* stream = w.tile(t);
  const int64_t left = (w.n + kTileN - 1) / kTileN * w.k * kTileN - t * w.k * kTileN;  // bytes from stream on
  const float* scales = w.scales(t);
  const bool per_channel = w.groups == 1;
  __m512 sums[MR], offsets[MR];
  for (int i = 0; i < MR; ++i) sums[i] = offsets[i] = _mm512_setzero_ps();
  __m512 ws = _mm512_loadu_ps(scales);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* bytes = stream + b * kBlock * kTileN;  // 512 bytes: 32 columns of 16 channels
    __m512i dots[MR];
    for (int i = 0; i < MR; ++i) dots[i] = _mm512_setzero_si512();
    for (int kk = 0; kk < 8; ++kk) {
      const int64_t ahead = b * kBlock * kTileN + kk * 64 + kPrefetchBytes;  // offsets: no pointer past the end
      if (ahead < left) _mm_prefetch(reinterpret_cast<const char*>(stream + ahead), _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(bytes + kk * 64);
      for (int i = 0; i < MR; ++i) {
        int32_t four;
        std::memcpy(&four, x.q.data() + (r0 + i) * k + b * kBlock + kk * 4, 4);
        dots[i] = _mm512_dpbusd_epi32(dots[i], wv, _mm512_set1_epi32(four));
      }
    }
    if (!per_channel && b % per_group == 0) ws = _mm512_loadu_ps(scales + (b / per_group) * kTileN);
    for (int i = 0; i < MR; ++i) {
      const __m512 d = _mm512_set1_ps(x.scale[(r0 + i) * blocks + b]);
      if (per_channel) {
        sums[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[i]), d, sums[i]);
      } else {
        sums[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[i]), _mm512_mul_ps(ws, d), sums[i]);
        offsets[i] = _mm512_fmadd_ps(ws, _mm512_set1_ps(x.sums[(r0 + i) * blocks + b]), offsets[i]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    const __m512 y = per_channel
                         ? _mm512_mul_ps(ws, _mm512_sub_ps(sums[i], _mm512_set1_ps(128.f * row_sums[r0 + i])))
                         : _mm512_fnmadd_ps(_mm512_set1_ps(128.f), offsets[i], sums[i]);
    _mm512_storeu_ps(acc + i * kTileN, y);
  }
}

// int4: each 64 bytes unpack to two vectors of 4 columns x 16 channels (low nibbles, high nibbles).
template <int MR>
void tile_vnni(const Int4Tiles& w, int64_t t, const QuantizedRows<int8_t>& x, int64_t r0, const float*, float* acc) {
  const int64_t k = w.k, blocks = k / kBlock, per_group = w.group / kBlock;
  const uint8_t* stream = w.tile(t);
  const int64_t left = ((w.n + kTileN - 1) / kTileN - t) * (w.k / 2) * kTileN;  // bytes from stream on
  const float *scales = w.scales(t), *minimums = w.minimums(t);
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  __m512 sums[MR], offsets[MR];
  for (int i = 0; i < MR; ++i) sums[i] = offsets[i] = _mm512_setzero_ps();
  __m512 ws = _mm512_setzero_ps(), wm = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* bytes = stream + b * kBlock / 2 * kTileN;  // 256 bytes: 32 columns of 16 channels
    __m512i dots[MR];
    for (int i = 0; i < MR; ++i) dots[i] = _mm512_setzero_si512();
    for (int v = 0; v < 4; ++v) {
      const int64_t ahead = b * kBlock / 2 * kTileN + v * 64 + kPrefetchBytes;
      if (ahead < left) _mm_prefetch(reinterpret_cast<const char*>(stream + ahead), _MM_HINT_T0);
      const __m512i raw = _mm512_loadu_si512(bytes + v * 64);
      const __m512i lo = _mm512_and_si512(raw, low_mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low_mask);
      for (int i = 0; i < MR; ++i) {
        int32_t quads[2];
        std::memcpy(quads, x.q.data() + (r0 + i) * k + b * kBlock + v * 8, 8);
        dots[i] = _mm512_dpbusd_epi32(dots[i], lo, _mm512_set1_epi32(quads[0]));
        dots[i] = _mm512_dpbusd_epi32(dots[i], hi, _mm512_set1_epi32(quads[1]));
      }
    }
    if (b % per_group == 0) {
      ws = _mm512_loadu_ps(scales + (b / per_group) * kTileN);
      wm = _mm512_loadu_ps(minimums + (b / per_group) * kTileN);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 d = _mm512_set1_ps(x.scale[(r0 + i) * blocks + b]);
      sums[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[i]), _mm512_mul_ps(ws, d), sums[i]);
      offsets[i] = _mm512_fmadd_ps(wm, _mm512_set1_ps(x.sums[(r0 + i) * blocks + b]), offsets[i]);
    }
  }
  for (int i = 0; i < MR; ++i) _mm512_storeu_ps(acc + i * kTileN, _mm512_add_ps(sums[i], offsets[i]));
}
#endif

// The same sums in plain C++, for CPUs without AVX-512 VNNI (and compared with the vector path in tests).
template <typename W>
void tile_portable(const W& w, int64_t t, const QuantizedRows<int8_t>& x, int64_t r0, int64_t rows, float* acc) {
  const int64_t k = w.k, blocks = k / kBlock, per_group = w.group / kBlock;
  const uint8_t* stream = w.tile(t);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < kTileN; ++c) {
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        const int8_t* xq = x.q.data() + (r0 + i) * k + b * kBlock;
        for (int64_t j = 0; j < kBlock; ++j) dot += w.value(stream, c, b * kBlock + j) * xq[j];
        const int64_t g = (b / per_group) * kTileN + c, at = (r0 + i) * blocks + b;
        total += w.scales(t)[g] * x.scale[at] * static_cast<float>(dot) + w.offset(t, g) * x.sums[at];
      }
      acc[i * kTileN + c] = total;
    }
  }
}

template <typename W, typename T>
void tiles_matmul(const W& w, const QuantizedRows<int8_t>& x, int64_t m, const T* bias, T* out, bool portable) {
  const int64_t blocks = w.k / kBlock, tiles = (w.n + kTileN - 1) / kTileN;
  std::vector<float> row_sums(m, 0.f);  // per activation row: sum over blocks of d_b * sum_b(xq)
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < blocks; ++b) row_sums[r] += x.sums[r * blocks + b];
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    float acc[kTileRowsMax * kTileN];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t channels = std::min(kTileN, w.n - t * kTileN);
      for (int64_t r0 = 0; r0 < m; r0 += kTileRowsMax) {
        const int64_t rows = std::min<int64_t>(kTileRowsMax, m - r0);
#if LMI_VNNI
        if (!portable) {
          switch (rows) {
            case 1: tile_vnni<1>(w, t, x, r0, row_sums.data(), acc); break;
            case 2: tile_vnni<2>(w, t, x, r0, row_sums.data(), acc); break;
            case 3: tile_vnni<3>(w, t, x, r0, row_sums.data(), acc); break;
            case 4: tile_vnni<4>(w, t, x, r0, row_sums.data(), acc); break;
            case 5: tile_vnni<5>(w, t, x, r0, row_sums.data(), acc); break;
            case 6: tile_vnni<6>(w, t, x, r0, row_sums.data(), acc); break;
            case 7: tile_vnni<7>(w, t, x, r0, row_sums.data(), acc); break;
            default: tile_vnni<8>(w, t, x, r0, row_sums.data(), acc); break;
          }
        } else
#endif
          tile_portable(w, t, x, r0, rows, acc);
        for (int64_t i = 0; i < rows; ++i) {
          T* dst = out + (r0 + i) * w.n + t * kTileN;
          for (int64_t c = 0; c < channels; ++c) {
            const float b = bias ? static_cast<float>(bias[t * kTileN + c]) : 0.f;
            dst[c] = static_cast<T>(acc[i * kTileN + c] + b);
          }
        }
      }
    }
  });
}

void check_input(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [m, ", k, "]");
  TORCH_CHECK(k % kBlock == 0, "the input width must be a multiple of 32, got ", k);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
}

template <typename Q, typename W, typename T>
void run_typed(const W& w, const torch::Tensor& x, int64_t n, const c10::optional<torch::Tensor>& bias,
               torch::Tensor& out, bool portable) {
  const QuantizedRows<Q> xq = quantize_rows<Q>(x.data_ptr<T>(), x.size(0), w.k);
  matmul(w, xq, x.size(0), n, bias ? bias->data_ptr<T>() : nullptr, out.data_ptr<T>(), portable);
}

template <typename W>
torch::Tensor run(const W& w, const torch::Tensor& x, int64_t n, const c10::optional<torch::Tensor>& bias,
                  bool portable, bool wide) {
  auto out = torch::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return out;
  const bool fp32 = x.scalar_type() == at::kFloat;
  if (wide)
    fp32 ? run_typed<int16_t, W, float>(w, x, n, bias, out, portable)
         : run_typed<int16_t, W, at::BFloat16>(w, x, n, bias, out, portable);
  else
    fp32 ? run_typed<int8_t, W, float>(w, x, n, bias, out, portable)
         : run_typed<int8_t, W, at::BFloat16>(w, x, n, bias, out, portable);
  return out;
}

void check_bias(const c10::optional<torch::Tensor>& bias, const torch::Tensor& x, int64_t n) {
  if (!bias) return;
  TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == n,
              "bias must be a contiguous [", n, "] tensor of x's dtype");
}

torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                      const torch::Tensor& minimum, int64_t group, const c10::optional<torch::Tensor>& bias,
                      bool portable, bool tiled, bool wide) {
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  check_input(x, k);
  check_bias(bias, x, n);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(group % kBlock == 0 && k % group == 0, "group must be a multiple of 32 dividing ", k);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && minimum.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  minimum.is_contiguous() && scale.numel() == n * (k / group) && minimum.numel() == scale.numel(),
              "scale and minimum must be contiguous float32 [n, k/group]");
  const Int4Rows w{packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), minimum.data_ptr<float>(), k, k / group, group, n};
  return tiled ? tiled_mm(w, x, n, bias) : run(w, x, n, bias, portable, wide);
}

torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale, int64_t group,
                      const c10::optional<torch::Tensor>& bias, bool portable, bool tiled, bool wide) {
  const int64_t n = q.size(0), k = q.size(1);
  check_input(x, k);
  check_bias(bias, x, n);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), "q must be contiguous uint8 (w + 128)");
  TORCH_CHECK(group % kBlock == 0 && k % group == 0, "group must be a multiple of 32 dividing ", k);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n * (k / group),
              "scale must be contiguous float32 [n, k/group]");
  const Int8Rows w{q.data_ptr<uint8_t>(), scale.data_ptr<float>(), k, k / group, group, n};
  return tiled ? tiled_mm(w, x, n, bias) : run(w, x, n, bias, portable, wide);
}

template <typename W>
torch::Tensor run_tiles(const W& w, const torch::Tensor& x, const c10::optional<torch::Tensor>& bias, bool portable) {
  torch::Tensor out = torch::empty({x.size(0), w.n}, x.options());
  if (x.size(0) == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    const auto xq = quantize_rows_int8(x.data_ptr<float>(), x.size(0), w.k);
    tiles_matmul(w, xq, x.size(0), bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), portable);
  } else {
    const auto xq = quantize_rows_int8(x.data_ptr<at::BFloat16>(), x.size(0), w.k);
    tiles_matmul(w, xq, x.size(0), bias ? bias->data_ptr<at::BFloat16>() : nullptr, out.data_ptr<at::BFloat16>(),
                 portable);
  }
  return out;
}

// The tiles' arguments: q [ceil(n/16), k/columns_per_row, 16, 4] uint8 (columns: 4 for int8, 8 for int4);
// returns (k, tiles).
std::pair<int64_t, int64_t> check_tiles(const torch::Tensor& x, const torch::Tensor& q, int64_t columns, int64_t n,
                                        int64_t group, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == kTileN && q.size(3) == 4, "q must be [ceil(n/16), k/", columns, ", 16, 4]");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), "q must be contiguous uint8");
  const int64_t k = q.size(1) * columns, tiles = q.size(0);
  check_input(x, k);
  check_bias(bias, x, n);
  TORCH_CHECK(n > 0 && (n + kTileN - 1) / kTileN == tiles, "n=", n, " does not fill ", tiles, " tiles of 16");
  TORCH_CHECK(group % kBlock == 0 && k % group == 0, "group must be a multiple of 32 dividing ", k);
  return {k, tiles};
}

void check_tile_scales(std::initializer_list<torch::Tensor> scales, int64_t count) {
  for (const auto& s : scales)
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == count,
                "scales must be contiguous float32 [ceil(n/16), k/group, 16]");
}

torch::Tensor int8_tiles_mm(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale, int64_t group,
                            int64_t n, const c10::optional<torch::Tensor>& bias, bool portable) {
  const auto [k, tiles] = check_tiles(x, q, 4, n, group, bias);
  check_tile_scales({scale}, tiles * (k / group) * kTileN);
  const Int8Tiles w{q.data_ptr<uint8_t>(), scale.data_ptr<float>(), k, k / group, group, n};
  return run_tiles(w, x, bias, portable);
}

torch::Tensor int4_tiles_mm(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                            const torch::Tensor& minimum, int64_t group, int64_t n,
                            const c10::optional<torch::Tensor>& bias, bool portable) {
  const auto [k, tiles] = check_tiles(x, q, 8, n, group, bias);
  check_tile_scales({scale, minimum}, tiles * (k / group) * kTileN);
  const Int4Tiles w{q.data_ptr<uint8_t>(), scale.data_ptr<float>(), minimum.data_ptr<float>(), k, k / group, group, n};
  return run_tiles(w, x, bias, portable);
}

// The indices of each row's `count` largest values, in no order (the rescored LM head's candidates).
// One pass per row against a running threshold, the `count` best so far in a min-heap: past the first
// few hundred columns almost no value beats the threshold, so a row costs about one vector compare per
// 16 values. torch.topk took 2.7 ms for 64 rows of 49,152 bf16 logits on this CPU.
template <typename T>
inline float ranked(T value) {  // NaN ranks last: a NaN in the heap would block every later value
  const float f = static_cast<float>(value);
  return std::isnan(f) ? -std::numeric_limits<float>::infinity() : f;
}

template <typename T>
void top_row(const T* row, int64_t width, int64_t count, int64_t* out) {
  using Entry = std::pair<float, int64_t>;
  std::vector<Entry> heap(count);
  for (int64_t j = 0; j < count; ++j) heap[j] = {ranked(row[j]), j};
  const auto worse = [](const Entry& a, const Entry& b) { return a.first > b.first; };  // min at the front
  std::make_heap(heap.begin(), heap.end(), worse);
  auto offer = [&](float value, int64_t j) {
    if (!(value > heap.front().first)) return;
    std::pop_heap(heap.begin(), heap.end(), worse);
    heap.back() = {value, j};
    std::push_heap(heap.begin(), heap.end(), worse);
  };
  int64_t j = count;
#if LMI_VNNI
  for (; j + 16 <= width; j += 16) {
    __m512 v;
    if constexpr (std::is_same_v<T, float>) {
      v = _mm512_loadu_ps(row + j);
    } else {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    uint32_t above = _mm512_cmp_ps_mask(v, _mm512_set1_ps(heap.front().first), _CMP_GT_OQ);
    while (above) {
      const int lane = __builtin_ctz(above);
      above &= above - 1;
      offer(ranked(row[j + lane]), j + lane);
    }
  }
#endif
  for (; j < width; ++j) offer(ranked(row[j]), j);
  for (int64_t i = 0; i < count; ++i) out[i] = heap[i].second;
}

torch::Tensor top_candidates(const torch::Tensor& logits, int64_t count) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(), "logits must be [n, vocab] on CPU");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, "logits must be float32 or bfloat16");
  const int64_t rows = logits.size(0), width = logits.size(1);
  TORCH_CHECK(count >= 1 && count <= width, "count must be in 1..", width, ", got ", count);
  auto out = torch::empty({rows, count}, logits.options().dtype(at::kLong));
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (logits.scalar_type() == at::kFloat)
        top_row(logits.data_ptr<float>() + r * width, width, count, out.data_ptr<int64_t>() + r * count);
      else
        top_row(logits.data_ptr<at::BFloat16>() + r * width, width, count, out.data_ptr<int64_t>() + r * count);
    }
  });
  return out;
}

bool has_vnni() { return LMI_VNNI; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("int4_mm", &int4_mm, "x @ W.T (+ bias) with W int4 (see the file's header)", py::arg("x"), py::arg("packed"),
        py::arg("scale"), py::arg("minimum"), py::arg("group"), py::arg("bias"), py::arg("portable"), py::arg("tiled"),
        py::arg("wide") = false);
  m.def("int8_mm", &int8_mm, "x @ W.T (+ bias) with W int8 (see the file's header)", py::arg("x"), py::arg("q"),
        py::arg("scale"), py::arg("group"), py::arg("bias"), py::arg("portable"), py::arg("tiled"),
        py::arg("wide") = false);
  m.def("int8_tiles_mm", &int8_tiles_mm, "x @ W.T (+ bias) with W int8 in VNNI tiles (see int8_tiles_mm)", py::arg("x"),
        py::arg("q"), py::arg("scale"), py::arg("group"), py::arg("n"), py::arg("bias"), py::arg("portable"));
  m.def("int4_tiles_mm", &int4_tiles_mm, "x @ W.T (+ bias) with W int4 in VNNI tiles (see Int4Tiles)", py::arg("x"),
        py::arg("q"), py::arg("scale"), py::arg("minimum"), py::arg("group"), py::arg("n"), py::arg("bias"),
        py::arg("portable"));
  m.def("top_candidates", &top_candidates, "indices of each row's count largest logits, in no order", py::arg("logits"),
        py::arg("count"));
  m.def("has_vnni", &has_vnni, "whether this build has the AVX-512 VNNI path");
}
