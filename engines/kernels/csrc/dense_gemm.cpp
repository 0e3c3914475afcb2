// y = x @ W.T (+ bias) for few activation rows, reading W [n, k] as it lies in the checkpoint.
//
// oneDNN wants its weights re-laid-out once ("packed") to be fast at small batches: F.linear on the
// plain layout took twice as long for one row (bf16, this CPU). That reorder costs about a second per
// GiB on one core at every start, and its layout cannot be stored. This kernel reads the plain
// row-major layout at memory speed instead, so a weight can be used where it was loaded (a mapped
// partition file included) with no copy. Above a few rows the work is compute-bound and torch's
// F.linear on the plain layout matches the packed one; engines/llama/linear.py picks by row count.
//
// Each output is one weight row's dot product with one activation row: bf16 through AVX-512 BF16's
// vdpbf16ps (32 products per instruction, float sums), float32 through fused multiply-adds. Four
// weight rows x up to four activation rows share their loads; a lone activation row walks one weight
// row at a time with four independent sums (one sum's chain of dependent adds would bound the loop by
// the instruction's latency, not by memory), prefetching 8 KiB ahead as the hardware prefetcher stops
// at every 4 KiB page. The reference is F.linear (engines/llama/linear.py:dense_reference).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LMI_DENSE 1
#else
#define LMI_DENSE 0
#endif

namespace {

#if LMI_DENSE
constexpr int64_t kPrefetchBytes = 8192;
constexpr int64_t kRowsPerTask = 64;  // weight rows per parallel task: whole pages of a row-major stream

// Per dtype: how to load up to one vector of elements (masked past `count`) and multiply-add two
// vectors into 16 lanes of float partial sums.
struct Bf16 {
  using T = at::BFloat16;
  static constexpr int64_t kStep = 32;  // elements per instruction
  static inline __m512i load(const T* p, int64_t count) {
    return count >= kStep ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << count) - 1), p);
  }
  static inline __m512 dot(__m512 acc, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
  }
};

struct Fp32 {
  using T = float;
  static constexpr int64_t kStep = 16;
  static inline __m512i load(const T* p, int64_t count) {
    return _mm512_castps_si512(count >= kStep ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), p));
  }
  static inline __m512 dot(__m512 acc, __m512i w, __m512i x) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(w), _mm512_castsi512_ps(x), acc);
  }
};

// One output: the float sum plus the bias, rounded once to T (as F.linear rounds).
template <typename T>
inline void store(T* out, int64_t at, float sum, const T* bias, int64_t r) {
  out[at] = static_cast<T>(bias ? sum + static_cast<float>(bias[r]) : sum);
}

// One activation row against weight rows [n0, n1): four partial sums per row, 8 KiB prefetch.
template <typename D>
void gemv(const typename D::T* w, const typename D::T* x, int64_t k, int64_t n0, int64_t n1, int64_t n,
          const typename D::T* bias, typename D::T* out) {
  constexpr int64_t S = D::kStep;
  const int64_t row_bytes = k * static_cast<int64_t>(sizeof(typename D::T));
  const int64_t end_bytes = n * row_bytes;
  const char* base = reinterpret_cast<const char*>(w);
  for (int64_t r = n0; r < n1; ++r) {
    const typename D::T* row = w + r * k;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t c = 0;
    for (; c + 4 * S <= k; c += 4 * S) {
      const int64_t ahead = r * row_bytes + c * static_cast<int64_t>(sizeof(typename D::T)) + kPrefetchBytes;
      for (int64_t line = 0; line < 4 * 64; line += 64)  // this step's 256 bytes, 8 KiB on
        if (ahead + line < end_bytes) _mm_prefetch(base + ahead + line, _MM_HINT_T0);
      for (int u = 0; u < 4; ++u)
        acc[u] = D::dot(acc[u], D::load(row + c + u * S, S), D::load(x + c + u * S, S));
    }
    for (int u = 0; c < k; c += S, u = (u + 1) % 4) {
      const int64_t count = std::min(S, k - c);
      acc[u] = D::dot(acc[u], D::load(row + c, count), D::load(x + c, count));
    }
    store(out, r, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))),
          bias, r);
  }
}

// The 16 sums of a 4x4 block at once: lane 4j + i of the result is the sum of acc[i][j]'s lanes.
// Reducing each vector alone took 8 dependent shuffles and adds, a third of a block's instructions
// at k = 576; transposing as it adds takes 45 for all 16.
inline __m512 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {  // per 128-bit lane L: the 4 vectors' L sums
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
}

