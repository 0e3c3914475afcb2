// Attention over a paged KV cache on CPU: every packed query token attends its own sequence's first
// kv_len cached keys, read through that sequence's block table. Decode tokens and the tokens of short
// prefill chunks alike are such queries (a chunk's token at position p has kv_len p + 1: causal).
//
// Each (token, kv head) pair is one work item: the query heads sharing that kv head are processed
// together so every K/V row is read from memory once, and each token reads only its own kv_len rows
// (no padding to the longest sequence, unlike a masked SDPA call). Rows are located per key block of 32:
// cache block table[p / block_size], row p % block_size, so any power-of-two block size works. Keys are taken in blocks: scores for
// the whole block first, then one online-softmax rescale per block, then the V accumulation, which keeps
// the loops free of serial dependencies so the compiler vectorises them. Accumulation is in float32.
// The plain-torch reference is engines/kernels/paged.py:paged_attention_reference.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <climits>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxGroup = 16;
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kBlock = 32;
constexpr float kNegativeHuge = -1e30f;  // "minus infinity" that -ffast-math may not assume away

struct Item {
  int64_t group;
  int64_t head_dim;
  int64_t kv_len;
  int64_t q_head_stride;
  int64_t kv_row_stride;
  float scale;
  const int32_t* table;   // this token's sequence's block table
  int64_t block_shift;    // log2(block_size)
  int64_t block_stride;   // elements between cache blocks
};

// Where position p's row of this kv head starts: base points at block 0 of the head.
template <typename T>
inline const T* row_at(const T* base, int64_t p, const Item& item) {
  const int64_t mask = (int64_t{1} << item.block_shift) - 1;
  return base + item.table[p >> item.block_shift] * item.block_stride + (p & mask) * item.kv_row_stride;
}

// kHeadDim > 0 fixes head_dim at compile time so the inner loops unroll fully.
template <typename T, int64_t kHeadDim>
void attend_one(const T* q, const T* k, const T* v, T* out, const Item& item) {
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : item.head_dim;
  const int64_t group = item.group;
  // Flat buffers indexed with the real head_dim keep the working set dense in L1.
  float qf[kMaxGroup * kMaxHeadDim];
  float acc[kMaxGroup * kMaxHeadDim];
  float kf[kBlock * kMaxHeadDim];
  float vblock[kBlock * kMaxHeadDim];
  float probs[kMaxGroup][kBlock];
  float row_max[kMaxGroup];
  float row_sum[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) {
    float* qg = qf + g * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) {
      qg[d] = static_cast<float>(q[g * item.q_head_stride + d]) * item.scale;
      acc[g * head_dim + d] = 0.f;
    }
    row_max[g] = kNegativeHuge;
    row_sum[g] = 0.f;
  }
  for (int64_t t0 = 0; t0 < item.kv_len; t0 += kBlock) {
    const int64_t n = std::min(kBlock, item.kv_len - t0);
    for (int64_t t = 0; t < n; ++t) {
      const T* k_row = row_at(k, t0 + t, item);
      for (int64_t d = 0; d < head_dim; ++d) kf[t * head_dim + d] = static_cast<float>(k_row[d]);
    }
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * head_dim;
      float block_max = row_max[g];
      for (int64_t t = 0; t < n; ++t) {
        const float* kt = kf + t * head_dim;
        float s = 0.f;
        for (int64_t d = 0; d < head_dim; ++d) s += qg[d] * kt[d];
        probs[g][t] = s;
        block_max = std::max(block_max, s);
      }
      const float rescale = std::exp(row_max[g] - block_max);
      row_max[g] = block_max;
      float block_sum = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        probs[g][t] = std::exp(probs[g][t] - block_max);
        block_sum += probs[g][t];
      }
      row_sum[g] = row_sum[g] * rescale + block_sum;
      for (int64_t d = 0; d < head_dim; ++d) acc[g * head_dim + d] *= rescale;
    }
    for (int64_t t = 0; t < n; ++t) {
      const T* v_row = row_at(v, t0 + t, item);
      for (int64_t d = 0; d < head_dim; ++d) vblock[t * head_dim + d] = static_cast<float>(v_row[d]);
    }
    for (int64_t g = 0; g < group; ++g) {
      float* ag = acc + g * head_dim;
      float local[kMaxHeadDim];  // stays in registers when head_dim is a compile-time constant
      for (int64_t d = 0; d < head_dim; ++d) local[d] = ag[d];
      for (int64_t t = 0; t < n; ++t) {
        const float p = probs[g][t];
        const float* vt = vblock + t * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) local[d] += p * vt[d];
      }
      for (int64_t d = 0; d < head_dim; ++d) ag[d] = local[d];
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / row_sum[g];
    for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] = static_cast<T>(acc[g * head_dim + d] * inv);
  }
}


#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 fast path: q.k and p.v run as bf16 dot products (vdpbf16ps) with float32 accumulation, as in
// FlashAttention (p is rounded to bf16 for the p.v product); scores of 16 keys are reduced together by
// one transpose-and-add instead of 16 horizontal sums.
constexpr int64_t kMaxFastGroup = 8;

