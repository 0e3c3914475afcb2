// Attention over a paged KV cache on CPU, in two kernels with one contract (the plain-torch reference is
// engines/kernels/paged.py:paged_attention_reference): a query at position p of a sequence attends that
// sequence's keys 0..p, read through its block table (cache block table[p / block_size], row
// p % block_size, so any power-of-two block size works). Accumulation is in float32.
//
// paged_attention: every packed token is one query (decodes, short prefill chunks). Each (token, kv
// head) pair is one work item: the query heads sharing that kv head are processed together so every K/V
// row is read from memory once, and each token reads only its own rows (no padding to the longest
// sequence, unlike a masked SDPA call). Keys are taken in blocks of 32: scores for the whole block first,
// then one online-softmax rescale per block, then the V accumulation, which keeps the loops free of
// serial dependencies so the compiler vectorises them.
//
// paged_prefill_attention: by sequence, with a chunk's tokens in query tiles that share every K/V row
// they read (see "Prefill: query tiles" below); chunks shorter than a threshold go token by token as in
// paged_attention, in the same call.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <climits>
#include <cstring>
#include <type_traits>
#include <utility>
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
// tile's tokens x group query rows instead of `group`. The rows run across vector lanes (16 per 512-bit
// register), so the online softmax is element-wise across key columns, and key or value elements are
// broadcast: q.k and p.v are register-blocked outer products. Keys go in blocks of 32; only blocks past a
// tile's first position meet the causal frontier and are masked.

constexpr int64_t kTileRows = 48;  // query rows (tokens x group) per tile; 32 or 64: 3-10% slower (bf16)

struct Tile {
  int64_t seq, head;
  int64_t token;     // the tile's first packed query row
  int64_t tokens;    // query tokens in the tile (1 on the per-token path)
  int64_t position;  // the first token's position: it attends keys [0, position]
  bool tiled;        // false: a token of a short chunk, on the per-token kernel
};

struct TileArgs {
  int64_t group, head_dim, heads;
  int64_t q_token_stride, q_head_stride, kv_row_stride, block_shift, block_stride;
  float scale;
};

// Pointers to the rows of keys [t0, t0 + n) (one run of consecutive rows per cache block), and `zeros`
// for the rest of the kBlock slots.
template <typename T>
void block_rows(const T* k, const T* v, int64_t t0, int64_t n, const int32_t* table, const TileArgs& a,
                const T* zeros, const T* k_rows[kBlock], const T* v_rows[kBlock]) {
  const int64_t block_size = int64_t{1} << a.block_shift;
  int64_t t = 0;
  while (t < n) {
    const int64_t offset = (t0 + t) & (block_size - 1);
    const int64_t run = std::min(block_size - offset, n - t);
    const int64_t first = table[(t0 + t) >> a.block_shift] * a.block_stride + offset * a.kv_row_stride;
    for (int64_t i = 0; i < run; ++i, ++t) {
      k_rows[t] = k + first + i * a.kv_row_stride;
      v_rows[t] = v + first + i * a.kv_row_stride;
    }
  }
  for (; t < kBlock; ++t) k_rows[t] = v_rows[t] = zeros;
}

// Keys (for q.k) or dims (for p.v) per register block of kVecs row vectors: as many as keep the
// accumulators within `budget` registers, at most 16.
constexpr int64_t chunk_for(int64_t vecs, int64_t budget) {
  int64_t chunk = 16;
  while (chunk > 1 && chunk * vecs > budget) chunk /= 2;
  return chunk;
}

// Portable tile kernel in float32: the lanes are those of GCC/Clang vector types (zmm, ymm or NEON
// registers, whichever the target has); the softmax runs on plain arrays (vectorised expf under
// -ffast-math). kVecs row vectors of kVecWidth lanes; tiles with fewer rows take fewer vectors.
#if defined(__AVX512F__)
constexpr int64_t kVecWidth = 16, kRegisterBudget = 24;
#else
constexpr int64_t kVecWidth = 8, kRegisterBudget = 12;
#endif
typedef float Vec __attribute__((vector_size(kVecWidth * sizeof(float))));

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x), and 0 below e^-80 (masked keys): the vectorised expf takes a slow scalar path (setting errno)
// for arguments that underflow, so it never sees them.
inline float exp_or_zero(float x) {
  const float e = std::exp(std::max(x, -80.f));
  return x < -80.f ? 0.f : e;
}