inline __m512 reduce16(const __m512 (&acc)[4][4]) {
  __m512 c[4];
  for (int j = 0; j < 4; ++j) c[j] = sum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

template <typename D, int NR, int MR>
inline void block_step(const typename D::T* w, const typename D::T* x, int64_t k, int64_t count, __m512 (&acc)[NR][MR]) {
  __m512i xv[MR];
  for (int j = 0; j < MR; ++j) xv[j] = D::load(x + j * k, count);
  for (int i = 0; i < NR; ++i) {
    const __m512i wv = D::load(w + i * k, count);
    for (int j = 0; j < MR; ++j) acc[i][j] = D::dot(acc[i][j], wv, xv[j]);
  }
}

// NR weight rows x MR activation rows at a time: each weight chunk loaded once per MR rows, each
// activation chunk once per NR rows.
template <typename D, int NR, int MR>
void block(const typename D::T* w, const typename D::T* x, int64_t k, int64_t n, int64_t r, int64_t m0,
           const typename D::T* bias, typename D::T* out) {
  constexpr int64_t S = D::kStep;
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) acc[i][j] = _mm512_setzero_ps();
  const typename D::T* next = w + (r + NR) * k;  // the next block's rows, prefetched column by column
  const int64_t next_rows = std::min<int64_t>(NR, n - r - NR);
  const int64_t full = k / S * S;
  for (int64_t c = 0; c < k; c += S) {
    const int64_t count = c < full ? S : k - c;
    if (c < full) {
      for (int64_t i = 0; i < next_rows; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * k + c), _MM_HINT_T0);
      block_step<D, NR, MR>(w + r * k + c, x + m0 * k + c, k, S, acc);
    } else {
      block_step<D, NR, MR>(w + r * k + c, x + m0 * k + c, k, count, acc);
    }
  }
  if constexpr (NR == 4 && MR == 4) {
    float sums[16];
    _mm512_storeu_ps(sums, reduce16(acc));
    for (int j = 0; j < MR; ++j)
      for (int i = 0; i < NR; ++i) store(out, (m0 + j) * n + r + i, sums[j * 4 + i], bias, r + i);
  } else {
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < MR; ++j) store(out, (m0 + j) * n + r + i, _mm512_reduce_add_ps(acc[i][j]), bias, r + i);
  }
}

// Weight rows [r, r + NR) against every activation row, MR rows at a time: the group of NR weight
// rows stays in L1 while each activation block passes it.
template <typename D, int NR>
void weight_group(const typename D::T* w, const typename D::T* x, int64_t k, int64_t n, int64_t r, int64_t m,
                  const typename D::T* bias, typename D::T* out) {
  int64_t m0 = 0;
  for (; m0 + 4 <= m; m0 += 4) block<D, NR, 4>(w, x, k, n, r, m0, bias, out);
  switch (m - m0) {
    case 3: block<D, NR, 3>(w, x, k, n, r, m0, bias, out); break;
    case 2: block<D, NR, 2>(w, x, k, n, r, m0, bias, out); break;
    case 1: block<D, NR, 1>(w, x, k, n, r, m0, bias, out); break;
    default: break;
  }
}

template <typename D>
void matmul(const typename D::T* w, const typename D::T* x, int64_t m, int64_t k, int64_t n, const typename D::T* bias,
            typename D::T* out) {
  at::parallel_for(0, (n + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * kRowsPerTask, n1 = std::min(n, end * kRowsPerTask);
    if (m == 1) return gemv<D>(w, x, k, n0, n1, n, bias, out);
    int64_t r = n0;
    for (; r + 4 <= n1; r += 4) weight_group<D, 4>(w, x, k, n, r, m, bias, out);
    for (; r < n1; ++r) weight_group<D, 1>(w, x, k, n, r, m, bias, out);
  });
}
#endif

bool available() { return LMI_DENSE; }

torch::Tensor dense_mm(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(LMI_DENSE, "dense_mm needs AVX-512 BF16 (built without it)");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "x and w must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x must be [m, k] and w [n, k], got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x and w must both be bfloat16 or both float32");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "x and w must be contiguous");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type() && bias->is_contiguous() &&
                    bias->numel() == n,
                "bias must be a contiguous [", n, "] tensor of x's dtype");
  }
  auto out = torch::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
#if LMI_DENSE
  if (x.scalar_type() == at::kBFloat16) {
    using T = at::BFloat16;
    matmul<Bf16>(w.data_ptr<T>(), x.data_ptr<T>(), m, k, n, bias ? bias->data_ptr<T>() : nullptr, out.data_ptr<T>());
  } else {
    matmul<Fp32>(w.data_ptr<float>(), x.data_ptr<float>(), m, k, n, bias ? bias->data_ptr<float>() : nullptr,
                 out.data_ptr<float>());
  }
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether the kernel was built with AVX-512 BF16");
  m.def("dense_mm", &dense_mm, "x [m, k] @ w[n, k].T (+ bias) on the plain layout, float sums",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
}
