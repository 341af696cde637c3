// weightstream's GPU kernels, compiled by NVRTC when a `Gpu` starts.
//
// The same conventions as the CPU kernels (crates/kernels): outputs first,
// then saved-for-backward, inputs, weights, dimensions; parameter gradients
// accumulate (+=), activation gradients overwrite unless a kernel says it
// accumulates. Each kernel mirrors one CPU kernel and is tested against it
// (crates/cuda/tests). Reductions run in a fixed order (no atomics), so a
// step gives the same bits every time on the same GPU.
//
// No CUDA headers: bf16 is handled as raw 16-bit words, which keeps NVRTC
// free of include paths.

typedef unsigned short bf16_t;
typedef long long i64;
#define NEG_INF __int_as_float(0xff800000)

// fp32 -> bf16, round to nearest even (NaN stays NaN), as the CPU's to_bf16.
__device__ __forceinline__ bf16_t bf16_rne(float x) {
    unsigned int b = __float_as_uint(x);
    if (x != x) return (bf16_t)((b >> 16) | 0x40);
    return (bf16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float bf16_to_f32(bf16_t x) { return __uint_as_float(((unsigned int)x) << 16); }

// Two floats rounded to bf16 in one 32-bit word, the first in the low half
// (its lower address).
__device__ __forceinline__ unsigned int bf16_pair(float a, float b) {
    return (unsigned int)bf16_rne(a) | ((unsigned int)bf16_rne(b) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. `sh` holds 32 floats.
__device__ float block_sum(float v, float* sh) {
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? sh[lane] : 0.0f;
        x = warp_sum(x);
        if (lane == 0) sh[0] = x;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float* sh) {
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    v = warp_max(v);
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? sh[lane] : NEG_INF;
        x = warp_max(x);
        if (lane == 0) sh[0] = x;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// The derivative of GELU's tanh approximation (sigmoid form) at x, as the CPU kernel.
__device__ __forceinline__ float gelu_grad(float v) {
    float u = 0.7978846f * (v + 0.044715f * v * v * v);
    float s = sigmoidf_(2.0f * u);
    return s + v * 2.0f * s * (1.0f - s) * 0.7978846f * (1.0f + 3.0f * 0.044715f * v * v);
}

// ---------------------------------------------------------------- embedding

// out[BT,C] = wte[tokens] + wpe[position]
extern "C" __global__ void embedding_fwd(float* out, const int* tokens, const float* wte, const float* wpe, int bt,
                                         int t, int c) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)bt * c) return;
    int row = (int)(i / c), j = (int)(i % c);
    out[i] = wte[(i64)tokens[row] * c + j] + wpe[(i64)(row % t) * c + j];
}

// dwte[tok] += dout rows of that token, in position order. Block u handles
// the u-th distinct token; `order[starts[u]..starts[u+1]]` are its positions
// (ascending), so the sum runs in the CPU kernel's order.
extern "C" __global__ void embedding_bwd_wte(float* dwte, const float* dout, const int* order, const int* starts,
                                             const int* uniq, int c) {
    int u = blockIdx.x;
    int p0 = starts[u], p1 = starts[u + 1];
    i64 base = (i64)uniq[u] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float a = dwte[base + j];
        for (int p = p0; p < p1; p++) a += dout[(i64)order[p] * c + j];
        dwte[base + j] = a;
    }
}

// dwpe[T,C] += sum over the batch of dout[b,t,:], batch in order.
extern "C" __global__ void embedding_bwd_wpe(float* dwpe, const float* dout, int b, int t, int c) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)t * c) return;
    float a = dwpe[i];
    for (int k = 0; k < b; k++) a += dout[(i64)k * t * c + i];
    dwpe[i] = a;
}

// ---------------------------------------------------------------- layernorm

// One warp per row. The output in fp32 (out) and/or rounded to bf16
// (out16, the next product's operand); either may be null.
extern "C" __global__ void layernorm_fwd(float* out, bf16_t* out16, float* mean, float* rstd, const float* x,
                                         const float* w, const float* b, int n, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= n) return;
    const float* xr = x + (i64)row * c;
    float s = 0.0f;
    for (int j = lane; j < c; j += 32) s += xr[j];
    float mu = warp_sum(s) / c;
    float v = 0.0f;
    for (int j = lane; j < c; j += 32) {
        float d = xr[j] - mu;
        v += d * d;
    }
    float rs = 1.0f / sqrtf(warp_sum(v) / c + 1e-5f);
    for (int j = lane; j < c; j += 32) {
        float y = (xr[j] - mu) * rs * w[j] + b[j];
        if (out) out[(i64)row * c + j] = y;
        if (out16) out16[(i64)row * c + j] = bf16_rne(y);
    }
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

// The same LayerNorm for C = 128 V (V float4 per lane): one warp per row,
// the row read once into registers, 16-byte loads and stores. The launcher
// picks these where C fits and the pointers are 16-byte aligned.
template <int V>
__device__ void layernorm_fwd_v(float* out, bf16_t* out16, float* mean, float* rstd, const float* x, const float* w,
                                const float* b, int n) {
    const int c = 128 * V;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= n) return;
    const float4* xr = reinterpret_cast<const float4*>(x + (i64)row * c);
    float4 v[V];
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < V; j++) {
        v[j] = xr[lane + 32 * j];
        s += (v[j].x + v[j].y) + (v[j].z + v[j].w);
    }
    float mu = warp_sum(s) / c;
    float var = 0.0f;
#pragma unroll
    for (int j = 0; j < V; j++) {
        float a = v[j].x - mu, bb = v[j].y - mu, cc = v[j].z - mu, d = v[j].w - mu;
        var += (a * a + bb * bb) + (cc * cc + d * d);
    }
    float rs = 1.0f / sqrtf(warp_sum(var) / c + 1e-5f);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    const float4* b4 = reinterpret_cast<const float4*>(b);
