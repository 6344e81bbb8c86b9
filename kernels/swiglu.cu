// SwiGLU (LLaMA MLP activation), forward and backward, elementwise over n values.
//
// Forward, in HF's cast order (act_fn(gate) is a bf16 tensor before the multiply):
//   a   = bf16( silu(g) ),  silu(g) = g * sig(g),  sig(g) = 1 / (1 + exp(-g))
//   out = bf16( a * u )
// Backward, as torch autograd rounds it (each product is a bf16 tensor):
//   dup   = bf16( dout * a )
//   da    = bf16( dout * u )
//   dgate = bf16( da * sig(g) * (1 + g * (1 - sig(g))) )     d silu / dg
// All math in f32; silu/sigmoid use expf (not the fast intrinsic) for parity.
#include "common.cuh"

namespace palign {
namespace swiglu {

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

__device__ __forceinline__ float forward(float g, float u) {
    const float a = round_bf16(g * sigmoid(g));
    return a * u;
}

__device__ __forceinline__ void backward(float dout, float g, float u, float &dgate,
                                         float &dup) {
    const float sg = sigmoid(g);
    const float a = round_bf16(g * sg);
    dup = dout * a;
    const float da = round_bf16(dout * u);
    dgate = da * sg * (1.0f + g * (1.0f - sg));
}

} // namespace swiglu
} // namespace palign

extern "C" __global__ void swiglu_forward_bf16(SwigluForwardParams p) {
    using namespace palign;
    const bool vec = aligned16(p.out) && aligned16(p.gate) && aligned16(p.up);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * 8;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < p.n; i += stride) {
        if (vec && i + 8 <= p.n) {
            float g[8], u[8];
            load8(p.gate + i, g);
            load8(p.up + i, u);
#pragma unroll
            for (int k = 0; k < 8; k++) g[k] = swiglu::forward(g[k], u[k]);
            store8(p.out + i, g);
        } else {
            for (int64_t j = i; j < i + 8 && j < p.n; j++)
                p.out[j] = f2bf(swiglu::forward(bf2f(p.gate[j]), bf2f(p.up[j])));
        }
    }
}

extern "C" __global__ void swiglu_backward_bf16(SwigluBackwardParams p) {
    using namespace palign;
    const bool vec = aligned16(p.dgate) && aligned16(p.dup) && aligned16(p.dout) &&
                     aligned16(p.gate) && aligned16(p.up);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * 8;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < p.n; i += stride) {
        if (vec && i + 8 <= p.n) {
            float d[8], g[8], u[8], dg[8], du[8];
            load8(p.dout + i, d);
            load8(p.gate + i, g);
            load8(p.up + i, u);
#pragma unroll
            for (int k = 0; k < 8; k++) swiglu::backward(d[k], g[k], u[k], dg[k], du[k]);
            store8(p.dgate + i, dg);
            store8(p.dup + i, du);
        } else {
            for (int64_t j = i; j < i + 8 && j < p.n; j++) {
                float dg, du;
                swiglu::backward(bf2f(p.dout[j]), bf2f(p.gate[j]), bf2f(p.up[j]), dg, du);
                p.dgate[j] = f2bf(dg);
                p.dup[j] = f2bf(du);
            }
        }
    }
}
