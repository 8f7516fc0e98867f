// Hopper warpgroup tile products (wgmma.mma_async, sm_90a): a warpgroup of 4 warps computes
// D[64 x N] (+)= A[64 x 16] B[16 x N] per instruction, both operands read from shared memory through
// matrix descriptors, fp32 accumulators in registers. The instructions exist only in sm_90a code; other
// targets compile these helpers to a trap, and the host launches wgmma kernels only on sm_90 devices, whose
// modules the loader builds for sm_90a.
//
// Shared-memory layout ("blocked", no swizzle): a rows x cols tile of 16-bit elements (cols a multiple of
// 8) is stored as 8 x 8 core matrices of 128 contiguous bytes, row-major over core matrices:
//   element (r, c) at ((r / 8) * (cols / 8) + c / 8) * 64 + (r % 8) * 8 + c % 8.
// The same tile serves as a K-major operand (cols the contraction dimension) or an MN-major one (rows the
// contraction dimension). A warp's accumulator pairs land in one core matrix row each, so epilogue stores
// into this layout are free of bank conflicts, and 16-byte chunks of rows fill it linearly.
#pragma once
#include "common/chunk_stages.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RAWDELTA_WGMMA 1
#endif

namespace rawdelta {

typedef unsigned long long u64;

// Bytes rounded up to the 128-byte swizzle's period (1024): what a buffer of tiles takes so that the tiles after it
// (the next stage, the next slot) start aligned too.
__host__ __device__ constexpr int sw128_aligned(int bytes) { return (bytes + 1023) / 1024 * 1024; }

// Element offset of (r, c) in a blocked tile with `cols` columns.
__device__ __forceinline__ int blk(int r, int c, int cols) {
    return (((r >> 3) * (cols >> 3) + (c >> 3)) << 6) + ((r & 7) << 3) + (c & 7);
}

// Matrix descriptor without swizzle: start address, leading-dimension byte offset (between core matrices
// along the contraction dimension for K-major operands, along M/N for MN-major ones) and stride byte offset
// (the other direction).
__device__ __forceinline__ u64 wg_desc(unsigned saddr, unsigned lbo, unsigned sbo) {
    return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32);
}

// Descriptor of the 16-wide contraction step kk of a blocked tile (`cols` columns, E 16-bit elements).
// K-major: the operand's M/N rows are tile rows [r0, r0 + 64 or N), contraction over tile columns.
__device__ __forceinline__ u64 desc_kmajor(unsigned tile, int cols, int r0, int kk) {
    return wg_desc(tile + r0 * cols * 2 + kk * 256, 128, cols * 16);
}
// MN-major: the operand's M/N indices are tile columns [c0, ...), contraction over tile rows.
__device__ __forceinline__ u64 desc_mnmajor(unsigned tile, int cols, int c0, int kk) {
    return wg_desc(tile + kk * 32 * cols + c0 * 16, cols * 16, 128);
}