#pragma unroll
    for (int j = 0; j < V; j++) {
        int q = lane + 32 * j;
        float4 ww = w4[q], bv = b4[q];
        float4 y = make_float4((v[j].x - mu) * rs * ww.x + bv.x, (v[j].y - mu) * rs * ww.y + bv.y,
                               (v[j].z - mu) * rs * ww.z + bv.z, (v[j].w - mu) * rs * ww.w + bv.w);
        if (out) reinterpret_cast<float4*>(out + (i64)row * c)[q] = y;
        if (out16) reinterpret_cast<uint2*>(out16 + (i64)row * c)[q] = make_uint2(bf16_pair(y.x, y.y), bf16_pair(y.z, y.w));
    }
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

// LayerNorm's backward for C = 128 V in one pass over dout and x: dx +=
// the input gradient (one warp per row), and each block's column partial
// sums of dout * norm and dout over its chunk of rows (part[blk][0..C] and
// part[blk][C..2C], as layernorm_param_partial), kept per lane in registers
// and added over the block's warps in a fixed order. Block 256; grid R.
template <int V>
__device__ void layernorm_bwd_v(float* dx, float* part, const float* dout, const float* x, const float* w,
                                const float* mean, const float* rstd, int n, int chunk) {
    const int c = 128 * V;
    __shared__ float sh[8][128 * V];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r0 = blockIdx.x * chunk, r1 = min(n, r0 + chunk);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    float4 aw[V], ab[V];
#pragma unroll
    for (int j = 0; j < V; j++) {
        aw[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        ab[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    for (int row = r0 + warp; row < r1; row += 8) {
        const float4* gr = reinterpret_cast<const float4*>(dout + (i64)row * c);
        const float4* xr = reinterpret_cast<const float4*>(x + (i64)row * c);
        const float mu = mean[row], rs = rstd[row];
        float4 g[V], nm[V];
        float dm = 0.0f, dnm = 0.0f;
#pragma unroll
        for (int j = 0; j < V; j++) {
            int q = lane + 32 * j;
            g[j] = gr[q];
            float4 xv = xr[q], ww = w4[q];
            nm[j] = make_float4((xv.x - mu) * rs, (xv.y - mu) * rs, (xv.z - mu) * rs, (xv.w - mu) * rs);
            float4 dn = make_float4(ww.x * g[j].x, ww.y * g[j].y, ww.z * g[j].z, ww.w * g[j].w);
            dm += (dn.x + dn.y) + (dn.z + dn.w);
            dnm += (dn.x * nm[j].x + dn.y * nm[j].y) + (dn.z * nm[j].z + dn.w * nm[j].w);
            aw[j].x += g[j].x * nm[j].x;
            aw[j].y += g[j].y * nm[j].y;
            aw[j].z += g[j].z * nm[j].z;
            aw[j].w += g[j].w * nm[j].w;
            ab[j].x += g[j].x;
            ab[j].y += g[j].y;
            ab[j].z += g[j].z;
            ab[j].w += g[j].w;
        }
        dm = warp_sum(dm) / c;
        dnm = warp_sum(dnm) / c;
        float4* d = reinterpret_cast<float4*>(dx + (i64)row * c);
#pragma unroll
        for (int j = 0; j < V; j++) {
            int q = lane + 32 * j;
            float4 ww = w4[q], o = d[q];
            o.x += (ww.x * g[j].x - dm - nm[j].x * dnm) * rs;
            o.y += (ww.y * g[j].y - dm - nm[j].y * dnm) * rs;
            o.z += (ww.z * g[j].z - dm - nm[j].z * dnm) * rs;
            o.w += (ww.w * g[j].w - dm - nm[j].w * dnm) * rs;
            d[q] = o;
        }
    }
    // Over the block's warps in order, dw then db.
    for (int pass = 0; pass < 2; pass++) {
#pragma unroll
        for (int j = 0; j < V; j++) {
            float4 a = pass == 0 ? aw[j] : ab[j];
            reinterpret_cast<float4*>(sh[warp])[lane + 32 * j] = a;
        }
        __syncthreads();
        for (int col = threadIdx.x; col < c; col += blockDim.x) {
            float t = 0.0f;
            for (int k = 0; k < 8; k++) t += sh[k][col];
            part[(i64)blockIdx.x * 2 * c + pass * c + col] = t;
        }
        __syncthreads();
    }
}

// The instances: C = 128, 256, 512, 768 (GPT-2 small), 1024. The backward's
// registers fit two blocks an SM up to 768 without spilling (ptxas, sm_90).
extern "C" __global__ void layernorm_fwd_1(float* out, bf16_t* out16, float* mean, float* rstd, const float* x,
                                         const float* w, const float* b, int n) {
    layernorm_fwd_v<1>(out, out16, mean, rstd, x, w, b, n);
}
extern "C" __launch_bounds__(256, 2) __global__ void layernorm_bwd_1(float* dx, float* part, const float* dout, const float* x, const float* w,
                                         const float* mean, const float* rstd, int n, int chunk) {
    layernorm_bwd_v<1>(dx, part, dout, x, w, mean, rstd, n, chunk);
}
extern "C" __global__ void layernorm_fwd_2(float* out, bf16_t* out16, float* mean, float* rstd, const float* x,
                                         const float* w, const float* b, int n) {
    layernorm_fwd_v<2>(out, out16, mean, rstd, x, w, b, n);
}
extern "C" __launch_bounds__(256, 2) __global__ void layernorm_bwd_2(float* dx, float* part, const float* dout, const float* x, const float* w,
                                         const float* mean, const float* rstd, int n, int chunk) {
    layernorm_bwd_v<2>(dx, part, dout, x, w, mean, rstd, n, chunk);
}
extern "C" __global__ void layernorm_fwd_4(float* out, bf16_t* out16, float* mean, float* rstd, const float* x,
                                         const float* w, const float* b, int n) {
    layernorm_fwd_v<4>(out, out16, mean, rstd, x, w, b, n);
}
extern "C" __launch_bounds__(256, 2) __global__ void layernorm_bwd_4(float* dx, float* part, const float* dout, const float* x, const float* w,
                                         const float* mean, const float* rstd, int n, int chunk) {
    layernorm_bwd_v<4>(dx, part, dout, x, w, mean, rstd, n, chunk);
}
extern "C" __global__ void layernorm_fwd_6(float* out, bf16_t* out16, float* mean, float* rstd, const float* x,
                                         const float* w, const float* b, int n) {
    layernorm_fwd_v<6>(out, out16, mean, rstd, x, w, b, n);
}
extern "C" __launch_bounds__(256, 2) __global__ void layernorm_bwd_6(float* dx, float* part, const float* dout, const float* x, const float* w,
                                         const float* mean, const float* rstd, int n, int chunk) {
    layernorm_bwd_v<6>(dx, part, dout, x, w, mean, rstd, n, chunk);
}
extern "C" __global__ void layernorm_fwd_8(float* out, bf16_t* out16, float* mean, float* rstd, const float* x,
                                         const float* w, const float* b, int n) {
    layernorm_fwd_v<8>(out, out16, mean, rstd, x, w, b, n);
}
extern "C" __global__ void layernorm_bwd_8(float* dx, float* part, const float* dout, const float* x, const float* w,
                                         const float* mean, const float* rstd, int n, int chunk) {
    layernorm_bwd_v<8>(dx, part, dout, x, w, mean, rstd, n, chunk);
}

// dx += layernorm input gradient; one warp per row.
extern "C" __global__ void layernorm_bwd_dx(float* dx, const float* dout, const float* x, const float* w,
                                            const float* mean, const float* rstd, int n, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= n) return;
    const float* xr = x + (i64)row * c;
    const float* g = dout + (i64)row * c;
    float mu = mean[row], rs = rstd[row];
    float dm = 0.0f, dnm = 0.0f;
    for (int j = lane; j < c; j += 32) {
        float norm = (xr[j] - mu) * rs;
        float dn = w[j] * g[j];
        dm += dn;
        dnm += dn * norm;
    }
    dm = warp_sum(dm) / c;
    dnm = warp_sum(dnm) / c;
    float* d = dx + (i64)row * c;
    for (int j = lane; j < c; j += 32) {
        float norm = (xr[j] - mu) * rs;
        float dn = w[j] * g[j];
        d[j] += (dn - dm - norm * dnm) * rs;
    }
}

// Column partial sums over a chunk of rows, for LayerNorm's dw (sum of
// dout * norm) and db (sum of dout). Block (32, 8); grid (ceil(C/32), R).
// part[r][0..C] = dw partial, part[r][C..2C] = db partial.
extern "C" __global__ void layernorm_param_partial(float* part, const float* dout, const float* x, const float* mean,
                                                   const float* rstd, int n, int c, int chunk) {
    __shared__ float sw[8][33];
    __shared__ float sb[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * chunk, r1 = min(n, r0 + chunk);
    float aw = 0.0f, ab = 0.0f;
    if (col < c) {
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            float g = dout[(i64)r * c + col];
            float norm = (x[(i64)r * c + col] - mean[r]) * rstd[r];
            aw += g * norm;
            ab += g;
        }
    }
    sw[threadIdx.y][threadIdx.x] = aw;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && col < c) {
        float tw = 0.0f, tb = 0.0f;
        for (int k = 0; k < 8; k++) {
            tw += sw[k][threadIdx.x];
            tb += sb[k][threadIdx.x];
        }
        part[(i64)blockIdx.y * 2 * c + col] = tw;
        part[(i64)blockIdx.y * 2 * c + c + col] = tb;
    }
}

// Column partial sums over chunks of rows of g[N,C] (a bias gradient),
// where g = dout (fp32, or bf16 in dout16 when dout is null), or g = dout *
// gelu'(x) when x16 is not null (the gradient through GELU, whose input x
// was kept in bf16). With out16, g also goes out rounded to bf16, the
// operand of the products that follow. Block (32, 8); grid (ceil(C/32), R).
extern "C" __global__ void column_partial(float* part, bf16_t* out16, const float* dout, const bf16_t* dout16,
                                          const bf16_t* x16, int n, int c, int chunk) {
    __shared__ float s[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * chunk, r1 = min(n, r0 + chunk);
    float a = 0.0f;
    if (col < c)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            i64 at = (i64)r * c + col;
            float g = dout ? dout[at] : bf16_to_f32(dout16[at]);
            if (x16) g *= gelu_grad(bf16_to_f32(x16[at]));
            if (out16) out16[at] = bf16_rne(g);
            a += g;
        }
    s[threadIdx.y][threadIdx.x] = a;
    __syncthreads();
    if (threadIdx.y == 0 && col < c) {
        float t = 0.0f;
        for (int k = 0; k < 8; k++) t += s[k][threadIdx.x];
        part[(i64)blockIdx.y * c + col] = t;
    }
}

// out[j] += sum over r of part[r * stride + j], r in order.
extern "C" __global__ void sum_partials(float* out, const float* part, int r, int c, int stride) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float a = 0.0f;
    for (int k = 0; k < r; k++) a += part[(i64)k * stride + j];
    out[j] += a;
}

