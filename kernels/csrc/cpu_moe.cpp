// Routed experts on CPU for few rows per expert (decode and small batches), AVX-512.
//
//   h[r, :]  = gate_up[e_r] @ x[t_r]                                  ([2I], r over valid slots)
//   a[r, :]  = silu(min(h[r, :I], L)) * clamp(h[r, I:], -L, L) * w_r  ([I])
//   y[t, :] += down[e_r] @ a[r, :]   for every slot r of token t        ([H], float32)
//
// Slots are grouped by expert with a counting sort, so every hit expert's weights are streamed
// from memory once per call, whatever the number of its rows: each weight vector loaded is used
// for up to 8 rows at once (register tiles of 2 weight rows x up to 8 activation rows).
// Weights are [E, 2I, H] and [E, H, I], contiguous, float32 or bfloat16. bfloat16 weights use
// VDPBF16PS (pairs of bf16 products summed in float32) when the CPU has AVX512_BF16 — the
// activations are then bf16 too, as in torch's own bf16 matmuls — else they are widened to
// float32 by a shift (exact) and multiplied with float32 activations. Accumulation is float32.
// Slots whose expert id is outside [0, E) are skipped. Both phases run in one OpenMP region (one
// wake-up of the thread pool per call: after an idle period that wake-up costs tens of µs).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr int kMaxRows = 8;   // activation rows per register tile

inline __m512 widen(__m256i raw) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)); }

// ---- dot-product policies: weight type W, activation type A, kStep elements per vector step
struct F32 {
  using W = float;
  using A = float;
  using V = __m512;
  static constexpr int kStep = 16;
  static V load_w(const W* p) { return _mm512_loadu_ps(p); }
  static V load_w(const W* p, __mmask32 m) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p); }
  static V load_a(const A* p) { return _mm512_loadu_ps(p); }
  static V load_a(const A* p, __mmask32 m) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p); }
  static __m512 madd(__m512 acc, V w, V a) { return _mm512_fmadd_ps(w, a, acc); }
};

struct Bf16Wide : F32 {  // bf16 weights widened to float32; activations, step and FMA as F32
  using W = bf16;
  static V load_w(const W* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load_w(const W* p, __mmask32 m) { return widen(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(m), p)); }
};

struct Bf16Dot {
  using W = bf16;
  using A = bf16;
  using V = __m512i;
  static constexpr int kStep = 32;
  static V load_w(const W* p) { return _mm512_loadu_si512(p); }
  static V load_w(const W* p, __mmask32 m) { return _mm512_maskz_loadu_epi16(m, p); }
  static V load_a(const A* p) { return _mm512_loadu_si512(p); }
  static V load_a(const A* p, __mmask32 m) { return _mm512_maskz_loadu_epi16(m, p); }
  static __m512 madd(__m512 acc, V w, V a) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)w); }
};

// lane j of the result = the sum of the 16 lanes of v[j]: a transposing add tree (45 shuffles and
// adds instead of 16 separate horizontal reductions, which dominate short dot products)
inline __m512 reduce16(const __m512 (&v)[16]) {
  __m512 s[8], t[4], z[2];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: the lane sums of 4 consecutive vectors
    t[j] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int j = 0; j < 2; ++j)  // add 128-bit lane pairs: [t0 L0+L1, t0 L2+L3, t1 L0+L1, t1 L2+L3]
    z[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// out[r * M + m] = w[r, :K] . a[m][:K] for NR weight rows (stride ldw) and M activation rows
template <class P, int NR, int M>
inline void tile_dot(const typename P::W* w, int64_t ldw, const typename P::A* const* a, int64_t K, float* out) {
  __m512 acc[NR][M];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + P::kStep <= K; j += P::kStep) {
    typename P::V wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) wv[r] = P::load_w(w + r * ldw + j);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const typename P::V av = P::load_a(a[m] + j);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[r][m] = P::madd(acc[r][m], wv[r], av);
    }
  }
  if (j < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - j)) - 1);
    typename P::V wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = P::load_w(w + r * ldw + j, mask);
    for (int m = 0; m < M; ++m) {
      const typename P::V av = P::load_a(a[m] + j, mask);
      for (int r = 0; r < NR; ++r) acc[r][m] = P::madd(acc[r][m], wv[r], av);
    }
  }
  if constexpr (NR * M >= 8) {
    __m512 v[16];
    for (int q = 0; q < 16; ++q) v[q] = q < NR * M ? acc[q / M][q % M] : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << (NR * M)) - 1), reduce16(v));
  } else {
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < M; ++m) out[r * M + m] = _mm512_reduce_add_ps(acc[r][m]);
  }
}

