// beit-rs kernels for CUDA. Inference: the element-wise work around the GEMMs of a frozen BEiT
// layer, fused so that each activation is read and written once (candle would run one kernel per
// step: bias add, GELU, layer scale, residual, scale, bias gather, softmax, head split).
// Training: the relative position bias gather, bias add, softmax, GELU and LayerNorm with
// their gradients, and AdamW in place.
// Arithmetic in f32 for every storage type (f32, bf16, f16), as PyTorch does.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Sum of v over the block, returned to every thread (red: 32 floats of shared memory).
__device__ __forceinline__ float block_sum(float v, float *red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  __syncthreads();  // red may still be read by an earlier call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// Linear epilogue on y [rows, n] (row-major): op 0: y + bias; 1: GELU(y + bias) (exact erf);
// 2: res + scale * (y + bias) with scale = params[n..2n] when has_scale, else 1.
// params = bias [n] (then scale [n]).
template <typename T>
__device__ void epilogue(const T *y, const T *params, const T *res, T *out, int rows, int n,
                         int op, int has_scale) {
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const size_t base = (size_t)r * n;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
      float v = to_f(y[base + c]) + to_f(params[c]);
      if (op == 1) {
        v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
      } else if (op == 2) {
        if (has_scale) v *= to_f(params[n + c]);
        v += to_f(res[base + c]);
      }
      out[base + c] = from_f<T>(v);
    }
  }
}

// softmax(scores * scale + bias) over rows of length s; row r belongs to head (r / s) % heads
// and query i = r % s. The bias is gathered from table [heads, table_rows] through
// index [s * s] (relative position index); table == nullptr: no bias. One block per row; the
// row's logits are kept in shared memory (s floats).
template <typename T>
__device__ void attn_softmax(const T *scores, const T *table, const uint32_t *index, T *out,
                             size_t rows, int s, int heads, int table_rows, float scale) {
  extern __shared__ float logits[];
  __shared__ float red[32];
  const size_t r = blockIdx.x;
  if (r >= rows) return;
  const int i = (int)(r % s);
  const int h = (int)((r / s) % heads);
  const T *row = scores + r * (size_t)s;
  const uint32_t *idx = index ? index + (size_t)i * s : nullptr;
  const T *tab = table ? table + (size_t)h * table_rows : nullptr;
  float mx = __int_as_float(0xff800000);  // -inf
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    float v = to_f(row[j]) * scale;
    if (tab) v += to_f(tab[idx[j]]);
    logits[j] = v;
    mx = fmaxf(mx, v);
  }
  // Block-wide max, then sum.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = lane < warps ? red[lane] : __int_as_float(0xff800000);
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
  __syncthreads();
  float sum = 0.f;
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    const float e = expf(logits[j] - mx);
    logits[j] = e;
    sum += e;
  }
  const float inv = 1.0f / block_sum(sum, red);
  T *dst = out + r * (size_t)s;
  for (int j = threadIdx.x; j < s; j += blockDim.x) dst[j] = from_f<T>(logits[j] * inv);
}

// softmax(scores * scale + bias) as above, one warp per row for rows of at most 32 * K: the
// row stays in registers (K values per lane) and the reductions are warp shuffles, no block
// synchronisation (the block kernel above leaves most of its threads idle on 197-long rows).
template <typename T, int K>
__device__ void attn_softmax_warp(const T *scores, const T *table, const uint32_t *index, T *out,
                                  size_t rows, int s, int heads, int table_rows, float scale) {
  const size_t r = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int i = (int)(r % s);
  const int h = (int)((r / s) % heads);
  const T *row = scores + r * (size_t)s;
  const uint32_t *idx = index ? index + (size_t)i * s : nullptr;
  const T *tab = table ? table + (size_t)h * table_rows : nullptr;
  float v[K];
  float mx = __int_as_float(0xff800000);  // -inf
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = lane + 32 * k;
    float x = __int_as_float(0xff800000);
    if (j < s) {
      x = to_f(row[j]) * scale;
      if (tab) x += to_f(tab[idx[j]]);
    }
    v[k] = x;
    mx = fmaxf(mx, x);
  }
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (lane + 32 * k < s) {
      v[k] = expf(v[k] - mx);
      sum += v[k];
    }
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
  const float inv = 1.0f / sum;
  T *dst = out + r * (size_t)s;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = lane + 32 * k;
    if (j < s) dst[j] = from_f<T>(v[k] * inv);
  }
}

