// Where the attention backward's time goes, on a GPU machine with nvcc and no Rust:
// times each kernel of one backward (prep, the main kernel of every variant, the dQ
// conversion) and the forward variants with CUDA events at benches/attention.rs's shape
// (16384 tokens, 32/8 heads, d = 128, causal), and runs each once more for a profiler
// (ncu) to catch. The sm_90a wgmma kernels (wg2*) run last and only on compute
// capability 9.0: a fault there ends the run after the other lines are out.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Ikernels tools/prof/attn_bwd.cu -o /tmp/attn_bwd
//   /tmp/attn_bwd                       # s = 1024, 2048, 4096 (16384 tokens in all)
//   /tmp/attn_bwd 4096 once             # one s, each kernel run twice (for ncu)
// gpu-check.sh's runner (section prof) builds and runs it, then runs ncu as this says:
// ncu: attention_bwd_(w8q64s2g|wg2q64s2)_bf16_d128 4096 once
//
// Inputs are a real forward's (O and lse from attention_fwd_bf16_d128) on random Q/K/V/dO,
// so the exponentials see realistic values. A timing tool, not a test: parity lives in
// tests/gpu_attention.rs. Launch shapes mirror src/backend/cuda/attention.rs.
#include "attention.cu"

#include <cstring>
#include <vector>

#include "prof.cuh"

struct Timer {
    cudaEvent_t a, b;
    Timer() {
        CK(cudaEventCreate(&a));
        CK(cudaEventCreate(&b));
    }
    template <class F> float ms(F f, int reps) {
        f(); // warm-up
        CK(cudaEventRecord(a));
        for (int i = 0; i < reps; i++) f();
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float t;
        CK(cudaEventElapsedTime(&t, a, b));
        return t / reps;
    }
};

static void profile(int S, bool once);

int main(int argc, char **argv) {
    if (argc > 1) {
        const int S = atoi(argv[1]);
        if (S < 128 || 16384 % S != 0) {
            fprintf(stderr, "attn_bwd: sequence %s must divide 16384 and be >= 128\n", argv[1]);
            return 2;
        }
        profile(S, argc > 2 && !strcmp(argv[2], "once"));
    } else {
        for (int S : {1024, 2048, 4096}) profile(S, false);
    }
    return 0;
}