inline __m512 sum16(__m512 v[16]) {
  // lane i of the result = sum of the 16 lanes of v[i]
  __m512 s[8], r[4];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j)
    r[j] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
}

inline __m512bh load_bh(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }

template <int64_t kHeadDim>
void attend_bf16(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, at::BFloat16* out,
                 const Item& item) {
  constexpr int64_t kChunks = kHeadDim / 32;  // 32 bf16 per 512-bit register
  const int64_t group = item.group;
  __m512bh qv[kMaxFastGroup][kChunks];
  __m512 acc_lo[kMaxFastGroup][kChunks], acc_hi[kMaxFastGroup][kChunks];
  float row_max[kMaxFastGroup], row_sum[kMaxFastGroup];
  alignas(64) float probs[kMaxFastGroup][kBlock];
  alignas(64) uint16_t probs_bh[kMaxFastGroup][kBlock];
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t c = 0; c < kChunks; ++c) {
      qv[g][c] = load_bh(q + g * item.q_head_stride + 32 * c);
      acc_lo[g][c] = acc_hi[g][c] = _mm512_setzero_ps();
    }
    row_max[g] = kNegativeHuge;
    row_sum[g] = 0.f;
  }
  const __m512 scale = _mm512_set1_ps(item.scale);
  for (int64_t t0 = 0; t0 < item.kv_len; t0 += kBlock) {
    const int64_t n = std::min(kBlock, item.kv_len - t0);
    // the next block's rows start arriving while this one is computed
    for (int64_t t = t0 + kBlock; t < std::min(t0 + 2 * kBlock, item.kv_len); ++t) {
      for (int64_t byte = 0; byte < kHeadDim * 2; byte += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(row_at(k, t, item)) + byte, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(row_at(v, t, item)) + byte, _MM_HINT_T0);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t half = 0; half < kBlock; half += 16) {
        __m512 partial[16];
        for (int64_t i = 0; i < 16; ++i) {
          partial[i] = _mm512_setzero_ps();
          if (half + i < n) {
            const at::BFloat16* row = row_at(k, t0 + half + i, item);
            for (int64_t c = 0; c < kChunks; ++c)
              partial[i] = _mm512_dpbf16_ps(partial[i], qv[g][c], load_bh(row + 32 * c));
          }
        }
        _mm512_store_ps(probs[g] + half, _mm512_mul_ps(sum16(partial), scale));
      }
      float block_max = row_max[g];
      for (int64_t t = 0; t < n; ++t) block_max = std::max(block_max, probs[g][t]);
      const float rescale = std::exp(row_max[g] - block_max);
      row_max[g] = block_max;
      float block_sum = 0.f;
      for (int64_t t = 0; t < kBlock; ++t) {
        probs[g][t] = t < n ? std::exp(probs[g][t] - block_max) : 0.f;
        block_sum += probs[g][t];
      }
      row_sum[g] = row_sum[g] * rescale + block_sum;
      const __m512 r = _mm512_set1_ps(rescale);
      for (int64_t c = 0; c < kChunks; ++c) {
        acc_lo[g][c] = _mm512_mul_ps(acc_lo[g][c], r);
        acc_hi[g][c] = _mm512_mul_ps(acc_hi[g][c], r);
      }
      for (int64_t h = 0; h < kBlock; h += 32) {
        const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_load_ps(probs[g] + h + 16), _mm512_load_ps(probs[g] + h));
        _mm512_store_si512(probs_bh[g] + h, (__m512i)packed);
      }
    }
    // p.v over key pairs: interleave rows t and t+1 so each 32-bit lane holds (v_t[d], v_t+1[d]).
    for (int64_t t = 0; t < n; t += 2) {
      const at::BFloat16* row0 = row_at(v, t0 + t, item);
      const at::BFloat16* row1 = t + 1 < n ? row_at(v, t0 + t + 1, item) : row0;
      for (int64_t c = 0; c < kChunks; ++c) {
        const __m512i a = _mm512_loadu_si512(row0 + 32 * c);
        const __m512i b = t + 1 < n ? _mm512_loadu_si512(row1 + 32 * c) : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b);
        const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
        for (int64_t g = 0; g < group; ++g) {
          uint32_t pair;
          std::memcpy(&pair, probs_bh[g] + t, sizeof(pair));
          const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
          acc_lo[g][c] = _mm512_dpbf16_ps(acc_lo[g][c], lo, p);
          acc_hi[g][c] = _mm512_dpbf16_ps(acc_hi[g][c], hi, p);
        }
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / row_sum[g];
    alignas(64) float lo[16], hi[16];
    for (int64_t c = 0; c < kChunks; ++c) {
      _mm512_store_ps(lo, acc_lo[g][c]);
      _mm512_store_ps(hi, acc_hi[g][c]);
      // unpacklo/hi work per 128-bit lane: lane L of lo holds dims 8L..8L+3 of this chunk, hi 8L+4..8L+7
      for (int64_t lane = 0; lane < 4; ++lane) {
        for (int64_t m = 0; m < 4; ++m) {
          out[g * kHeadDim + 32 * c + 8 * lane + m] = static_cast<at::BFloat16>(lo[4 * lane + m] * inv);
          out[g * kHeadDim + 32 * c + 8 * lane + 4 + m] = static_cast<at::BFloat16>(hi[4 * lane + m] * inv);
        }
      }
    }
  }
}
#endif

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
         const int32_t* tables, int64_t table_width, const int64_t* token_seq, const int64_t* kv_lens,
         int64_t block_shift, torch::Tensor& out, float scale) {
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = cache_k.size(1), group = heads / kv_heads;
  auto kernel = head_dim == 64 ? attend_one<T, 64> : head_dim == 128 ? attend_one<T, 128> : attend_one<T, 0>;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (group <= kMaxFastGroup && head_dim == 64) kernel = attend_bf16<64>;
    if (group <= kMaxFastGroup && head_dim == 128) kernel = attend_bf16<128>;
  }