// ---------------------------------------------------------------- elementwise

// GELU, tanh approximation in its sigmoid form (as the CPU kernel).
// The output in fp32 (out) and/or rounded to bf16 (out16), and the input
// rounded to bf16 (x16, kept for the backward); any may be null.
extern "C" __global__ void gelu_fwd(float* out, bf16_t* out16, bf16_t* x16, const float* x, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    if (x16) x16[i] = bf16_rne(v);
    float u = 0.7978846f * (v + 0.044715f * v * v * v);
    float y = v * sigmoidf_(2.0f * u);
    if (out) out[i] = y;
    if (out16) out16[i] = bf16_rne(y);
}

// d *= gelu'(x)
extern "C" __global__ void gelu_bwd(float* d, const float* x, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    d[i] *= gelu_grad(x[i]);
}

// a += b
extern "C" __global__ void add_inplace(float* a, const float* b, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += b[i];
}

// out[N,C] = bias broadcast over rows
extern "C" __global__ void bias_fill(float* out, const float* bias, int n, int c) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)n * c) return;
    out[i] = bias[i % c];
}

extern "C" __global__ void to_bf16(bf16_t* out, const float* x, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = bf16_rne(x[i]);
}

extern "C" __global__ void from_bf16(float* out, const bf16_t* x, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf16_to_f32(x[i]);
}

