// Tensor-core tile products on shared-memory operands: mma.sync m16n8k16 with fp32 accumulation.
//
// A block of NW warps computes C[M x N] (+)= A[M x KD] * B[KD x N]; each warp owns a fixed set of
// 16 x 8 accumulator tiles (Acc below), so element-wise epilogues know which (row, col) they hold.
// Operand tiles live in shared memory in the 16-bit mma type E (bf16 or fp16), loaded with ldmatrix.
// A float32 matrix is kept as a Split<E> pair of tiles, hi + lo, and multiplied as hi*hi + lo*hi +
// hi*lo, which carries ~16 mantissa bits: states, inverses and fp32 inputs keep their precision
// through the tensor cores.
//
// Layouts: A is MK (s[m * ld + k]) or KM (s[k * ld + m], i.e. the stored matrix is A transposed);
// B is KN (s[k * ld + n]) or NK (s[n * ld + k]). Leading dimensions of 16-bit tiles must be
// multiples of 8 elements (16-byte ldmatrix rows); a pad of 8 keeps ldmatrix free of bank conflicts.
#pragma once
#include "include/rawdelta_common.cuh"

namespace rawdelta {

typedef unsigned int u32;

enum Layout { MK, KM, KN, NK };

template <typename E> struct MmaType;

template <> struct MmaType<__nv_bfloat16> {
    static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

template <> struct MmaType<__half> {
    static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(u32 (&r)[2], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2_t(u32 (&r)[2], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// A float matrix kept as two E tiles, hi = E(x) and lo = E(x - hi), with the same leading dimension:
// split once when stored, loaded with ldmatrix like any E tile.
template <typename E>
struct Split {
    E* hi;
    E* lo;
};

// Whether a gemm operand (a 16-bit tile pointer or a Split) carries a lo part.
template <typename X> struct OperandSplit { static constexpr bool value = false; };
template <typename E> struct OperandSplit<Split<E>> { static constexpr bool value = true; };

// Shared-memory addresses of an operand's hi and lo tiles (lo = hi for an unsplit tile).
template <typename E> __device__ __forceinline__ uint2 tile_addrs(const E* s) {
    const unsigned a = smem_addr(s);
    return make_uint2(a, a);
}
template <typename E> __device__ __forceinline__ uint2 tile_addrs(const Split<E>& s) {
    return make_uint2(smem_addr(s.hi), smem_addr(s.lo));
}

// Byte offsets inside a 16-bit tile of leading dimension ld. A fragment is 16 x 16 at (m0, k0), a B
// fragment 16 x 8 at (k0, n0); lane_* is where this lane's ldmatrix row starts relative to the
// fragment's origin. The gemm adds the fragment offsets to per-lane base addresses: with the k loop
// unrolled and ld a compile-time constant they fold into the ldmatrix immediates, so the loop issues
// no address arithmetic.
template <Layout L> __device__ __forceinline__ int a_lane(int lane, int ld) {
    if constexpr (L == MK) return ((lane & 15) * ld + (lane >> 4) * 8) * 2;
    const int j = lane >> 3, r = lane & 7;
    return (((j >> 1) * 8 + r) * ld + (j & 1) * 8) * 2;
}
template <Layout L> __device__ __forceinline__ int a_frag(int m0, int k0, int ld) {
    return L == MK ? (m0 * ld + k0) * 2 : (k0 * ld + m0) * 2;
}
template <Layout L> __device__ __forceinline__ int b_lane(int lane, int ld) {
    if constexpr (L == NK) return ((lane & 7) * ld + ((lane >> 3) & 1) * 8) * 2;
    return ((((lane >> 3) & 1) * 8 + (lane & 7)) * ld) * 2;
}
template <Layout L> __device__ __forceinline__ int b_frag(int k0, int n0, int ld) {
    return L == NK ? (n0 * ld + k0) * 2 : (k0 * ld + n0) * 2;
}
template <Layout L> __device__ __forceinline__ void load_a(u32 (&r)[4], unsigned addr) {
    if constexpr (L == MK) ldsm_x4(r, addr);
    else ldsm_x4_t(r, addr);
}
template <Layout L> __device__ __forceinline__ void load_b(u32 (&r)[2], unsigned addr) {
    if constexpr (L == NK) ldsm_x2(r, addr);
    else ldsm_x2_t(r, addr);
}

template <typename E>
__device__ __forceinline__ void split_store(Split<E> s, int idx, float x) {
    const E h = from_float<E>(x);
    s.hi[idx] = h;
    s.lo[idx] = from_float<E>(x - to_float(h));
}

// Two adjacent elements as one 32-bit (16-bit types) or 64-bit (float) access: accumulator elements
// come in column pairs, and paired accesses halve the conversion and load/store instructions of the
// epilogues that dominate the chunk kernels' instruction count.
template <typename X> struct PairOf;
template <> struct PairOf<float> {
    using type = float2;
    static __device__ __forceinline__ type pack(float a, float b) { return make_float2(a, b); }
    static __device__ __forceinline__ float2 unpack(type v) { return v; }
};
template <> struct PairOf<__nv_bfloat16> {
    using type = __nv_bfloat162;
    static __device__ __forceinline__ type pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
    static __device__ __forceinline__ float2 unpack(type v) { return __bfloat1622float2(v); }
};
template <> struct PairOf<__half> {
    using type = __half2;
    static __device__ __forceinline__ type pack(float a, float b) { return __floats2half2_rn(a, b); }
    static __device__ __forceinline__ float2 unpack(type v) { return __half22float2(v); }
};

// x[idx], x[idx + 1] for an even idx of an 8-byte (float) or 4-byte (16-bit) aligned array.
template <typename X>
__device__ __forceinline__ void store_pair(X* p, int idx, float a, float b) {
    *reinterpret_cast<typename PairOf<X>::type*>(p + idx) = PairOf<X>::pack(a, b);
}
template <typename X>
__device__ __forceinline__ float2 load_pair(const X* p, int idx) {
    return PairOf<X>::unpack(*reinterpret_cast<const typename PairOf<X>::type*>(p + idx));
}
// The dot product of two 16-byte pieces of eight 16-bit X elements each, in float32.
template <typename X>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    const auto* pa = reinterpret_cast<const typename PairOf<X>::type*>(&a);
    const auto* pb = reinterpret_cast<const typename PairOf<X>::type*>(&b);
    float s = 0.f;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const float2 x = PairOf<X>::unpack(pa[p]), y = PairOf<X>::unpack(pb[p]);
        s += x.x * y.x + x.y * y.y;
    }
    return s;
}
template <typename E>
__device__ __forceinline__ void split_store_pair(Split<E> s, int idx, float a, float b) {
    const typename PairOf<E>::type h = PairOf<E>::pack(a, b);
    const float2 hf = PairOf<E>::unpack(h);
    *reinterpret_cast<typename PairOf<E>::type*>(s.hi + idx) = h;
    store_pair(s.lo, idx, a - hf.x, b - hf.y);
}

// Eight consecutive floats (16-byte aligned) split into hi and lo parts, stored as one 16-byte access to
// each of hi and lo (16-byte aligned); the hi part only when lo is null.
template <typename E>
__device__ __forceinline__ void split_store8(E* hi, E* lo, const float* src) {
    using P = PairOf<E>;
    const float4 a = *reinterpret_cast<const float4*>(src), b = *reinterpret_cast<const float4*>(src + 4);
    const float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    alignas(16) typename P::type h[4], l[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        h[p] = P::pack(x[2 * p], x[2 * p + 1]);
        const float2 hf = P::unpack(h[p]);
        l[p] = P::pack(x[2 * p] - hf.x, x[2 * p + 1] - hf.y);
    }
    *reinterpret_cast<uint4*>(hi) = *reinterpret_cast<const uint4*>(h);
    if (lo != nullptr) *reinterpret_cast<uint4*>(lo) = *reinterpret_cast<const uint4*>(l);
}

// Which 16 x 8 tiles of an M x N accumulator each of NW warps owns: WM warps along M, WN along N,
// interleaved (warp (wm, wn) owns m-tiles wm + i * WM and n-tiles wn + j * WN). Warps beyond
// WM * WN (tiny products) own nothing.
template <int M, int N, int NW>
struct Acc {
    static_assert(M % 16 == 0 && N % 8 == 0, "tile sizes");
    static constexpr int MT_ALL = M / 16, NT_ALL = N / 8;
    static constexpr int WM = MT_ALL < NW ? MT_ALL : NW;
    static constexpr int WN = (NW / WM) < NT_ALL ? (NW / WM) : NT_ALL;
    static constexpr int MT = MT_ALL / WM, NT = NT_ALL / WN;
    float v[MT][NT][4];

    // Blocks have exactly NW warps, so when WM * WN == NW every warp is active at compile time.
    __device__ __forceinline__ static bool active(int warp) { return WM * WN == NW || warp < WM * WN; }
    __device__ __forceinline__ static int row(int warp, int lane, int i, int e) {
        return ((warp % WM) + i * WM) * 16 + (lane >> 2) + (e >> 1) * 8;
    }
    __device__ __forceinline__ static int col(int warp, int lane, int j, int e) {
        return ((warp / WM) + j * WN) * 8 + (lane & 3) * 2 + (e & 1);
    }
    __device__ __forceinline__ void fill(float x) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) v[i][j][e] = x;
    }
    // f(row, col, value&) for every element this thread holds (nothing for idle warps).
    template <typename F>
    __device__ __forceinline__ void apply(F&& f) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        if (!active(warp)) return;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) f(row(warp, lane, i, e), col(warp, lane, j, e), v[i][j][e]);
    }
    // f(row, col, value&, next value&) for every pair of adjacent columns (col, col + 1), col even.
    template <typename F>
    __device__ __forceinline__ void apply_pairs(F&& f) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        if (!active(warp)) return;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; e += 2)
                    f(row(warp, lane, i, e), col(warp, lane, j, e), v[i][j][e], v[i][j][e + 1]);
    }
    // f(row, col, value&, other's value&) over the same elements of two accumulators of this shape.
    template <typename F>
    __device__ __forceinline__ void zip(Acc& other, F&& f) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        if (!active(warp)) return;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    f(row(warp, lane, i, e), col(warp, lane, j, e), v[i][j][e], other.v[i][j][e]);
    }
    // Write (converted) to a shared M x N tile s[row * ld + col] (ld even).
    template <typename TS>
    __device__ __forceinline__ void store(TS* s, int ld) {
        apply_pairs([&](int r, int c, float& x0, float& x1) { store_pair(s, r * ld + c, x0, x1); });
    }
    template <typename E>
    __device__ __forceinline__ void store(Split<E> s, int ld) {
        apply_pairs([&](int r, int c, float& x0, float& x1) { split_store_pair(s, r * ld + c, x0, x1); });
    }
};