// Attention heads in and out of the token layout, rows of hd elements moved as `vec` units of
// U (16-byte vectors where the row allows, else single elements). Token-major [B, S, P, H, hd]
// (the QKV projection: P = 3; an attention output: P = 1) <-> heads-major [P, B, H, S, hd].
// to_heads = 1: token-major src -> heads-major dst; 0: the reverse. Indexed by the heads-major
// position, so that one side of every warp's access is contiguous.
template <typename U>
__device__ void heads_permute(const U *src, U *dst, int b, int s, int p, int h, int vec,
                              int to_heads) {
  const size_t total = (size_t)p * b * h * s * vec;
  for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
       t += (size_t)gridDim.x * blockDim.x) {
    size_t q = t;
    const int v = (int)(q % vec);
    q /= vec;
    const int si = (int)(q % s);
    q /= s;
    const int hi = (int)(q % h);
    q /= h;
    const int bi = (int)(q % b);
    const int pi = (int)(q / b);
    const size_t tok = ((((size_t)bi * s + si) * p + pi) * h + hi) * vec + v;
    if (to_heads) {
      dst[t] = src[tok];
    } else {
      dst[tok] = src[t];
    }
  }
}

#define HEADS_PERMUTE(U, SUFFIX)                                                                \
  extern "C" __global__ void beit_heads_permute_##SUFFIX(const U *src, U *dst, int b, int s,    \
                                                         int p, int h, int vec, int to_heads) { \
    heads_permute<U>(src, dst, b, s, p, h, vec, to_heads);                                      \
  }
HEADS_PERMUTE(uint4, u128)
HEADS_PERMUTE(uint32_t, u32)
HEADS_PERMUTE(uint16_t, u16)

// out [heads, n] = table[heads, table_cols] gathered through index [n].
template <typename T>
__device__ void gather_columns(const T *table, const uint32_t *index, T *out, int heads,
                               int table_cols, size_t n) {
  const size_t total = (size_t)heads * n;
  for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
       t += (size_t)gridDim.x * blockDim.x) {
    const size_t h = t / n, j = t % n;
    out[t] = table[h * table_cols + index[j]];
  }
}

// The gradient of gather_columns: dtable[h, c] = sum of grad[h, j] over the positions j with
// index[j] == c, listed (ascending) in order[offsets[c] .. offsets[c + 1]]. One thread per
// table entry, a fixed summation order: deterministic, unlike atomics.
template <typename T>
__device__ void gather_columns_backward(const T *grad, const uint32_t *offsets,
                                        const uint32_t *order, T *out, int heads, int table_cols,
                                        size_t n) {
  const int total = heads * table_cols;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    const int h = t / table_cols, c = t % table_cols;
    const T *g = grad + (size_t)h * n;
    float acc = 0.f;
    for (uint32_t k = offsets[c]; k < offsets[c + 1]; ++k) acc += to_f(g[order[k]]);
    out[t] = from_f<T>(acc);
  }
}

// Exact GELU and its gradient, element-wise over n values.
template <typename T>
__device__ void gelu_erf(const T *x, T *out, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float v = to_f(x[i]);
    out[i] = from_f<T>(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
  }
}

// out = g * GELU'(x) = g * (Phi(x) + x * phi(x)).
template <typename T>
__device__ void gelu_erf_backward(const T *x, const T *g, T *out, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float v = to_f(x[i]);
    const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
    out[i] = from_f<T>(to_f(g[i]) * (cdf + v * pdf));
  }
}

