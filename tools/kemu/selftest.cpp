// kemu's own tests: the emulated primitives against their PTX definitions, and each
// class of kernel bug the emulator promises to catch, caught. Built and run by
// tools/kemu/build.sh (exit status 1 and a FAIL line on any failure).
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <string>
#include <vector>

#include "runtime.h"

namespace kemu {
const KernelEntry kKernels[] = {{"none", nullptr, nullptr}};
const int kNumKernels = 0;
} // namespace kemu

namespace {

int failures = 0;

void expect(bool ok, const std::string &what) {
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    if (!ok) failures++;
}

// Runs `fn(p)` as a kernel; returns the launch error ("" when it succeeded).
template <class P> std::string run(void (*fn)(P), P p, dim3 grid, dim3 block, unsigned smem = 0) {
    kemu::KernelEntry k = kemu::entry("selftest", fn);
    void *args[] = {&p};
    std::string err;
    if (kemu::launch(k, grid, block, smem, args, err)) return "";
    return err;
}

struct Buf {
    float *f;
    uint32_t *u;
    int n;
};

// ---------------------------------------------------------------- semantics
void k_shfl(Buf b) {
    const int t = threadIdx.x;
    float v = float(t);
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    b.f[t] = v;                                           // the warp's sum in every lane
    b.u[t] = __shfl_xor_sync(0xffffffffu, unsigned(t), 1, 2); // pairs swap
}

void k_block_sum(Buf b) {
    __shared__ float s[256];
    s[threadIdx.x] = float(threadIdx.x + blockIdx.x);
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0;
        for (unsigned i = 0; i < blockDim.x; i++) t += s[i];
        b.f[blockIdx.x] = t;
    }
}

// One warp: D = A·B + C with A[16][16] = r*16+k, B[16][8] = k-n, C = 1 at (r, n),
// fragments loaded per the layout in kernels/common.cuh (PTX ISA, mma.m16n8k16).
__nv_bfloat16 bf(float x) { return __float2bfloat16_rn(x); }
uint32_t pack(float lo, float hi) { return uint32_t(bf(lo).x) | uint32_t(bf(hi).x) << 16; }
float Aval(int r, int k) { return float((r * 16 + k) % 7 - 3); }
float Bval(int k, int n) { return float((k - n) % 5); }

void k_mma(Buf b) {
    const int l = threadIdx.x, g = l / 4, t = l % 4;
    uint32_t a[4] = {pack(Aval(g, 2 * t), Aval(g, 2 * t + 1)),
                     pack(Aval(g + 8, 2 * t), Aval(g + 8, 2 * t + 1)),
                     pack(Aval(g, 2 * t + 8), Aval(g, 2 * t + 9)),
                     pack(Aval(g + 8, 2 * t + 8), Aval(g + 8, 2 * t + 9))};
    const uint32_t b0 = pack(Bval(2 * t, g), Bval(2 * t + 1, g));
    const uint32_t b1 = pack(Bval(2 * t + 8, g), Bval(2 * t + 9, g));
    float c[4] = {1, 1, 1, 1};
    kemu::mma_m16n8k16_bf16(c, a, b0, b1);
    b.f[g * 8 + 2 * t] = c[0];
    b.f[g * 8 + 2 * t + 1] = c[1];
    b.f[(g + 8) * 8 + 2 * t] = c[2];
    b.f[(g + 8) * 8 + 2 * t + 1] = c[3];
}

// ldmatrix x4 over a 16x16 bf16 tile M[r][c] = r*16 + c in shared memory (row stride
// 32 bytes): lane l gives row (l % 16), column half (l / 16).
void k_ldmatrix(Buf b) {
    __shared__ __align__(16) uint16_t tile[16 * 16];
    const int l = threadIdx.x;
    for (int i = l; i < 256; i += 32) tile[i] = uint16_t(i);
    __syncwarp();
    uint32_t r[4], rt[4];
    kemu::ldmatrix(r, 4, false, &tile[(l % 16) * 16 + (l / 16) * 8]);
    kemu::ldmatrix(rt, 4, true, &tile[(l % 16) * 16 + (l / 16) * 8]);
    // A lane's later store cannot reach what the others loaded: the warp reads at once.
    for (int i = 0; i < 8; i++) tile[(l % 16) * 16 + (l / 16) * 8 + i] = 0;
    for (int i = 0; i < 4; i++) {
        b.u[l * 8 + i] = r[i];
        b.u[l * 8 + 4 + i] = rt[i];
    }
}

