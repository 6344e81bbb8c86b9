// Probes of the hardware primitives the kernels are built on, one small launch each, so a
// GPU run can tell which primitive a failing kernel misreads.
//
// wgmma_probe_<form>: one sm_90a warpgroup MMA of each form the kernels use (common.cuh):
//   form 0  m64n128k16, A and B K-major in shared memory     (fwd_wgmma S, NF4 GEMMs)
//   form 1  m64n64k16,  A and B K-major                       (wg2n64s2 S, bwd_wgmma Sᵀ, dPᵀ)
//   form 2  m64n64k16,  A and B MN-major                      (bwd_wgmma dQ)
//   form 3  m64n64k16,  A from registers, B MN-major          (fwd_wgmma P·V, bwd dV, dK)
//   form 4  m64n256k16, A from registers, B K-major           (NF4 _rs GEMMs)
// D[64][N] = (accumulate ? 1 : 0) + A[64][16]·B[16][N] with A, B given row-major as f32
// (small integers, so every product and sum is exact and the expected D is known bit for
// bit). The operands go to shared memory in the layouts the kernels build (128-byte rows,
// 16-byte chunk c of row r at c ^ (r % 8), 1024-byte aligned; K-major: a row per m or n,
// MN-major: a row per k), or, for register A, into mma.sync's A fragment; D comes back
// from the accumulator fragment (element 4j+i: row 16q + g + 8(i/2), column 8j + 2t + i%2).
// A wrong descriptor field, swizzle, transpose flag or fragment shows as wrong elements,
// and the pattern (transposed, shifted by 8 rows, ...) names the misreading.
// One block of 128 threads; PROBE_SMEM bytes of dynamic shared memory (under the 48 KB
// that needs no opt-in).

#include "common.cuh"

namespace palign::probe {

// Element (r, c) of a tile of 128-byte rows (64 bf16), swizzled as above.
__device__ __forceinline__ void put(uint8_t *tile, int r, int c, float v) {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    *reinterpret_cast<__nv_bfloat16 *>(tile + r * 128 + (((c / 8) ^ (r % 8)) << 4) + 2 * (c % 8)) = h;
}

__device__ __forceinline__ uint32_t pair(const float *a, int r, int k) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a[r * 16 + k], a[r * 16 + k + 1]);
    return *reinterpret_cast<const uint32_t *>(&h);
}

template <int N> __device__ void store_d(float *d, const float (&acc)[N / 2]) {
    const int q = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int j = 0; j < N / 8; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) d[(16 * q + g + 8 * (i / 2)) * N + 8 * j + 2 * t + i % 2] = acc[4 * j + i];
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(PALIGN_KEMU)
// A tile (8 KB: 64 rows) and B tile (32 KB: 256 rows), plus the 1024-byte alignment.
constexpr int PROBE_SMEM = 8192 + 256 * 128 + 1024;

// One kernel per form: with all five in one, ptxas serialized the wgmmas (C7511,
// insufficient registers for the pipeline), which build.rs rightly refuses.
template <int FORM> __device__ void wgmma_probe(const WgmmaProbeParams &p) {
    constexpr int N = FORM == 0 ? 128 : FORM == 4 ? 256 : 64;
    constexpr bool A_MN = FORM == 2, B_MN = FORM == 2 || FORM == 3;
    // A launcher/kernel mismatch must fail loudly.
    if (p.form != FORM || dynamic_smem_bytes() < (uint32_t)PROBE_SMEM) __trap();
    PALIGN_DYNAMIC_SMEM(smem_raw);
    const uint32_t raw = smem_addr(smem_raw);
    uint8_t *smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
    uint8_t *ta = smem, *tb = smem + 8192; // A: up to 64 rows; B: up to 256 rows
    for (int i = threadIdx.x; i < (8192 + 256 * 128) / 4; i += blockDim.x)
        reinterpret_cast<uint32_t *>(smem)[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < 64 * 16; i += blockDim.x) { // A[m][k]
        const int m = i / 16, k = i % 16;
        if (A_MN) put(ta, k, m, p.a[i]);
        else put(ta, m, k, p.a[i]);
    }
    for (int i = threadIdx.x; i < 16 * N; i += blockDim.x) { // B[k][n]
        const int k = i / N, c = i % N;
        if (B_MN) put(tb, k, c, p.b[i]);
        else put(tb, c, k, p.b[i]);
    }
    fence_proxy_async_smem();
    __syncthreads();
    const int q = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const int r = 16 * q + g;
    const uint32_t af[4] = {pair(p.a, r, 2 * t), pair(p.a, r + 8, 2 * t), pair(p.a, r, 2 * t + 8),
                            pair(p.a, r + 8, 2 * t + 8)};
    const uint64_t da = A_MN ? wg_desc_mn(smem_addr(ta)) : wg_desc(smem_addr(ta));
    const uint64_t db = B_MN ? wg_desc_mn(smem_addr(tb)) : wg_desc(smem_addr(tb));
    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; i++) d[i] = p.accumulate ? 1.0f : 0.0f;
    wg_pin(d); // the writes stay ahead of the fence (else ptxas injects an arrive, C7519)
    wg_fence();
    if constexpr (FORM == 0) wgmma_m64n128k16(d, da, db, p.accumulate != 0);
    if constexpr (FORM == 1) wgmma_m64n64k16<0, 0>(d, da, db, p.accumulate != 0);
    if constexpr (FORM == 2) wgmma_m64n64k16<1, 1>(d, da, db, p.accumulate != 0);
    if constexpr (FORM == 3) wgmma_m64n64k16_rs_t(d, af, db); // register A always accumulates
    if constexpr (FORM == 4) wgmma_m64n256k16_rs(d, af, db);
    wg_commit();
    wg_wait<0>();
    wg_pin(d);
    store_d<N>(p.d, d);
}
#else
template <int FORM> __device__ void wgmma_probe(const WgmmaProbeParams &) { __trap(); }
#endif

} // namespace palign::probe

// wgmma_probe_<form>: the forms above, one kernel each (128 threads, PROBE_SMEM bytes).
extern "C" __global__ void __launch_bounds__(128) wgmma_probe_0(const WgmmaProbeParams p) {
    palign::probe::wgmma_probe<0>(p);
}

extern "C" __global__ void __launch_bounds__(128) wgmma_probe_1(const WgmmaProbeParams p) {
    palign::probe::wgmma_probe<1>(p);
}

extern "C" __global__ void __launch_bounds__(128) wgmma_probe_2(const WgmmaProbeParams p) {
    palign::probe::wgmma_probe<2>(p);
}

extern "C" __global__ void __launch_bounds__(128) wgmma_probe_3(const WgmmaProbeParams p) {
    palign::probe::wgmma_probe<3>(p);
}

extern "C" __global__ void __launch_bounds__(128) wgmma_probe_4(const WgmmaProbeParams p) {
    palign::probe::wgmma_probe<4>(p);
}