// Operands for WgAcc::mma: the descriptor of (tile i, step kk) is the first one's plus i * di + (kk % 4) * dk +
// (kk / 4) * dg (dg = 4 dk but where four steps end a 128-byte-swizzle box). The start-address field is the low
// 14 bits (byte address / 16) and shared addresses stay below 2^18, so the offsets never carry out of it: one
// 64-bit add per product instead of a descriptor built from fields.
struct WgOperand {
    u64 d0;
    unsigned di, dk, dg;
    __device__ __forceinline__ u64 at(int i, int kk) const {
        return d0 + (u64)(i * di + (kk & 3) * dk + (kk >> 2) * dg);
    }
};
// K-major: operand rows are tile rows from r0 (A: r0 + 64 i); MN-major: operand rows are tile columns from c0
// (A: c0 + 64 i), the tile's transpose. A B operand takes i = 0.
__device__ __forceinline__ WgOperand a_kmajor(unsigned tile, int cols, int r0) {
    return {desc_kmajor(tile, cols, r0, 0), (unsigned)(64 * cols * 2) >> 4, 256u >> 4, 1024u >> 4};
}
__device__ __forceinline__ WgOperand a_mnmajor(unsigned tile, int cols, int c0 = 0) {
    return {desc_mnmajor(tile, cols, c0, 0), (64u * 16) >> 4, (unsigned)(32 * cols) >> 4, (unsigned)(128 * cols) >> 4};
}
// 128-byte-swizzle tiles (tma.cuh): 64 rows, columns in boxes of 64 (8 KB apart). Layout type 1 in bits 62-63.
// K-major: a step of 16 columns is 32 bytes into the swizzled rows, then the next box; 8-row groups 1024 bytes
// apart (the leading offset is unused). MN-major: operand rows are the tile's columns, box i holding the 64 of
// A tile i; a step of 16 tile rows is 2048 bytes.
__device__ __forceinline__ u64 wg_desc_sw128(unsigned saddr, unsigned lbo, unsigned sbo) {
    return wg_desc(saddr, lbo, sbo) | (1ull << 62);
}
__device__ __forceinline__ WgOperand a_kmajor_sw128(unsigned tile) {
    return {wg_desc_sw128(tile, 16, 1024), 8192u >> 4, 32u >> 4, 8192u >> 4};
}
__device__ __forceinline__ WgOperand a_mnmajor_sw128(unsigned tile) {
    return {wg_desc_sw128(tile, 8192, 1024), 8192u >> 4, 2048u >> 4, 8192u >> 4};
}
__device__ __forceinline__ WgOperand b_kmajor(unsigned tile, int cols, int r0) { return a_kmajor(tile, cols, r0); }
__device__ __forceinline__ WgOperand b_mnmajor(unsigned tile, int cols, int c0) { return a_mnmajor(tile, cols, c0); }

__device__ __forceinline__ void wg_fence() {
#ifdef RAWDELTA_WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#ifdef RAWDELTA_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void wg_wait() {
#ifdef RAWDELTA_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Generic-proxy shared-memory writes (st.shared, cp.async) made visible to the async proxy that wgmma
// reads through; each writing thread fences, then the threads synchronise.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef RAWDELTA_WGMMA
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Barrier over one warpgroup (named barrier 1 + wg; 0 is __syncthreads).
__device__ __forceinline__ void wg_barrier(int wg) { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); }

// d[64 x N] = (scale_d ? d : 0) + A B. TA / TB: the operand is MN-major (transposed) in shared memory.
template <typename E, int N, bool TA, bool TB> struct Wgmma;

#define RAWDELTA_D8(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
// One wgmma of SHAPE on E operands (bf16 or f16): ACC the accumulator operand list, DA / DB / SD / XA / XB
// the operand numbers of the two descriptors, scale-d and the two transpose immediates; the accumulator
// operands (__VA_ARGS__) come first.
#define RAWDELTA_WGMMA_ASM(SHAPE, TY, ACC, DA, DB, SD, XA, XB, ...)                                           \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" SD ", 0;\nwgmma.mma_async.sync.aligned." SHAPE ".f32." TY   \
                 "." TY " {" ACC "}, %" DA ", %" DB ", p, 1, 1, %" XA ", %" XB ";\n}\n"                             \
                 : __VA_ARGS__                                                                                \
                 : "l"(da), "l"(db), "r"(scale_d), "n"(TA ? 1 : 0), "n"(TB ? 1 : 0))
#define RAWDELTA_WGMMA_RUN(SHAPE, ACC, DA, DB, SD, XA, XB, ...)                                                \
    if constexpr (SameType<E, __nv_bfloat16>::value)                                                           \
        RAWDELTA_WGMMA_ASM(SHAPE, "bf16", ACC, DA, DB, SD, XA, XB, __VA_ARGS__);                               \
    else                                                                                                        \
        RAWDELTA_WGMMA_ASM(SHAPE, "f16", ACC, DA, DB, SD, XA, XB, __VA_ARGS__)