// ---------------------------------------------------------------- attention

// out[B,NH,T,HS] <- in[(b*T + t) * stride + off + h*HS + d]: one of q, k, v
// out of qkv[B,T,3C] (stride 3C), or a [B,T,C] gradient (stride C).
extern "C" __global__ void split_heads(float* out, const float* in, int b, int t, int nh, int hs, int stride, int off) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 total = (i64)b * nh * t * hs;
    if (i >= total) return;
    int d = (int)(i % hs);
    i64 r = i / hs;
    int tt = (int)(r % t);
    r /= t;
    int h = (int)(r % nh);
    int bb = (int)(r / nh);
    out[i] = in[((i64)bb * t + tt) * stride + off + h * hs + d];
}

// The inverse: out[(b*T + t) * stride + off + h*HS + d] = in[B,NH,T,HS].
extern "C" __global__ void merge_heads(float* out, const float* in, int b, int t, int nh, int hs, int stride, int off) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 total = (i64)b * nh * t * hs;
    if (i >= total) return;
    int d = (int)(i % hs);
    i64 r = i / hs;
    int tt = (int)(r % t);
    r /= t;
    int h = (int)(r % nh);
    int bb = (int)(r / nh);
    out[((i64)bb * t + tt) * stride + off + h * hs + d] = in[i];
}

// Causal softmax of scale * scores, in place on att[rows, T] (rows = B*NH*T,
// row r is query position r % T); masked entries become 0. One warp per row.
extern "C" __global__ void softmax_causal_fwd(float* att, int rows, int t, float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int q = row % t;
    float* a = att + (i64)row * t;
    float m = NEG_INF;
    for (int j = lane; j <= q; j += 32) m = fmaxf(m, a[j] * scale);
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j <= q; j += 32) s += expf(a[j] * scale - m);
    s = warp_sum(s);
    float inv = 1.0f / s;
    for (int j = lane; j < t; j += 32) a[j] = j <= q ? expf(a[j] * scale - m) * inv : 0.0f;
}

// d(scores) from d(att), in place on d[rows, T]:
// d_j = scale * att_j * (datt_j - sum_k att_k datt_k) for j <= q, else 0.
extern "C" __global__ void softmax_causal_bwd(float* d, const float* att, int rows, int t, float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int q = row % t;
    float* dr = d + (i64)row * t;
    const float* a = att + (i64)row * t;
    float s = 0.0f;
    for (int j = lane; j <= q; j += 32) s += a[j] * dr[j];
    s = warp_sum(s);
    for (int j = lane; j < t; j += 32) dr[j] = j <= q ? scale * a[j] * (dr[j] - s) : 0.0f;
}

// ---------------------------------------------------------------- fused attention
//
// Causal attention without the T x T matrix, in FlashAttention-2's scheme:
// tiles of 64 positions in shared memory as bf16, products on the tensor
// cores (mma.sync m16n8k16, fp32 accumulate), the softmax online in fp32,
// and per row only the log-sum-exp kept (log2 units) for the backward pass,
// which recomputes the probabilities. q, k, v come from a bf16 copy of
// qkv[B,T,3C] and the output goes to y[B,T,C] (fp32); the gradients to
// dqkv[B,T,3C]. Head sizes 64 and 128, sm_80 and later; the host falls back
// to the materialised kernels above otherwise. The backward is two kernels,
// dk/dv by key tile and dq by query tile, so that every gradient element is
// summed by one thread in a fixed order: no atomics, the same bits every
// run. 4 warps per block, each owns 16 rows of the block's tile. The next
// tile streams into shared memory (cp.async) while this one computes.
//
// Fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments"), with g = lane/4
// and q = 2 * (lane % 4): A[16x16] row-major in 4 registers of two bf16 each,
// {A[g][q..q+1]}, {A[g+8][q..q+1]}, {A[g][q+8..q+9]}, {A[g+8][q+8..q+9]};
// B[16x8] in 2 registers, {B[q..q+1][g]}, {B[q+8..q+9][g]}; C[16x8] in 4
// floats, C[g][q], C[g][q+1], C[g+8][q], C[g+8][q+1]. The element with the
// lower index sits in the lower 16 bits. ldmatrix.x4 loads four 8x8 bf16
// matrices, matrix i from the row addresses of lanes 8i..8i+7, into exactly
// these layouts (.trans: each matrix transposed on the way).

#define FA_TILE 64
#define FA_THREADS 128

extern __shared__ __align__(16) unsigned char fa_smem[];

__device__ __forceinline__ unsigned int bf16_bits(float x) {
    unsigned int b = __float_as_uint(x);
    return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    return bf16_bits(lo) | (bf16_bits(hi) << 16);
}

// The tensor-core and copy instructions (sm_80 on; never run below it).

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    unsigned int a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }\n" : "=r"(a) : "l"(p));
    return a;
}

// c[4] += A[16x16] B[16x8]
__device__ __forceinline__ void mma_bf16(float* c, const unsigned int* a, const unsigned int* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// r[i] = this lane's part of the 8x8 matrix whose rows lanes 8i..8i+7 point at (p: this lane's row).
__device__ __forceinline__ void ldsm_x4(unsigned int* r, const bf16_t* p) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
#endif
}

// As ldsm_x4, each matrix transposed.
__device__ __forceinline__ void ldsm_x4_t(unsigned int* r, const bf16_t* p) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
#endif
}

// 16 bytes global -> shared without waiting; zeros where !valid (g is then not read).
__device__ __forceinline__ void cp_async16(void* s, const void* g, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(s)), "l"(g), "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N committed groups of this thread are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// A[m][k] = tile[row0 + m][k0 + k] (tile rows LD apart)
template <int LD>
__device__ __forceinline__ void frag_a(unsigned int* a, const bf16_t* tile, int row0, int k0) {
    int l = threadIdx.x & 31;
    ldsm_x4(a, tile + (row0 + (l & 15)) * LD + k0 + (l >> 4) * 8);
}