// cp.async lands only when waited for.
void k_cp_async(Buf b) {
    __shared__ __align__(16) float s[4];
    if (threadIdx.x == 0) {
        s[0] = -1;
        kemu::cp_async(s, b.f, 16, 16);
        kemu::cp_async_commit();
        b.f[8] = s[0]; // before the wait: still -1
        kemu::cp_async_wait(0);
        b.f[9] = s[0]; // after: b.f[0]
    }
}

// One warpgroup's wgmma m64n128k16 on K-major 128-byte-swizzled tiles laid out as the
// PTX ISA describes (16-byte chunk c of row r at chunk c ^ (r % 8) of the row's 128 bytes,
// tiles 1024-byte aligned in the shared window); k < 16 of A[r][k] and B[n][k].
float WA(int r, int k) { return float((r + 2 * k) % 5 - 2); }
float WB(int n, int k) { return float((n - k) % 3); }
uint64_t wg_desc(uint32_t saddr) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) |
           ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
// MN-major (both offsets 1024: the tiles here are one 64-wide atom across).
uint64_t wg_desc_mn(uint32_t saddr) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)(1024 >> 4) << 16) |
           ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
// The block's dynamic shared memory from its first 1024-byte boundary (`base`: its
// shared-window address), where 128B-swizzle atoms must start.
uint8_t *aligned_tiles(uint32_t &base) {
    const uint32_t raw = kemu::smem_addr(kemu::dyn_smem);
    base = (raw + 1023u) & ~1023u;
    return kemu::dyn_smem + (base - raw);
}
// This thread's accumulators d (wgmma D fragment: warp q, lane (g, t): element 4j + i at
// row 16q + g + 8(i/2), column 8j + 2t + i%2) into the row-major 64 x n result b.f.
void store_d(Buf b, const float *d, int n) {
    const int q = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, tt = threadIdx.x % 4;
    for (int j = 0; j < n / 8; j++)
        for (int i = 0; i < 4; i++)
            b.f[(16 * q + g + 8 * (i / 2)) * n + 8 * j + 2 * tt + i % 2] = d[4 * j + i];
}
void k_wgmma(Buf b) {
    uint32_t base;
    uint8_t *t = aligned_tiles(base);
    for (int i = threadIdx.x; i < 192 * 64; i += blockDim.x) {
        const int r = i / 64, k = i % 64; // rows 0..63: A, 64..191: B
        const int rr = r < 64 ? r : r - 64;
        uint8_t *row = t + (r < 64 ? 0 : 8192) + rr * 128;
        const float v = k >= 16 ? 99.0f : r < 64 ? WA(rr, k) : WB(rr, k);
        const __nv_bfloat16 h = __float2bfloat16_rn(v);
        std::memcpy(row + (((k / 8) ^ (rr % 8)) << 4) + 2 * (k % 8), &h, 2);
    }
    __syncthreads();
    float d[64];
    for (int i = 0; i < 64; i++) d[i] = 1.0f;
    const uint32_t b_tile = b.n == 2 && threadIdx.x == 70 ? base + 9216 : base + 8192;
    // b.n == 2: one thread differs; b.n == 3: scale-d 0 (D = A·Bᵀ, the 1s dropped)
    if (b.n != 6) kemu::wgmma_fence(); // b.n == 6, the bug: no wgmma.fence before it
    kemu::wgmma_m64n128k16(d, wg_desc(base), wg_desc(b_tile), b.n != 3);
    kemu::wgmma_commit();
    if (b.n == 1 && threadIdx.x == 3) t[0] ^= 0x40; // the bug: an operand changes in flight
    if (b.n == 4 && threadIdx.x == 3) d[5] = 0.0f;  // the bug: its accumulator is written
    if (b.n == 5) { // a second wgmma on d; d written after the first retires, the second not
        kemu::wgmma_m64n128k16(d, wg_desc(base), wg_desc(b_tile), true);
        kemu::wgmma_commit();
        kemu::wgmma_wait(1);
        if (threadIdx.x == 3) d[5] = 0.0f;
    }
    const float early = b.n == 8 ? d[5] : 0.0f; // the bug: an accumulator read in flight
    if (b.n == 7) { // the bug: warps 0-1 wait at one wgmma.wait_group, warps 2-3 at another
        if (threadIdx.x < 64) {
            asm volatile("" ::: "memory"); // keeps the two arms' calls apart
            kemu::wgmma_wait(0);
        } else {
            kemu::wgmma_wait(0);
        }
    }
    kemu::wgmma_wait(0);
    if (b.n == 8) d[5] = early;
    store_d(b, d, 128);
}

