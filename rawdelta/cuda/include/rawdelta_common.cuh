// Shared device helpers: dtype load/store, sequence ranges, warp reductions, gate/beta activations.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rawdelta {

typedef long long i64;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Tokens [bos, eos) of sequence n: from cu_seqlens with varlen, else the n-th of N sequences of T tokens.
struct SeqRange { i64 bos, eos; };

__device__ __forceinline__ SeqRange seq_range(const i64* cu, int n, int T, bool varlen) {
    if (varlen) return {cu[n], cu[n + 1]};
    return {(i64)n * T, (i64)n * T + T};
}

// Sum over groups of lanes whose ids differ only in the bits of [FIRST, FIRST * COUNT).
template <int FIRST, int COUNT>
__device__ __forceinline__ float lane_group_sum(float x) {
#pragma unroll
    for (int m = FIRST; m < FIRST * COUNT; m <<= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

__device__ __forceinline__ float warp_sum(float x) { return lane_group_sum<1, 32>(x); }

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

// softplus as in the peer: identity above 20 (no overflow), log1p(exp(x)) below.
__device__ __forceinline__ float softplusf_(float x) { return x > 20.f ? x : log1pf(expf(x)); }

}  // namespace rawdelta