// B fragments of n-tiles n0 (b[0..1]) and n0 + 8 (b[2..3]) where
// B[k][n] = tile[n][k0 + k]: the tile holds B's columns as rows.
template <int LD>
__device__ __forceinline__ void frag_b_cols(unsigned int* b, const bf16_t* tile, int n0, int k0) {
    int l = threadIdx.x & 31, i = l >> 3;
    ldsm_x4(b, tile + (n0 + (l & 7) + (i >> 1) * 8) * LD + k0 + (i & 1) * 8);
}

// B fragments of n-tiles n0 (b[0..1]) and n0 + 8 (b[2..3]) where
// B[k][n] = tile[k0 + k][n]: the tile holds B's rows as rows.
template <int LD>
__device__ __forceinline__ void frag_b_rows(unsigned int* b, const bf16_t* tile, int k0, int n0) {
    int l = threadIdx.x & 31, i = l >> 3;
    ldsm_x4_t(b, tile + (k0 + (l & 7) + (i & 1) * 8) * LD + n0 + (i >> 1) * 8);
}

// The A fragment of columns 16j..16j+15 of a 16 x N product held as
// accumulators: n-tiles 2j (lo) and 2j + 1 (hi), rounded to bf16.
__device__ __forceinline__ void frag_a_acc(unsigned int* a, const float* lo, const float* hi) {
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

// acc[NT][4] += A[16 x 16*KS] (rows row0.. of ta, columns k from 0) times
// B[16*KS x 8*NT] with B[k][n] = tb[n0 + n][k] (frag_b_cols).
template <int LD, int KS, int NT>
__device__ __forceinline__ void mma_rows_cols(float (*acc)[4], const bf16_t* ta, int row0, const bf16_t* tb, int n0) {
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        unsigned int a[4];
        frag_a<LD>(a, ta, row0, kk * 16);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            unsigned int b[4];
            frag_b_cols<LD>(b, tb, n0 + j * 8, kk * 16);
            mma_bf16(acc[j], a, b);
            mma_bf16(acc[j + 1], a, b + 2);
        }
    }
}

// acc[ND][4] += P[16 x 16*KS] (accumulators p[2*KS][4], rounded to bf16)
// times B[16*KS x 8*ND] with B[k][n] = tb[k][n] (frag_b_rows).
template <int LD, int KS, int ND>
__device__ __forceinline__ void mma_acc_rows(float (*acc)[4], const float (*p)[4], const bf16_t* tb) {
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        unsigned int a[4];
        frag_a_acc(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int d = 0; d < ND; d += 2) {
            unsigned int b[4];
            frag_b_rows<LD>(b, tb, kk * 16, d * 8);
            mma_bf16(acc[d], a, b);
            mma_bf16(acc[d + 1], a, b + 2);
        }
    }
}

// Starts copying tile[r][0..D) <- src[(row0 + r) * stride + 0..D) for r < rows (bf16); zeros at positions >= t.
template <int D, int LD>
__device__ __forceinline__ void fa_load(bf16_t* tile, const bf16_t* src, int stride, int row0, int rows, int t) {
    const int per_row = D / 8;
    for (int i = threadIdx.x; i < rows * per_row; i += blockDim.x) {
        int r = i / per_row, col = (i % per_row) * 8;
        bool in = row0 + r < t;
        cp_async16(tile + r * LD + col, in ? src + (i64)(row0 + r) * stride + col : src, in);
    }
}

