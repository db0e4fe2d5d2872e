// dsv41 MoE CUDA kernels (no PyTorch dependency; the bindings live in moe_ops.cu).
//
//   moe_align_count_kernel   per-chunk expert histograms
//   moe_align_scan_kernel    per-expert totals, padded starts, per-(chunk, expert) offsets,
//                            expert of every BLOCK_M row block, rows in use
//   moe_align_place_kernel   stable placement: slot s of expert e goes to
//                            start[e] + (# earlier slots of e); writes the inverse permutation
//   moe_gather_rows_kernel   A operand of the gate/up GEMM in padded row order
//   moe_clamped_swiglu_kernel silu(min(g, limit)) * clamp(u, -limit, limit)
//   moe_combine_kernel       out[t] = sum_j w[t, j] * Y[slot_pos[t*k + j]]  (fp32 accumulation)
//
// The output of the alignment equals dsv41.kernels.reference.align_reference exactly: inside an
// expert the slots keep increasing slot order (chunks in order, warps in order, lanes in order).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace dsv41 {

constexpr int kAlignThreads = 256;  // threads per block of the count / place kernels

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename IdT>
__device__ __forceinline__ int valid_expert(IdT v, int num_experts) {
  return (v >= 0 && v < static_cast<IdT>(num_experts)) ? static_cast<int>(v) : -1;
}

// grid: num_chunks blocks; shared: num_experts ints
template <typename IdT>
__global__ void moe_align_count_kernel(const IdT* __restrict__ ids, int32_t* __restrict__ chunk_counts,
                                       int64_t num_slots, int num_experts, int chunk) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * chunk;
  for (int i = threadIdx.x; i < chunk; i += blockDim.x) {
    const int64_t s = base + i;
    if (s < num_slots) {
      const int e = valid_expert(ids[s], num_experts);
      if (e >= 0) atomicAdd(&hist[e], 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
    chunk_counts[static_cast<int64_t>(blockIdx.x) * num_experts + e] = hist[e];
}

// grid: 1 block; shared: 2 * num_experts + 1 ints
__global__ void moe_align_scan_kernel(const int32_t* __restrict__ chunk_counts, int32_t* __restrict__ chunk_off,
                                      int32_t* __restrict__ counts, int32_t* __restrict__ block_expert,
                                      int32_t* __restrict__ num_padded, int num_chunks, int num_experts,
                                      int block_m, int n_blocks) {
  extern __shared__ int32_t smem[];
  int32_t* padded = smem;
  int32_t* starts = smem + num_experts;
  int32_t* total_padded = smem + 2 * num_experts;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int32_t total = 0;
    for (int c = 0; c < num_chunks; ++c) total += chunk_counts[static_cast<int64_t>(c) * num_experts + e];
    counts[e] = total;
    padded[e] = (total + block_m - 1) / block_m * block_m;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // E <= a few hundred: a serial scan is cheaper than a block scan's syncs
    int32_t run = 0;
    for (int e = 0; e < num_experts; ++e) {
      starts[e] = run;
      run += padded[e];
    }
    *total_padded = run;
    num_padded[0] = run;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int32_t run = starts[e];
    for (int c = 0; c < num_chunks; ++c) {
      const int64_t at = static_cast<int64_t>(c) * num_experts + e;
      chunk_off[at] = run;
      run += chunk_counts[at];
    }
    for (int b = starts[e] / block_m; b < (starts[e] + padded[e]) / block_m; ++b) block_expert[b] = e;
  }
  for (int b = *total_padded / block_m + threadIdx.x; b < n_blocks; b += blockDim.x) block_expert[b] = -1;
}

// grid: num_chunks blocks of kAlignThreads; shared: num_experts * (1 + warps) ints
template <typename IdT>
__global__ void moe_align_place_kernel(const IdT* __restrict__ ids, const int32_t* __restrict__ chunk_off,
                                       int32_t* __restrict__ sorted_ids, int32_t* __restrict__ slot_pos,
                                       int64_t num_slots, int num_experts, int chunk) {
  extern __shared__ int32_t smem[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  int32_t* running = smem;
  int32_t* warp_hist = smem + num_experts;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    running[e] = chunk_off[static_cast<int64_t>(blockIdx.x) * num_experts + e];
    for (int w = 0; w < warps; ++w) warp_hist[w * num_experts + e] = 0;
  }
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * chunk;
  for (int r = 0; r < chunk; r += blockDim.x) {
    const int local = r + threadIdx.x;
    const int64_t s = base + local;
    const bool in_range = local < chunk && s < num_slots;
    const int e = in_range ? valid_expert(ids[s], num_experts) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int lane_rank = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && lane == __ffs(peers) - 1) warp_hist[warp * num_experts + e] = __popc(peers);
    __syncthreads();
    if (e >= 0) {
      int32_t pos = running[e] + lane_rank;
      for (int w = 0; w < warp; ++w) pos += warp_hist[w * num_experts + e];
      sorted_ids[pos] = static_cast<int32_t>(s);
      slot_pos[s] = pos;
    } else if (in_range) {
      slot_pos[s] = -1;
    }
    __syncthreads();
    for (int x = threadIdx.x; x < num_experts; x += blockDim.x) {
      int32_t sum = 0;
      for (int w = 0; w < warps; ++w) {
        sum += warp_hist[w * num_experts + x];
        warp_hist[w * num_experts + x] = 0;
      }
      running[x] += sum;
    }
    __syncthreads();
  }
}