// This thread's register-A fragment of WA (mma.sync's A layout: reg 0 (row g, k 2t, 2t+1),
// reg 1 row g + 8, regs 2/3 the same rows at k + 8, rows 16q.. for warp q of the warpgroup).
void wa_fragment(uint32_t a[4]) {
    const int q = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, tt = threadIdx.x % 4;
    auto pair = [](int r, int k) {
        const __nv_bfloat16 lo = __float2bfloat16_rn(WA(r, k)), hi = __float2bfloat16_rn(WA(r, k + 1));
        uint16_t l, h;
        std::memcpy(&l, &lo, 2);
        std::memcpy(&h, &hi, 2);
        return uint32_t(l) | uint32_t(h) << 16;
    };
    const int r = 16 * q + g;
    a[0] = pair(r, 2 * tt), a[1] = pair(r + 8, 2 * tt);
    a[2] = pair(r, 2 * tt + 8), a[3] = pair(r + 8, 2 * tt + 8);
}

// The register-A form, m64n256k16: A's fragment from each lane's registers (mma.sync's A
// layout: reg 0 (row g, k 2t, 2t+1), reg 1 row g + 8, regs 2/3 the same rows at k + 8,
// rows 16q.. for warp q), B [256][16] in shared memory as above.
void k_wgmma_rs(Buf b) {
    uint32_t base;
    uint8_t *t = aligned_tiles(base);
    for (int i = threadIdx.x; i < 256 * 64; i += blockDim.x) {
        const int n = i / 64, k = i % 64;
        const __nv_bfloat16 h = __float2bfloat16_rn(k >= 16 ? 99.0f : WB(n, k));
        std::memcpy(t + n * 128 + (((k / 8) ^ (n % 8)) << 4) + 2 * (k % 8), &h, 2);
    }
    __syncthreads();
    const int q = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, tt = threadIdx.x % 4;
    uint32_t a[4];
    wa_fragment(a);
    float d[128];
    for (int i = 0; i < 128; i++) d[i] = 1.0f;
    kemu::wgmma_fence();
    kemu::wgmma_m64n256k16_rs(d, a, wg_desc(base));
    kemu::wgmma_commit();
    a[0] = a[1] = a[2] = a[3] = 0; // registers are read at issue
    kemu::wgmma_wait(0);
    store_d(b, d, 256);
}