template <int N>
__device__ __forceinline__ void zero_acc(float (*acc)[4]) {
#pragma unroll
    for (int j = 0; j < N; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
}

// Shared memory of each kernel, bytes (the host mirrors these): the q tile
// and two buffers of k, v (forward); q, dy and two of k, v (dq); k, v and
// two of q, dy, lse, dvec (dk/dv, BQ queries a step).
template <int D>
struct FaSmem {
    static constexpr int LD = D + 8;
    static constexpr int BQ = D == 64 ? 64 : 32;
    static constexpr int TILE = FA_TILE * LD;
    static constexpr int FWD = 5 * TILE * 2;
    static constexpr int DQ = 6 * TILE * 2;
    static constexpr int DKDV = (2 * TILE + 4 * BQ * LD) * 2 + 4 * BQ * 4;
};

// The key loop of the forward and dq kernels: starts loading key tile
// kb + 1 (k and v of head base, into the other of the two buffers at skv)
// while tile kb arrives, waits for tile kb, and returns its k (v follows).
template <int D>
__device__ __forceinline__ const bf16_t* fa_next_kv(bf16_t* skv, const bf16_t* base, int t, int nh, int kb, int qb) {
    const int LD = FaSmem<D>::LD, TILE = FaSmem<D>::TILE, c = nh * D;
    if (kb < qb) {
        bf16_t* next = skv + 2 * ((kb + 1) & 1) * TILE;
        const int k1 = (kb + 1) * FA_TILE;
        fa_load<D, LD>(next, base + c, 3 * c, k1, FA_TILE, t);
        fa_load<D, LD>(next + TILE, base + 2 * c, 3 * c, k1, FA_TILE, t);
        cp_async_commit();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
    return skv + 2 * (kb & 1) * TILE;
}

// y = softmax(scale * q k^T, causal) v; lse[(b*NH + h)*T + i] in log2 units.
// Grid (ceil(T/64), B*NH), the longest query tiles first.
template <int D>
__device__ void flash_fwd(float* y, bf16_t* y16, float* lse, const bf16_t* qkv, int t, int nh, float scale_log2) {
    const int LD = FaSmem<D>::LD, TILE = FaSmem<D>::TILE, NT = FA_TILE / 8, ND = D / 8;
    bf16_t* sq = reinterpret_cast<bf16_t*>(fa_smem);
    bf16_t* skv = sq + TILE;  // buffer i: k at skv + 2*i*TILE, v after it
    const int qb = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y, bb = bh / nh, h = bh % nh, c = nh * D;
    const bf16_t* base = qkv + (i64)bb * t * 3 * c + h * D;
    const int q0 = qb * FA_TILE, warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, q = (threadIdx.x & 3) * 2;
    const int row_a = q0 + warp * 16 + g, row_b = row_a + 8;
    fa_load<D, LD>(sq, base, 3 * c, q0, FA_TILE, t);
    fa_load<D, LD>(skv, base + c, 3 * c, 0, FA_TILE, t);
    fa_load<D, LD>(skv + TILE, base + 2 * c, 3 * c, 0, FA_TILE, t);
    cp_async_commit();
    float o[ND][4];
    zero_acc<ND>(o);
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    for (int kb = 0; kb <= qb; kb++) {
        const int k0 = kb * FA_TILE;
        const bf16_t* sk = fa_next_kv<D>(skv, base, t, nh, kb, qb);
        const bf16_t* sv = sk + FaSmem<D>::TILE;
        float s[NT][4];
        zero_acc<NT>(s);
        mma_rows_cols<LD, D / 16, NT>(s, sq, warp * 16, sk, 0);
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + j * 8 + q + (e & 1), row = e < 2 ? row_a : row_b;
                float x = key <= row ? s[j][e] * scale_log2 : NEG_INF;
                s[j][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
        float alpha[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            alpha[r] = exp2f(m[r] - mx[r]);
            m[r] = mx[r];
        }
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = exp2f(s[j][e] - m[e >> 1]);
                s[j][e] = p;
                rs[e >> 1] += p;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 1);
            rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 2);
            l[r] = l[r] * alpha[r] + rs[r];
        }
#pragma unroll
        for (int d = 0; d < ND; d++) {
            o[d][0] *= alpha[0];
            o[d][1] *= alpha[0];
            o[d][2] *= alpha[1];
            o[d][3] *= alpha[1];
        }
        mma_acc_rows<LD, FA_TILE / 16, ND>(o, s, sv);
        __syncthreads();
    }
    float* yb = y + (i64)bb * t * c + h * D;
    const float inv_a = 1.0f / l[0], inv_b = 1.0f / l[1];
#pragma unroll
    for (int d = 0; d < ND; d++) {
        int col = d * 8 + q;
        if (row_a < t) *reinterpret_cast<float2*>(yb + (i64)row_a * c + col) = make_float2(o[d][0] * inv_a, o[d][1] * inv_a);
        if (row_b < t) *reinterpret_cast<float2*>(yb + (i64)row_b * c + col) = make_float2(o[d][2] * inv_b, o[d][3] * inv_b);
        if (y16) {
            unsigned int* ya = reinterpret_cast<unsigned int*>(y16 + (i64)bb * t * c + h * D + (i64)row_a * c + col);
            unsigned int* yb16 = reinterpret_cast<unsigned int*>(y16 + (i64)bb * t * c + h * D + (i64)row_b * c + col);
            if (row_a < t) *ya = bf16_pair(o[d][0] * inv_a, o[d][1] * inv_a);
            if (row_b < t) *yb16 = bf16_pair(o[d][2] * inv_b, o[d][3] * inv_b);
        }
    }
    if (q == 0) {
        if (row_a < t) lse[(i64)bh * t + row_a] = m[0] + log2f(l[0]);
        if (row_b < t) lse[(i64)bh * t + row_b] = m[1] + log2f(l[1]);
    }
}

// dvec[(b*NH + h)*T + i] = sum_d dy[b,i,h*HS + d] * y[b,i,h*HS + d]; one warp per row.
// dy also goes out rounded to bf16 (dy16), the operand of the fused backward.
extern "C" __global__ void flash_bwd_dvec(float* dvec, bf16_t* dy16, const float* dy, const float* y, int b, int t, int nh,
                                          int hs) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= b * nh * t) return;
    int i = row % t, bh = row / t, bb = bh / nh, h = bh % nh;
    i64 off = ((i64)bb * t + i) * nh * hs + h * hs;
    float s = 0.0f;
    for (int d = lane; d < hs; d += 32) {
        float g = dy[off + d];
        dy16[off + d] = bf16_rne(g);
        s += g * y[off + d];
    }
    s = warp_sum(s);
    if (lane == 0) dvec[row] = s;
}

// dq into dqkv[:, :, 0:C]; dy as bf16 [B,T,C]. Grid as the forward.
template <int D>
__device__ void flash_dq(float* dqkv, const bf16_t* qkv, const bf16_t* dy, const float* lse, const float* dvec, int t,
                         int nh, float scale_log2, float scale) {
    const int LD = FaSmem<D>::LD, TILE = FaSmem<D>::TILE, NT = FA_TILE / 8, ND = D / 8;
    bf16_t* sq = reinterpret_cast<bf16_t*>(fa_smem);
    bf16_t* sdo = sq + TILE;
    bf16_t* skv = sdo + TILE;  // buffer i: k at skv + 2*i*TILE, v after it
    const int qb = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y, bb = bh / nh, h = bh % nh, c = nh * D;
    const bf16_t* base = qkv + (i64)bb * t * 3 * c + h * D;
    const int q0 = qb * FA_TILE, warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, q = (threadIdx.x & 3) * 2;
    const int row_a = q0 + warp * 16 + g, row_b = row_a + 8;
    fa_load<D, LD>(sq, base, 3 * c, q0, FA_TILE, t);
    fa_load<D, LD>(sdo, dy + (i64)bb * t * c + h * D, c, q0, FA_TILE, t);
    fa_load<D, LD>(skv, base + c, 3 * c, 0, FA_TILE, t);
    fa_load<D, LD>(skv + TILE, base + 2 * c, 3 * c, 0, FA_TILE, t);
    cp_async_commit();
    const float lse_r[2] = {row_a < t ? lse[(i64)bh * t + row_a] : 0.0f, row_b < t ? lse[(i64)bh * t + row_b] : 0.0f};
    const float dv_r[2] = {row_a < t ? dvec[(i64)bh * t + row_a] : 0.0f, row_b < t ? dvec[(i64)bh * t + row_b] : 0.0f};
    float dq[ND][4];
    zero_acc<ND>(dq);
    for (int kb = 0; kb <= qb; kb++) {
        const int k0 = kb * FA_TILE;
        const bf16_t* sk = fa_next_kv<D>(skv, base, t, nh, kb, qb);
        const bf16_t* sv = sk + FaSmem<D>::TILE;
        float s[NT][4], dp[NT][4];
        zero_acc<NT>(s);
        zero_acc<NT>(dp);
        mma_rows_cols<LD, D / 16, NT>(s, sq, warp * 16, sk, 0);
        mma_rows_cols<LD, D / 16, NT>(dp, sdo, warp * 16, sv, 0);
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + j * 8 + q + (e & 1), row = e < 2 ? row_a : row_b;
                float p = key <= row && row < t ? exp2f(s[j][e] * scale_log2 - lse_r[e >> 1]) : 0.0f;
                s[j][e] = p * (dp[j][e] - dv_r[e >> 1]);
            }
        }
        mma_acc_rows<LD, FA_TILE / 16, ND>(dq, s, sk);
        __syncthreads();
    }
    float* out = dqkv + (i64)bb * t * 3 * c + h * D;
