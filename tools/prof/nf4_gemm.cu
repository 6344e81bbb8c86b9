// The NF4 training GEMMs kernel by kernel, on a GPU machine with nvcc and no Rust: the
// mma.sync fused kernels (nf4_gemm_fwd, nf4_gemm_bwd) and, on sm_90a, the wgmma ones
// (nf4_gemm_{fwd,bwd}_wgmma: 128 rows a block; _m256: 256; _rs: W from registers), timed with CUDA
// events at Mistral-7B's projection shapes and M = 512, 2048, 8192 tokens (small M: few
// blocks, where the 256-row kernel's grid is half as tall), plus a once mode for ncu.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Ikernels tools/prof/nf4_gemm.cu -o /tmp/nf4_gemm
//   /tmp/nf4_gemm                # every shape and M
//   /tmp/nf4_gemm once           # 4096x4096, M = 8192, each kernel once (for ncu)
// gpu-check.sh's runner (section prof) builds and runs it, then runs ncu as this says:
// ncu: nf4_gemm_(fwd|bwd)(_wgmma|_wgmma_m256|_wgmma_rs)?$ once
//
// What ncu should settle: whether the wgmma kernels are bound by issue slots (the W decode,
// kernels/nf4.cu §5), by shared-memory bandwidth (wgmma operand reads + decode stores + LUT
// lookups) or by the per-k-tile barrier. Launch shapes mirror src/backend/cuda/nf4.rs
// (grid x = N / 128 output columns, grid y = M / rows a block). A timing tool, not a test:
// parity lives in tests/gpu_nf4.rs, and cuBLAS's figure for the same shapes in benches/nf4.rs.
#include "nf4.cu"

#include <cstring>
#include <vector>

#include "prof.cuh"
#include "prof_nf4.cuh"

struct Kernel {
    const char *name;
    void (*f)(Nf4GemmParams);
    int rows, threads, smem; // rows of X a block; src/backend/cuda/nf4.rs's constants
    bool sm90, bwd;          // bwd: dX[M, K] = dY[M, N]·W (grid x over K)
};

static const Kernel KERNELS[] = {
    {"fused", nf4_gemm_fwd, 128, 256, 73728, false, false},
    {"wgmma", nf4_gemm_fwd_wgmma, 128, 256, 132096, true, false},
    {"wgmma_m256", nf4_gemm_fwd_wgmma_m256, 256, 512, 197632, true, false},
    {"wgmma_rs", nf4_gemm_fwd_wgmma_rs, 256, 256, 132096, true, false},
    {"fused", nf4_gemm_bwd, 128, 256, 73728, false, true},
    {"wgmma", nf4_gemm_bwd_wgmma, 128, 256, 132096, true, true},
    {"wgmma_m256", nf4_gemm_bwd_wgmma_m256, 256, 512, 197632, true, true},
    {"wgmma_rs", nf4_gemm_bwd_wgmma_rs, 256, 256, 138240, true, true},
};

int main(int argc, char **argv) {
    const bool once = argc > 1 && !strcmp(argv[1], "once");
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    const bool hung = prof_tests_hung("gpu_nf4");
    const bool sm90 = prop.major == 9 && prop.minor == 0 && !hung;
    printf("nf4_gemm on %s (%d SMs)%s\n", prop.name, prop.multiProcessorCount,
           hung ? ": wgmma kernels skipped (gpu_nf4 timed out)" : "");
    struct Shape {
        int n, k;
    };
    std::vector<Shape> shapes = {{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}};
    std::vector<int> ms = {512, 2048, 8192};
    if (once) shapes = {{4096, 4096}}, ms = {8192};
    for (const Kernel &kn : KERNELS)
        if (!kn.sm90 || sm90)
            CK(cudaFuncSetAttribute(kn.f, cudaFuncAttributeMaxDynamicSharedMemorySize, kn.smem));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (const Shape &s : shapes) {
        int64_t bytes = 0;
        const Nf4WeightParams w = make_weight(s.n, s.k, 1, &bytes);
        const int mmax = ms.back();
        // X [M, K] (or dY [M, N]) and the output: max(N, K) columns serve both products.
        const int64_t wide = s.n > s.k ? s.n : s.k;
        __nv_bfloat16 *x, *y;
        CK(cudaMalloc(&x, (int64_t)mmax * wide * 2));
        CK(cudaMalloc(&y, (int64_t)mmax * wide * 2));
        prof_fill<<<1024, 256>>>(x, (int64_t)mmax * wide, 9, -1.0f, 1.0f);
        CK(cudaDeviceSynchronize());
        for (int m : ms) {
            const double flops = 2.0 * m * s.n * (double)s.k;
            for (const Kernel &kn : KERNELS) {
                if (kn.sm90 && !sm90) continue;
                const dim3 grid(((kn.bwd ? s.k : s.n) + 127) / 128, (m + kn.rows - 1) / kn.rows);
                auto launch = [&] {
                    Nf4GemmParams p{y, x, w, m, 0};
                    kn.f<<<grid, kn.threads, kn.smem>>>(p);
                };
                if (!once) launch(); // warm-up; ncu needs none
                const int reps = once ? 1 : 10;
                CK(cudaEventRecord(a));
                for (int i = 0; i < reps; i++) launch();
                CK(cudaEventRecord(b));
                CK(cudaEventSynchronize(b));
                CK(cudaGetLastError());
                float ms_total;
                CK(cudaEventElapsedTime(&ms_total, a, b));
                const double msec = ms_total / reps;
                printf("PROF gemm %s %-10s m=%-5d %5dx%-5d %8.3f ms %6.1f TFLOP/s\n",
                       kn.bwd ? "bwd" : "fwd", kn.name, m, s.n, s.k, msec,
                       flops / (msec * 1e-3) / 1e12);
            }
        }
        free_weight(w);
        CK(cudaFree(x));
        CK(cudaFree(y));
    }
    return 0;
}