// Softmax gradient over rows of length s: out = y * (g - sum(g * y)); one block per row.
template <typename T>
__device__ void softmax_backward(const T *y, const T *g, T *out, size_t rows, int s) {
  __shared__ float red[32];
  const size_t r = blockIdx.x;
  if (r >= rows) return;
  const T *yr = y + r * (size_t)s, *gr = g + r * (size_t)s;
  float dot = 0.f;
  for (int j = threadIdx.x; j < s; j += blockDim.x) dot += to_f(yr[j]) * to_f(gr[j]);
  dot = block_sum(dot, red);
  T *dst = out + r * (size_t)s;
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    dst[j] = from_f<T>(to_f(yr[j]) * (to_f(gr[j]) - dot));
  }
}


// Mean and 1 / sqrt(variance + eps) of a row of d values, block-wide (two passes).
template <typename T>
__device__ void row_stats(const T *xr, int d, float eps, float *red, float &mean, float &rstd) {
  float s = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) s += to_f(xr[j]);
  mean = block_sum(s, red) / d;
  float v = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float c = to_f(xr[j]) - mean;
    v += c * c;
  }
  rstd = 1.0f / sqrtf(block_sum(v, red) / d + eps);
}

// LayerNorm over rows of length d: one block per row.
template <typename T>
__device__ void layer_norm(const T *x, const T *w, const T *b, T *out, size_t rows, int d,
                           float eps) {
  __shared__ float red[32];
  const size_t r = blockIdx.x;
  if (r >= rows) return;
  const T *xr = x + r * d;
  float mean, rstd;
  row_stats(xr, d, eps, red, mean, rstd);
  T *o = out + r * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    o[j] = from_f<T>((to_f(xr[j]) - mean) * rstd * to_f(w[j]) + to_f(b[j]));
  }
}

// LayerNorm gradient: out [2, rows, d] = (dx, g * xhat); the weight's gradient is the column
// sum of the second half, the bias's that of g. One block per row, statistics recomputed.
template <typename T>
__device__ void layer_norm_backward(const T *x, const T *w, const T *g, T *out, size_t rows,
                                    int d, float eps) {
  __shared__ float red[32];
  const size_t r = blockIdx.x;
  if (r >= rows) return;
  const T *xr = x + r * d, *gr = g + r * d;
  float mean, rstd;
  row_stats(xr, d, eps, red, mean, rstd);
  float a = 0.f, bx = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float xhat = (to_f(xr[j]) - mean) * rstd, dxh = to_f(gr[j]) * to_f(w[j]);
    a += dxh;
    bx += dxh * xhat;
  }
  const float m1 = block_sum(a, red) / d, m2 = block_sum(bx, red) / d;
  T *dx = out + r * d, *gx = out + (rows + r) * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float xhat = (to_f(xr[j]) - mean) * rstd, gj = to_f(gr[j]);
    dx[j] = from_f<T>((gj * to_f(w[j]) - m1 - xhat * m2) * rstd);
    gx[j] = from_f<T>(gj * xhat);
  }
}

// Column sums of x [rows, n] -> out [n] (f32 accumulation, fixed order: deterministic). Block
// (32, 32): 32 columns, each summed by 32 threads over interleaved rows, then combined.
template <typename T>
__device__ void column_sum(const T *x, T *out, size_t rows, int n) {
  __shared__ float part[32][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.f;
  if (c < n) {
    for (size_t r = threadIdx.y; r < rows; r += 32) acc += to_f(x[r * n + c]);
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float s = 0.f;
    for (int k = 0; k < 32; ++k) s += part[k][threadIdx.x];
    out[c] = from_f<T>(s);
  }
}

// AdamW, in place on f32 tensors of n elements (torch's update, as train::optim's CPU kernels):
// m = beta * m + (1 - beta) * g (g * g when square).
extern "C" __global__ void beit_adamw_moment_f32(float *m, const float *g, size_t n, float beta,
                                                 float one_minus_beta, int square) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float gi = square ? g[i] * g[i] : g[i];
    m[i] = m[i] * beta + gi * one_minus_beta;
  }
}