#pragma unroll
    for (int d = 0; d < ND; d++) {
        int col = d * 8 + q;
        if (row_a < t)
            *reinterpret_cast<float2*>(out + (i64)row_a * 3 * c + col) = make_float2(dq[d][0] * scale, dq[d][1] * scale);
        if (row_b < t)
            *reinterpret_cast<float2*>(out + (i64)row_b * 3 * c + col) = make_float2(dq[d][2] * scale, dq[d][3] * scale);
    }
}

// dk, dv into dqkv[:, :, C:3C]; dy as bf16 [B,T,C]. Grid (ceil(T/64), B*NH):
// block x owns keys 64x..64x+63 and walks the query tiles from there to the end.
template <int D>
__device__ void flash_dkdv(float* dqkv, const bf16_t* qkv, const bf16_t* dy, const float* lse, const float* dvec, int t,
                           int nh, float scale_log2, float scale) {
    const int LD = FaSmem<D>::LD, TILE = FaSmem<D>::TILE, BQ = FaSmem<D>::BQ, NQ = BQ / 8, ND = D / 8;
    bf16_t* sk = reinterpret_cast<bf16_t*>(fa_smem);
    bf16_t* sv = sk + TILE;
    bf16_t* sqd = sv + TILE;  // buffer i: q at sqd + 2*i*BQ*LD, dy after it
    float* sstat = reinterpret_cast<float*>(sqd + 4 * BQ * LD);  // buffer i: lse at sstat + 2*i*BQ, dvec after it
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh, c = nh * D;
    const bf16_t* base = qkv + (i64)bb * t * 3 * c + h * D;
    const bf16_t* dyb = dy + (i64)bb * t * c + h * D;
    const int k0 = blockIdx.x * FA_TILE, warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, q = (threadIdx.x & 3) * 2;
    const int key_a = k0 + warp * 16 + g, key_b = key_a + 8;
    // Starts loading query tile q0 into buffer `buf`.
    auto load_queries = [&](int q0, int buf) {
        bf16_t* dst = sqd + 2 * buf * BQ * LD;
        fa_load<D, LD>(dst, base, 3 * c, q0, BQ, t);
        fa_load<D, LD>(dst + BQ * LD, dyb, c, q0, BQ, t);
        float* st = sstat + 2 * buf * BQ;
        for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
            bool in = q0 + i < t;
            st[i] = in ? lse[(i64)bh * t + q0 + i] : 0.0f;
            st[BQ + i] = in ? dvec[(i64)bh * t + q0 + i] : 0.0f;
        }
    };
    fa_load<D, LD>(sk, base + c, 3 * c, k0, FA_TILE, t);
    fa_load<D, LD>(sv, base + 2 * c, 3 * c, k0, FA_TILE, t);
    load_queries(k0, 0);
    cp_async_commit();
    float dk[ND][4], dv[ND][4];
    zero_acc<ND>(dk);
    zero_acc<ND>(dv);
    for (int q0 = k0, it = 0; q0 < t; q0 += BQ, it++) {
        if (q0 + BQ < t) {
            load_queries(q0 + BQ, (it + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16_t* sq = sqd + 2 * (it & 1) * BQ * LD;
        const bf16_t* sdo = sq + BQ * LD;
        const float* slse = sstat + 2 * (it & 1) * BQ;
        const float* sdv = slse + BQ;
        // s = k q^T and dp = v dy^T for this warp's 16 keys and BQ queries
        float s[NQ][4], dp[NQ][4];
        zero_acc<NQ>(s);
        zero_acc<NQ>(dp);
        mma_rows_cols<LD, D / 16, NQ>(s, sk, warp * 16, sq, 0);
        mma_rows_cols<LD, D / 16, NQ>(dp, sv, warp * 16, sdo, 0);
#pragma unroll
        for (int j = 0; j < NQ; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qi = j * 8 + q + (e & 1), query = q0 + qi, key = e < 2 ? key_a : key_b;
                float p = key <= query && query < t ? exp2f(s[j][e] * scale_log2 - slse[qi]) : 0.0f;
                s[j][e] = p;
                dp[j][e] = p * (dp[j][e] - sdv[qi]);
            }
        }
        // dv += p^T dy, dk += ds^T q (this warp's keys are the rows)
        mma_acc_rows<LD, BQ / 16, ND>(dv, s, sdo);
        mma_acc_rows<LD, BQ / 16, ND>(dk, dp, sq);
        __syncthreads();
    }
    float* out = dqkv + (i64)bb * t * 3 * c + h * D;
#pragma unroll
    for (int d = 0; d < ND; d++) {
        int col = d * 8 + q;
        if (key_a < t) {
            float* r = out + (i64)key_a * 3 * c + col;
            *reinterpret_cast<float2*>(r + c) = make_float2(dk[d][0] * scale, dk[d][1] * scale);
            *reinterpret_cast<float2*>(r + 2 * c) = make_float2(dv[d][0], dv[d][1]);
        }
        if (key_b < t) {
            float* r = out + (i64)key_b * 3 * c + col;
            *reinterpret_cast<float2*>(r + c) = make_float2(dk[d][2] * scale, dk[d][3] * scale);
            *reinterpret_cast<float2*>(r + 2 * c) = make_float2(dv[d][2], dv[d][3]);
        }
    }
}

extern "C" __global__ void flash_fwd_64(float* y, bf16_t* y16, float* lse, const bf16_t* qkv, int t, int nh,
                                        float scale_log2) {
    flash_fwd<64>(y, y16, lse, qkv, t, nh, scale_log2);
}
extern "C" __global__ void flash_fwd_128(float* y, bf16_t* y16, float* lse, const bf16_t* qkv, int t, int nh,
                                         float scale_log2) {
    flash_fwd<128>(y, y16, lse, qkv, t, nh, scale_log2);
}
extern "C" __global__ void flash_dq_64(float* dqkv, const bf16_t* qkv, const bf16_t* dy, const float* lse,
                                       const float* dvec, int t, int nh, float scale_log2, float scale) {
    flash_dq<64>(dqkv, qkv, dy, lse, dvec, t, nh, scale_log2, scale);
}
extern "C" __global__ void flash_dq_128(float* dqkv, const bf16_t* qkv, const bf16_t* dy, const float* lse,
                                        const float* dvec, int t, int nh, float scale_log2, float scale) {
    flash_dq<128>(dqkv, qkv, dy, lse, dvec, t, nh, scale_log2, scale);
}
extern "C" __global__ void flash_dkdv_64(float* dqkv, const bf16_t* qkv, const bf16_t* dy, const float* lse,
                                         const float* dvec, int t, int nh, float scale_log2, float scale) {
    flash_dkdv<64>(dqkv, qkv, dy, lse, dvec, t, nh, scale_log2, scale);
}
extern "C" __global__ void flash_dkdv_128(float* dqkv, const bf16_t* qkv, const bf16_t* dy, const float* lse,
                                          const float* dvec, int t, int nh, float scale_log2, float scale) {
    flash_dkdv<128>(dqkv, qkv, dy, lse, dvec, t, nh, scale_log2, scale);
}

// ---------------------------------------------------------------- cross-entropy

// Adds x to a running (max m, sum s of exp(. - m)), rescaling s when m grows.
__device__ __forceinline__ void online_max_sum(float x, float& m, float& s) {
    if (x == NEG_INF) return;  // exp(-inf - m) adds 0; with m still -inf it would add NaN
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m);
    }
}