template <typename E, bool TA, bool TB> struct Wgmma<E, 16, TA, TB> {
    static __device__ __forceinline__ void run(float (&d)[8], u64 da, u64 db, int scale_d) {
#ifdef RAWDELTA_WGMMA
        RAWDELTA_WGMMA_RUN("m64n16k16", "%0,%1,%2,%3,%4,%5,%6,%7", "8", "9", "10", "11", "12", RAWDELTA_D8(d));
#else
        __trap();
#endif
    }
};

template <typename E, bool TA, bool TB> struct Wgmma<E, 32, TA, TB> {
    static __device__ __forceinline__ void run(float (&d)[16], u64 da, u64 db, int scale_d) {
#ifdef RAWDELTA_WGMMA
        RAWDELTA_WGMMA_RUN("m64n32k16", "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15", "16", "17", "18",
                           "19", "20", RAWDELTA_D8(d), RAWDELTA_D8((d + 8)));
#else
        __trap();
#endif
    }
};

template <typename E, bool TA, bool TB> struct Wgmma<E, 64, TA, TB> {
    static __device__ __forceinline__ void run(float (&d)[32], u64 da, u64 db, int scale_d) {
#ifdef RAWDELTA_WGMMA
        RAWDELTA_WGMMA_RUN("m64n64k16",
                           "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,"
                           "%25,%26,%27,%28,%29,%30,%31",
                           "32", "33", "34", "35", "36", RAWDELTA_D8(d), RAWDELTA_D8((d + 8)), RAWDELTA_D8((d + 16)),
                           RAWDELTA_D8((d + 24)));
#else
        __trap();
#endif
    }
};

#undef RAWDELTA_WGMMA_RUN
#undef RAWDELTA_WGMMA_ASM
#undef RAWDELTA_D8

// A warpgroup's accumulator of MT stacked 64 x N tiles (rows [64 i, 64 i + 64) in tile i). Thread t of the
// warpgroup holds, per tile, N / 2 floats: element x at row 16 (t / 32) + (t % 32) / 4 + 8 ((x % 4) / 2) and
// column 8 (x / 4) + 2 (t % 4) + x % 2, the m16n8 accumulator layout repeated along N.
template <int MT, int N>
struct WgAcc {
    static constexpr int NX = N / 2;
    float v[MT][NX];