#endif
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = cache_k.data_ptr<T>();
  const T* v_ptr = cache_v.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  // Items are dealt round-robin to the threads so mixed sequence lengths balance out.
  const int64_t items = batch * kv_heads;
  const int64_t lanes = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane) {
      for (int64_t index = lane; index < items; index += lanes) {
        const int64_t b = index / kv_heads, h = index % kv_heads;
        const Item item{group,         head_dim, kv_lens[b], q.stride(1), cache_k.stride(2), scale,
                        tables + token_seq[b] * table_width, block_shift, cache_k.stride(0)};
        kernel(q_ptr + b * q.stride(0) + h * group * q.stride(1), k_ptr + h * cache_k.stride(1),
               v_ptr + h * cache_v.stride(1),
               out_ptr + (b * heads + h * group) * head_dim, item);
      }
    }
  });
}

// ---- Prefill: query tiles ----------------------------------------------------------------------------
// A chunk's consecutive tokens share their keys, so a work item is (sequence, kv head, tile of
// consecutive query tokens) with all `group` query heads of that kv head: each K/V row read serves the
// tile's tokens x group query rows instead of `group`. Keys go in blocks of 32 with an online softmax per
// row; only the blocks past a tile's first position meet the causal frontier and are masked.

constexpr int64_t kTileRows = 48;  // query rows (tokens x group) per tile: 32, 48, 64 measured, 48 best

struct Tile {
  int64_t seq, head;
  int64_t token;     // the tile's first packed query row
  int64_t tokens;    // query tokens in the tile (1 on the per-token path)
  int64_t position;  // the first token's position: it attends keys [0, position]
  int64_t cost;      // key rows x query rows, for scheduling
  bool tiled;        // false: a token of a short chunk, on the per-token kernel
};

struct TileArgs {
  int64_t group, head_dim, heads;
  int64_t q_token_stride, q_head_stride, kv_row_stride, block_shift, block_stride;
  float scale;
};

inline const int32_t* table_of(const int32_t* tables, int64_t width, const Tile& tile) {
  return tables + tile.seq * width;
}

template <typename T>
inline const T* tile_row(const T* base, int64_t p, const int32_t* table, const TileArgs& a) {
  const int64_t mask = (int64_t{1} << a.block_shift) - 1;
  return base + table[p >> a.block_shift] * a.block_stride + (p & mask) * a.kv_row_stride;
}

