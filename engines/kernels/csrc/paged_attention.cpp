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
#include <cmath>
#include <cstdint>
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
  m.def("bf16_fast_path", &bf16_fast_path, "True when bf16 runs on the AVX-512 BF16 path");
}