// grid: capacity rows; padding rows and rows past num_padded are zero-filled
template <typename T>
__global__ void moe_gather_rows_kernel(const T* __restrict__ x, const int32_t* __restrict__ sorted_ids,
                                       const int32_t* __restrict__ num_padded, T* __restrict__ out,
                                       int64_t hidden, int top_k, int64_t num_slots) {
  const int64_t row = blockIdx.x;
  const int32_t slot = row < num_padded[0] ? sorted_ids[row] : static_cast<int32_t>(num_slots);
  T* dst = out + row * hidden;
  if (slot >= num_slots) {
    for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) dst[h] = from_float<T>(0.f);
    return;
  }
  const T* src = x + static_cast<int64_t>(slot / top_k) * hidden;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) dst[h] = src[h];
}

// grid: capacity rows; input [rows, 2I] (gate then up), output [rows, I]
template <typename T>
__global__ void moe_clamped_swiglu_kernel(const T* __restrict__ gate_up, const int32_t* __restrict__ num_padded,
                                          T* __restrict__ out, int64_t inter, float limit) {
  const int64_t row = blockIdx.x;
  if (row >= num_padded[0]) return;
  const T* g = gate_up + row * 2 * inter;
  for (int64_t i = threadIdx.x; i < inter; i += blockDim.x) {
    const float gv = fminf(to_float(g[i]), limit);
    const float uv = fminf(fmaxf(to_float(g[inter + i]), -limit), limit);
    out[row * inter + i] = from_float<T>(gv / (1.f + __expf(-gv)) * uv);
  }
}

// grid: num_tokens; weights are float32 [T, k]
template <typename T>
__global__ void moe_combine_kernel(const T* __restrict__ y, const int32_t* __restrict__ slot_pos,
                                   const float* __restrict__ weights, T* __restrict__ out, int64_t hidden,
                                   int top_k) {
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const int32_t pos = slot_pos[t * top_k + j];
      if (pos >= 0) acc += weights[t * top_k + j] * to_float(y[static_cast<int64_t>(pos) * hidden + h]);
    }
    out[t * hidden + h] = from_float<T>(acc);
  }
}

// ------------------------------------------------------------------ host-side launch helpers

inline int align_chunk() { return 16 * kAlignThreads; }

template <typename IdT>
cudaError_t launch_moe_align(const IdT* ids, int64_t num_slots, int num_experts, int block_m, int n_blocks,
                             int32_t* chunk_counts, int32_t* chunk_off, int32_t* counts, int32_t* block_expert,
                             int32_t* num_padded, int32_t* sorted_ids, int32_t* slot_pos, int num_chunks,
                             cudaStream_t stream) {
  const int chunk = align_chunk();
  const size_t count_smem = sizeof(int32_t) * num_experts;
  const size_t scan_smem = sizeof(int32_t) * (2 * num_experts + 1);
  const size_t place_smem = sizeof(int32_t) * num_experts * (1 + kAlignThreads / 32);
  if (num_slots > 0)
    moe_align_count_kernel<IdT><<<num_chunks, kAlignThreads, count_smem, stream>>>(ids, chunk_counts, num_slots,
                                                                                    num_experts, chunk);
  moe_align_scan_kernel<<<1, 1024, scan_smem, stream>>>(chunk_counts, chunk_off, counts, block_expert, num_padded,
                                                        num_chunks, num_experts, block_m, n_blocks);
  if (num_slots > 0)
    moe_align_place_kernel<IdT><<<num_chunks, kAlignThreads, place_smem, stream>>>(
        ids, chunk_off, sorted_ids, slot_pos, num_slots, num_experts, chunk);
  return cudaGetLastError();
}

}  // namespace dsv41