// Portable tile kernel (float32 arithmetic): scores as a [rows, 32] product against the key block
// transposed, so the compiler vectorises over keys; p.v vectorises over head_dim.
template <typename T, int64_t kHeadDim>
void tile_generic(const T* q, const T* k, const T* v, T* out, const int32_t* table, const Tile& tile,
                  const TileArgs& a) {
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : a.head_dim;
  const int64_t group = a.group, rows = tile.tokens * group;
  static thread_local std::vector<float> buffer;
  buffer.resize((2 * kTileRows + 2 * kBlock) * kMaxHeadDim);
  float* qf = buffer.data();                  // [rows][head_dim], scaled
  float* acc = qf + kTileRows * head_dim;     // [rows][head_dim]
  float* kt = acc + kTileRows * head_dim;     // [head_dim][kBlock]
  float* vf = kt + kBlock * head_dim;         // [kBlock][head_dim]
  alignas(64) float probs[kBlock];
  float row_max[kTileRows], row_sum[kTileRows];
  for (int64_t r = 0; r < rows; ++r) {
    const T* qr = q + (tile.token + r / group) * a.q_token_stride + (r % group) * a.q_head_stride;
    for (int64_t d = 0; d < head_dim; ++d) {
      qf[r * head_dim + d] = static_cast<float>(qr[d]) * a.scale;
      acc[r * head_dim + d] = 0.f;
    }
    row_max[r] = kNegativeHuge;
    row_sum[r] = 0.f;
  }
  const int64_t kv_end = tile.position + tile.tokens;
  for (int64_t t0 = 0; t0 < kv_end; t0 += kBlock) {
    const int64_t n = std::min(kBlock, kv_end - t0);
    for (int64_t t = 0; t < kBlock; ++t) {
      const T* k_row = t < n ? tile_row(k, t0 + t, table, a) : nullptr;
      const T* v_row = t < n ? tile_row(v, t0 + t, table, a) : nullptr;
      for (int64_t d = 0; d < head_dim; ++d) {
        kt[d * kBlock + t] = k_row ? static_cast<float>(k_row[d]) : 0.f;
        vf[t * head_dim + d] = v_row ? static_cast<float>(v_row[d]) : 0.f;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t limit = std::min(n, tile.position + r / group - t0 + 1);  // keys this row may see
      if (limit <= 0) continue;
      float scores[kBlock] = {};
      const float* qr = qf + r * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float qd = qr[d];
        for (int64_t t = 0; t < kBlock; ++t) scores[t] += qd * kt[d * kBlock + t];
      }
      float block_max = row_max[r];
      for (int64_t t = 0; t < limit; ++t) block_max = std::max(block_max, scores[t]);
      const float rescale = std::exp(row_max[r] - block_max);
      row_max[r] = block_max;
      float block_sum = 0.f;
      for (int64_t t = 0; t < kBlock; ++t) {
        probs[t] = t < limit ? std::exp(scores[t] - block_max) : 0.f;
        block_sum += probs[t];
      }
      row_sum[r] = row_sum[r] * rescale + block_sum;
      float* ar = acc + r * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) ar[d] *= rescale;
      for (int64_t t = 0; t < limit; ++t) {
        const float p = probs[t];
        const float* vt = vf + t * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) ar[d] += p * vt[d];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / row_sum[r];
    T* o = out + (tile.token + r / group) * a.heads * head_dim + (r % group) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<T>(acc[r * head_dim + d] * inv);
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 tile kernel. The 16 lanes of a vector are 16 query rows, so the online softmax is element-wise
// across key columns (no horizontal reductions). q.k: lanes hold (q[r][2j], q[r][2j+1]) of the transposed
// tile, multiplied by key t's pair j broadcast straight from the cache row (no key packing). p.v: lanes
// hold (p[r][2j], p[r][2j+1]) against the broadcast pair (v[2j][d], v[2j+1][d]) of an interleaved copy
// of the value block. Products run as vdpbf16ps with float32 accumulation; p is rounded to bf16.
constexpr int64_t kRowVecs = kTileRows / 16;
constexpr int64_t kKeyChunk = kRowVecs == 1 ? 16 : kRowVecs <= 3 ? 8 : 4;  // q.k accumulators: 16-24
constexpr int64_t kDimChunk = kKeyChunk;                                     // p.v accumulators: 16-24

inline __m512i broadcast_pair(const void* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return _mm512_set1_epi32(pair);
}

// 2^x: x = n + f with |f| <= 1/2, 2^f by its degree-6 Taylor polynomial in f ln 2 (relative error
// < 2e-7), scaled by 2^n; very negative x (masked keys) gives 0.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-200.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.540353e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022651f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

template <int64_t kHeadDim>
void tile_bf16(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, at::BFloat16* out,
               const int32_t* table, const Tile& tile, const TileArgs& a) {
  constexpr int64_t kPairs = kHeadDim / 2, kLanes = kRowVecs * 16;
  const int64_t group = a.group, rows = tile.tokens * group;
  alignas(64) uint32_t qt[kPairs][kLanes];          // row r's dims (2j, 2j+1) in lane r
  alignas(64) float ot[kHeadDim][kLanes];           // output accumulator, transposed
  alignas(64) float scores[kBlock][kLanes];         // then the probabilities
  alignas(64) uint32_t p_pairs[kBlock / 2][kLanes];  // (p[r][2j], p[r][2j+1]) in bf16
  alignas(64) uint32_t v_pairs[kBlock / 2][kHeadDim];  // (v[2j][d], v[2j+1][d]) in bf16
  alignas(64) int32_t positions[kLanes];
  static const at::BFloat16 zeros[kMaxHeadDim] = {};  // stands in for rows past the tile's last key
  for (int64_t r = 0; r < kLanes; ++r) {
    const at::BFloat16* qr =
        r < rows ? q + (tile.token + r / group) * a.q_token_stride + (r % group) * a.q_head_stride : zeros;
    for (int64_t j = 0; j < kPairs; ++j) std::memcpy(&qt[j][r], qr + 2 * j, sizeof(uint32_t));
    // padding rows (q = 0) may see every key: their scores stay finite and their output is dropped
    positions[r] = r < rows ? static_cast<int32_t>(tile.position + r / group) : INT32_MAX;
  }
  std::memset(ot, 0, sizeof(ot));
  __m512 row_max[kRowVecs], row_sum[kRowVecs], rescale[kRowVecs];
  __m512i pos[kRowVecs];
  for (int64_t w = 0; w < kRowVecs; ++w) {
    row_max[w] = _mm512_set1_ps(kNegativeHuge);
    row_sum[w] = _mm512_setzero_ps();
    pos[w] = _mm512_load_si512(positions + 16 * w);
  }
  const __m512 scale = _mm512_set1_ps(a.scale * 1.44269504f);  // scores in log2 units for exp2
  // Lane 2i of a p.v operand takes element i of the first vector, lane 2i+1 element i of the second.
  alignas(64) int16_t interleave_lo[32], interleave_hi[32];
  for (int i = 0; i < 32; ++i) {
    interleave_lo[i] = static_cast<int16_t>((i & 1) * 32 + i / 2);
    interleave_hi[i] = static_cast<int16_t>((i & 1) * 32 + 16 + i / 2);
  }
  const __m512i mix_lo = _mm512_load_si512(interleave_lo), mix_hi = _mm512_load_si512(interleave_hi);
  // one source: lane 2i takes element i (key 2j of row i), lane 2i+1 element 16 + i (key 2j + 1)
  alignas(64) int16_t interleave_halves[32];
  for (int i = 0; i < 32; ++i) interleave_halves[i] = static_cast<int16_t>((i & 1) * 16 + i / 2);
  const __m512i mix_halves = _mm512_load_si512(interleave_halves);
  const at::BFloat16* k_rows[kBlock];
  const at::BFloat16* v_rows[kBlock];
  const int64_t kv_end = tile.position + tile.tokens;
  for (int64_t t0 = 0; t0 < kv_end; t0 += kBlock) {
    const int64_t n = std::min(kBlock, kv_end - t0);
    for (int64_t t = 0; t < kBlock; ++t) {
      k_rows[t] = t < n ? tile_row(k, t0 + t, table, a) : zeros;
      v_rows[t] = t < n ? tile_row(v, t0 + t, table, a) : zeros;
    }
    const int64_t key_chunks = (n + kKeyChunk - 1) / kKeyChunk;
    for (int64_t c = 0; c < key_chunks; ++c) {
      __m512 acc[kRowVecs][kKeyChunk];
      for (int64_t w = 0; w < kRowVecs; ++w)
        for (int64_t i = 0; i < kKeyChunk; ++i) acc[w][i] = _mm512_setzero_ps();
      for (int64_t j = 0; j < kPairs; ++j) {
        __m512bh qv[kRowVecs];
        for (int64_t w = 0; w < kRowVecs; ++w) qv[w] = (__m512bh)_mm512_load_si512(&qt[j][16 * w]);
        for (int64_t i = 0; i < kKeyChunk; ++i) {
          const __m512bh kv = (__m512bh)broadcast_pair(k_rows[c * kKeyChunk + i] + 2 * j);
          for (int64_t w = 0; w < kRowVecs; ++w) acc[w][i] = _mm512_dpbf16_ps(acc[w][i], qv[w], kv);
        }
      }
      for (int64_t i = 0; i < kKeyChunk; ++i)
        for (int64_t w = 0; w < kRowVecs; ++w)
          _mm512_store_ps(&scores[c * kKeyChunk + i][16 * w], _mm512_mul_ps(acc[w][i], scale));
    }
    const int64_t used = key_chunks * kKeyChunk;  // keys [n, used) are zero rows: masked below
    const bool masked = t0 + used - 1 > tile.position;
    for (int64_t w = 0; w < kRowVecs; ++w) {
      __m512 block_max = row_max[w];
      for (int64_t t = 0; t < used; ++t) {
        __m512 s = _mm512_load_ps(&scores[t][16 * w]);
        if (masked) {
          const __mmask16 seen = _mm512_cmp_epi32_mask(_mm512_set1_epi32(static_cast<int>(t0 + t)), pos[w],
                                                       _MM_CMPINT_LE);
          s = _mm512_mask_blend_ps(seen, _mm512_set1_ps(kNegativeHuge), s);
          _mm512_store_ps(&scores[t][16 * w], s);
        }
        block_max = _mm512_max_ps(block_max, s);
      }
      rescale[w] = exp2_ps(_mm512_sub_ps(row_max[w], block_max));
      row_max[w] = block_max;
      __m512 block_sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < used; ++t) {
        const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_load_ps(&scores[t][16 * w]), block_max));
        _mm512_store_ps(&scores[t][16 * w], p);
        block_sum = _mm512_add_ps(block_sum, p);
      }
      row_sum[w] = _mm512_fmadd_ps(row_sum[w], rescale[w], block_sum);
      for (int64_t j = 0; j < used / 2; ++j) {
        // lanes 0-15: p of key 2j, 16-31: key 2j+1; interleaved into (2j, 2j+1) pairs per row
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(&scores[2 * j + 1][16 * w]),
                                                          _mm512_load_ps(&scores[2 * j][16 * w]));
        _mm512_store_si512(&p_pairs[j][16 * w], _mm512_permutexvar_epi16(mix_halves, both));
      }
    }
    const int64_t pairs = used / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      for (int64_t c = 0; c < kHeadDim; c += 32) {
        const __m512i a0 = _mm512_loadu_si512(v_rows[2 * j] + c), a1 = _mm512_loadu_si512(v_rows[2 * j + 1] + c);
        _mm512_store_si512(&v_pairs[j][c], _mm512_permutex2var_epi16(a0, mix_lo, a1));
        _mm512_store_si512(&v_pairs[j][c + 16], _mm512_permutex2var_epi16(a0, mix_hi, a1));
      }
    }
    for (int64_t d0 = 0; d0 < kHeadDim; d0 += kDimChunk) {
      __m512 acc[kRowVecs][kDimChunk];
      for (int64_t i = 0; i < kDimChunk; ++i)
        for (int64_t w = 0; w < kRowVecs; ++w)
          acc[w][i] = _mm512_mul_ps(_mm512_load_ps(&ot[d0 + i][16 * w]), rescale[w]);
      for (int64_t j = 0; j < pairs; ++j) {
        __m512bh pv[kRowVecs];
        for (int64_t w = 0; w < kRowVecs; ++w) pv[w] = (__m512bh)_mm512_load_si512(&p_pairs[j][16 * w]);
        for (int64_t i = 0; i < kDimChunk; ++i) {
          const __m512bh vv = (__m512bh)_mm512_set1_epi32(static_cast<int>(v_pairs[j][d0 + i]));
          for (int64_t w = 0; w < kRowVecs; ++w) acc[w][i] = _mm512_dpbf16_ps(acc[w][i], pv[w], vv);
        }
      }
      for (int64_t i = 0; i < kDimChunk; ++i)
        for (int64_t w = 0; w < kRowVecs; ++w) _mm512_store_ps(&ot[d0 + i][16 * w], acc[w][i]);
    }
  }
  alignas(64) float inv[kLanes];
  for (int64_t w = 0; w < kRowVecs; ++w)
    _mm512_store_ps(inv + 16 * w, _mm512_div_ps(_mm512_set1_ps(1.f), row_sum[w]));
  for (int64_t r = 0; r < rows; ++r) {
    at::BFloat16* o = out + (tile.token + r / group) * a.heads * kHeadDim + (r % group) * kHeadDim;
    for (int64_t d = 0; d < kHeadDim; ++d) o[d] = static_cast<at::BFloat16>(ot[d][r] * inv[r]);
  }
}
#endif