// w[:K] . a[:K] added to 4 accumulators over K: one sequential stream (the single-row case)
template <class P>
inline void row_dot_acc(const typename P::W* w, const typename P::A* a, int64_t K, __m512 (&acc)[4]) {
  int64_t j = 0;
  for (; j + 4 * P::kStep <= K; j += 4 * P::kStep) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) acc[u] = P::madd(acc[u], P::load_w(w + j + u * P::kStep), P::load_a(a + j + u * P::kStep));
  }
  for (; j + P::kStep <= K; j += P::kStep) acc[0] = P::madd(acc[0], P::load_w(w + j), P::load_a(a + j));
  if (j < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - j)) - 1);
    acc[1] = P::madd(acc[1], P::load_w(w + j, mask), P::load_a(a + j, mask));
  }
}

inline float reduce4(const __m512 (&acc)[4]) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// out[r * m + i] = w[r, :] . a[i][:] for nr in {1, 2} weight rows (stride ldw) and 1 <= m <= kMaxRows
// activation rows
template <class P>
void rows_dot(const typename P::W* w, int64_t ldw, int nr, const typename P::A* const* a, int m, int64_t K,
              float* out) {
  if (m == 1) {
    for (int r = 0; r < nr; ++r) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      row_dot_acc<P>(w + r * ldw, a[0], K, acc);
      out[r] = reduce4(acc);
    }
    return;
  }
#define DSV41_TILE(M)                            \
  case M:                                        \
    if (nr == 2)                                 \
      tile_dot<P, 2, M>(w, ldw, a, K, out);      \
    else                                         \
      tile_dot<P, 1, M>(w, ldw, a, K, out);      \
    break;
  switch (m) {
    DSV41_TILE(2) DSV41_TILE(3) DSV41_TILE(4) DSV41_TILE(5) DSV41_TILE(6) DSV41_TILE(7) DSV41_TILE(8)
  }
#undef DSV41_TILE
}

struct Group {
  int64_t expert, begin, end;  // rows [begin, end) of the expert-sorted slot order
};

// Phase-1 work units are (group, pair of adjacent gate_up rows), costing one pass over the pair
// per register tile of rows. Each thread takes one contiguous run of units of equal total cost,
// so that it streams long contiguous stretches of weights (measured: interleaving small tiles
// between threads instead cost ~30% of the read bandwidth from DRAM).
struct UnitCosts {
  std::vector<int64_t> before;  // cost of all units of groups [0, g)
  std::vector<int64_t> per_unit;
  int64_t units_per_group;
  // the unit whose cost range holds position c; all units for c >= total cost
  int64_t unit_at(int64_t c) const {
    if (c >= before.back()) return static_cast<int64_t>(per_unit.size()) * units_per_group;
    const int64_t g = std::upper_bound(before.begin(), before.end(), c) - before.begin() - 1;
    return g * units_per_group + (c - before[g]) / per_unit[g];
  }
};

template <class P>
void experts_forward(const typename P::W* gate_up, const typename P::W* down, const typename P::A* x,
                     const std::vector<int64_t>& row_token, const std::vector<float>& row_weight,
                     const std::vector<Group>& groups, int64_t hidden,
                     int64_t inter, float limit, float* y) {
  using A = typename P::A;
  using W = typename P::W;
  const int64_t rows = static_cast<int64_t>(row_token.size()), n_groups = static_cast<int64_t>(groups.size());
  thread_local std::vector<float> h_buf;
  thread_local std::vector<A> act_buf;
  if (static_cast<int64_t>(h_buf.size()) < rows * 2 * inter) h_buf.resize(rows * 2 * inter);
  if (static_cast<int64_t>(act_buf.size()) < rows * inter) act_buf.resize(rows * inter);
  float* h = h_buf.data();
  A* act = act_buf.data();
  const int64_t pairs = inter;  // 2I gate_up rows in pairs
  UnitCosts costs{std::vector<int64_t>(n_groups + 1, 0), std::vector<int64_t>(n_groups), pairs};
  for (int64_t g = 0; g < n_groups; ++g) {
    costs.per_unit[g] = (groups[g].end - groups[g].begin + kMaxRows - 1) / kMaxRows;
    costs.before[g + 1] = costs.before[g] + pairs * costs.per_unit[g];
  }
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_groups * pairs)));