// The MN-major (transposed) B form, m64n64k16 with A from registers: B[k][n] stored with
// k as the 128-byte row (64 n a row), rows 8 apart in 1024-byte atoms, 16-byte chunk c
// of row k at chunk c ^ (k % 8) (PTX ISA canonical MN-major 128B-swizzle layout).
void k_wgmma_rs_t(Buf b) {
    uint32_t base;
    uint8_t *t = aligned_tiles(base);
    for (int i = threadIdx.x; i < 16 * 64; i += blockDim.x) {
        const int k = i / 64, n = i % 64;
        const __nv_bfloat16 h = __float2bfloat16_rn(WB(n, k));
        std::memcpy(t + (k / 8) * 1024 + (k % 8) * 128 + (((n / 8) ^ (k % 8)) << 4) + 2 * (n % 8), &h, 2);
    }
    __syncthreads();
    uint32_t a[4];
    wa_fragment(a);
    float d[32];
    for (int i = 0; i < 32; i++) d[i] = 1.0f;
    kemu::wgmma_fence();
    kemu::wgmma_m64n64k16_rs_t(d, a, wg_desc_mn(base));
    kemu::wgmma_commit();
    kemu::wgmma_wait(0);
    store_d(b, d, 64);
}

// Both operands MN-major from shared memory (m64n64k16, transpose flags 1, 1): A[m][k]
// and B[k][n] stored with k as the 128-byte row, as k_wgmma_rs_t stores B.
void k_wgmma_ss_t(Buf b) {
    uint32_t base;
    uint8_t *t = aligned_tiles(base);
    for (int i = threadIdx.x; i < 2 * 16 * 64; i += blockDim.x) {
        const int which = i / 1024, k = (i % 1024) / 64, x = i % 64; // x: m (A) or n (B)
        const __nv_bfloat16 h = __float2bfloat16_rn(which == 0 ? WA(x, k) : WB(x, k));
        std::memcpy(t + which * 2048 + (k / 8) * 1024 + (k % 8) * 128 + (((x / 8) ^ (k % 8)) << 4) +
                        2 * (x % 8),
                    &h, 2);
    }
    __syncthreads();
    float d[32];
    for (int i = 0; i < 32; i++) d[i] = 1.0f;
    kemu::wgmma_fence();
    kemu::wgmma_m64n64k16(d, wg_desc_mn(base), wg_desc_mn(base + 2048), true, true, true);
    kemu::wgmma_commit();
    kemu::wgmma_wait(0);
    store_d(b, d, 64);
}

// A race (no barrier between a write and a read by another thread): what the reader
// sees depends on KEMU_ORDER, which is how running both orders exposes it.
void k_race(Buf b) {
    auto *v = reinterpret_cast<uint32_t *>(kemu::dyn_smem); // 0xffffffff at block start
    if (threadIdx.x == 0) *v = 1;
    if (threadIdx.x == 63) b.u[0] = *v;
}

