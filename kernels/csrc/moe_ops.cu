// PyTorch bindings for moe_kernels.cuh, JIT-built by dsv41.kernels.cuda_ext (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "moe_kernels.cuh"

namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "dsv41 moe: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "dsv41 moe: ", name, " must be contiguous");
}

template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "dsv41 moe: unsupported activation dtype ", st, " (float32, float16, bfloat16)");
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dsv41 moe: ", what, " launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// Returns (sorted_ids [capacity], block_expert [capacity / block_m], num_padded [1], slot_pos [T*k], counts [E]).
std::vector<at::Tensor> moe_align(at::Tensor top_k_index, int64_t num_experts, int64_t block_m, int64_t capacity) {
  check_cuda(top_k_index, "top_k_index");
  TORCH_CHECK(num_experts > 0 && num_experts <= 4096, "dsv41 moe: num_experts must be in [1, 4096], got ", num_experts);
  TORCH_CHECK(block_m > 0 && capacity % block_m == 0, "dsv41 moe: capacity must be a multiple of block_m");
  const c10::cuda::CUDAGuard guard(top_k_index.device());
  auto opts = top_k_index.options().dtype(at::kInt);
  const int64_t num_slots = top_k_index.numel();
  TORCH_CHECK(num_slots < (int64_t(1) << 31), "dsv41 moe: too many (token, expert) slots for int32 indices");
  const int chunk = dsv41::align_chunk();
  const int num_chunks = static_cast<int>(std::max<int64_t>(1, (num_slots + chunk - 1) / chunk));
  const int n_blocks = static_cast<int>(capacity / block_m);
  auto chunk_counts = at::zeros({num_chunks, num_experts}, opts);
  auto chunk_off = at::empty({num_chunks, num_experts}, opts);
  auto counts = at::empty({num_experts}, opts);
  auto block_expert = at::empty({n_blocks}, opts);
  auto num_padded = at::empty({1}, opts);
  auto sorted_ids = at::full({capacity}, num_slots, opts);
  auto slot_pos = at::empty({num_slots}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (top_k_index.scalar_type() == at::kLong) {
    err = dsv41::launch_moe_align<int64_t>(top_k_index.data_ptr<int64_t>(), num_slots, num_experts, block_m, n_blocks,
                                           chunk_counts.data_ptr<int32_t>(), chunk_off.data_ptr<int32_t>(),
                                           counts.data_ptr<int32_t>(), block_expert.data_ptr<int32_t>(),
                                           num_padded.data_ptr<int32_t>(), sorted_ids.data_ptr<int32_t>(),
                                           slot_pos.data_ptr<int32_t>(), num_chunks, stream);
  } else {
    TORCH_CHECK(top_k_index.scalar_type() == at::kInt, "dsv41 moe: top_k_index must be int64 or int32");
    err = dsv41::launch_moe_align<int32_t>(top_k_index.data_ptr<int32_t>(), num_slots, num_experts, block_m, n_blocks,
                                           chunk_counts.data_ptr<int32_t>(), chunk_off.data_ptr<int32_t>(),
                                           counts.data_ptr<int32_t>(), block_expert.data_ptr<int32_t>(),
                                           num_padded.data_ptr<int32_t>(), sorted_ids.data_ptr<int32_t>(),
                                           slot_pos.data_ptr<int32_t>(), num_chunks, stream);
  }
  check_launch(err, "moe_align");
  return {sorted_ids, block_expert, num_padded, slot_pos, counts};
}

at::Tensor gather_rows(at::Tensor x, at::Tensor sorted_ids, at::Tensor num_padded, int64_t top_k) {
  check_cuda(x, "hidden_states");
  check_cuda(sorted_ids, "sorted_ids");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t capacity = sorted_ids.numel(), hidden = x.size(1);
  const int64_t num_slots = x.size(0) * top_k;
  auto out = at::empty({capacity, hidden}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dsv41::moe_gather_rows_kernel<T><<<capacity, 256, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), sorted_ids.data_ptr<int32_t>(), num_padded.data_ptr<int32_t>(),
        reinterpret_cast<T*>(out.data_ptr()), hidden, static_cast<int>(top_k), num_slots);
  });
  check_launch(cudaGetLastError(), "gather_rows");
  return out;
}

at::Tensor clamped_swiglu(at::Tensor gate_up, at::Tensor num_padded, double limit) {
  check_cuda(gate_up, "gate_up");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = at::empty({rows, inter}, gate_up.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(gate_up.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dsv41::moe_clamped_swiglu_kernel<T><<<rows, 256, 0, stream>>>(
        reinterpret_cast<const T*>(gate_up.data_ptr()), num_padded.data_ptr<int32_t>(),
        reinterpret_cast<T*>(out.data_ptr()), inter, static_cast<float>(limit));
  });
  check_launch(cudaGetLastError(), "clamped_swiglu");
  return out;
}

at::Tensor combine(at::Tensor y, at::Tensor slot_pos, at::Tensor weights, int64_t num_tokens, int64_t top_k) {
  check_cuda(y, "expert outputs");
  check_cuda(weights, "routing weights");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "dsv41 moe: routing weights must be float32 here");
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t hidden = y.size(1);
  auto out = at::empty({num_tokens, hidden}, y.options());
  if (num_tokens == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(y.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dsv41::moe_combine_kernel<T><<<num_tokens, 256, 0, stream>>>(
        reinterpret_cast<const T*>(y.data_ptr()), slot_pos.data_ptr<int32_t>(), weights.data_ptr<float>(),
        reinterpret_cast<T*>(out.data_ptr()), hidden, static_cast<int>(top_k));
  });
  check_launch(cudaGetLastError(), "combine");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_align", &moe_align, "count / align / permute (token, expert) slots into per-expert row blocks");
  m.def("gather_rows", &gather_rows, "gather token rows into padded expert-sorted order");
  m.def("clamped_swiglu", &clamped_swiglu, "silu(min(g, limit)) * clamp(u, -limit, limit)");
  m.def("combine", &combine, "weighted sum of the k expert outputs of each token (inverse permutation)");
}
