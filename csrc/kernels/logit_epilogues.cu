// Epilogues over one fp32 logits workspace tile (the output of a cuBLAS GEMM): row statistics
// and the §2 gradient. One thread block per token row, streaming that row's vocabulary slice
// with coalesced accesses: both kernels are bound by the tile's memory traffic (one read, at
// most one write), so they stay a small fraction of the GEMMs around them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "hykernels.h"

namespace hykernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // elements per thread per logit_grad tile

// z = s(x + b)/τ: the model's softcap first, then the sampler's temperature (docs/math.md §1).
__device__ __forceinline__ float transform(float x, int64_t j, const LogitTransform& tf) {
  if (tf.bias != nullptr) x += tf.bias[j];
  if (tf.softcap > 0.f) return tanhf(x / tf.softcap) * (tf.softcap * tf.inv_temp);
  return x * tf.inv_temp;
}

// Online-softmax state of part of a row (see hykernels/_partials.py): sums relative to m.
// A masked logit (z = −inf, e.g. a −inf bias entry) contributes exactly nothing to s and t
// (e = 0, and p·(z − m) is taken as 0, never −inf·0 = NaN); u = Σ(z − m) becomes −inf, so the
// row's self-certainty is +inf, as on materialised logits. A NaN logit still propagates.
struct RowState {
  float m, s, t, u, n, zy;  // n: entries folded in (float: only used to rebase u)
  int64_t arg;

  __device__ void init() {
    m = -INFINITY;
    s = t = u = n = zy = 0.f;
    arg = INT64_MAX;
  }

  // Rebase the sums from m to mx ≥ m. An empty state (n = 0), or one that has seen only −inf
  // (s = t = 0, shift = −inf), keeps s = t = 0, never −inf·0.
  __device__ void rebase(float mx) {
    if (n == 0.f || mx == m) return;
    const float shift = m - mx;
    const float a = expf(shift);
    t = s == 0.f ? 0.f : a * (t + shift * s);
    s *= a;
    u += n * shift;
    m = mx;
  }

  __device__ void add(float z, int64_t col) {
    if (z > m) {  // strict: the first maximum keeps the argmax
      rebase(z);
      m = z;
      arg = col;
    }
    // z = m = −inf (only masked entries so far): zs = −inf, not −inf − (−inf) = NaN.
    const float zs = (z == -INFINITY) ? -INFINITY : z - m;  // NaN propagates into s, t, u
    const float e = expf(zs);
    s += e;
    if (e != 0.f) t += zs * e;
    u += zs;
    n += 1.f;
  }

  __device__ void merge(RowState o) {
    if (o.n == 0.f) return;
    if (n == 0.f) {
      *this = o;
      return;
    }
    const float mx = fmaxf(m, o.m);
    const int64_t best = (o.m > m || (o.m == m && o.arg < arg)) ? o.arg : arg;
    rebase(mx);
    o.rebase(mx);
    s += o.s;
    t += o.t;
    u += o.u;
    n += o.n;
    zy += o.zy;
    arg = best;
  }

  __device__ RowState shuffle_down(int offset) const {
    RowState o;
    o.m = __shfl_down_sync(0xffffffffu, m, offset);
    o.s = __shfl_down_sync(0xffffffffu, s, offset);
    o.t = __shfl_down_sync(0xffffffffu, t, offset);
    o.u = __shfl_down_sync(0xffffffffu, u, offset);
    o.n = __shfl_down_sync(0xffffffffu, n, offset);
    o.zy = __shfl_down_sync(0xffffffffu, zy, offset);
    o.arg = __shfl_down_sync(0xffffffffu, arg, offset);
    return o;
  }
};

__device__ RowState block_merge(RowState st) {
  __shared__ RowState warp_states[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) st.merge(st.shuffle_down(offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    if (lane < kWarps) {
      st = warp_states[lane];
    } else {
      st.init();
    }
    for (int offset = 16; offset > 0; offset >>= 1) st.merge(st.shuffle_down(offset));
  }
  return st;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads) logit_stats_kernel(
    float* tile, int64_t cols, int64_t ld, int64_t col0, LogitTransform tf, bool write_back,
    const int64_t* targets, float* m, float* s, float* t, float* u, float* zy, int64_t* argmax) {
  const int64_t row = blockIdx.x;
  float* z = tile + row * ld;
  const int64_t y = targets[row] - col0;  // the target's column in this slice, if it is here
  RowState st;
  st.init();
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const float x = transform(z[j], j, tf);
    if (write_back) z[j] = x;
    if (j == y) st.zy = x;
    st.add(x, col0 + j);
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    m[row] = st.m;
    s[row] = st.s;
    t[row] = st.t;
    u[row] = st.u;
    zy[row] = st.zy;
    argmax[row] = st.arg;
  }
}

