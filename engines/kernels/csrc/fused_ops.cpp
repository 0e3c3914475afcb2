// Fused element-wise ops of a Llama decoder layer on CPU, each one pass over memory instead of several
// torch ops (and their dispatch and thread fork/join): RMSNorm with the residual add, and rotary
// embedding with the KV-cache write, silu(gate) * up, and greedy decoding's argmax. Rounding follows the
// torch references in
// engines/kernels/ops.py:TorchOps step by step (compute in float32, round to the tensor dtype where
// torch would), so bf16 results match them bit for bit up to the order of the RMS sum and, in
// silu_mul, an exp within an ulp of torch's.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <algorithm>
#include <initializer_list>
#include <tuple>

namespace {

template <typename T>
inline T round_to(float value) {
  return static_cast<T>(value);
}

int64_t grain_rows(int64_t row_elements) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elements, 1)); }

template <typename T>
void rms_norm_rows(const T* x, const T* residual, const T* weight, T* out, T* h_out, int64_t rows, int64_t hidden,
                   int64_t x_stride, float eps) {
  at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      for (int64_t i = 0; i < hidden; ++i) {
        // h = x + residual, rounded to T as torch's add would
        h[i] = residual ? static_cast<float>(round_to<T>(static_cast<float>(xr[i]) +
                                                         static_cast<float>(residual[r * hidden + i])))
                        : static_cast<float>(xr[i]);
      }
      float lanes[16] = {};  // 16 independent partial sums: vectorises without -ffast-math
      int64_t i = 0;
      for (; i + 16 <= hidden; i += 16)
        for (int64_t j = 0; j < 16; ++j) lanes[j] += h[i + j] * h[i + j];
      float sum = 0.f;
      for (; i < hidden; ++i) sum += h[i] * h[i];
      for (int64_t j = 0; j < 16; ++j) sum += lanes[j];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
      for (int64_t i = 0; i < hidden; ++i) {
        const float normed = static_cast<float>(round_to<T>(h[i] * inv));  // .to(dtype)
        out[r * hidden + i] = round_to<T>(static_cast<float>(weight[i]) * normed);
        if (h_out) h_out[r * hidden + i] = round_to<T>(h[i]);
      }
    }
  });
}

template <typename T>
inline float rotate(const T* x, const T* cos, const T* sin, int64_t d, int64_t half) {
  // HF: x * cos + rotate_half(x) * sin, each product and the sum rounded to T
  const float rotated = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
  const float a = static_cast<float>(round_to<T>(static_cast<float>(x[d]) * static_cast<float>(cos[d])));
  const float b = static_cast<float>(round_to<T>(rotated * static_cast<float>(sin[d])));
  return a + b;
}

template <typename T>
void rope_cache_rows(const T* qkv, const T* cos, const T* sin, const int64_t* positions, const int64_t* slots,
                     T* q_out, T* cache_k, T* cache_v, int64_t tokens, int64_t heads, int64_t kv_heads,
                     int64_t head_dim, int64_t qkv_stride, const int64_t* cache_strides) {
  const int64_t half = head_dim / 2;
  at::parallel_for(0, tokens, grain_rows((heads + 2 * kv_heads) * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = qkv + t * qkv_stride;
      const T* c = cos + t * head_dim;
      const T* s = sin + t * head_dim;
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < head_dim; ++d)
          q_out[(t * heads + h) * head_dim + d] = round_to<T>(rotate(row + h * head_dim, c, s, d, half));
      const int64_t base = slots[t] * cache_strides[0] + positions[t] * cache_strides[2];
      for (int64_t h = 0; h < kv_heads; ++h) {
        const T* k = row + (heads + h) * head_dim;
        const T* v = row + (heads + kv_heads + h) * head_dim;
        T* k_dst = cache_k + base + h * cache_strides[1];
        T* v_dst = cache_v + base + h * cache_strides[1];
        for (int64_t d = 0; d < head_dim; ++d) {
          k_dst[d] = round_to<T>(rotate(k, c, s, d, half));
          v_dst[d] = v[d];
        }
      }
    }
  });
}

#define LMI_DISPATCH(dtype, NAME, ...)                                                   \
  switch (dtype) {                                                                       \
    case torch::kFloat: { using scalar_t = float; __VA_ARGS__; break; }                  \
    case torch::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__; break; }        \
    case torch::kHalf: { using scalar_t = at::Half; __VA_ARGS__; break; }                \
    default: TORCH_CHECK(false, NAME " supports float32, bfloat16 and float16");         \
  }