#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    const A* a_rows[kMaxRows];
    float part[2 * kMaxRows];
    // phase 1: h = x @ gate_up[e]^T, each thread one contiguous stretch of the hit experts' rows
    const int64_t total = costs.before.back();
    const int64_t first = costs.unit_at(total * thread / team), last = costs.unit_at(total * (thread + 1) / team);
    for (int64_t unit = first; unit < last; ++unit) {
      const Group& grp = groups[unit / pairs];
      const int64_t n = 2 * (unit % pairs);
      const W* w = gate_up + (grp.expert * 2 * inter + n) * hidden;
      for (int64_t r0 = grp.begin; r0 < grp.end; r0 += kMaxRows) {
        const int m = static_cast<int>(std::min<int64_t>(kMaxRows, grp.end - r0));
        for (int i = 0; i < m; ++i) a_rows[i] = x + row_token[r0 + i] * hidden;
        rows_dot<P>(w, hidden, 2, a_rows, m, hidden, part);
        for (int i = 0; i < m; ++i) {
          h[(r0 + i) * 2 * inter + n] = part[i];
          h[(r0 + i) * 2 * inter + n + 1] = part[m + i];
        }
      }
    }
#pragma omp barrier
    // the clamped SwiGLU, times the routing weight
    for (int64_t r = rows * thread / team; r < rows * (thread + 1) / team; ++r) {
      const float* hr = h + r * 2 * inter;
      for (int64_t c = 0; c < inter; ++c) {
        const float gv = std::min(hr[c], limit);
        const float uv = std::min(std::max(hr[inter + c], -limit), limit);
        act[r * inter + c] = static_cast<A>(gv / (1.0f + std::exp(-gv)) * uv * row_weight[r]);
      }
    }
#pragma omp barrier
    // phase 2: y[t] += act @ down[e]^T; each thread owns a contiguous range of hidden columns and
    // streams that stretch of every hit expert's [H, I] rows in turn (one sequential read per
    // expert; walking all experts column by column instead ran at ~60% of the read bandwidth)
    const int64_t c_lo = hidden * thread / team, c_hi = hidden * (thread + 1) / team;
    for (const Group& grp : groups) {
      const W* wd = down + grp.expert * hidden * inter;
      for (int64_t c = c_lo; c < c_hi; c += 2) {
        const int nr = static_cast<int>(std::min<int64_t>(2, c_hi - c));
        for (int64_t r0 = grp.begin; r0 < grp.end; r0 += kMaxRows) {
          const int m = static_cast<int>(std::min<int64_t>(kMaxRows, grp.end - r0));
          for (int i = 0; i < m; ++i) a_rows[i] = act + (r0 + i) * inter;
          rows_dot<P>(wd + c * inter, inter, nr, a_rows, m, inter, part);
          for (int r = 0; r < nr; ++r)
            for (int i = 0; i < m; ++i) y[row_token[r0 + i] * hidden + c + r] += part[r * m + i];
        }
      }
    }
  }
}

// activations of x ([T, H], any float dtype) as A, without a copy when the types already match
template <typename A>
const A* activations(const torch::Tensor& x, std::vector<A>& buf) {
  if (x.scalar_type() == c10::CppTypeToScalarType<A>::value) return x.data_ptr<A>();
  buf.resize(x.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dsv41_moe_x", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    for (int64_t j = 0; j < x.numel(); ++j) buf[j] = static_cast<A>(static_cast<float>(p[j]));
  });
  return buf.data();
}

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

}  // namespace