// acc += A * B over KD (a multiple of 16).
// TA / TB: an E tile pointer or a Split<E>. UNROLL k steps are unrolled (all by default, see a_lane / a_frag);
// fewer where the caller holds many live accumulators and full unrolling would spill.
template <typename E, Layout LA, Layout LB, int M, int N, int KD, int NW, int UNROLL = KD / 16, typename TA,
          typename TB>
__device__ __forceinline__ void gemm(Acc<M, N, NW>& acc, const TA& sA, int lda, const TB& sB, int ldb) {
    static_assert(KD % 16 == 0, "KD must be a multiple of 16");
    using C = Acc<M, N, NW>;
    constexpr bool A_SPLIT = OperandSplit<TA>::value, B_SPLIT = OperandSplit<TB>::value;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (!C::active(warp)) return;
    const int wm = warp % C::WM, wn = warp / C::WM;
    const int ao = a_lane<LA>(lane, lda) + a_frag<LA>(wm * 16, 0, lda);
    const int bo = b_lane<LB>(lane, ldb) + b_frag<LB>(0, wn * 8, ldb);
    const uint2 a = tile_addrs(sA), b = tile_addrs(sB);
    const unsigned ah0 = a.x + ao, al0 = a.y + ao, bh0 = b.x + bo, bl0 = b.y + bo;
    // The lo-part products go to their own accumulator, added at the end: two independent mma chains per
    // output tile instead of one chain of two or three dependent mmas per k step. Callers that limit the
    // unrolling are register-bound and keep the single chain.
    constexpr bool CORR = (A_SPLIT || B_SPLIT) && UNROLL > 1;
    C corr;
    if constexpr (CORR) corr.fill(0.f);
#pragma unroll UNROLL
    for (int k0 = 0; k0 < KD; k0 += 16) {
        u32 ah[C::MT][4], al[C::MT][4], bh[C::NT][2], bl[C::NT][2];
#pragma unroll
        for (int i = 0; i < C::MT; ++i) {
            const int off = a_frag<LA>(i * C::WM * 16, k0, lda);
            load_a<LA>(ah[i], ah0 + off);
            if constexpr (A_SPLIT) load_a<LA>(al[i], al0 + off);
        }
#pragma unroll
        for (int j = 0; j < C::NT; ++j) {
            const int off = b_frag<LB>(k0, j * C::WN * 8, ldb);
            load_b<LB>(bh[j], bh0 + off);
            if constexpr (B_SPLIT) load_b<LB>(bl[j], bl0 + off);
        }
#pragma unroll
        for (int j = 0; j < C::NT; ++j)
#pragma unroll
            for (int i = 0; i < C::MT; ++i) MmaType<E>::mma(acc.v[i][j], ah[i], bh[j]);
#pragma unroll
        for (int j = 0; j < C::NT; ++j)
#pragma unroll
            for (int i = 0; i < C::MT; ++i) {
                float(&c)[4] = CORR ? corr.v[i][j] : acc.v[i][j];
                if constexpr (A_SPLIT) MmaType<E>::mma(c, al[i], bh[j]);
                if constexpr (B_SPLIT) MmaType<E>::mma(c, ah[i], bl[j]);
            }
    }
    if constexpr (CORR) acc.zip(corr, [](int, int, float& x, float& c) { x += c; });
}

// Deterministic per-row sums of an accumulator's elements f(row, col, value): quad shuffles, then the
// WN warp partials in a fixed order. `scratch` holds WN * M floats; the result lands in out[row]
// (written by threads < M). Contains __syncthreads: call from every thread of the block.
template <int M, int N, int NW, typename F>
__device__ __forceinline__ void acc_row_sums(Acc<M, N, NW>& acc, F&& f, float* scratch, float* out) {
    using C = Acc<M, N, NW>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (C::active(warp)) {
#pragma unroll
        for (int i = 0; i < C::MT; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float s = 0.f;
#pragma unroll
                for (int j = 0; j < C::NT; ++j)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e)
                        s += f(C::row(warp, lane, i, e), C::col(warp, lane, j, e), acc.v[i][j][e]);
                s += __shfl_xor_sync(0xffffffffu, s, 1);
                s += __shfl_xor_sync(0xffffffffu, s, 2);
                if ((lane & 3) == 0) scratch[(warp / C::WM) * M + C::row(warp, lane, i, 2 * h)] = s;
            }
        }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < M; r += blockDim.x) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < C::WN; ++w) s += scratch[w * M + r];
        out[r] = s;
    }
    __syncthreads();
}

}  // namespace rawdelta
