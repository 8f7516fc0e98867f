// Per-item readiness flags between a producer kernel and a consumer kernel that run at the same time (the
// consumer launched right after the producer with programmatic stream serialization: prepare and the Hopper forward
// pass, docs/benchmarks.md, "Prepare beside the forward pass").
// The producer publishes each finished item with a release store; the consumer's warp that reads the item waits
// for it (await_item) and acquires it. Deadlock-free only because the consumer cannot start before every producer block
// has started (the producer triggers its dependents first thing, and the launch waits for all of its blocks),
// and producer blocks never wait on the consumer.
#pragma once
#include "common/wgmma.cuh"

namespace rawdelta {

// Lets a dependent grid launched with programmatic stream serialization start (sm_90; a no-op without one).
__device__ __forceinline__ void launch_dependents() {
#ifdef RAWDELTA_WGMMA
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The block's item is written: after a barrier (so every thread's writes precede it), one thread's release
// store, at GPU scope, makes them visible to whoever acquires the flag.
__device__ __forceinline__ void publish_item(int* flag) {
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(flag), "r"(1) : "memory");
}

// Until the item behind `flag` is published, by a whole warp (acquire: each lane's later reads see the item's
// writes). Lane 0 polls with relaxed loads, slowly enough to leave L2 and the SM to the producer's blocks, which
// share the SMs; then every lane acquires the flag once.
__device__ __forceinline__ void await_item(const int* flag) {
    int v;
    if ((threadIdx.x & 31) == 0) {
        for (;;) {
            asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(flag) : "memory");
            if (v != 0) break;
            __nanosleep(256);
        }
    }
    __syncwarp();
    do {  // seen by lane 0, so at once
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(flag) : "memory");
    } while (v == 0);
}

// This thread's acquired global writes made visible to the async proxy (TMA copies it issues next).
__device__ __forceinline__ void fence_proxy_async_global() {
#ifdef RAWDELTA_WGMMA
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
#endif
}

}  // namespace rawdelta