// One block per row of logits[R,V] (rows `stride` apart, V <= stride).
// losses[r] = logsumexp - logit[target]; the max and the sum of
// exponentials come from one read of the row (the sum rescaled whenever the
// max grows). With `grad`, the gradient (softmax - onehot) * scale over the
// row's `stride` columns: in place, or rounded to bf16 into out16 (same
// strides; the logits are left as they are) when out16 is not null.
extern "C" __global__ void crossentropy(float* losses, float* logits, bf16_t* out16, const int* targets, int v,
                                        int stride, float scale, int grad) {
    __shared__ float sh[32];
    int r = blockIdx.x;
    float* x = logits + (i64)r * stride;
    int target = targets[r];
    float m = NEG_INF, s = 0.0f;
    // 16-byte loads where the rows allow them (stride a multiple of 4).
    const bool vec = (stride & 3) == 0 && (reinterpret_cast<unsigned long long>(logits) & 15) == 0 &&
                     (reinterpret_cast<unsigned long long>(out16) & 7) == 0;
    if (vec) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int q = threadIdx.x; 4 * q < v; q += blockDim.x) {
            float4 f = x4[q];
            float e[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                if (4 * q + k < v) online_max_sum(e[k], m, s);
            }
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x) online_max_sum(x[j], m, s);
    }
    float mx = block_max(m, sh);
    s = block_sum(m == NEG_INF ? 0.0f : s * expf(m - mx), sh);
    m = mx;
    if (threadIdx.x == 0) losses[r] = logf(s) - (x[target] - m);
    __syncthreads();
    if (grad) {
        // The padding columns (v..stride) become 0: products over the padded
        // width then add nothing.
        float inv = scale / s;
        bf16_t* o16 = out16 ? out16 + (i64)r * stride : nullptr;
        if (vec) {
            float4* x4 = reinterpret_cast<float4*>(x);
            for (int q = threadIdx.x; 4 * q < stride; q += blockDim.x) {
                float4 f = x4[q];
                float e[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    int j = 4 * q + k;
                    e[k] = j < v ? expf(e[k] - m) * inv : 0.0f;
                    if (j == target) e[k] -= scale;
                }
                if (o16)
                    reinterpret_cast<uint2*>(o16)[q] = make_uint2(bf16_pair(e[0], e[1]), bf16_pair(e[2], e[3]));
                else
                    x4[q] = make_float4(e[0], e[1], e[2], e[3]);
            }
        } else {
            for (int j = threadIdx.x; j < stride; j += blockDim.x) {
                float g = j < v ? expf(x[j] - m) * inv : 0.0f;
                if (j == target) g -= scale;
                if (o16)
                    o16[j] = bf16_rne(g);
                else
                    x[j] = g;
            }
        }
    }
}

// ---------------------------------------------------------------- optimizer

// AdamW, PyTorch semantics, exactly the CPU kernel's arithmetic.
extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, i64 n, float beta1, float beta2,
                                 float eps, float decay, float step_size, float bc2_sqrt, float grad_scale) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
}

// Per-block partial sums of squares in double: part[blockIdx.x]. Grid-stride,
// fixed grid, so the sum is the same every time.
extern "C" __global__ void sumsq_partial(double* part, const float* x, i64 n) {
    __shared__ double sh[32];
    double a = 0.0;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        double v = x[i];
        a += v * v;
    }
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    a = warp_sum_d(a);
    if (lane == 0) sh[w] = a;
    __syncthreads();
    if (w == 0) {
        double t = lane < nw ? sh[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) part[blockIdx.x] = t;
    }
}