void check_cpu(std::initializer_list<const torch::Tensor*> tensors) {
  for (const auto* t : tensors) TORCH_CHECK(t->device().is_cpu(), "fused ops run on CPU tensors");
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1, name, " must be a CPU [rows, n] tensor with contiguous rows");
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr bool kVectorSiluMul = true;  // for bf16 and fp16

// exp(x) of 16 floats within about 1 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, then
// 2^n by vscalefps, which gives inf past 88.7 and 0 below -104 as expf does). torch's silu uses Sleef's
// 1-ulp expf: the two can differ in the last float bit, which moves a bf16 rounding about once in 2^15.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

template <typename T>
inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}

// Rounds 16 floats to T as c10's conversions do (nearest, ties to even; bf16 keeps subnormals and NaN).
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    rounded = _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
    return _mm512_castsi512_ps(rounded);
  } else {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <typename T>
inline void store16(T* p, __m512 v, __mmask16 m) {  // v already holds T's values: exact
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512i high = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(high));
  } else {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// out = silu(gate) * up per row of gate_up [T, 2I] for 16-bit T, as torch rounds it: silu in float32
// rounded to T, then the product in float32 rounded to T.
template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t inter, int64_t stride) {
  at::parallel_for(0, rows, grain_rows(2 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * stride;
      const T* up = gate + inter;
      T* o = out + r * inter;
      for (int64_t i = 0; i < inter; i += 16) {
        const __mmask16 m = inter - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (inter - i)) - 1);
        const __m512 g = load16(gate + i, m);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 silu = round16<T>(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
        store16(o + i, round16<T>(_mm512_mul_ps(silu, load16(up + i, m))), m);
      }
    }
  });
}
#else
constexpr bool kVectorSiluMul = false;  // torch's own vectorised silu and mul serve (below)
#endif

}  // namespace

// x [T, H] (rows may be strided), weight [H]; with residual [T, H]: returns (norm(x + residual), x + residual).
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                    const c10::optional<torch::Tensor>& residual) {
  check_rows(x, "x");
  check_cpu({&weight});
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.numel() == hidden && weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "weight must be [hidden] in x's dtype");
  torch::Tensor res;
  if (residual.has_value()) {
    res = residual->contiguous();
    check_cpu({&res});
    TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(), "residual must match x");
  }
  auto out = torch::empty({rows, hidden}, x.options());
  auto h = residual.has_value() ? torch::empty({rows, hidden}, x.options()) : torch::Tensor();
  LMI_DISPATCH(x.scalar_type(), "rms_norm",
               rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
                                       weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                       h.defined() ? h.data_ptr<scalar_t>() : nullptr, rows, hidden, x.stride(0),
                                       static_cast<float>(eps)));
  if (h.defined()) return {out, h};
  return {out};
}

