// One-token MoE decode on CPU (AVX-512): the routed experts' two projections as gathered GEMVs
// that stream only the k selected experts' weights, with the clamped SwiGLU and the routing
// weights in between and float32 accumulation throughout.
//
//   h[s, :]  = gate_up[e_s] @ x                      (s over the valid slots, [2I])
//   a[s, :]  = silu(min(h[s, :I], L)) * clamp(h[s, I:], -L, L) * w_s
//   y        = sum_s down[e_s] @ a[s, :]              ([H])
//
// Weights are bf16 or fp32 ([E, 2I, H] and [E, H, I], contiguous); bf16 is widened to fp32 by a
// shift (exact). Slots whose expert id is outside [0, E) are skipped.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }

// acc += w[0:n] . v[0:n] in four independent vector accumulators (memory-bound on w); the scalar
// tail goes to `tail`. Callers reduce once per output, however many rows they accumulate.
template <typename T>
inline void dot_acc(const T* w, const float* v, int64_t n, __m512 (&acc)[4], float& tail) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    acc[0] = _mm512_fmadd_ps(load16(w + j), load16(v + j), acc[0]);
    acc[1] = _mm512_fmadd_ps(load16(w + j + 16), load16(v + j + 16), acc[1]);
    acc[2] = _mm512_fmadd_ps(load16(w + j + 32), load16(v + j + 32), acc[2]);
    acc[3] = _mm512_fmadd_ps(load16(w + j + 48), load16(v + j + 48), acc[3]);
  }
  for (; j + 16 <= n; j += 16) acc[0] = _mm512_fmadd_ps(load16(w + j), load16(v + j), acc[0]);
  for (; j < n; ++j) tail += load1(w + j) * v[j];
}

inline float reduce(const __m512 (&acc)[4], float tail) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) + tail;
}

template <typename T>
inline float dot(const T* w, const float* v, int64_t n) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  float tail = 0.0f;
  dot_acc(w, v, n, acc, tail);
  return reduce(acc, tail);
}

template <typename T>
void decode(const T* gate_up, const T* down, const float* x, const std::vector<int64_t>& experts,
            const std::vector<float>& weights, int64_t hidden, int64_t inter, float limit, float* y) {
  const int64_t slots = static_cast<int64_t>(experts.size());
  std::vector<float> h(slots * 2 * inter);
  // gate/up: one dot product per (slot, output row); rows of one expert are contiguous
  at::parallel_for(0, slots * 2 * inter, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s = r / (2 * inter), n = r % (2 * inter);
      h[r] = dot(gate_up + (experts[s] * 2 * inter + n) * hidden, x, hidden);
    }
  });
  std::vector<float> a(slots * inter);
  for (int64_t s = 0; s < slots; ++s) {
    for (int64_t i = 0; i < inter; ++i) {
      const float g = std::min(h[s * 2 * inter + i], limit);
      const float u = std::min(std::max(h[s * 2 * inter + inter + i], -limit), limit);
      a[s * inter + i] = g / (1.0f + std::exp(-g)) * u * weights[s];
    }
  }
  // down: output row n reads row n of every selected expert
  at::parallel_for(0, hidden, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      float tail = 0.0f;
      for (int64_t s = 0; s < slots; ++s) dot_acc(down + (experts[s] * hidden + n) * inter, a.data() + s * inter, inter, acc, tail);
      y[n] = reduce(acc, tail);
    }
  });
}

}  // namespace

// x [1, H] or [H] (float32 / bfloat16 / float16), top_k_index [1, k] (integer), top_k_weights [1, k]
// (floating) -> y shaped and typed like x. Conversions happen here so the Python side does none.
torch::Tensor moe_decode(torch::Tensor gate_up, torch::Tensor down, torch::Tensor x, torch::Tensor top_k_index,
                         torch::Tensor top_k_weights, double limit) {
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3, "gate_up and down must be [E, 2I, H] and [E, H, I]");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "expert weights must be contiguous");
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type(), "gate_up and down must share a dtype");
  const int64_t num_experts = gate_up.size(0), hidden = gate_up.size(2), inter = down.size(2);
  TORCH_CHECK(gate_up.size(1) == 2 * inter && down.size(0) == num_experts && down.size(1) == hidden,
              "expert shapes do not match: gate_up ", gate_up.sizes(), ", down ", down.sizes());
  TORCH_CHECK(x.numel() == hidden, "x must hold one token of ", hidden, " values, got shape ", x.sizes());
  TORCH_CHECK(top_k_index.numel() == top_k_weights.numel(), "top_k_index and top_k_weights differ in size");
  TORCH_CHECK(x.device().is_cpu() && gate_up.device().is_cpu(), "moe_decode runs on CPU tensors");
  TORCH_CHECK(x.is_contiguous() && top_k_index.is_contiguous() && top_k_weights.is_contiguous(),
              "x, top_k_index and top_k_weights must be contiguous");
  // plain loops instead of ATen conversions: at one token every op dispatch shows in the latency
  std::vector<float> xf(hidden);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_decode_x", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    for (int64_t j = 0; j < hidden; ++j) xf[j] = static_cast<float>(p[j]);
  });
  std::vector<int64_t> experts;
  std::vector<float> weights;
  const int64_t k = top_k_index.numel();
  std::vector<float> wk(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, top_k_weights.scalar_type(), "moe_decode_w", [&] {
    const scalar_t* p = top_k_weights.data_ptr<scalar_t>();
    for (int64_t s = 0; s < k; ++s) wk[s] = static_cast<float>(p[s]);
  });
  AT_DISPATCH_INTEGRAL_TYPES(top_k_index.scalar_type(), "moe_decode_idx", [&] {
    const scalar_t* p = top_k_index.data_ptr<scalar_t>();
    for (int64_t s = 0; s < k; ++s) {
      const int64_t e = static_cast<int64_t>(p[s]);
      if (e >= 0 && e < num_experts) {
        experts.push_back(e);
        weights.push_back(wk[s]);
      }
    }
  });
  std::vector<float> yf(hidden, 0.0f);
  const float lim = static_cast<float>(limit);
  if (!experts.empty()) {
    if (gate_up.scalar_type() == torch::kBFloat16) {
      decode(gate_up.data_ptr<at::BFloat16>(), down.data_ptr<at::BFloat16>(), xf.data(), experts, weights, hidden,
             inter, lim, yf.data());
    } else {
      TORCH_CHECK(gate_up.scalar_type() == torch::kFloat32, "expert weights must be bfloat16 or float32, got ",
                  gate_up.scalar_type());
      decode(gate_up.data_ptr<float>(), down.data_ptr<float>(), xf.data(), experts, weights, hidden, inter, lim,
             yf.data());
    }
  }
  auto y = torch::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_decode_y", [&] {
    scalar_t* p = y.data_ptr<scalar_t>();
    for (int64_t j = 0; j < hidden; ++j) p[j] = static_cast<scalar_t>(yf[j]);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_decode", &moe_decode, "one-token routed-expert decode (AVX-512, float32 accumulation)");
}
