// Gated delta rule: the last kernels of the backward, which both modes run on their per-block partial gradients:
// the sums over blocks and grouped value heads, the L2 norm's backward (dq, dk), and the gate and beta activations'
// backward (dg, dbeta, dgk, dA_log, ddt_bias). Layouts: q, k [BT, H, K]; partials [NVB, BT, HV, K | 1] float32
// (BT = B * T flattened tokens); g, beta [BT, HV].
#include "gated_delta_rule/gdn_common.cuh"

using namespace rawdelta;

// dq and dk: sum the partials over vb and over the value heads of each key head, then the
// L2-norm backward. One warp per (token, key head); lane owns the 8 key rows col(i) below: four
// consecutive rows per 128 when K is a multiple of 4 (16-byte loads of the float partials), else
// rows lane + 32 * i.
template <typename T>
__global__ void __launch_bounds__(128)
gdn_bwd_finish_qk_kernel(const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ part_dq,
                         const float* __restrict__ part_dk, T* __restrict__ dq, T* __restrict__ dk, i64 BT, int H,
                         int HV, int K, int NVB, int flags) {
    const i64 item = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (item >= BT * H) return;
    const i64 t = item / H;
    const int h = (int)(item % H), G = HV / H;
    const bool vec = (K & 3) == 0;
    auto col = [&](int i) { return vec ? 128 * (i >> 2) + 4 * lane + (i & 3) : lane + 32 * i; };
    for (int which = 0; which < 2; ++which) {
        const T* x = (which == 0 ? q : k) + (t * H + h) * K;
        const float* part = which == 0 ? part_dq : part_dk;
        T* out = (which == 0 ? dq : dk) + (t * H + h) * K;
        float d[8], xv[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) d[i] = xv[i] = 0.f;
        if (vec) {
#pragma unroll
            for (int i4 = 0; i4 < 2; ++i4) {
                const int r = 128 * i4 + 4 * lane;
                if (r >= K) continue;
                for (int vb = 0; vb < NVB; ++vb)
                    for (int gi = 0; gi < G; ++gi) {
                        const float4 p4 = *reinterpret_cast<const float4*>(part + ((vb * BT + t) * HV + h * G + gi) * K + r);
                        d[4 * i4] += p4.x;
                        d[4 * i4 + 1] += p4.y;
                        d[4 * i4 + 2] += p4.z;
                        d[4 * i4 + 3] += p4.w;
                    }
#pragma unroll
                for (int e = 0; e < 4; ++e) xv[4 * i4 + e] = to_float(x[r + e]);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int r = col(i);
                if (r >= K) continue;
                for (int vb = 0; vb < NVB; ++vb)
                    for (int gi = 0; gi < G; ++gi) d[i] += part[((vb * BT + t) * HV + h * G + gi) * K + r];
                xv[i] = to_float(x[r]);
            }
        }
        if (flags & F_L2) {
            float ss = 0.f, dot = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) ss += xv[i] * xv[i];
            const float rn = rsqrtf(warp_sum(ss) + 1e-6f);
#pragma unroll
            for (int i = 0; i < 8; ++i) dot += d[i] * xv[i] * rn;
            dot = warp_sum(dot);
#pragma unroll
            for (int i = 0; i < 8; ++i) d[i] = rn * (d[i] - dot * xv[i] * rn);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int r = col(i);
            if (r < K) out[r] = from_float<T>(d[i]);
        }
    }
}

// Per (token, value head): dg (through the in-kernel gate), dbeta (through the sigmoid), dgk.
// Also writes dg * g and dg_raw for the A_log / dt_bias reductions.
__global__ void gdn_bwd_finish_gates_kernel(const float* __restrict__ g, const float* __restrict__ beta,
                                            const float* __restrict__ A_log, const float* __restrict__ dt_bias,
                                            const float* __restrict__ part_dg, const float* __restrict__ part_db,
                                            const float* __restrict__ part_dgk, float* __restrict__ dg,
                                            float* __restrict__ dbeta, float* __restrict__ dgk,
                                            float* __restrict__ gate_terms, i64 BT, int HV, int K, int NVB,
                                            int flags) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= BT * HV) return;
    const int hv = (int)(idx % HV);
    if (flags & F_G) {
        float d = 0.f;
        for (int vb = 0; vb < NVB; ++vb) d += part_dg[vb * BT * HV + idx];
        if (flags & F_GATE) {
            const float a = __expf(A_log[hv]);
            const float x = g[idx] + ((flags & F_DTB) ? dt_bias[hv] : 0.f);
            // selected, not multiplied: a zero gradient (a reset, or a token no cotangent reaches) against a raw
            // gate of +-inf or NaN adds nothing to the sums over tokens
            const float draw = d != 0.f ? -a * sigmoidf_(x) * d : 0.f;
            gate_terms[idx] = d != 0.f ? d * (-a * softplusf_(x)) : 0.f;  // dg * g  -> dA_log
            gate_terms[BT * HV + idx] = draw;                             // dg_raw -> ddt_bias
            d = draw;
        }
        dg[idx] = d;
    }
    if ((flags & F_BETA) && !(flags & F_BETA_V)) {
        float d = 0.f;
        for (int vb = 0; vb < NVB; ++vb) d += part_db[vb * BT * HV + idx];
        if (flags & F_BSIG) {
            const float sg = sigmoidf_(beta[idx]);
            d *= ((flags & F_NEG) ? 2.f : 1.f) * sg * (1.f - sg);
        }
        dbeta[idx] = d;
    }
    if (flags & F_GK) {
        for (int r = 0; r < K; ++r) {
            float d = 0.f;
            for (int vb = 0; vb < NVB; ++vb) d += part_dgk[(vb * BT * HV + idx) * K + r];
            dgk[idx * K + r] = d;
        }
    }
}

// dA_log[hv] = sum_t dg_t * g_t and ddt_bias[hv] = sum_t dg_raw_t: one block per value head,
// fixed-order tree reduction (deterministic).
__global__ void __launch_bounds__(256)
gdn_bwd_gate_params_kernel(const float* __restrict__ gate_terms, float* __restrict__ dA_log,
                           float* __restrict__ ddt_bias, i64 BT, int HV, int flags) {
    __shared__ float sm[2][256];
    const int hv = blockIdx.x;
    float a = 0.f, b = 0.f;
    for (i64 t = threadIdx.x; t < BT; t += 256) {
        a += gate_terms[t * HV + hv];
        b += gate_terms[BT * HV + t * HV + hv];
    }
    sm[0][threadIdx.x] = a;
    sm[1][threadIdx.x] = b;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sm[0][threadIdx.x] += sm[0][threadIdx.x + s];
            sm[1][threadIdx.x] += sm[1][threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        dA_log[hv] = sm[0][0];
        if (flags & F_DTB) ddt_bias[hv] = sm[1][0];
    }
}