    __device__ __forceinline__ void fill(float x) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int e = 0; e < NX; ++e) v[i][e] = x;
    }
    // f(row, col, value&) for every element this thread holds.
    template <typename F>
    __device__ __forceinline__ void apply(F&& f) {
        apply_pairs([&](int r, int c, float& x0, float& x1) {
            f(r, c, x0);
            f(r, c + 1, x1);
        });
    }
    // f(row, col, value&, next value&) for each pair of adjacent columns (col even) this thread holds.
    template <typename F>
    __device__ __forceinline__ void apply_pairs(F&& f) {
        zip_pairs(*this, [&](int r, int c, float& x0, float& x1, float&, float&) { f(r, c, x0, x1); });
    }
    // f(row, col, x0&, x1&, y0&, y1&): the pairs of this accumulator (x) beside the same elements of o (y).
    template <typename F>
    __device__ __forceinline__ void zip_pairs(WgAcc& o, F&& f) {
        const int r = row0(), c = col0();
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int e = 0; e < NX; e += 2)
                f(64 * i + r + 8 * ((e & 3) >> 1), 8 * (e >> 2) + c, v[i][e], v[i][e + 1], o.v[i][e], o.v[i][e + 1]);
    }
    // This thread's first row (it also holds row + 8, and both + 64 i) and first column (it also holds col + 1,
    // and both + 8 j) in the m16n8 layout.
    static __device__ __forceinline__ int row0() {
        const int t = threadIdx.x & 127;
        return 16 * (t >> 5) + ((t & 31) >> 2);
    }
    static __device__ __forceinline__ int col0() { return 2 * (threadIdx.x & 3); }
    // x *= f(row) for every element, f evaluated once per row this thread holds.
    template <typename F>
    __device__ __forceinline__ void scale_rows(F&& f) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int a = 0; a < 2; ++a) {
                const float m = f(64 * i + row0() + 8 * a);
#pragma unroll
                for (int e = 2 * a; e < NX; e += 4) {
                    v[i][e] *= m;
                    v[i][e + 1] *= m;
                }
            }
    }
    // Sums over this warpgroup's columns of f(row, col, value) for each row (MT = 1): put(row, sum) is called
    // by one lane per row (lane shuffles over the 4 lanes that share it).
    template <typename F, typename P>
    __device__ __forceinline__ void row_sums(F&& f, P&& put) {
        static_assert(MT == 1, "row_sums: one 64-row tile");
        float s[2] = {0.f, 0.f};  // this thread's two rows r0 and r0 + 8
        apply_pairs([&](int r, int c, float& x0, float& x1) { s[(r >> 3) & 1] += f(r, c, x0) + f(r, c + 1, x1); });
        put_row_sums(s, put);
    }
    // Row sums (as row_sums) of the products with the same elements of a blocked tile of 16-bit X elements with
    // COLS columns, at its columns [c0, c0 + N) (c0 a multiple of 8): each element pair is one 32-bit load at an
    // offset fixed at compile time from the thread's first.
    template <int COLS, typename X, typename P>
    __device__ __forceinline__ void row_dots(const X* tile, int c0, P&& put) const {
        static_assert(MT == 1, "row_dots: one 64-row tile");
        const int base = blk(row0(), c0 + col0(), COLS);
        float s[2] = {0.f, 0.f};
#pragma unroll
        for (int e = 0; e < NX; e += 2) {
            const int a = (e & 3) >> 1;
            const float2 y = load_pair(tile, base + a * 8 * COLS + (e >> 2) * 64);
            s[a] += v[0][e] * y.x + v[0][e + 1] * y.y;
        }
        put_row_sums(s, put);
    }
    template <typename P>
    static __device__ __forceinline__ void put_row_sums(float (&s)[2], P&& put) {
        const int t = threadIdx.x & 127;
#pragma unroll
        for (int a = 0; a < 2; ++a) {
            s[a] += __shfl_xor_sync(0xffffffffu, s[a], 1);
            s[a] += __shfl_xor_sync(0xffffffffu, s[a], 2);
            if ((t & 3) == 0) put(row0() + 8 * a, s[a]);
        }
    }
    // acc (+)= A B over KD (a multiple of 16): A the M x KD operand, B KD x N; the first step overwrites when
    // `accumulate` is false. Issues only: the caller commits and waits.
    template <typename E, bool TA, bool TB, int KD>
    __device__ __forceinline__ void mma(const WgOperand& a, const WgOperand& b, bool accumulate) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int kk = 0; kk < KD / 16; ++kk)
                Wgmma<E, N, TA, TB>::run(v[i], a.at(i, kk), b.at(0, kk), (accumulate || kk > 0) ? 1 : 0);
    }
};

// Row and column of piece idx (8 columns, 16 bytes) of a blocked tile with cg pieces per row, in the order that
// makes shared-memory addresses linear in idx: down the 8 rows of a core matrix, then across, then down.
__device__ __forceinline__ int2 blocked_piece(int idx, int cg) {
    return make_int2(((idx / (8 * cg)) << 3) + (idx & 7), ((idx >> 3) % cg) << 3);
}

// The piece that thread t takes in the compile-time copy paths. Within each warp, every 8 lanes (which the memory
// system serves together for 16-byte accesses) take 4 rows x 2 adjacent pieces, so that each request covers whole
// 32-byte sectors (with 8 rows x 1 piece each request would cover half sectors, which the lanes with the other
// halves would fetch again).
__device__ __forceinline__ int sector_piece(int t) {
    return (t & ~31) | (((t & 1) | ((t >> 3) & 2)) << 3) | ((t >> 1) & 3) | ((t >> 1) & 4);
}

