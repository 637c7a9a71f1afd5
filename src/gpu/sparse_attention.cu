// Sparse attention over selected positions (pqcache GPU adapter). Compiled at run time with
// NVRTC; see src/gpu/mod.rs for the memory layout and the launch.
//
// One CUDA block per query head: block b handles query head qh0 + b (grid = kv_heads * group
// for a whole layer, or group blocks with qh0 = kv * group for one kv head). WARPS warps per block. Warp w
// takes the selected positions w, w + WARPS, ...: the 32 lanes compute q . k together (each
// lane DPL = ceil(d / 32) dimensions, a shuffle reduction), then each lane updates the
// online softmax state of its DPL output dimensions:
//     m' = max(m, s);  acc = acc * exp(m - m') + exp(s - m') * v;  l = l * exp(m - m') + exp(s - m')
// At the end the warps' (m, l, acc) are merged through shared memory with the same rule, and
// out = acc / l. f16 keys / values, f32 arithmetic throughout.

#define WARPS 4
#define MAX_DPL 16   // head_dim <= 512

// f16 bits to f32 with the PTX conversion (no cuda_fp16.h needed under NVRTC).
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

#define NEG_INF __int_as_float(0xff800000)

extern "C" __global__ void sparse_attention(
    const unsigned short* __restrict__ keys,    // [capacity, kv_heads, d] f16 bits
    const unsigned short* __restrict__ values,  // same layout
    const float* __restrict__ queries,          // [kv_heads * group, d]
    const unsigned int* __restrict__ positions, // concatenated per kv head
    const unsigned int* __restrict__ starts,    // [kv_heads + 1] offsets into positions
    float* __restrict__ out,                    // [kv_heads * group, d]
    int kv_heads, int group, int d, float scale, int qh0)
{
    __shared__ float s_m[WARPS];
    __shared__ float s_l[WARPS];
    extern __shared__ float s_acc[];            // [WARPS, d]

    const int qh = qh0 + blockIdx.x;
    const int kv = qh / group;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const float* q = queries + (size_t)qh * d;
    const int dpl = (d + 31) / 32;

    float qr[MAX_DPL];
    float acc[MAX_DPL];
    for (int j = 0; j < MAX_DPL; ++j) {
        int c = lane + 32 * j;
        qr[j] = (j < dpl && c < d) ? q[c] * scale : 0.0f;
        acc[j] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    const unsigned int first = starts[kv], last = starts[kv + 1];
    for (unsigned int i = first + warp; i < last; i += WARPS) {
        const size_t row = ((size_t)positions[i] * kv_heads + kv) * d;
        float s = 0.0f;
        for (int j = 0; j < dpl; ++j) {
            int c = lane + 32 * j;
            if (c < d) s += qr[j] * h2f(keys[row + c]);
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        const float m2 = fmaxf(m, s);
        const float a = __expf(m - m2);   // 0 when m = -inf
        const float b = __expf(s - m2);
        l = l * a + b;
        for (int j = 0; j < dpl; ++j) {
            int c = lane + 32 * j;
            float v = (c < d) ? h2f(values[row + c]) : 0.0f;
            acc[j] = acc[j] * a + b * v;
        }
        m = m2;
    }
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
    for (int j = 0; j < dpl; ++j) {
        int c = lane + 32 * j;
        if (c < d) s_acc[warp * d + c] = acc[j];
    }
    __syncthreads();
    float gm = NEG_INF;
    for (int w = 0; w < WARPS; ++w) gm = fmaxf(gm, s_m[w]);
    float gl = 0.0f;
    for (int w = 0; w < WARPS; ++w) gl += (s_l[w] > 0.0f) ? s_l[w] * __expf(s_m[w] - gm) : 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < WARPS; ++w)
            if (s_l[w] > 0.0f) o += s_acc[w * d + c] * __expf(s_m[w] - gm);
        out[(size_t)qh * d + c] = gl > 0.0f ? o / gl : 0.0f;
    }
}