template <typename T>
using TileKernel = void (*)(const T*, const T*, const T*, T*, const int32_t*, const Tile&, const TileArgs&);

template <typename T>
void run_prefill(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                 const int32_t* tables, int64_t table_width, const int32_t* starts, const int32_t* contexts,
                 int64_t num_seqs, int64_t block_shift, int64_t min_tile_tokens, torch::Tensor& out,
                 float scale) {
  const int64_t heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = cache_k.size(1), group = heads / kv_heads;
  const TileArgs args{group,           head_dim,          heads,       q.stride(0), q.stride(1),
                      cache_k.stride(2), block_shift, cache_k.stride(0), scale};
  TileKernel<T> tiled = head_dim == 64    ? tile_generic<T, 64>
                        : head_dim == 128 ? tile_generic<T, 128>
                                          : tile_generic<T, 0>;
  auto token_kernel = head_dim == 64 ? attend_one<T, 64> : head_dim == 128 ? attend_one<T, 128> : attend_one<T, 0>;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (head_dim == 64) tiled = tile_bf16<64>;
    if (head_dim == 128) tiled = tile_bf16<128>;
    if (group <= kMaxFastGroup && head_dim == 64) token_kernel = attend_bf16<64>;
    if (group <= kMaxFastGroup && head_dim == 128) token_kernel = attend_bf16<128>;
  }