template <typename Out>
__device__ __forceinline__ Out narrow(float g);
template <>
__device__ __forceinline__ __nv_bfloat16 narrow(float g) { return __float2bfloat16_rn(g); }
template <>
__device__ __forceinline__ __half narrow(float g) { return __float2half_rn(g); }

// The row is walked in tiles of kThreads·kItems elements: all of a tile is read into registers
// before any of it is written. A narrow element j lands at byte 2j, inside fp32 elements that
// earlier tiles (or this one, before the barrier) have already read, so the in-place write
// never clobbers a logit still to be read.
template <typename Out>
__global__ void __launch_bounds__(kThreads) logit_grad_kernel(
    float* tile, int64_t cols, int64_t ld, int64_t col0, LogitTransform tf, bool transformed,
    const int64_t* targets, const float* lse, const float* lse_lo, const float* A, const float* B,
    const float* C, const float* D) {
  const int64_t row = blockIdx.x;
  float* z = tile + row * ld;
  const int64_t y = targets[row] - col0;
  const float hi = lse[row], lo = lse_lo[row], a = A[row], b = B[row], c = C[row], d = D[row];
  for (int64_t start = 0; start < cols; start += kThreads * kItems) {
    float g[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = start + i * kThreads + threadIdx.x;
      if (j >= cols) break;
      const float x = transformed ? z[j] : transform(z[j], j, tf);
      const float logp = (x - hi) - lo;
      const float p = expf(logp);
      float gv = (p == 0.f ? 0.f : p * (a + b * logp)) + d;  // a masked logit: p = 0, never −inf·0
      if (j == y) gv += c;
      if (tf.softcap > 0.f) {  // x is the final logit z = s/τ, so s/c = τ·z/c
        const float r = x / (tf.softcap * tf.inv_temp);
        gv *= 1.f - r * r;  // s′ = 1 − (s/c)²
      }
      g[i] = gv * tf.inv_temp;
    }
    if constexpr (sizeof(Out) < sizeof(float)) __syncthreads();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = start + i * kThreads + threadIdx.x;
      if (j >= cols) break;
      if constexpr (sizeof(Out) == sizeof(float)) {
        z[j] = g[i];
      } else {
        reinterpret_cast<Out*>(z)[j] = narrow<Out>(g[i]);
      }
    }
  }
}

}  // namespace

int logit_stats(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t col0, LogitTransform tf,
                bool write_back, const int64_t* targets, float* m, float* s, float* t, float* u, float* zy,
                int64_t* argmax, void* stream) {
  if (rows == 0) return cudaSuccess;
  logit_stats_kernel<<<static_cast<unsigned>(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      tile, cols, ld, col0, tf, write_back, targets, m, s, t, u, zy, argmax);
  return cudaGetLastError();
}

int logit_grad(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t col0, LogitTransform tf,
               bool transformed, const int64_t* targets, const float* lse, const float* lse_lo, const float* A,
               const float* B, const float* C, const float* D, int out_kind, void* stream) {
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(rows));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (out_kind) {
    case kGradFloat32:
      logit_grad_kernel<float><<<grid, kThreads, 0, st>>>(tile, cols, ld, col0, tf, transformed, targets, lse,
                                                          lse_lo, A, B, C, D);
      break;
    case kGradBFloat16:
      logit_grad_kernel<__nv_bfloat16><<<grid, kThreads, 0, st>>>(tile, cols, ld, col0, tf, transformed, targets,
                                                                  lse, lse_lo, A, B, C, D);
      break;
    case kGradFloat16:
      logit_grad_kernel<__half><<<grid, kThreads, 0, st>>>(tile, cols, ld, col0, tf, transformed, targets, lse,
                                                           lse_lo, A, B, C, D);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace hykernels