static void profile(int S, bool once) {
    const int T = 16384, H = 32, HKV = 8, D = 128, NS = T / S;
    const float scale = 1.0f / sqrtf((float)D);
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));

    __nv_bfloat16 *q, *k, *v, *o, *d_o, *dk, *dv, *dq;
    float *lse, *delta, *dq_accum;
    uint32_t *starts, *lens;
    const int64_t nq = (int64_t)T * H * D, nkv = (int64_t)T * HKV * D;
    CK(cudaMalloc(&q, nq * 2));
    CK(cudaMalloc(&o, nq * 2));
    CK(cudaMalloc(&d_o, nq * 2));
    CK(cudaMalloc(&dq, nq * 2));
    CK(cudaMalloc(&k, nkv * 2));
    CK(cudaMalloc(&v, nkv * 2));
    CK(cudaMalloc(&dk, nkv * 2));
    CK(cudaMalloc(&dv, nkv * 2));
    CK(cudaMalloc(&lse, (int64_t)T * H * 4));
    CK(cudaMalloc(&delta, (int64_t)T * H * 4));
    CK(cudaMalloc(&dq_accum, nq * 4));
    CK(cudaMalloc(&starts, NS * 4));
    CK(cudaMalloc(&lens, NS * 4));
    std::vector<uint32_t> hs(NS), hl(NS, S);
    for (int i = 0; i < NS; i++) hs[i] = i * S;
    CK(cudaMemcpy(starts, hs.data(), NS * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(lens, hl.data(), NS * 4, cudaMemcpyHostToDevice));
    prof_fill<<<1024, 256>>>(q, nq, 1, -1.0f, 1.0f);
    prof_fill<<<1024, 256>>>(k, nkv, 2, -1.0f, 1.0f);
    prof_fill<<<1024, 256>>>(v, nkv, 3, -1.0f, 1.0f);
    prof_fill<<<1024, 256>>>(d_o, nq, 4, -0.1f, 0.1f);
    CK(cudaGetLastError());

    // Forward (the default kernel: 4 warps, 64 query rows a block, 48 KB).
    AttnFwdParams fp{o, lse, q, k, v, starts, lens, NS, H, HKV, 0, scale, 0};
    const int fwd_smem = palign::attention::fwd_smem_bytes<128, 4, 1, 64, 1>();
    CK(cudaFuncSetAttribute(attention_fwd_bf16_d128, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            fwd_smem));
    auto fwd = [&] { attention_fwd_bf16_d128<<<dim3(H * NS, S / 64), 128, fwd_smem>>>(fp); };
    AttnBwdPrepParams pp{delta, dq_accum, o, d_o, T, H, D, 0};
    auto prep = [&] { attention_bwd_prep_bf16<<<(T * H + 7) / 8, 256>>>(pp); };
    AttnBwdParams bp{dq_accum, dk, dv, q, k, v, d_o, lse, delta, starts, lens, NS, H, HKV, 0, scale, 0};
    AttnDqParams dp{dq, dq_accum, nq, scale, 0};
    const int dq_grid = (int)std::min<int64_t>((nq / 4 + 255) / 256, prop.multiProcessorCount * 16);
    auto conv = [&] { attention_bwd_dq_bf16<<<dq_grid, 256>>>(dp); };

    struct Bwd {
        const char *name;
        void (*k)(AttnBwdParams);
        int warps, smem;
    };
    using namespace palign::attention;
    const bool hung = prof_tests_hung("gpu_attention");
    if (hung) printf("attn_bwd: wgmma kernels skipped (gpu_attention timed out)\n");
    const bool sm90 = prop.major == 9 && prop.minor == 0 && !hung;
    const Bwd bwds[] = {
        {"w8q64s2", attention_bwd_bf16_d128, 8, bwd_smem_bytes<128, 8, 64, 2>()},
        {"w8q64s2a", attention_bwd_w8q64s2a_bf16_d128, 8, bwd_smem_bytes<128, 8, 64, 2>()},
        {"w4q64s2a", attention_bwd_w4q64s2a_bf16_d128, 4, bwd_smem_bytes<128, 4, 64, 2>()},
        {"w8q64s2g", attention_bwd_w8q64s2g_bf16_d128, 8, bwdg_smem_bytes<128, 8, 64, 2>()},
        {"w4q64s2g", attention_bwd_w4q64s2g_bf16_d128, 4, bwdg_smem_bytes<128, 4, 64, 2>()},
        {"wg2q64s2", attention_bwd_wg2q64s2_bf16_d128, 8, bwd_wgmma_smem_bytes<128, 2, 64, 2>()},
    };
    struct Fwd {
        const char *name;
        void (*k)(AttnFwdParams);
        int rows, threads, smem;
    };
    const Fwd fwds[] = {
        {"w4m2n64s2", attention_fwd_w4m2n64s2_bf16_d128, 128, 128, fwd_smem_bytes<128, 4, 2, 64, 2>()},
        {"wg2n128s2", attention_fwd_wg2n128s2_bf16_d128, 128, 256, fwd_wgmma_smem_bytes<128, 2, 128, 2>()},
        {"wg2n128s3", attention_fwd_wg2n128s3_bf16_d128, 128, 256, fwd_wgmma_smem_bytes<128, 2, 128, 3>()},
        {"wg2n128s3p", attention_fwd_wg2n128s3p_bf16_d128, 128, 256, fwd_wgmma_smem_bytes<128, 2, 128, 3>()},
        {"wg2n64s2", attention_fwd_wg2n64s2_bf16_d128, 128, 256, fwd_wgmma_smem_bytes<128, 2, 64, 2>()},
    };
    fwd();
    prep();
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    Timer tm;
    const int reps = once ? 1 : 10;
    // 4·s²·d·H/2 per sequence forward (causal), backward 2.5x (benches/attention.rs).
    const double fwd_flop = 4.0 * S * (double)S * D * H / 2 * NS, bwd_flop = 2.5 * fwd_flop;
    printf("attn_bwd on %s: %d tokens, s=%d, %d/%d heads, d=%d, causal\n", prop.name, T, S, H,
           HKV, D);
    const float t_fwd = tm.ms(fwd, reps), t_prep = tm.ms(prep, reps), t_conv = tm.ms(conv, reps);
    printf("PROF fwd (default)     %8.3f ms  %6.1f TFLOP/s\n", t_fwd, fwd_flop / t_fwd / 1e9);
    printf("PROF bwd prep          %8.3f ms  %6.1f GB/s\n", t_prep,
           (2.0 * nq * 2 + nq * 4 + T * H * 4.0) / t_prep / 1e6);
    printf("PROF bwd dq convert    %8.3f ms  %6.1f GB/s\n", t_conv, (nq * 4.0 + nq * 2) / t_conv / 1e6);
    // Two passes, the wgmma kernels (wg*, sm_90a) in the second: a fault in one cannot
    // take the other lines with it.
    for (const bool wg : {false, true}) {
        if (wg && !sm90) break;
        for (const Fwd &f : fwds) {
            if ((f.name[1] == 'g') != wg) continue;
            CK(cudaFuncSetAttribute(f.k, cudaFuncAttributeMaxDynamicSharedMemorySize, f.smem));
            auto run = [&] { f.k<<<dim3(H * NS, (S + f.rows - 1) / f.rows), f.threads, f.smem>>>(fp); };
            const float t = tm.ms(run, reps);
            CK(cudaGetLastError());
            printf("PROF fwd %-13s %8.3f ms  %6.1f TFLOP/s\n", f.name, t, fwd_flop / t / 1e9);
        }
        fwd(); // the default's O and lse again for the backward
        CK(cudaDeviceSynchronize());
        for (const Bwd &b : bwds) {
            if ((b.name[1] == 'g') != wg) continue;
            CK(cudaFuncSetAttribute(b.k, cudaFuncAttributeMaxDynamicSharedMemorySize, b.smem));
            const int keys = 16 * b.warps;
            auto run = [&] { b.k<<<dim3(HKV * NS, (S + keys - 1) / keys), 32 * b.warps, b.smem>>>(bp); };
            const float t = tm.ms(run, reps);
            CK(cudaGetLastError());
            printf("PROF bwd main %-9s %8.3f ms  %6.1f TFLOP/s  (+prep+convert %.3f ms: %.1f TFLOP/s)\n",
                   b.name, t, bwd_flop / t / 1e9, t + t_prep + t_conv,
                   bwd_flop / (t + t_prep + t_conv) / 1e9);
        }
    }
    CK(cudaDeviceSynchronize());
    for (void *ptr : {(void *)q, (void *)o, (void *)d_o, (void *)dq, (void *)k, (void *)v, (void *)dk,
                      (void *)dv, (void *)lse, (void *)delta, (void *)dq_accum, (void *)starts,
                      (void *)lens})
        CK(cudaFree(ptr));
}