#endif
  // Chunks of at least min_tile_tokens are cut into tiles; shorter ones (decodes) go token by token.
  const int64_t tile_tokens = std::max<int64_t>(1, kTileRows / group);
  std::vector<Tile> work;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t query_len = starts[s + 1] - starts[s], first = contexts[s] - query_len;
    const int64_t step = query_len >= min_tile_tokens ? tile_tokens : 1;
    for (int64_t i = 0; i < query_len; i += step) {
      const int64_t tokens = std::min(step, query_len - i);
      for (int64_t h = 0; h < kv_heads; ++h)
        work.push_back({s, h, starts[s] + i, tokens, first + i, tokens * group * (first + i + tokens),
                         step > 1 || min_tile_tokens <= 1});
    }
  }
  // Largest first, each thread taking the next item when it is free: tiles late in a long sequence
  // cost many times the early ones, and a static split would leave one thread idle at the end.
  std::stable_sort(work.begin(), work.end(), [](const Tile& x, const Tile& y) { return x.cost > y.cost; });
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = cache_k.data_ptr<T>();
  const T* v_ptr = cache_v.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t items = static_cast<int64_t>(work.size());
  const int64_t lanes = std::min<int64_t>(at::get_num_threads(), items);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane) {
      for (int64_t index = next++; index < items; index = next++) {
        const Tile& tile = work[index];
        const int32_t* table = table_of(tables, table_width, tile);
        const T* q_head = q_ptr + tile.head * group * q.stride(1);
        const T* k_head = k_ptr + tile.head * cache_k.stride(1);
        const T* v_head = v_ptr + tile.head * cache_v.stride(1);
        T* out_head = out_ptr + tile.head * group * head_dim;
        if (tile.tiled) {
          tiled(q_head, k_head, v_head, out_head, table, tile, args);
        } else {
          const Item item{group, head_dim, tile.position + 1, q.stride(1), cache_k.stride(2), scale,
                          table,  block_shift, cache_k.stride(0)};
          token_kernel(q_head + tile.token * q.stride(0), k_head, v_head,
                       out_head + tile.token * heads * head_dim, item);
        }
      }
    }
  });
}

}  // namespace

