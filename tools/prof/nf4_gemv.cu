// The NF4 decode GEMV kernel by kernel, on a GPU machine with nvcc and no Rust: every
// variant of kernels/nf4.cu (nf4_gemv_<v>, _m16 for M > 8) and the one-warp-per-row
// baseline, timed with CUDA events at Mistral-7B's decode shapes, each launch on the next
// of enough weight copies to fill 256 MB (so the weights stream from HBM, as in a
// model's decode, instead of sitting in the 50 MB L2), plus a once mode for ncu.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Ikernels tools/prof/nf4_gemv.cu -o /tmp/nf4_gemv
//   /tmp/nf4_gemv                # every shape, M = 1, 8, 16
//   /tmp/nf4_gemv once           # 14336x4096, M = 1, each kernel once (for ncu)
// gpu-check.sh's runner (section prof) builds and runs it, then runs ncu as this says:
// ncu: nf4_gemv_nt(4u2b1|4u1b4|4u1p2)$ once
//
// Weights: random codes with double-quantized scales (blocksize 64, 256), the QLoRA
// default; the values do not change the timing. GB/s counts what a launch must read once
// (codes, 8-bit scales, second-level scales, X) and write (Y). A timing tool, not a test:
// parity lives in tests/gpu_nf4.rs. Launch shapes mirror src/backend/cuda/nf4.rs.
#include "nf4.cu"

#include <cstring>
#include <vector>

#include "prof.cuh"
#include "prof_nf4.cuh"

struct Kernel {
    const char *name;
    void (*m8)(Nf4GemvParams);
    void (*m16)(Nf4GemvParams);
    int tiles; // 8-column output tiles a block; 0: the naive kernel (8 rows a block)
};

// src/backend/cuda/nf4.rs GEMV_VARIANTS, in its order, then the baseline.
static const Kernel KERNELS[] = {
    {"nt1u4b1", nf4_gemv_nt1u4b1, nf4_gemv_nt1u4b1_m16, 1},
    {"nt2u4b1", nf4_gemv_nt2u4b1, nf4_gemv_nt2u4b1_m16, 2},
    {"nt4u2b1", nf4_gemv_nt4u2b1, nf4_gemv_nt4u2b1_m16, 4},
    {"nt1u4b4", nf4_gemv_nt1u4b4, nf4_gemv_nt1u4b4_m16, 1},
    {"nt2u4b3", nf4_gemv_nt2u4b3, nf4_gemv_nt2u4b3_m16, 2},
    {"nt2u2b4", nf4_gemv_nt2u2b4, nf4_gemv_nt2u2b4_m16, 2},
    {"nt4u1b4", nf4_gemv_nt4u1b4, nf4_gemv_nt4u1b4_m16, 4},
    {"nt1u1p3", nf4_gemv_nt1u1p3, nf4_gemv_nt1u1p3_m16, 1},
    {"nt1u2p2", nf4_gemv_nt1u2p2, nf4_gemv_nt1u2p2_m16, 1},
    {"nt2u1p3", nf4_gemv_nt2u1p3, nf4_gemv_nt2u1p3_m16, 2},
    {"nt4u1p2", nf4_gemv_nt4u1p2, nf4_gemv_nt4u1p2_m16, 4},
    {"naive", nf4_gemv_naive, nf4_gemv_naive, 0},
};

int main(int argc, char **argv) {
    const bool once = argc > 1 && !strcmp(argv[1], "once");
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("nf4_gemv on %s (%d SMs, L2 %d MB): weights rotated over >= 256 MB\n", prop.name,
           prop.multiProcessorCount, prop.l2CacheSize >> 20);
    struct Shape {
        int n, k;
    };
    std::vector<Shape> shapes = {{4096, 4096}, {14336, 4096}, {4096, 14336}, {1024, 4096}};
    std::vector<int> ms = {1, 8, 16};
    if (once) shapes = {{14336, 4096}}, ms = {1};
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (const Shape &s : shapes) {
        int64_t bytes = 0;
        std::vector<Nf4WeightParams> ws;
        ws.push_back(make_weight(s.n, s.k, 1, &bytes));
        const int copies = once ? 1 : (int)((256ll << 20) / bytes + 1);
        for (int i = 1; i < copies; i++) ws.push_back(make_weight(s.n, s.k, 1 + 7 * i, &bytes));
        __nv_bfloat16 *x, *y;
        CK(cudaMalloc(&x, 16ll * s.k * 2));
        CK(cudaMalloc(&y, 16ll * s.n * 2));
        prof_fill<<<256, 256>>>(x, 16ll * s.k, 9, -1.0f, 1.0f);
        CK(cudaDeviceSynchronize());
        for (int m : ms) {
            const double amount = (double)bytes + 2.0 * m * (s.n + s.k);
            double base_us = 0;
            for (const Kernel &kn : KERNELS) {
                void (*f)(Nf4GemvParams) = m > 8 ? kn.m16 : kn.m8;
                const int grid = kn.tiles ? (s.n + 8 * kn.tiles - 1) / (8 * kn.tiles) : (s.n + 7) / 8;
                auto launch = [&](int i) {
                    Nf4GemvParams p{y, x, ws[i % ws.size()], m, 0};
                    f<<<grid, 256>>>(p);
                };
                if (!once) launch(0); // warm-up (module load, first touch); ncu needs none
                const int reps = once ? 1 : 8 * (int)ws.size();
                CK(cudaEventRecord(a));
                for (int i = 0; i < reps; i++) launch(i + 1);
                CK(cudaEventRecord(b));
                CK(cudaEventSynchronize(b));
                CK(cudaGetLastError());
                float ms_total;
                CK(cudaEventElapsedTime(&ms_total, a, b));
                const double us = 1e3 * ms_total / reps, gbs = amount / us / 1e3;
                if (base_us == 0) base_us = us;
                printf("PROF gemv %-8s m=%-2d %5dx%-5d %8.2f us %7.1f GB/s (%4.1f%% of 4800) %.2fx %s\n",
                       kn.name, m, s.n, s.k, us, gbs, gbs / 48.0, base_us / us, KERNELS[0].name);
            }
        }
        for (const Nf4WeightParams &w : ws) free_weight(w);
        CK(cudaFree(x));
        CK(cudaFree(y));
    }
    return 0;
}