// theta = theta * decay - step * m / (sqrt(v) / sqrt_bc2 + eps).
extern "C" __global__ void beit_adamw_param_f32(float *theta, const float *m, const float *v,
                                                size_t n, float decay, float step, float sqrt_bc2,
                                                float eps) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    theta[i] = theta[i] * decay - step * (m[i] / (sqrtf(v[i]) / sqrt_bc2 + eps));
  }
}

#define SOFTMAX_WARP(T, SUFFIX, K)                                                              \
  extern "C" __global__ void beit_attn_softmax_w##K##_##SUFFIX(                                 \
      const T *scores, const T *table, const uint32_t *index, T *out, size_t rows, int s,       \
      int heads, int table_rows, float scale) {                                                 \
    attn_softmax_warp<T, K>(scores, table, index, out, rows, s, heads, table_rows, scale);      \
  }

#define INSTANTIATE(T, SUFFIX)                                                                  \
  extern "C" __global__ void beit_epilogue_##SUFFIX(const T *y, const T *params, const T *res,  \
                                                    T *out, int rows, int n, int op,            \
                                                    int has_scale) {                            \
    epilogue<T>(y, params, res, out, rows, n, op, has_scale);                                   \
  }                                                                                             \
  extern "C" __global__ void beit_attn_softmax_##SUFFIX(                                        \
      const T *scores, const T *table, const uint32_t *index, T *out, size_t rows, int s,       \
      int heads, int table_rows, float scale) {                                                 \
    attn_softmax<T>(scores, table, index, out, rows, s, heads, table_rows, scale);              \
  }                                                                                             \
  SOFTMAX_WARP(T, SUFFIX, 4)                                                                    \
  SOFTMAX_WARP(T, SUFFIX, 8)                                                                    \
  SOFTMAX_WARP(T, SUFFIX, 16)                                                                   \
  SOFTMAX_WARP(T, SUFFIX, 32)                                                                   \
  extern "C" __global__ void beit_gather_columns_##SUFFIX(const T *table, const uint32_t *index, \
                                                          T *out, int heads, int table_cols,    \
                                                          size_t n) {                           \
    gather_columns<T>(table, index, out, heads, table_cols, n);                                 \
  }                                                                                             \
  extern "C" __global__ void beit_gather_columns_backward_##SUFFIX(                             \
      const T *grad, const uint32_t *offsets, const uint32_t *order, T *out, int heads,         \
      int table_cols, size_t n) {                                                               \
    gather_columns_backward<T>(grad, offsets, order, out, heads, table_cols, n);                \
  }                                                                                             \
  extern "C" __global__ void beit_gelu_erf_##SUFFIX(const T *x, T *out, size_t n) {             \
    gelu_erf<T>(x, out, n);                                                                     \
  }                                                                                             \
  extern "C" __global__ void beit_gelu_erf_backward_##SUFFIX(const T *x, const T *g, T *out,    \
                                                             size_t n) {                        \
    gelu_erf_backward<T>(x, g, out, n);                                                         \
  }                                                                                             \
  extern "C" __global__ void beit_softmax_backward_##SUFFIX(const T *y, const T *g, T *out,     \
                                                            size_t rows, int s) {               \
    softmax_backward<T>(y, g, out, rows, s);                                                    \
  }                                                                                             \
  extern "C" __global__ void beit_layer_norm_##SUFFIX(const T *x, const T *w, const T *b, T *out, \
                                                      size_t rows, int d, float eps) {          \
    layer_norm<T>(x, w, b, out, rows, d, eps);                                                  \
  }                                                                                             \
  extern "C" __global__ void beit_layer_norm_backward_##SUFFIX(                                 \
      const T *x, const T *w, const T *g, T *out, size_t rows, int d, float eps) {              \
    layer_norm_backward<T>(x, w, g, out, rows, d, eps);                                         \
  }                                                                                             \
  extern "C" __global__ void beit_column_sum_##SUFFIX(const T *x, T *out, size_t rows, int n) { \
    column_sum<T>(x, out, rows, n);                                                             \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