template <typename T, int64_t kHeadDim, int64_t kVecs>
void tile_generic(const T* q, const T* k, const T* v, T* out, const int32_t* table, const Tile& tile,
                  const TileArgs& a) {
  constexpr int64_t kLanes = kVecs * kVecWidth, kChunk = chunk_for(kVecs, kRegisterBudget);
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : a.head_dim;
  const int64_t padded_dim = (head_dim + kChunk - 1) / kChunk * kChunk;  // p.v's dims, zero-padded
  const int64_t group = a.group, rows = tile.tokens * group;
  static thread_local std::vector<float> buffer;
  buffer.resize(2 * kMaxHeadDim * kLanes + 2 * kBlock * kMaxHeadDim);
  float* qt = buffer.data();              // [head_dim][kLanes]: the tile's q, transposed and scaled
  float* ot = qt + kMaxHeadDim * kLanes;  // [padded_dim][kLanes]: the output accumulator
  float* kf = ot + kMaxHeadDim * kLanes;  // [kBlock][head_dim]: the key block in float32
  float* vf = kf + kBlock * kMaxHeadDim;  // [kBlock][padded_dim]: the value block in float32
  alignas(64) float scores[kBlock][kLanes];  // then the probabilities
  alignas(64) float row_max[kLanes], row_sum[kLanes], rescale[kLanes], block_max[kLanes], block_sum[kLanes];
  int32_t positions[kLanes];
  static const T zeros[kMaxHeadDim] = {};
  for (int64_t r = 0; r < kLanes; ++r) {
    const T* qr = r < rows ? q + (tile.token + r / group) * a.q_token_stride + (r % group) * a.q_head_stride
                           : zeros;
    for (int64_t d = 0; d < head_dim; ++d) qt[d * kLanes + r] = static_cast<float>(qr[d]) * a.scale;
    // padding rows (q = 0) may see every key: their scores stay finite and their output is dropped
    positions[r] = r < rows ? static_cast<int32_t>(tile.position + r / group) : INT32_MAX;
    row_max[r] = kNegativeHuge;
    row_sum[r] = 0.f;
  }
  std::fill(ot, ot + padded_dim * kLanes, 0.f);
  const T* k_rows[kBlock];
  const T* v_rows[kBlock];
  const int64_t kv_end = tile.position + tile.tokens;
  for (int64_t t0 = 0; t0 < kv_end; t0 += kBlock) {
    const int64_t n = std::min(kBlock, kv_end - t0);
    const int64_t used = (n + kChunk - 1) / kChunk * kChunk;  // keys [n, used) are zero rows, masked
    block_rows(k, v, t0, n, table, a, zeros, k_rows, v_rows);
    for (int64_t t = 0; t < used; ++t) {
      for (int64_t d = 0; d < head_dim; ++d) {
        kf[t * head_dim + d] = static_cast<float>(k_rows[t][d]);
        vf[t * padded_dim + d] = static_cast<float>(v_rows[t][d]);
      }
      for (int64_t d = head_dim; d < padded_dim; ++d) vf[t * padded_dim + d] = 0.f;
    }
    for (int64_t c = 0; c < used; c += kChunk) {
      Vec acc[kChunk][kVecs] = {};
      for (int64_t d = 0; d < head_dim; ++d) {
        Vec qd[kVecs];
        for (int64_t w = 0; w < kVecs; ++w) qd[w] = load_vec(qt + d * kLanes + w * kVecWidth);
        for (int64_t i = 0; i < kChunk; ++i) {
          const float key = kf[(c + i) * head_dim + d];
          for (int64_t w = 0; w < kVecs; ++w) acc[i][w] += qd[w] * key;
        }
      }
      for (int64_t i = 0; i < kChunk; ++i)
        for (int64_t w = 0; w < kVecs; ++w) store_vec(&scores[c + i][w * kVecWidth], acc[i][w]);
    }
    if (t0 + used - 1 > tile.position) {  // keys past some rows' positions
      for (int64_t t = 0; t < used; ++t)
        for (int64_t l = 0; l < kLanes; ++l)
          scores[t][l] = t0 + t <= positions[l] ? scores[t][l] : kNegativeHuge;
    }
    for (int64_t l = 0; l < kLanes; ++l) block_max[l] = row_max[l];
    for (int64_t t = 0; t < used; ++t)
      for (int64_t l = 0; l < kLanes; ++l) block_max[l] = std::max(block_max[l], scores[t][l]);
    for (int64_t l = 0; l < kLanes; ++l) {
      rescale[l] = exp_or_zero(row_max[l] - block_max[l]);
      row_max[l] = block_max[l];
      block_sum[l] = 0.f;
    }
    for (int64_t t = 0; t < used; ++t) {
      for (int64_t l = 0; l < kLanes; ++l) {
        scores[t][l] = exp_or_zero(scores[t][l] - block_max[l]);
        block_sum[l] += scores[t][l];
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) row_sum[l] = row_sum[l] * rescale[l] + block_sum[l];
    Vec scale_by[kVecs];
    for (int64_t w = 0; w < kVecs; ++w) scale_by[w] = load_vec(rescale + w * kVecWidth);
    for (int64_t d0 = 0; d0 < padded_dim; d0 += kChunk) {
      Vec acc[kChunk][kVecs];
      for (int64_t i = 0; i < kChunk; ++i)
        for (int64_t w = 0; w < kVecs; ++w)
          acc[i][w] = load_vec(ot + (d0 + i) * kLanes + w * kVecWidth) * scale_by[w];
      for (int64_t t = 0; t < used; ++t) {
        Vec pt[kVecs];
        for (int64_t w = 0; w < kVecs; ++w) pt[w] = load_vec(&scores[t][w * kVecWidth]);
        for (int64_t i = 0; i < kChunk; ++i) {
          const float value = vf[t * padded_dim + d0 + i];
          for (int64_t w = 0; w < kVecs; ++w) acc[i][w] += pt[w] * value;
        }
      }
      for (int64_t i = 0; i < kChunk; ++i)
        for (int64_t w = 0; w < kVecs; ++w) store_vec(ot + (d0 + i) * kLanes + w * kVecWidth, acc[i][w]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / row_sum[r];
    T* o = out + (tile.token + r / group) * a.heads * head_dim + (r % group) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<T>(ot[d * kLanes + r] * inv);
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 tile kernel. q.k: lanes hold (q[r][2j], q[r][2j+1]) of the transposed tile, multiplied by key t's
// pair j broadcast straight from the cache row (no key packing). p.v: lanes hold (p[r][2j], p[r][2j+1])
// against the broadcast pair (v[2j][d], v[2j+1][d]) of an interleaved copy of the value block. Products
// run as vdpbf16ps with float32 accumulation (p rounded to bf16, as in attend_bf16).
inline __m512i broadcast_pair(const void* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return _mm512_set1_epi32(pair);
}

// 2^x: x = n + f with |f| <= 1/2, 2^f by its degree-4 Taylor polynomial in f ln 2 (relative error
// < 5e-5, far below the bf16 rounding of p), scaled by 2^n; x = -1e30 (a masked key) gives exactly 0.
inline __m512 exp2_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(9.6181291e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022651f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

template <int64_t kHeadDim, int64_t kVecs>
void tile_bf16(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, at::BFloat16* out,
               const int32_t* table, const Tile& tile, const TileArgs& a) {
  constexpr int64_t kPairs = kHeadDim / 2, kLanes = kVecs * 16, kChunk = chunk_for(kVecs, 24);
  const int64_t group = a.group, rows = tile.tokens * group;
  alignas(64) uint32_t qt[kPairs][kLanes];             // row r's dims (2j, 2j+1) in lane r
  alignas(64) float ot[kHeadDim][kLanes];              // the output accumulator, transposed
  alignas(64) float scores[kBlock][kLanes];            // in log2 units
  alignas(64) uint32_t p_pairs[kBlock / 2][kLanes];    // (p[r][2j], p[r][2j+1]) in bf16
  alignas(64) uint32_t v_pairs[kBlock / 2][kHeadDim];  // (v[2j][d], v[2j+1][d]) in bf16
  alignas(64) int32_t positions[kLanes];
  static const at::BFloat16 zeros[kMaxHeadDim] = {};  // stands in for rows past the tile's last key
  for (int64_t r = 0; r < kLanes; ++r) {
    const at::BFloat16* qr =
        r < rows ? q + (tile.token + r / group) * a.q_token_stride + (r % group) * a.q_head_stride : zeros;
    for (int64_t j = 0; j < kPairs; ++j) std::memcpy(&qt[j][r], qr + 2 * j, sizeof(uint32_t));
    positions[r] = r < rows ? static_cast<int32_t>(tile.position + r / group) : INT32_MAX;
  }
  std::memset(ot, 0, sizeof(ot));
  __m512 row_max[kVecs], row_sum[kVecs], rescale[kVecs];
  __m512i pos[kVecs];
  for (int64_t w = 0; w < kVecs; ++w) {
    row_max[w] = _mm512_set1_ps(kNegativeHuge);
    row_sum[w] = _mm512_setzero_ps();
    pos[w] = _mm512_load_si512(positions + 16 * w);
  }
  const __m512 scale = _mm512_set1_ps(a.scale * 1.44269504f);  // scores in log2 units for exp2
  // Two sources (bit 5 picks the second): lane 2i takes element i of the first, 2i+1 of the second.
  alignas(64) int16_t interleave_lo[32], interleave_hi[32], interleave_halves[32];
  for (int i = 0; i < 32; ++i) {
    interleave_lo[i] = static_cast<int16_t>((i & 1) * 32 + i / 2);
    interleave_hi[i] = static_cast<int16_t>((i & 1) * 32 + 16 + i / 2);
    interleave_halves[i] = static_cast<int16_t>((i & 1) * 16 + i / 2);  // one source: its two halves
  }
  const __m512i mix_lo = _mm512_load_si512(interleave_lo), mix_hi = _mm512_load_si512(interleave_hi);
  const __m512i mix_halves = _mm512_load_si512(interleave_halves);
  const at::BFloat16* k_rows[kBlock];
  const at::BFloat16* v_rows[kBlock];
  const int64_t kv_end = tile.position + tile.tokens;
  for (int64_t t0 = 0; t0 < kv_end; t0 += kBlock) {
    const int64_t n = std::min(kBlock, kv_end - t0);
    const int64_t used = (n + kChunk - 1) / kChunk * kChunk;  // keys [n, used) are zero rows, masked
    block_rows(k, v, t0, n, table, a, zeros, k_rows, v_rows);
    for (int64_t c = 0; c < used; c += kChunk) {
      __m512 acc[kVecs][kChunk];
      for (int64_t w = 0; w < kVecs; ++w)
        for (int64_t i = 0; i < kChunk; ++i) acc[w][i] = _mm512_setzero_ps();
      for (int64_t j = 0; j < kPairs; ++j) {
        __m512bh qv[kVecs];
        for (int64_t w = 0; w < kVecs; ++w) qv[w] = (__m512bh)_mm512_load_si512(&qt[j][16 * w]);
        for (int64_t i = 0; i < kChunk; ++i) {
          const __m512bh kv = (__m512bh)broadcast_pair(k_rows[c + i] + 2 * j);
          for (int64_t w = 0; w < kVecs; ++w) acc[w][i] = _mm512_dpbf16_ps(acc[w][i], qv[w], kv);
        }
      }
      for (int64_t i = 0; i < kChunk; ++i)
        for (int64_t w = 0; w < kVecs; ++w)
          _mm512_store_ps(&scores[c + i][16 * w], _mm512_mul_ps(acc[w][i], scale));
    }
    if (t0 + used - 1 > tile.position) {  // keys past some rows' positions
      for (int64_t t = 0; t < used; ++t) {
        const __m512i key = _mm512_set1_epi32(static_cast<int>(t0 + t));
        for (int64_t w = 0; w < kVecs; ++w) {
          const __mmask16 seen = _mm512_cmp_epi32_mask(key, pos[w], _MM_CMPINT_LE);
          const __m512 s = _mm512_load_ps(&scores[t][16 * w]);
          _mm512_store_ps(&scores[t][16 * w], _mm512_mask_blend_ps(seen, _mm512_set1_ps(kNegativeHuge), s));
        }
      }
    }
    // Two chains per row vector (even and odd keys) halve the serial max and sum latencies.
    __m512 even[kVecs], odd[kVecs], block_max[kVecs];
    for (int64_t w = 0; w < kVecs; ++w) even[w] = odd[w] = row_max[w];
    for (int64_t t = 0; t < used; t += 2) {
      for (int64_t w = 0; w < kVecs; ++w) {
        even[w] = _mm512_max_ps(even[w], _mm512_load_ps(&scores[t][16 * w]));
        odd[w] = _mm512_max_ps(odd[w], _mm512_load_ps(&scores[t + 1][16 * w]));
      }
    }
    bool rescaled = false;  // once every row's maximum has settled, blocks leave the output scale alone
    for (int64_t w = 0; w < kVecs; ++w) {
      block_max[w] = _mm512_max_ps(even[w], odd[w]);
      rescale[w] = exp2_ps(_mm512_sub_ps(row_max[w], block_max[w]));
      rescaled |= _mm512_cmp_ps_mask(rescale[w], _mm512_set1_ps(1.f), _CMP_NEQ_UQ) != 0;
      row_max[w] = block_max[w];
      even[w] = odd[w] = _mm512_setzero_ps();
    }
    const int64_t pairs = used / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      for (int64_t w = 0; w < kVecs; ++w) {
        const __m512 p0 = exp2_ps(_mm512_sub_ps(_mm512_load_ps(&scores[2 * j][16 * w]), block_max[w]));
        const __m512 p1 = exp2_ps(_mm512_sub_ps(_mm512_load_ps(&scores[2 * j + 1][16 * w]), block_max[w]));
        even[w] = _mm512_add_ps(even[w], p0);
        odd[w] = _mm512_add_ps(odd[w], p1);
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // keys 2j | 2j + 1
        _mm512_store_si512(&p_pairs[j][16 * w], _mm512_permutexvar_epi16(mix_halves, both));
      }
    }
    for (int64_t w = 0; w < kVecs; ++w)
      row_sum[w] = _mm512_fmadd_ps(row_sum[w], rescale[w], _mm512_add_ps(even[w], odd[w]));
    for (int64_t j = 0; j < pairs; ++j) {
      for (int64_t c = 0; c < kHeadDim; c += 32) {
        const __m512i a0 = _mm512_loadu_si512(v_rows[2 * j] + c);
        const __m512i a1 = _mm512_loadu_si512(v_rows[2 * j + 1] + c);
        _mm512_store_si512(&v_pairs[j][c], _mm512_permutex2var_epi16(a0, mix_lo, a1));
        _mm512_store_si512(&v_pairs[j][c + 16], _mm512_permutex2var_epi16(a0, mix_hi, a1));
      }
    }
    for (int64_t d0 = 0; d0 < kHeadDim; d0 += kChunk) {
      __m512 acc[kVecs][kChunk];
      for (int64_t i = 0; i < kChunk; ++i)
        for (int64_t w = 0; w < kVecs; ++w) {
          acc[w][i] = _mm512_load_ps(&ot[d0 + i][16 * w]);
          if (rescaled) acc[w][i] = _mm512_mul_ps(acc[w][i], rescale[w]);
        }
      for (int64_t j = 0; j < pairs; ++j) {
        __m512bh pv[kVecs];
        for (int64_t w = 0; w < kVecs; ++w) pv[w] = (__m512bh)_mm512_load_si512(&p_pairs[j][16 * w]);
        for (int64_t i = 0; i < kChunk; ++i) {
          const __m512bh vv = (__m512bh)_mm512_set1_epi32(static_cast<int>(v_pairs[j][d0 + i]));
          for (int64_t w = 0; w < kVecs; ++w) acc[w][i] = _mm512_dpbf16_ps(acc[w][i], pv[w], vv);
        }
      }
      for (int64_t i = 0; i < kChunk; ++i)
        for (int64_t w = 0; w < kVecs; ++w) _mm512_store_ps(&ot[d0 + i][16 * w], acc[w][i]);
    }
  }
  alignas(64) float inv[kLanes];
  for (int64_t w = 0; w < kVecs; ++w)
    _mm512_store_ps(inv + 16 * w, _mm512_div_ps(_mm512_set1_ps(1.f), row_sum[w]));
  for (int64_t r = 0; r < rows; ++r) {
    at::BFloat16* o = out + (tile.token + r / group) * a.heads * kHeadDim + (r % group) * kHeadDim;
    for (int64_t d = 0; d < kHeadDim; ++d) o[d] = static_cast<at::BFloat16>(ot[d][r] * inv[r]);
  }
}
#endif

template <typename T>
using TileKernel = void (*)(const T*, const T*, const T*, T*, const int32_t*, const Tile&, const TileArgs&);

// The tile kernels by the number of row vectors a tile needs, so a short tile (a chunk's end, or a short
// chunk) computes at most one vector of padding rows.
template <typename T>
struct TileKernels {
  int64_t width;                                          // rows per vector
  std::array<TileKernel<T>, kTileRows / 8> by_vecs = {};  // [vectors - 1]
};

template <typename T, int64_t kHeadDim, int64_t... kVecs>
TileKernels<T> generic_kernels(std::integer_sequence<int64_t, kVecs...>) {
  return {kVecWidth, {tile_generic<T, kHeadDim, kVecs + 1>...}};
}

template <typename T>
TileKernels<T> tile_kernels(int64_t head_dim) {
  constexpr auto vecs = std::make_integer_sequence<int64_t, kTileRows / kVecWidth>{};
  if (head_dim == 64) return generic_kernels<T, 64>(vecs);
  if (head_dim == 128) return generic_kernels<T, 128>(vecs);
  return generic_kernels<T, 0>(vecs);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
template <int64_t kHeadDim, int64_t... kVecs>
TileKernels<at::BFloat16> bf16_kernels(std::integer_sequence<int64_t, kVecs...>) {
  return {16, {tile_bf16<kHeadDim, kVecs + 1>...}};
}

template <>
TileKernels<at::BFloat16> tile_kernels(int64_t head_dim) {
  constexpr auto vecs = std::make_integer_sequence<int64_t, kTileRows / 16>{};
  if (head_dim == 64) return bf16_kernels<64>(vecs);
  if (head_dim == 128) return bf16_kernels<128>(vecs);
  return generic_kernels<at::BFloat16, 0>(std::make_integer_sequence<int64_t, kTileRows / kVecWidth>{});
}
#endif

template <typename T>
void run_prefill(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                 const int32_t* tables, int64_t table_width, const int32_t* starts, const int32_t* contexts,
                 int64_t num_seqs, int64_t block_shift, int64_t min_tile_tokens, torch::Tensor& out,
                 float scale) {
  const int64_t heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = cache_k.size(1), group = heads / kv_heads;
  const TileArgs args{group,       head_dim,         heads, q.stride(0), q.stride(1), cache_k.stride(2),
                      block_shift, cache_k.stride(0), scale};
  const TileKernels<T> tile_kernel = tile_kernels<T>(head_dim);
  auto token_kernel = head_dim == 64    ? attend_one<T, 64>
                      : head_dim == 128 ? attend_one<T, 128>
                                        : attend_one<T, 0>;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (group <= kMaxFastGroup && head_dim == 64) token_kernel = attend_bf16<64>;
    if (group <= kMaxFastGroup && head_dim == 128) token_kernel = attend_bf16<128>;
  }
#endif
  // Chunks of at least min_tile_tokens are cut into tiles; shorter ones (decodes) go token by token.
  // Work is queued by (sequence, kv head), the costliest first, each one's tiles from the last (the
  // costliest) down: a thread taking the next item when it is free mostly stays on one head, whose
  // keys and values then stay in its L2, and the queue ends with small items that even out the threads.
  const int64_t tile_tokens = std::max<int64_t>(1, kTileRows / group);
  std::vector<int64_t> order(num_seqs);
  std::vector<int64_t> seq_cost(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t query_len = starts[s + 1] - starts[s];
    order[s] = s;
    seq_cost[s] = query_len * (2 * contexts[s] - query_len + 1);  // query x key pairs, times 2
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return seq_cost[x] > seq_cost[y]; });
  std::vector<Tile> work;
  for (const int64_t s : order) {
    const int64_t query_len = starts[s + 1] - starts[s], first = contexts[s] - query_len;
    const bool tiled = query_len >= min_tile_tokens;
    const int64_t step = tiled ? tile_tokens : 1;
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t i = (query_len - 1) / step * step; i >= 0; i -= step) {
        const int64_t tokens = std::min(step, query_len - i);
        work.push_back({s, h, starts[s] + i, tokens, first + i, tiled});
      }
    }
  }
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
        const int32_t* table = tables + tile.seq * table_width;
        const T* q_head = q_ptr + tile.head * group * q.stride(1);
        const T* k_head = k_ptr + tile.head * cache_k.stride(1);
        const T* v_head = v_ptr + tile.head * cache_v.stride(1);
        T* out_head = out_ptr + tile.head * group * head_dim;
        if (tile.tiled) {
          const int64_t vecs = (tile.tokens * group + tile_kernel.width - 1) / tile_kernel.width;
          tile_kernel.by_vecs[vecs - 1](q_head, k_head, v_head, out_head, table, tile, args);
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

// The checks both entry points share: ranks, layouts, dtypes, the kernels' limits and the block table.
void check_cache_inputs(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                        const torch::Tensor& block_tables) {
  TORCH_CHECK(q.dim() == 3 && cache_k.dim() == 4 && cache_v.sizes() == cache_k.sizes(), "bad ranks or shapes");
  TORCH_CHECK(cache_k.strides() == cache_v.strides(), "cache_k and cache_v must share a layout");
  TORCH_CHECK(q.stride(2) == 1 && cache_k.stride(3) == 1, "head_dim must be the contiguous dimension");
  TORCH_CHECK(q.scalar_type() == cache_k.scalar_type() && q.scalar_type() == cache_v.scalar_type(),
              "q and the cache must share a dtype");
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = cache_k.size(1);
  const int64_t block_size = cache_k.size(2);
  TORCH_CHECK(kv_heads > 0 && cache_k.size(3) == head_dim && heads % kv_heads == 0,
              "heads must be a multiple of kv_heads");
  TORCH_CHECK(heads / kv_heads <= kMaxGroup && head_dim <= kMaxHeadDim, "group or head_dim too large");
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, "block_size must be a power of two");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kInt32, "block_tables: [S, N] int32");
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
  check_cache_inputs(q, cache_k, cache_v, block_tables);
  const int64_t heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = cache_k.size(0), block_size = cache_k.size(2);
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
  check_cache_inputs(q, cache_k, cache_v, block_tables);
  const int64_t heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = cache_k.size(0), block_size = cache_k.size(2);
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
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "Attention by sequence over a paged KV cache, chunks in query tiles (CPU)", py::arg("q"),
        py::arg("cache_k"), py::arg("cache_v"), py::arg("block_tables"), py::arg("query_start"),
        py::arg("context_lens"), py::arg("scale"), py::arg("min_tile_tokens") = 1);
  m.def("bf16_fast_path", &bf16_fast_path, "True when bf16 runs on the AVX-512 BF16 path");
}