// q [T, heads, head_dim]; cache_k, cache_v [num_blocks, kv_heads, block_size, head_dim] (block_size a
// power of two); block_tables [S, max_blocks] int32; token_seq, kv_lens [T] int64. Returns
// [T, heads, head_dim]: token t attends positions [0, kv_lens[t]) of sequence token_seq[t].
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                              const torch::Tensor& block_tables, const torch::Tensor& token_seq,
                              const torch::Tensor& kv_lens, double scale) {
  for (const auto* t : {&q, &cache_k, &cache_v, &block_tables, &token_seq, &kv_lens})
    TORCH_CHECK(t->device().is_cpu(), "paged_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && cache_k.dim() == 4 && cache_v.sizes() == cache_k.sizes(), "bad ranks or shapes");
  TORCH_CHECK(cache_k.strides() == cache_v.strides(), "cache_k and cache_v must share a layout");
  TORCH_CHECK(q.stride(2) == 1 && cache_k.stride(3) == 1, "head_dim must be the contiguous dimension");
  TORCH_CHECK(q.scalar_type() == cache_k.scalar_type() && q.scalar_type() == cache_v.scalar_type(),
              "q and the cache must share a dtype");
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = cache_k.size(1);
  const int64_t num_blocks = cache_k.size(0), block_size = cache_k.size(2);
  TORCH_CHECK(kv_heads > 0 && cache_k.size(3) == head_dim && heads % kv_heads == 0,
              "heads must be a multiple of kv_heads");
  TORCH_CHECK(heads / kv_heads <= kMaxGroup && head_dim <= kMaxHeadDim, "group or head_dim too large");
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, "block_size must be a power of two");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kInt32, "block_tables: [S, N] int32");
  TORCH_CHECK(token_seq.scalar_type() == torch::kInt64 && kv_lens.scalar_type() == torch::kInt64, "int64 indices");
  TORCH_CHECK(token_seq.numel() == q.size(0) && kv_lens.numel() == q.size(0), "one sequence and kv_len per query");
  auto tables_c = block_tables.contiguous();
  auto seq_c = token_seq.contiguous();
  auto lens_c = kv_lens.contiguous();
  const int32_t* table_ptr = tables_c.data_ptr<int32_t>();
  const int64_t* seq_ptr = seq_c.data_ptr<int64_t>();
  const int64_t* len_ptr = lens_c.data_ptr<int64_t>();
  const int64_t num_seqs = block_tables.size(0), width = block_tables.size(1);
  std::vector<int64_t> checked(num_seqs, 0);  // blocks of each sequence already range-checked
  for (int64_t t = 0; t < q.size(0); ++t) {
    const int64_t s = seq_ptr[t];
    TORCH_CHECK(s >= 0 && s < num_seqs, "token_seq out of range");
    TORCH_CHECK(len_ptr[t] >= 1 && len_ptr[t] <= width * block_size, "kv_len out of range");
    const int64_t used = (len_ptr[t] + block_size - 1) / block_size;
    for (int64_t i = checked[s]; i < used; ++i) {
      const int32_t block = table_ptr[s * width + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id out of range");
    }
    checked[s] = std::max(checked[s], used);
  }
  int64_t shift = 0;
  while ((int64_t{1} << shift) < block_size) ++shift;
  auto out = torch::empty({q.size(0), heads, head_dim}, q.options());
  const float fscale = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case torch::kFloat:
      run<float>(q, cache_k, cache_v, table_ptr, width, seq_ptr, len_ptr, shift, out, fscale);
      break;
    case torch::kBFloat16:
      run<at::BFloat16>(q, cache_k, cache_v, table_ptr, width, seq_ptr, len_ptr, shift, out, fscale);
      break;
    case torch::kHalf:
      run<at::Half>(q, cache_k, cache_v, table_ptr, width, seq_ptr, len_ptr, shift, out, fscale);
      break;
    default: TORCH_CHECK(false, "paged_attention supports float32, bfloat16 and float16");
  }
  return out;
}