// 16-byte chunks of global rows into a blocked tile: s (RP x CP, E; RP a multiple of 8) from g[r * gstride + c],
// rows < rows and columns < cols (a multiple of 8), zeros elsewhere, by a block of NT threads. g and gstride
// 16-byte aligned. Piece idx lands at element 8 idx of s (blocked_piece's order); the compile-time path hands
// the pieces of each warp to its lanes in sector_piece's order. The caller waits (cp_async_wait_all).
template <int CP, int RP, int NT, typename E>
__device__ __forceinline__ void load_blocked(E* s, const E* __restrict__ g, i64 gstride, int rows, int cols) {
    constexpr int CG = CP / 8, N = RP * CG;
    if constexpr (NT % (8 * CG) == 0 && N % NT == 0) {
        // Then a thread's chunks share a column, every NT / CG rows: their addresses are the first's plus constants
        // instead of each chunk's position being decoded, and each copy has its own address registers (a copy in
        // flight holds its registers: advancing one pointer would make each copy wait for the one before).
        constexpr int RS = NT / CG;
        const int tp = sector_piece(threadIdx.x);
        const int2 rc = blocked_piece(tp, CG);
        const bool cin = rc.y < cols;
        const E* gp = g + rc.x * gstride + rc.y;
        const unsigned sa = smem_addr(s + tp * 8);
#pragma unroll
        for (int i = 0; i < N / NT; ++i) {
            const bool in = cin && rc.x + i * RS < rows;
            cp_async16_shared(sa + i * NT * 16, in ? gp + i * RS * gstride : g, in ? 16 : 0);
        }
    } else {
        for (int idx = threadIdx.x; idx < N; idx += NT) {
            const int2 rc = blocked_piece(idx, CG);
            const int r = rc.x, c = rc.y;
            const bool in = r < rows && c < cols;
            cp_async16(s + idx * 8, in ? g + r * gstride + c : g, in ? 16 : 0);
        }
    }
}

// The mirror of load_blocked for NC columns from c0 of a blocked tile s (RP x CPS, E): rows < rows and columns
// < cols to g[r * gstride + c], in 16-byte pieces of 8 columns, by NT threads (t: this thread's index among them).
// Each 8 lanes write whole 32-byte sectors of 4 rows (sector_piece; stores from accumulator fragments write 16
// bytes of 8 rows per warp instruction), reading shared memory with 2-way bank conflicts; a thread's
// shared-memory reads all issue before its stores. g and gstride 16-byte aligned.
template <int NC, int NT, int CPS, int RP, typename E>
__device__ __forceinline__ void store_blocked(E* __restrict__ g, i64 gstride, const E* s, int rows, int c0, int cols,
                                              int t) {
    constexpr int CG = NC / 8, N = RP * CG;
    if constexpr (NT % (8 * CG) == 0 && N % NT == 0) {
        constexpr int RS = NT / CG, IT = N / NT;
        const int2 rc = blocked_piece(sector_piece(t), CG);
        const int c = c0 + rc.y;
        uint4 x[IT];
#pragma unroll
        for (int i = 0; i < IT; ++i) x[i] = *reinterpret_cast<const uint4*>(s + blk(rc.x + i * RS, c, CPS));
#pragma unroll
        for (int i = 0; i < IT; ++i)
            if (rc.x + i * RS < rows && c < cols) *reinterpret_cast<uint4*>(g + (rc.x + i * RS) * gstride + c) = x[i];
    } else {
        for (int idx = t; idx < N; idx += NT) {
            const int2 rc = blocked_piece(idx, CG);
            const int r = rc.x, c = c0 + rc.y;
            if (r < rows && c < cols)
                *reinterpret_cast<uint4*>(g + r * gstride + c) = *reinterpret_cast<const uint4*>(s + blk(r, c, CPS));
        }
    }
}

}  // namespace rawdelta