// qkv [T, (heads + 2 kv_heads) * head_dim]; cos/sin [T, head_dim] (each token's rows of the rope
// tables); positions, slots [T] int64;
// cache_k/cache_v [slots, kv_heads, max_len, head_dim]. Returns rotated q [T, heads, head_dim] and writes
// rotated k and v at (slot, :, position) of the caches.
torch::Tensor rope_and_cache(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                             const torch::Tensor& positions, const torch::Tensor& slots, int64_t heads,
                             int64_t kv_heads, torch::Tensor& cache_k, torch::Tensor& cache_v) {
  check_rows(qkv, "qkv");
  check_cpu({&cos, &sin, &positions, &slots, &cache_k, &cache_v});
  TORCH_CHECK(cache_k.dim() == 4 && cache_v.sizes() == cache_k.sizes(), "cache_k and cache_v must be equal 4-d tensors");
  const int64_t tokens = qkv.size(0), head_dim = cache_k.size(3);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * head_dim, "qkv width does not match the heads");
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                  cos.size(0) == tokens && cos.size(1) == head_dim && head_dim % 2 == 0 &&
                  sin.scalar_type() == cos.scalar_type(),
              "cos and sin must be [T, head_dim], one row per token");
  TORCH_CHECK(cache_k.strides() == cache_v.strides() && cache_k.stride(3) == 1 && cache_k.size(1) == kv_heads,
              "bad cache layout");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && slots.scalar_type() == torch::kInt64 &&
                  positions.numel() == tokens && slots.numel() == tokens,
              "positions and slots must be [T] int64");
  TORCH_CHECK(qkv.scalar_type() == cache_k.scalar_type() && qkv.scalar_type() == cos.scalar_type(),
              "qkv, rope tables and cache must share a dtype");
  auto pos = positions.contiguous();
  auto slot = slots.contiguous();
  const int64_t* pos_ptr = pos.data_ptr<int64_t>();
  const int64_t* slot_ptr = slot.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(pos_ptr[t] >= 0 && pos_ptr[t] < cache_k.size(2), "position out of range");
    TORCH_CHECK(slot_ptr[t] >= 0 && slot_ptr[t] < cache_k.size(0), "slot out of range");
  }
  auto q = torch::empty({tokens, heads, head_dim}, qkv.options());
  const int64_t strides[3] = {cache_k.stride(0), cache_k.stride(1), cache_k.stride(2)};
  LMI_DISPATCH(qkv.scalar_type(), "rope_and_cache",
               rope_cache_rows<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                                         pos_ptr, slot_ptr, q.data_ptr<scalar_t>(), cache_k.data_ptr<scalar_t>(),
                                         cache_v.data_ptr<scalar_t>(), tokens, heads, kv_heads, head_dim, qkv.stride(0),
                                         strides));
  return q;
}

// gate_up [T, 2I] (rows may be strided) -> silu(gate) * up [T, I]: one pass and one call in place of
// torch's chunk, silu and mul (three dispatches, an intermediate: 14 against 2 us per decode layer here).
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const auto dtype = gate_up.scalar_type();
  if (dtype == torch::kBFloat16 || dtype == torch::kHalf) {
    auto out = torch::empty({rows, inter}, gate_up.options());
    LMI_DISPATCH(dtype, "silu_mul",
                 silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, inter,
                                         gate_up.stride(0)));
    return out;
  }
#endif
  // float32 (where an ulp of exp would show in every output) and CPUs without AVX-512: torch's own kernels
  return at::silu(gate_up.narrow(1, 0, inter)).mul_(gate_up.narrow(1, inter, inter));
}

// logits [rows, n] float32 -> [rows] int64: torch.argmax(logits, -1), the first index of each row's largest
// value, a NaN counting as larger than any number (torch's rule). torch's CPU argmax is a scalar reduction
// with indices (86 us for one 49,152-token row on 2 cores, 340 us for 8 rows); here two passes a compiler
// vectorises: the largest value in 16 lanes, then its first index (a few us).
torch::Tensor argmax_rows(const torch::Tensor& logits) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat, "logits must be float32");
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(n > 0, "logits must have at least one column");
  auto out = torch::empty({rows}, logits.options().dtype(torch::kInt64));
  const float* data = logits.data_ptr<float>();
  int64_t* picked = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = data + r * stride;
      float lanes[16];
      bool nan = false;
      std::fill(lanes, lanes + 16, -INFINITY);
      int64_t i = 0;
      for (; i + 16 <= n; i += 16)
        for (int64_t j = 0; j < 16; ++j) {
          const float v = row[i + j];
          lanes[j] = v > lanes[j] ? v : lanes[j];
          nan |= v != v;
        }
      float best = -INFINITY;
      for (; i < n; ++i) {
        best = row[i] > best ? row[i] : best;
        nan |= row[i] != row[i];
      }
      for (float lane : lanes) best = lane > best ? lane : best;
      int64_t index = 0;
      if (nan) {
        while (row[index] == row[index]) ++index;
      } else {
        while (row[index] != best) ++index;
      }
      picked[r] = index;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("silu_mul", &silu_mul, "silu(gate) * up of gate_up [T, 2I] (CPU)");
  m.def("has_vector_silu_mul", [] { return kVectorSiluMul; }, "whether silu_mul has its AVX-512 loop");
  m.def("argmax_rows", &argmax_rows, "torch.argmax(logits, -1) of float32 [rows, n] logits (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally fused with the residual add (CPU)");
  m.def("rope_and_cache", &rope_and_cache, "Rotary embedding of q and k, k and v written into the KV cache (CPU)");
}
