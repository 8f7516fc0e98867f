// Hopper tensor-memory-access copies (cp.async.bulk.tensor, sm_90a): one thread issues a whole tile's copy
// from global to shared memory; an mbarrier counts its bytes, and the threads that read the tile wait on it.
// Tensor maps are encoded on the host (rawdelta/cuda/tensor_map.py) and passed by value as __grid_constant__
// kernel parameters. Other targets compile these helpers to a trap; the host launches them only on sm_90.
//
// Operand tiles are boxes of 64 rows x 64 16-bit elements (128 bytes per row, 8 KB, 1024-byte aligned) in the
// 128-byte swizzle: the 16-byte piece j of row r sits at piece j ^ (r % 8). That is the layout wgmma reads through
// a 128-byte-swizzle matrix descriptor (wgmma.cuh: a_kmajor_sw128, a_mnmajor_sw128), and TMA fetches it in whole
// 128-byte rows. Narrower boxes (16 or 32 columns, read by threads) take the swizzle of their row length
// (swizzled()).
#pragma once
#include "common/wgmma.cuh"

namespace rawdelta {

// An encoded tensor map (CUtensorMap: 128 opaque bytes, 64-byte aligned).
struct alignas(64) TmaMap {
    unsigned long long opaque[16];
};

constexpr int BOX_ROWS = 64, SW128_BOX_BYTES = BOX_ROWS * 128;  // every box's rows; a 128-byte-swizzle box's bytes

__device__ __forceinline__ void mbar_init(u64* bar, unsigned count) {
#ifdef RAWDELTA_WGMMA
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}
// mbarrier.init made visible to the async proxy (the TMA units that complete the barriers' transactions).
__device__ __forceinline__ void fence_mbarrier_init() {
#ifdef RAWDELTA_WGMMA
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// The one arrival of a phase, announcing the bytes the copies of that phase will deliver.
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, unsigned bytes) {
#ifdef RAWDELTA_WGMMA
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
#endif
}
// One arrival without bytes (release: this thread's shared-memory writes before it are seen by the waiters).
__device__ __forceinline__ void mbar_arrive(u64* bar) {
#ifdef RAWDELTA_WGMMA
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
// Until the phase of parity `parity` has completed (its arrival made and all its bytes landed).
__device__ __forceinline__ void mbar_wait(u64* bar, unsigned parity) {
#ifdef RAWDELTA_WGMMA
    asm volatile(
        "{\n.reg .pred done;\nwait_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
#else
    __trap();
#endif
}

// Box (x, y, z) of a rank-3 tensor map (x the innermost coordinate, in elements) into shared memory at dst; its
// bytes count toward bar's current phase. Coordinates past the tensor's extent read as zeros.
__device__ __forceinline__ void tma_load_3d(void* dst, const TmaMap* map, int x, int y, int z, u64* bar) {
#ifdef RAWDELTA_WGMMA
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(z), "r"(smem_addr(bar))
        : "memory");
#else
    __trap();
#endif
}

// Element offset of (r, c) in a tile of `cols` 16-bit columns stored as TMA boxes of 64 rows x min(cols, 64)
// columns, each in the swizzle of its row length (32, 64 or 128 bytes: the 16-byte piece bits of an address are
// XORed with its bits 7 and up), boxes 64 rows apart. Box starts aligned to 1024 bytes.
__device__ __forceinline__ int swizzled(int r, int c, int cols) {
    const int bc = cols < 64 ? cols : 64, rb = 2 * bc;
    const int off = (c / bc) * (BOX_ROWS * rb) + r * rb + (c % bc) * 2;
    return (off ^ (((off >> 7) & (rb / 16 - 1)) << 4)) >> 1;
}

// Rows [r0, 64) of `boxes` consecutive TMA boxes with rows of `row_bytes` to zero, by threads [0, nthreads) (a
// row's pieces are only permuted within the row, so whole rows are cleared alike in any swizzle). Generic-proxy
// writes: the caller fences (fence_proxy_async) and synchronises before wgmma reads them.
__device__ __forceinline__ void zero_box_rows(unsigned char* tile, int boxes, int r0, int row_bytes, int nthreads) {
    const int per_row = row_bytes / 16, per_box = (BOX_ROWS - r0) * per_row;  // 16-byte pieces
    for (int idx = threadIdx.x; idx < boxes * per_box; idx += nthreads) {
        const int b = idx / per_box, p = idx % per_box;
        *reinterpret_cast<uint4*>(tile + (b * BOX_ROWS + r0) * row_bytes + p * 16) = make_uint4(0u, 0u, 0u, 0u);
    }
}

}  // namespace rawdelta
