// Compile-only translation unit for CI (no PyTorch headers): instantiates every kernel template of
// moe_kernels.cuh so that `nvcc -c` type-checks all of them.
#include "moe_kernels.cuh"

namespace dsv41 {
template cudaError_t launch_moe_align<int64_t>(const int64_t*, int64_t, int, int, int, int32_t*, int32_t*, int32_t*,
                                               int32_t*, int32_t*, int32_t*, int32_t*, int, cudaStream_t);
template cudaError_t launch_moe_align<int32_t>(const int32_t*, int64_t, int, int, int, int32_t*, int32_t*, int32_t*,
                                               int32_t*, int32_t*, int32_t*, int32_t*, int, cudaStream_t);
template __global__ void moe_gather_rows_kernel<float>(const float*, const int32_t*, const int32_t*, float*, int64_t,
                                                       int, int64_t);
template __global__ void moe_gather_rows_kernel<__half>(const __half*, const int32_t*, const int32_t*, __half*,
                                                        int64_t, int, int64_t);
template __global__ void moe_gather_rows_kernel<__nv_bfloat16>(const __nv_bfloat16*, const int32_t*, const int32_t*,
                                                               __nv_bfloat16*, int64_t, int, int64_t);
template __global__ void moe_clamped_swiglu_kernel<float>(const float*, const int32_t*, float*, int64_t, float);
template __global__ void moe_clamped_swiglu_kernel<__half>(const __half*, const int32_t*, __half*, int64_t, float);
template __global__ void moe_clamped_swiglu_kernel<__nv_bfloat16>(const __nv_bfloat16*, const int32_t*,
                                                                  __nv_bfloat16*, int64_t, float);
template __global__ void moe_combine_kernel<float>(const float*, const int32_t*, const float*, float*, int64_t, int);
template __global__ void moe_combine_kernel<__half>(const __half*, const int32_t*, const float*, __half*, int64_t,
                                                    int);
template __global__ void moe_combine_kernel<__nv_bfloat16>(const __nv_bfloat16*, const int32_t*, const float*,
                                                           __nv_bfloat16*, int64_t, int);
}  // namespace dsv41