// ---------------------------------------------------------------- bugs it must catch
// Half a warp waits at __syncthreads for the other half, which waits at a shuffle for
// the first. (Threads that exit count as arrived at __syncthreads, as on the GPU.)
void k_deadlock(Buf b) {
    if (threadIdx.x < 16)
        __syncthreads();
    else
        b.f[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
void k_exited_lane(Buf b) {
    if (threadIdx.x == 5) return;
    b.f[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
void k_misaligned_ldmatrix(Buf) {
    __shared__ __align__(16) uint16_t tile[16 * 16 + 8];
    uint32_t r[4];
    kemu::ldmatrix(r, 4, false, &tile[threadIdx.x % 16 * 16 + 1]);
}
void k_mixed_collectives(Buf b) {
    if (threadIdx.x % 2)
        b.f[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    else
        b.f[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 2);
}
void k_trap(Buf) {
    if (blockIdx.x == 2 && threadIdx.x == 7) __trap();
}

void k_past_the_end(Buf b) { b.f[b.n + threadIdx.x] = 1.0f; }
void k_misaligned_vector(Buf b) {
    const float4 v = *reinterpret_cast<const float4 *>(b.f + 1);
    b.f[0] = v.x;
}

extern "C" int cuMemAlloc_v2(uint64_t *ptr, size_t bytes); // driver.cpp

// Runs `k` in a child process; true when the child died of `sig`.
bool dies_of(void (*k)(Buf), int sig) {
    const pid_t pid = fork();
    if (pid == 0) {
        uint64_t p = 0;
        if (cuMemAlloc_v2(&p, 64 * sizeof(float)) != 0) _exit(3);
        run(k, Buf{reinterpret_cast<float *>(p), nullptr, 64}, {1, 1, 1}, {32, 1, 1});
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFSIGNALED(status) && WTERMSIG(status) == sig;
}

// ---------------------------------------------------------------- racecheck cases
// Run one at a time by the racecheck build (`selftest --race NAME`, tools/kemu/build.sh
// --racecheck): ThreadSanitizer must report a data race for each racy case and nothing
// for the others, which use the orderings a GPU guarantees.
void k_warp_exchange(Buf b) { // lanes swap values through shared memory
    __shared__ float s[32];
    s[threadIdx.x] = float(threadIdx.x);
    if (b.n) __syncwarp();
    b.f[threadIdx.x] = s[threadIdx.x ^ 1];
}
void k_shuffle_then_read(Buf b) { // a shuffle exchanges registers, it orders no memory
    __shared__ float s[1];
    if (threadIdx.x == 0) s[0] = 1;
    const float v = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    if (threadIdx.x == 1) b.f[1] = s[0] + v;
}
void k_cp_async_exchange(Buf b) { // each thread copies 16 bytes; its neighbour reads them
    __shared__ __align__(16) float s[64 * 4];
    const int t = threadIdx.x;
    kemu::cp_async(&s[4 * t], b.f + 4 * t, 16, 16);
    kemu::cp_async_commit();
    kemu::cp_async_wait(0);
    if (b.n) __syncthreads();
    b.u[t] = __float_as_uint(s[4 * ((t + 1) % 64)]);
}
void k_ldmatrix_other_warp(Buf b) { // warp 1 fills a tile that warp 0 loads
    __shared__ __align__(16) uint16_t tile[16 * 16];
    const int t = threadIdx.x;
    if (t >= 32)
        for (int i = t - 32; i < 256; i += 32) tile[i] = uint16_t(i);
    if (b.n) __syncthreads();
    if (t < 32) {
        uint32_t r[4];
        kemu::ldmatrix(r, 4, false, &tile[(t % 16) * 16 + (t / 16) * 8]);
        b.u[t] = r[0];
    }
}
// Between two barriers: thread 63 (the last to arrive, in the default order) reads a word
// that thread 0 writes. Races however many barriers came before (b.n: block; else warp).
void k_race_between_barriers(Buf b) {
    __shared__ unsigned v;
    const unsigned t = threadIdx.x, last = blockDim.x - 1;
    if (t == 0) v = 0;
    unsigned r = 0;
    if (b.n) {
        __syncthreads();
        if (t == last) r = v;
        if (t == 0) v = 1;
        __syncthreads();
    } else {
        __syncwarp();
        if (t == last) r = v;
        if (t == 0) v = 1;
        __syncwarp();
    }
    if (t == last) b.u[0] = r;
}
void k_atomic_count(Buf b) { atomicAdd(&b.f[0], 1.0f); }
void k_first_thread_writes(Buf b) {
    if (threadIdx.x == 0) b.f[0] = float(blockIdx.x);
}
void k_write_own(Buf b) { b.f[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f; }
void k_read_neighbour(Buf b) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    b.u[i] = __float_as_uint(b.f[(i + 37) % 256]);
}

// One case: `kernel` on `blocks` x `threads` with Buf::n = n, then `then` (a second
// launch of the same shape) when given.
struct RaceCase {
    const char *name;
    bool racy;
    void (*kernel)(Buf);
    int n;
    unsigned blocks, threads, smem;
    void (*then)(Buf) = nullptr;
};

const RaceCase kRaceCases[] = {
    {"block-barrier", false, k_block_sum, 0, 8, 256, 0},
    {"missing-block-barrier", true, k_race, 0, 1, 64, 1024},
    {"race-after-block-barrier", true, k_race_between_barriers, 1, 1, 64, 0},
    {"race-after-warp-barrier", true, k_race_between_barriers, 0, 1, 32, 0},
    {"warp-barrier", false, k_warp_exchange, 1, 1, 32, 0},
    {"missing-warp-barrier", true, k_warp_exchange, 0, 1, 32, 0},
    {"shuffle-is-no-barrier", true, k_shuffle_then_read, 0, 1, 32, 0},
    {"cp-async-then-barrier", false, k_cp_async_exchange, 1, 1, 64, 0},
    {"cp-async-without-barrier", true, k_cp_async_exchange, 0, 1, 64, 0},
    {"ldmatrix-after-barrier", false, k_ldmatrix_other_warp, 1, 1, 64, 0},
    {"ldmatrix-without-barrier", true, k_ldmatrix_other_warp, 0, 1, 64, 0},
    {"wgmma-after-barrier", false, k_wgmma, 0, 1, 128, 32768},
    {"atomics-across-blocks", false, k_atomic_count, 0, 4, 64, 0},
    {"blocks-write-one-word", true, k_first_thread_writes, 0, 4, 32, 0},
    {"launches-in-order", false, k_write_own, 0, 4, 64, 0, k_read_neighbour},
};

int race_case(const char *name) {
    std::vector<float> f(64 * 128, 0); // k_wgmma writes 64 x 128
    std::vector<uint32_t> u(1024, 0);
    for (const RaceCase &c : kRaceCases)
        if (std::string(name) == c.name) {
            const Buf b{f.data(), u.data(), c.n};
            const dim3 grid{c.blocks, 1, 1}, block{c.threads, 1, 1};
            std::string err = run(c.kernel, b, grid, block, c.smem);
            if (err.empty() && c.then) err = run(c.then, b, grid, block, c.smem);
            if (!err.empty()) std::printf("FAIL %s: %s\n", name, err.c_str());
            return err.empty() ? 0 : 1;
        }
    std::printf("FAIL no racecheck case %s\n", name);
    return 1;
}

} // namespace

int main(int argc, char **argv) {
    if (argc == 2 && std::string(argv[1]) == "--race-cases") {
        for (const RaceCase &c : kRaceCases) std::printf("%s %s\n", c.name, c.racy ? "racy" : "clean");
        return 0;
    }
    if (argc == 3 && std::string(argv[1]) == "--race") return race_case(argv[2]);

    std::vector<float> f(1024, 0);
    std::vector<uint32_t> u(1024, 0);
    Buf b{f.data(), u.data(), 1024};

    expect(run(k_shfl, b, {1, 1, 1}, {64, 1, 1}).empty(), "shuffles run");
    bool ok = true;
    for (int t = 0; t < 64; t++) {
        const float warp_sum = t < 32 ? 496.0f : 1520.0f;
        ok &= f[t] == warp_sum && u[t] == unsigned(t ^ 1);
    }
    expect(ok, "__shfl_xor_sync: butterfly sums per warp, width-2 swaps");

    expect(run(k_block_sum, b, {3, 1, 1}, {256, 1, 1}).empty(), "block sums run");
    expect(f[0] == 32640 && f[1] == 32896 && f[2] == 33152,
           "__syncthreads orders shared memory within each block");

    expect(run(k_mma, b, {1, 1, 1}, {32, 1, 1}).empty(), "mma runs");
    ok = true;
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 8; n++) {
            float want = 1;
            for (int k = 0; k < 16; k++) want += Aval(r, k) * Bval(k, n);
            ok &= f[r * 8 + n] == want;
        }
    expect(ok, "mma.m16n8k16 bf16: D = A·B + C with the PTX fragment layout");

    expect(run(k_ldmatrix, b, {1, 1, 1}, {32, 1, 1}).empty(), "ldmatrix runs");
    ok = true;
    for (int l = 0; l < 32; l++)
        for (int i = 0; i < 4; i++) {
            // Matrix i: rows 8(i%2).., columns 8(i/2)..; lane l: row l/4, columns 2(l%4)+{0,1}.
            const int r0 = 8 * (i % 2), c0 = 8 * (i / 2);
            const unsigned e0 = (r0 + l / 4) * 16 + c0 + 2 * (l % 4);
            ok &= u[l * 8 + i] == (e0 | (e0 + 1) << 16);
            // Transposed: rows 2(l%4)+{0,1}, column l/4.
            const unsigned t0 = (r0 + 2 * (l % 4)) * 16 + c0 + l / 4;
            ok &= u[l * 8 + 4 + i] == (t0 | (t0 + 16) << 16);
        }
    expect(ok, "ldmatrix.x4 and .x4.trans fragments");

    f[0] = 42;
    expect(run(k_cp_async, b, {1, 1, 1}, {32, 1, 1}).empty(), "cp.async runs");
    expect(f[8] == -1 && f[9] == 42, "cp.async data lands at cp.async.wait_group, not before");
    expect(__byte_perm(0x33221100u, 0x77665544u, 0x5410u) == 0x55441100u &&
               __byte_perm(0x33221100u, 0x77665544u, 0x0073u) == 0x00007733u,
           "__byte_perm: byte n from selector nibble n over {x, y}");

    // D (64 x n, row-major) == d0 + A·Bᵀ over k < 16, exactly (small integers).
    auto wg_result_is = [](const std::vector<float> &got, int n, float d0) {
        bool same = true;
        for (int r = 0; r < 64; r++)
            for (int c = 0; c < n; c++) {
                float want = d0;
                for (int k = 0; k < 16; k++) want += WA(r, k) * WB(c, k);
                same &= got[r * n + c] == want;
            }
        return same;
    };
    std::vector<float> big(64 * 128, 0);
    Buf wb{big.data(), nullptr, 0};
    expect(run(k_wgmma, wb, {1, 1, 1}, {128, 1, 1}, 32768).empty(), "wgmma runs");
    expect(wg_result_is(big, 128, 1.0f), "wgmma m64n128k16: D += A·Bᵀ from swizzled K-major tiles, the D fragment layout");
    std::vector<float> big_rs(64 * 256, 0);
    Buf rb{big_rs.data(), nullptr, 0};
    expect(run(k_wgmma_rs, rb, {1, 1, 1}, {128, 1, 1}, 33792).empty(), "wgmma (register A) runs");
    expect(wg_result_is(big_rs, 256, 1.0f), "wgmma m64n256k16 with A from registers: D += A·Bᵀ, the A and D fragment layouts");
    std::vector<float> big_t(64 * 64, 0);
    Buf tb{big_t.data(), nullptr, 0};
    expect(run(k_wgmma_rs_t, tb, {1, 1, 1}, {128, 1, 1}, 3072).empty(), "wgmma (MN-major B) runs");
    expect(wg_result_is(big_t, 64, 1.0f), "wgmma m64n64k16, register A, MN-major B: D += A·B from B[k][n] rows");
    std::fill(big_t.begin(), big_t.end(), 0.0f);
    expect(run(k_wgmma_ss_t, tb, {1, 1, 1}, {128, 1, 1}, 5120).empty(), "wgmma (MN-major A and B) runs");
    expect(wg_result_is(big_t, 64, 1.0f), "wgmma m64n64k16, both MN-major: D += A·B from A[k][m] and B[k][n] rows");
    wb.n = 3;
    expect(run(k_wgmma, wb, {1, 1, 1}, {128, 1, 1}, 32768).empty(), "wgmma (scale-d 0) runs");
    expect(wg_result_is(big, 128, 0.0f), "wgmma with scale-d 0: D = A·Bᵀ, the old D ignored");

    wb.n = 1;
    const std::string we = run(k_wgmma, wb, {1, 1, 1}, {128, 1, 1}, 32768);
    expect(we.find("changed") != std::string::npos,
           "a wgmma operand overwritten before wgmma.wait_group: " + we);
    for (int n : {4, 5}) {
        wb.n = n;
        const std::string wa = run(k_wgmma, wb, {1, 1, 1}, {128, 1, 1}, 32768);
        expect(wa.find("accumulator registers were written") != std::string::npos,
               std::string("a wgmma's accumulator written in flight (") +
                   (n == 4 ? "alone" : "behind an earlier wgmma on it") + "): " + wa);
    }
    wb.n = 6;
    const std::string wf = run(k_wgmma, wb, {1, 1, 1}, {128, 1, 1}, 32768);
    expect(wf.find("no wgmma.fence") != std::string::npos, "a wgmma with no wgmma.fence before it: " + wf);
    wb.n = 8;
    std::fill(big.begin(), big.end(), 0.0f);
    expect(run(k_wgmma, wb, {1, 1, 1}, {128, 1, 1}, 32768).empty(), "wgmma (early read) runs");
    expect(std::isnan(big[9]) && !std::isnan(big[0]), // thread 0: d[5] is row 0, column 9
           "an accumulator read before wgmma.wait_group is NaN (undefined on a GPU)");
    wb.n = 7;
    const std::string ww = run(k_wgmma, wb, {1, 1, 1}, {128, 1, 1}, 32768);
    expect(ww.find("different wgmma.wait_group") != std::string::npos,
           "the warps of a warpgroup at different wgmma.wait_group instructions: " + ww);
    wb.n = 2;
    const std::string wd = run(k_wgmma, wb, {1, 1, 1}, {128, 1, 1}, 32768);
    expect(wd.find("different operands") != std::string::npos,
           "a warpgroup whose threads give different wgmma descriptors: " + wd);

    const char *order = std::getenv("KEMU_ORDER");
    const bool reverse = order && std::string(order) == "reverse";
    expect(run(k_race, b, {1, 1, 1}, {64, 1, 1}, 1024).empty(), "the race runs");
    expect(u[0] == (reverse ? 0xffffffffu : 1u),
           std::string("threads run ") + (reverse ? "last to first" : "first to last") +
               " between waits (KEMU_ORDER)");

    auto fails_with = [](const std::string &err, const char *what) {
        return err.find(what) != std::string::npos;
    };
    std::string e = run(k_deadlock, b, {1, 1, 1}, {32, 1, 1});
    expect(fails_with(e, "deadlock"), "a __syncthreads and a shuffle that wait on each other: " + e);
    e = run(k_exited_lane, b, {1, 1, 1}, {32, 1, 1});
    expect(fails_with(e, "exited"), "a shuffle with an exited lane: " + e);
    e = run(k_misaligned_ldmatrix, b, {1, 1, 1}, {32, 1, 1});
    expect(fails_with(e, "aligned"), "a misaligned ldmatrix row: " + e);
    e = run(k_mixed_collectives, b, {1, 1, 1}, {32, 1, 1});
    expect(fails_with(e, "different warp-collective"),
           "lanes meeting at different shuffles: " + e);
    {
        kemu::KernelEntry k = kemu::entry("bounded", k_block_sum, 128);
        void *args[] = {&b};
        std::string err;
        kemu::launch(k, {1, 1, 1}, {256, 1, 1}, 0, args, err);
        expect(fails_with(err, "__launch_bounds__"), "a block over __launch_bounds__: " + err);
    }
    e = run(k_trap, b, {4, 1, 1}, {32, 1, 1});
    expect(fails_with(e, "__trap") && fails_with(e, "block (2,0,0), thread (7,0,0)"),
           "__trap names its block and thread: " + e);

    // Device memory from cuMemAlloc ends at an inaccessible page; vector accesses are
    // checked for alignment (-fsanitize=alignment, trapping). The child prints a kemu line.
    expect(dies_of(k_past_the_end, SIGSEGV), "a write past the end of an allocation faults");
    expect(dies_of(k_misaligned_vector, SIGILL), "a misaligned float4 load traps");

    std::printf("kemu selftest: %s\n", failures ? "FAILED" : "passed");
    return failures ? 1 : 0;
}
