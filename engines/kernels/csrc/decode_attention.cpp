// Decode attention over a slot KV cache on CPU: one new query token per sequence, GQA-aware.
//
// Each (sequence, kv head) pair is one work item: the query heads sharing that kv head are processed
// together so every K/V row is read from memory once, and each sequence reads only its own kv_len rows
// (no padding to the longest sequence, unlike a masked SDPA call). Keys are taken in blocks: scores for
// the whole block first, then one online-softmax rescale per block, then the V accumulation, which keeps
// the loops free of serial dependencies so the compiler vectorises them. Accumulation is in float32.
// The plain-torch reference is engines/kernels/decode_attention.py:decode_attention_reference.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

constexpr int64_t kMaxGroup = 16;
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kBlock = 32;

struct Item {
  int64_t group;
  int64_t head_dim;
  int64_t kv_len;
  int64_t q_head_stride;
  int64_t kv_row_stride;
  float scale;
};

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
    row_max[g] = -std::numeric_limits<float>::infinity();
    row_sum[g] = 0.f;
  }
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(T));
  // Rows of one (slot, head) are contiguous but a single stream per thread leaves DRAM idle between
  // blocks; prefetching the block after next keeps enough loads in flight (2.5x on 2 cores).
  auto prefetch_block = [&](int64_t first) {
    const int64_t last = std::min(first + kBlock, item.kv_len);
    for (int64_t t = first; t < last; ++t) {
      const char* k_row = reinterpret_cast<const char*>(k + t * item.kv_row_stride);
      const char* v_row = reinterpret_cast<const char*>(v + t * item.kv_row_stride);
      for (int64_t offset = 0; offset < row_bytes; offset += 64) {
        __builtin_prefetch(k_row + offset, 0, 0);
        __builtin_prefetch(v_row + offset, 0, 0);
      }
    }
  };
  prefetch_block(0);
  prefetch_block(kBlock);
  for (int64_t t0 = 0; t0 < item.kv_len; t0 += kBlock) {
    const int64_t n = std::min(kBlock, item.kv_len - t0);
    prefetch_block(t0 + 2 * kBlock);
    for (int64_t t = 0; t < n; ++t) {
      const T* k_row = k + (t0 + t) * item.kv_row_stride;
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
      const T* v_row = v + (t0 + t) * item.kv_row_stride;
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

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
         const int64_t* slots, const int64_t* kv_lens, torch::Tensor& out, float scale) {
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = cache_k.size(1), group = heads / kv_heads;
  auto kernel = head_dim == 64 ? attend_one<T, 64> : head_dim == 128 ? attend_one<T, 128> : attend_one<T, 0>;
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
        const Item item{group, head_dim, kv_lens[b], q.stride(1), cache_k.stride(2), scale};
        kernel(q_ptr + b * q.stride(0) + h * group * q.stride(1),
               k_ptr + slots[b] * cache_k.stride(0) + h * cache_k.stride(1),
               v_ptr + slots[b] * cache_v.stride(0) + h * cache_v.stride(1),
               out_ptr + (b * heads + h * group) * head_dim, item);
      }
    }
  });
}

}  // namespace

// q [B, heads, head_dim]; cache_k, cache_v [slots, kv_heads, max_len, head_dim]; slots, kv_lens [B] int64.
// Returns [B, heads, head_dim]: sequence b's query attends positions [0, kv_lens[b]) of slot slots[b].
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                               const torch::Tensor& slots, const torch::Tensor& kv_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && cache_k.device().is_cpu(), "decode_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && cache_k.dim() == 4 && cache_v.sizes() == cache_k.sizes(), "bad ranks or shapes");
  TORCH_CHECK(cache_k.strides() == cache_v.strides(), "cache_k and cache_v must share a layout");
  TORCH_CHECK(q.stride(2) == 1 && cache_k.stride(3) == 1, "head_dim must be the contiguous dimension");
  TORCH_CHECK(q.scalar_type() == cache_k.scalar_type() && q.scalar_type() == cache_v.scalar_type(),
              "q and the cache must share a dtype");
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = cache_k.size(1);
  TORCH_CHECK(cache_k.size(3) == head_dim && heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(heads / kv_heads <= kMaxGroup && head_dim <= kMaxHeadDim, "group or head_dim too large");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && kv_lens.scalar_type() == torch::kInt64, "int64 indices");
  TORCH_CHECK(slots.numel() == q.size(0) && kv_lens.numel() == q.size(0), "one slot and kv_len per query");
  auto slots_c = slots.contiguous();
  auto lens_c = kv_lens.contiguous();
  const int64_t* slot_ptr = slots_c.data_ptr<int64_t>();
  const int64_t* len_ptr = lens_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(slot_ptr[b] >= 0 && slot_ptr[b] < cache_k.size(0), "slot out of range");
    TORCH_CHECK(len_ptr[b] >= 1 && len_ptr[b] <= cache_k.size(2), "kv_len out of range");
  }
  auto out = torch::empty({q.size(0), heads, head_dim}, q.options());
  const float fscale = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case torch::kFloat: run<float>(q, cache_k, cache_v, slot_ptr, len_ptr, out, fscale); break;
    case torch::kBFloat16: run<at::BFloat16>(q, cache_k, cache_v, slot_ptr, len_ptr, out, fscale); break;
    case torch::kHalf: run<at::Half>(q, cache_k, cache_v, slot_ptr, len_ptr, out, fscale); break;
    default: TORCH_CHECK(false, "decode_attention supports float32, bfloat16 and float16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Decode attention over a slot KV cache (CPU)");
}