// The same attention by sequence (the contract of engines/kernels/paged.py:PagedAttentionMeta):
// q [T, heads, head_dim]; query_start [S + 1] int32 (sequence s owns rows query_start[s] to
// query_start[s + 1]); context_lens [S] int32 (its query i sits at position context_lens[s] - query_len
// + i and attends keys 0 to that position). Chunks of at least min_tile_tokens tokens run as query tiles;
// shorter ones (decodes) token by token as in paged_attention. Returns [T, heads, head_dim].
torch::Tensor paged_prefill_attention(const torch::Tensor& q, const torch::Tensor& cache_k,
                                      const torch::Tensor& cache_v, const torch::Tensor& block_tables,
                                      const torch::Tensor& query_start, const torch::Tensor& context_lens,
                                      double scale, int64_t min_tile_tokens) {
  for (const auto* t : {&q, &cache_k, &cache_v, &block_tables, &query_start, &context_lens})
    TORCH_CHECK(t->device().is_cpu(), "paged_prefill_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && cache_k.dim() == 4 && cache_v.sizes() == cache_k.sizes(), "bad ranks or shapes");
  TORCH_CHECK(cache_k.strides() == cache_v.strides(), "cache_k and cache_v must share a layout");
  TORCH_CHECK(q.stride(2) == 1 && cache_k.stride(3) == 1, "head_dim must be the contiguous dimension");
  TORCH_CHECK(q.scalar_type() == cache_k.scalar_type() && q.scalar_type() == cache_v.scalar_type(),
              "q and the cache must share a dtype");
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = cache_k.size(1);
  const int64_t num_blocks = cache_k.size(0), block_size = cache_k.size(2);
  TORCH_CHECK(kv_heads > 0 && cache_k.size(3) == head_dim && heads % kv_heads == 0,
              "heads must be a multiple of kv_heads");
  TORCH_CHECK(heads / kv_heads <= kMaxGroup && head_dim <= kMaxHeadDim, "group or head_dim too large");
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, "block_size must be a power of two");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kInt32, "block_tables: [S, N] int32");
  TORCH_CHECK(query_start.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32,
              "query_start and context_lens must be int32");
  const int64_t num_seqs = block_tables.size(0), width = block_tables.size(1);
  TORCH_CHECK(query_start.numel() == num_seqs + 1 && context_lens.numel() == num_seqs,
              "query_start [S + 1] and context_lens [S] for S block table rows");
  auto tables_c = block_tables.contiguous();
  auto starts_c = query_start.contiguous();
  auto contexts_c = context_lens.contiguous();
  const int32_t* table_ptr = tables_c.data_ptr<int32_t>();
  const int32_t* starts = starts_c.data_ptr<int32_t>();
  const int32_t* contexts = contexts_c.data_ptr<int32_t>();
  TORCH_CHECK(starts[0] == 0 && starts[num_seqs] == q.size(0), "query_start must run from 0 to T");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t query_len = starts[s + 1] - starts[s];
    TORCH_CHECK(query_len >= 0, "query_start must not decrease");
    if (query_len == 0) continue;
    TORCH_CHECK(contexts[s] >= query_len && contexts[s] <= width * block_size, "context_len out of range");
    for (int64_t i = 0; i < (contexts[s] + block_size - 1) / block_size; ++i) {
      const int32_t block = table_ptr[s * width + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id out of range");
    }
  }
  int64_t shift = 0;
  while ((int64_t{1} << shift) < block_size) ++shift;
  auto out = torch::empty({q.size(0), heads, head_dim}, q.options());
  const float fscale = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case torch::kFloat:
      run_prefill<float>(q, cache_k, cache_v, table_ptr, width, starts, contexts, num_seqs, shift,
                         min_tile_tokens, out, fscale);
      break;
    case torch::kBFloat16:
      run_prefill<at::BFloat16>(q, cache_k, cache_v, table_ptr, width, starts, contexts, num_seqs, shift,
                                min_tile_tokens, out, fscale);
      break;
    case torch::kHalf:
      run_prefill<at::Half>(q, cache_k, cache_v, table_ptr, width, starts, contexts, num_seqs, shift,
                            min_tile_tokens, out, fscale);
      break;
    default: TORCH_CHECK(false, "paged_prefill_attention supports float32, bfloat16 and float16");
  }
  return out;
}

// Whether bf16 inputs take the AVX-512 BF16 path (decided at compile time by -march=native).
bool bf16_fast_path() {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "Attention over a paged KV cache (CPU)");
  m.def("paged_prefill_attention", &paged_prefill_attention, "Causal attention by sequence and query tile "
        "over a paged KV cache (CPU)", py::arg("q"), py::arg("cache_k"), py::arg("cache_v"),
        py::arg("block_tables"), py::arg("query_start"), py::arg("context_lens"), py::arg("scale"),
        py::arg("min_tile_tokens") = 1);
  m.def("bf16_fast_path", &bf16_fast_path, "True when bf16 runs on the AVX-512 BF16 path");
}
