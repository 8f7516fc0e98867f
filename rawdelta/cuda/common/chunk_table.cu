// The chunk table every chunked op's kernels take: sequences cut into chunks of BT tokens that never cross a
// sequence start, in one block of 1024 threads. seq_chunk0[n] = the index of sequence n's first chunk
// (seq_chunk0[N] = the chunk count); per chunk, its first token chunk_bos and its length chunk_len. Without
// PASS_VARLEN in flags (common/chunk_pass.cuh), sequence n is tokens [n T_, n T_ + T_), else [cu[n], cu[n + 1]).
#include "common/chunk_pass.cuh"

using namespace rawdelta;

__global__ void __launch_bounds__(1024) chunk_table_kernel(const i64* __restrict__ cu, int N, int T_, int BT,
                                                           int* seq_chunk0, i64* chunk_bos, int* chunk_len,
                                                           int flags) {
    const bool varlen = (flags & PASS_VARLEN) != 0;
    __shared__ int part[1024];
    const int per = (N + blockDim.x - 1) / blockDim.x;
    const int n0 = threadIdx.x * per, n1 = min(N, n0 + per);
    int cnt = 0;
    for (int n = n0; n < n1; ++n) {
        const i64 len = varlen ? cu[n + 1] - cu[n] : (i64)T_;
        cnt += (int)((len + BT - 1) / BT);
    }
    part[threadIdx.x] = cnt;
    __syncthreads();
    for (int off = 1; off < (int)blockDim.x; off <<= 1) {  // Hillis-Steele inclusive scan
        const int x = threadIdx.x >= off ? part[threadIdx.x - off] : 0;
        __syncthreads();
        part[threadIdx.x] += x;
        __syncthreads();
    }
    int c = part[threadIdx.x] - cnt;
    for (int n = n0; n < n1; ++n) {
        const i64 bos = varlen ? cu[n] : (i64)n * T_, len = varlen ? cu[n + 1] - cu[n] : (i64)T_;
        seq_chunk0[n] = c;
        for (i64 s = 0; s < len; s += BT, ++c) {
            chunk_bos[c] = bos + s;
            chunk_len[c] = (int)min((i64)BT, len - s);
        }
    }
    if (threadIdx.x == blockDim.x - 1) seq_chunk0[N] = part[threadIdx.x];
}