// x [T, H] (float32 / bfloat16 / float16), top_k_index [T, k] (integer), top_k_weights [T, k] (floating)
// -> [T, H] in x's dtype, or None when the kernel does not apply (weights not contiguous float32 /
// bfloat16 of one dtype, or not on CPU: the caller then uses another path); shapes that do not fit
// together raise. bf16_dot: -1 auto (VDPBF16PS when the CPU has it), 0 never, 1 required. The
// applicability checks live here rather than in Python: at one token they are on the critical path.
std::optional<torch::Tensor> moe_experts(torch::Tensor gate_up, torch::Tensor down, torch::Tensor x,
                                         torch::Tensor top_k_index, torch::Tensor top_k_weights, double limit,
                                         int64_t bf16_dot) {
  const auto dtype = gate_up.scalar_type();
  if (!gate_up.device().is_cpu() || !down.device().is_cpu() || !x.device().is_cpu() || !top_k_index.device().is_cpu() ||
      !top_k_weights.device().is_cpu() || (dtype != torch::kBFloat16 && dtype != torch::kFloat32) ||
      down.scalar_type() != dtype || !gate_up.is_contiguous() || !down.is_contiguous())
    return std::nullopt;
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3, "gate_up and down must be [E, 2I, H] and [E, H, I], got ",
              gate_up.sizes(), " and ", down.sizes());
  const int64_t num_experts = gate_up.size(0), hidden = gate_up.size(2), inter = down.size(2);
  TORCH_CHECK(gate_up.size(1) == 2 * inter && down.size(0) == num_experts && down.size(1) == hidden,
              "expert shapes do not match: gate_up ", gate_up.sizes(), ", down ", down.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden, "x must be [T, ", hidden, "], got ", x.sizes());
  TORCH_CHECK(top_k_index.dim() == 2 && top_k_index.size(0) == x.size(0) && top_k_weights.sizes() == top_k_index.sizes(),
              "top_k_index and top_k_weights must both be [T, k] with T = ", x.size(0), ", got ", top_k_index.sizes(),
              " and ", top_k_weights.sizes());
  x = x.contiguous();
  top_k_index = top_k_index.contiguous();
  top_k_weights = top_k_weights.contiguous();
  const int64_t tokens = x.size(0), k = top_k_index.size(1);

  // counting sort of the valid (token, expert) slots by expert
  std::vector<int64_t> slot_expert(tokens * k);
  std::vector<float> slot_weight(tokens * k);
  AT_DISPATCH_INTEGRAL_TYPES(top_k_index.scalar_type(), "dsv41_moe_idx", [&] {
    const scalar_t* p = top_k_index.data_ptr<scalar_t>();
    for (int64_t s = 0; s < tokens * k; ++s) slot_expert[s] = static_cast<int64_t>(p[s]);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, top_k_weights.scalar_type(), "dsv41_moe_w", [&] {
    const scalar_t* p = top_k_weights.data_ptr<scalar_t>();
    for (int64_t s = 0; s < tokens * k; ++s) slot_weight[s] = static_cast<float>(p[s]);
  });
  std::vector<int64_t> start(num_experts + 1, 0);
  for (int64_t e : slot_expert)
    if (e >= 0 && e < num_experts) ++start[e + 1];
  for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
  const int64_t rows = start[num_experts];
  std::vector<Group> groups;
  for (int64_t e = 0; e < num_experts; ++e)
    if (start[e + 1] > start[e]) groups.push_back({e, start[e], start[e + 1]});
  std::vector<int64_t> row_token(rows), fill(start.begin(), start.end() - 1);
  std::vector<float> row_weight(rows);
  for (int64_t s = 0; s < tokens * k; ++s) {
    const int64_t e = slot_expert[s];
    if (e < 0 || e >= num_experts) continue;
    const int64_t r = fill[e]++;
    row_token[r] = s / k;
    row_weight[r] = slot_weight[s];
  }

  thread_local std::vector<float> y_buf;
  y_buf.assign(tokens * hidden, 0.0f);
  float* y = y_buf.data();
  const float lim = static_cast<float>(limit);
  if (rows > 0) {
    if (gate_up.scalar_type() == torch::kBFloat16) {
      const bool dot = bf16_dot == 1 || (bf16_dot == -1 && cpu_has_avx512_bf16());
      TORCH_CHECK(!dot || cpu_has_avx512_bf16(), "bf16_dot=1 needs a CPU with AVX512_BF16");
      if (dot) {
        thread_local std::vector<bf16> xb;
        experts_forward<Bf16Dot>(gate_up.data_ptr<bf16>(), down.data_ptr<bf16>(), activations<bf16>(x, xb), row_token,
                                 row_weight, groups, hidden, inter, lim, y);
      } else {
        thread_local std::vector<float> xf;
        experts_forward<Bf16Wide>(gate_up.data_ptr<bf16>(), down.data_ptr<bf16>(), activations<float>(x, xf), row_token,
                                  row_weight, groups, hidden, inter, lim, y);
      }
    } else {
      thread_local std::vector<float> xf;
      experts_forward<F32>(gate_up.data_ptr<float>(), down.data_ptr<float>(), activations<float>(x, xf), row_token,
                           row_weight, groups, hidden, inter, lim, y);
    }
  }
  auto out = torch::empty({tokens, hidden}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dsv41_moe_y", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    for (int64_t j = 0; j < tokens * hidden; ++j) p[j] = static_cast<scalar_t>(y[j]);
  });
  return out;
}

bool has_avx512_bf16() { return cpu_has_avx512_bf16(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_experts", &moe_experts, "routed experts for few rows per expert (AVX-512, float32 accumulation)");
  m.def("has_avx512_bf16", &has_avx512_bf16, "whether this CPU has AVX512_BF16 (VDPBF16PS)");
}
