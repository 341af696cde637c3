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

// One warp per row.
extern "C" __global__ void layernorm_fwd(float* out, float* mean, float* rstd, const float* x, const float* w,
                                         const float* b, int n, int c) {
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
    float* o = out + (i64)row * c;
    for (int j = lane; j < c; j += 32) o[j] = (xr[j] - mu) * rs * w[j] + b[j];
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
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

// Column partial sums of dout[N,C] (a bias gradient). Block (32, 8); grid (ceil(C/32), R).
extern "C" __global__ void column_partial(float* part, const float* dout, int n, int c, int chunk) {
    __shared__ float s[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * chunk, r1 = min(n, r0 + chunk);
    float a = 0.0f;
    if (col < c)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) a += dout[(i64)r * c + col];
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
extern "C" __global__ void gelu_fwd(float* out, const float* x, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    float u = 0.7978846f * (v + 0.044715f * v * v * v);
    out[i] = v * sigmoidf_(2.0f * u);
}

// d *= gelu'(x)
extern "C" __global__ void gelu_bwd(float* d, const float* x, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    float u = 0.7978846f * (v + 0.044715f * v * v * v);
    float s = sigmoidf_(2.0f * u);
    d[i] *= s + v * 2.0f * s * (1.0f - s) * 0.7978846f * (1.0f + 3.0f * 0.044715f * v * v);
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

// fp32 -> bf16, round to nearest even (NaN stays NaN), as the CPU's to_bf16.
extern "C" __global__ void to_bf16(bf16_t* out, const float* x, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int b = __float_as_uint(x[i]);
    if (x[i] != x[i]) {
        out[i] = (bf16_t)((b >> 16) | 0x40);
    } else {
        out[i] = (bf16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    }
}

extern "C" __global__ void from_bf16(float* out, const bf16_t* x, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __uint_as_float(((unsigned int)x[i]) << 16);
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

// ---------------------------------------------------------------- cross-entropy

// One block per row of logits[R,V] (rows `stride` apart, V <= stride).
// losses[r] = logsumexp - logit[target]; with `grad`, logits become
// (softmax - onehot) * scale.
extern "C" __global__ void crossentropy(float* losses, float* logits, const int* targets, int v, int stride, float scale,
                                        int grad) {
    __shared__ float sh[32];
    int r = blockIdx.x;
    float* x = logits + (i64)r * stride;
    int target = targets[r];
    float m = NEG_INF;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(x[j] - m);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) losses[r] = logf(s) - (x[target] - m);
    __syncthreads();
    if (grad) {
        // The padding columns (v..stride) become 0: products over the padded
        // width then add nothing.
        float inv = scale / s;
        for (int j = threadIdx.x; j < stride; j += blockDim.x) {
            float g = j < v ? expf(x[j] - m) * inv : 0.0f;
            if (j == target) g -= scale;
            x[j] = g;
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
