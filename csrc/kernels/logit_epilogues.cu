// Epilogues over one fp32 logits workspace tile (the output of a cuBLAS GEMM): row statistics
// and the §2 gradient. One thread block per token row streams that row's vocabulary slice.
// Both kernels are bound by the tile's memory traffic, so they move it in 16-byte vectors: each
// thread issues kUnroll independent float4 loads (coalesced: consecutive threads, consecutive
// 16 bytes) before it uses the first, and stores float4 (fp32) or 8 bytes (4 bf16/fp16 values).
//
// Bytes of HBM per logit (cuBLAS's fp32 write included; see csrc/README.md for every case):
// logit_stats reads 4 and writes 4 only when the host asks for the transformed tile back
// (write_back: a bias, softcap or temperature ≠ 1 changed it and a gradient pass follows);
// logit_grad reads 4 and writes 2 (bf16/fp16) or 4 (fp32). The transform is never stored when it
// is the identity: the GEMM output already is z, and logit_grad reads it as it is.
//
// The vector path needs a 16-byte-aligned tile, a leading dimension that is a multiple of 4 and a
// 16-byte-aligned bias slice (hykernels/backends/cuda.py pads the workspace rows and aligns the
// slices so it always has them); the last cols % 4 columns of a row go through a scalar tail. Any
// other layout the binding accepts runs the scalar kernels (one 4-byte access per element).
//
// Checked without a GPU only: tests/test_cuda.py compiles these for sm_80 and sm_90a and reads
// the SASS (128-bit loads in the main loops, no local memory), and tests/cuda_emulator.py follows
// the same contract in torch for the shared correctness suite. No GPU timing of them exists here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "hykernels.h"

namespace hykernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 4;                    // fp32 elements per 16-byte access
constexpr int kUnroll = 4;                 // float4 loads in flight per thread before the first use
constexpr int kStep = kThreads * kUnroll;  // float4s a block covers per step of the vector loops
constexpr int kItems = 4;                  // elements per thread per tile of the scalar logit_grad

// z = s(x + b)/τ: the model's softcap first, then the sampler's temperature (docs/math.md §1).
// `b` is the bias of x's column, ignored when the transform has none.
__device__ __forceinline__ float transform(float x, float b, const LogitTransform& tf) {
  if (tf.bias != nullptr) x += b;
  if (tf.softcap > 0.f) return tanhf(x / tf.softcap) * (tf.softcap * tf.inv_temp);
  return x * tf.inv_temp;
}

__device__ __forceinline__ float transform_at(float x, int j, const LogitTransform& tf) {
  return transform(x, tf.bias != nullptr ? tf.bias[j] : 0.f, tf);
}

__device__ __forceinline__ float4 transform4(float4 x, float4 b, const LogitTransform& tf) {
  return make_float4(transform(x.x, b.x, tf), transform(x.y, b.y, tf), transform(x.z, b.z, tf),
                     transform(x.w, b.w, tf));
}

// The row's target column in this slice, or −1 when its target (a global id, −1 = none) is not here.
// One step's loads of the vector loops: kUnroll float4s of the row (and of the bias, when there is
// one) per thread, all issued before the first is used (2·kUnroll loads in flight). A full step
// (the main loop) loads unconditionally; the last, partial one checks each index against n4.
template <bool kFull>
__device__ __forceinline__ void load_step(const float4* z4, const float4* b4, int base, int n4,
                                          float4 (&v)[kUnroll], float4 (&b)[kUnroll]) {
#pragma unroll
  for (int i = 0; i < kUnroll; ++i) {
    const int k = base + i * kThreads + threadIdx.x;
    if (kFull || k < n4) {
      v[i] = z4[k];
      b[i] = b4 != nullptr ? __ldg(b4 + k) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

__device__ __forceinline__ int local_target(const int64_t* targets, int64_t col0, int cols) {
  const int64_t y = targets[blockIdx.x] - col0;
  return (y >= 0 && y < cols) ? static_cast<int>(y) : -1;
}

// Online-softmax state of part of a row (see hykernels/_partials.py): sums relative to m.
// A masked logit (z = −inf, e.g. a −inf bias entry) contributes exactly nothing to s and t
// (e = 0, and p·(z − m) is taken as 0, never −inf·0 = NaN); u = Σ(z − m) becomes −inf, so the
// row's self-certainty is +inf, as on materialised logits. A NaN logit still propagates.
struct RowState {
  float m, s, t, u, n;  // n: entries folded in (float: only used to rebase u)
  int64_t arg;

  __device__ void init() {
    m = -INFINITY;
    s = t = u = n = 0.f;
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

  // One logit's terms relative to the current m (already ≥ z unless z is NaN).
  __device__ __forceinline__ void term(float z) {
    // z = m = −inf (only masked entries so far): zs = −inf, not −inf − (−inf) = NaN.
    const float zs = (z == -INFINITY) ? -INFINITY : z - m;  // NaN propagates into s, t, u
    const float e = expf(zs);
    s += e;
    if (e != 0.f) t += zs * e;
    u += zs;
    n += 1.f;
  }

  __device__ void add(float z, int64_t col) {
    if (z > m) {  // strict: the first maximum keeps the argmax (a NaN never becomes the max)
      rebase(z);
      m = z;
      arg = col;
    }
    term(z);
  }

  // Four consecutive logits at columns col..col+3: their maximum first (strict >, in column
  // order, so the first maximum keeps the argmax and a NaN never becomes it), one rebase, then
  // the four terms relative to the new m. Same result as four add() calls, up to rounding.
  __device__ void add4(float4 v, int64_t col) {
    float mx = m;
    int at = -1;
    if (v.x > mx) mx = v.x, at = 0;
    if (v.y > mx) mx = v.y, at = 1;
    if (v.z > mx) mx = v.z, at = 2;
    if (v.w > mx) mx = v.w, at = 3;
    if (at >= 0) {
      rebase(mx);
      m = mx;
      arg = col + at;
    }
    term(v.x);
    term(v.y);
    term(v.z);
    term(v.w);
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
    arg = best;
  }

  __device__ RowState shuffle_down(int offset) const {
    RowState o;
    o.m = __shfl_down_sync(0xffffffffu, m, offset);
    o.s = __shfl_down_sync(0xffffffffu, s, offset);
    o.t = __shfl_down_sync(0xffffffffu, t, offset);
    o.u = __shfl_down_sync(0xffffffffu, u, offset);
    o.n = __shfl_down_sync(0xffffffffu, n, offset);
    o.arg = __shfl_down_sync(0xffffffffu, arg, offset);
    return o;
  }
};

__device__ RowState block_merge(RowState st) {
  __shared__ RowState warp_states[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) st.merge(st.shuffle_down(offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();  // also orders every thread's write-back before thread 0 reads z_y below
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

// kVector: the row is walked in float4s (16-byte-aligned rows and bias), kStep of them per block
// step, the last cols % 4 columns scalar; otherwise every column is scalar.
template <bool kVector>
__global__ void __launch_bounds__(kThreads) logit_stats_kernel(
    float* tile, int cols, int64_t ld, int64_t col0, LogitTransform tf, bool write_back,
    const int64_t* targets, float* m, float* s, float* t, float* u, float* zy, int64_t* argmax) {
  const int64_t row = blockIdx.x;
  float* z = tile + row * ld;
  RowState st;
  st.init();
  int scalar_from = 0;
  if constexpr (kVector) {
    float4* z4 = reinterpret_cast<float4*>(z);
    const float4* b4 = reinterpret_cast<const float4*>(tf.bias);
    const int n4 = cols / kVec;
    // One step: kUnroll float4s per thread, all loaded (load_step) before the first is used.
    const auto step = [&](int base, auto full) {
      constexpr bool kFull = decltype(full)::value;
      float4 v[kUnroll], b[kUnroll];
      load_step<kFull>(z4, b4, base, n4, v, b);
#pragma unroll
      for (int i = 0; i < kUnroll; ++i) {
        const int k = base + i * kThreads + threadIdx.x;
        if (kFull || k < n4) {
          const float4 x = transform4(v[i], b[i], tf);
          if (write_back) z4[k] = x;
          st.add4(x, col0 + int64_t{kVec} * k);
        }
      }
    };
    const int full_end = n4 - n4 % kStep;
    for (int base = 0; base < full_end; base += kStep) step(base, std::true_type{});
    if (full_end < n4) step(full_end, std::false_type{});
    scalar_from = n4 * kVec;
  }
  // A thread's scalar columns come after its vector ones: it still folds its columns in order.
  for (int j = scalar_from + threadIdx.x; j < cols; j += kThreads) {
    const float x = transform_at(z[j], j, tf);
    if (write_back) z[j] = x;
    st.add(x, col0 + j);
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    // The target logit: one 4-byte read after the barrier in block_merge, so with write_back it is
    // the value stored (and folded in) above, and otherwise the same transform of the same input.
    const int y = local_target(targets, col0, cols);
    zy[row] = y < 0 ? 0.f : (write_back ? z[y] : transform_at(z[y], y, tf));
    m[row] = st.m;
    s[row] = st.s;
    t[row] = st.t;
    u[row] = st.u;
    argmax[row] = st.arg;
  }
}

template <typename Out>
__device__ __forceinline__ Out narrow(float g);
template <>
__device__ __forceinline__ __nv_bfloat16 narrow(float g) { return __float2bfloat16_rn(g); }
template <>
__device__ __forceinline__ __half narrow(float g) { return __float2half_rn(g); }

// Two narrow values as one 32-bit word, the first at the lower address (same rounding as narrow()).
template <typename Out>
__device__ __forceinline__ uint32_t narrow2(float a, float b);
template <>
__device__ __forceinline__ uint32_t narrow2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return reinterpret_cast<const uint32_t&>(h);
}
template <>
__device__ __forceinline__ uint32_t narrow2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return reinterpret_cast<const uint32_t&>(h);
}

// dL/dz of one logit and the chain rule through the transform (hykernels.h: logit_grad).
struct GradRow {
  float hi, lo, a, b, c, d;
  LogitTransform tf;

  __device__ __forceinline__ float operator()(float x, bool at_target) const {
    const float logp = (x - hi) - lo;
    const float p = expf(logp);
    float gv = (p == 0.f ? 0.f : p * (a + b * logp)) + d;  // a masked logit: p = 0, never −inf·0
    if (at_target) gv += c;
    if (tf.softcap > 0.f) {  // x is the final logit z = s/τ, so s/c = τ·z/c
      const float r = x / (tf.softcap * tf.inv_temp);
      gv *= 1.f - r * r;  // s′ = 1 − (s/c)²
    }
    return gv * tf.inv_temp;
  }
};

// In place over the row: fp32 element j is overwritten by its own gradient, or (bf16/fp16) narrow
// element j lands at byte 2j, inside fp32 element ⌊j/2⌋ ≤ j. So a narrow write never clobbers a
// logit still to be read as long as every write waits until the columns before it are read:
// - vector path: float4 k's four narrow values are one 8-byte store at byte 8k, inside float4
//   ⌊k/2⌋ ≤ k; each step loads all its float4s, then a barrier, then stores, so that float4 was
//   read in this step or an earlier one. The scalar tail (j ≥ 4·⌊cols/4⌋) is read before the
//   vector loop and written after a final barrier: byte 2j lies in a vector or a tail column.
// - scalar path: tiles of kThreads·kItems columns, read in full before a barrier, then written.
// fp32 output needs no barrier: each thread only overwrites what it has read itself.
template <typename Out, bool kVector>
__global__ void __launch_bounds__(kThreads) logit_grad_kernel(
    float* tile, int cols, int64_t ld, int64_t col0, LogitTransform tf, bool transformed,
    const int64_t* targets, const float* lse, const float* lse_lo, const float* A, const float* B,
    const float* C, const float* D) {
  constexpr bool kNarrow = sizeof(Out) < sizeof(float);
  const int64_t row = blockIdx.x;
  float* z = tile + row * ld;
  const int y = local_target(targets, col0, cols);
  const GradRow grad{lse[row], lse_lo[row], A[row], B[row], C[row], D[row], tf};
  if constexpr (kVector) {
    float4* z4 = reinterpret_cast<float4*>(z);
    const float4* b4 = transformed ? nullptr : reinterpret_cast<const float4*>(tf.bias);
    const int n4 = cols / kVec;
    const int tail = n4 * kVec + static_cast<int>(threadIdx.x);  // this thread's tail column
    float tail_g = 0.f;
    if (tail < cols) {
      const float x = transformed ? z[tail] : transform_at(z[tail], tail, tf);
      tail_g = grad(x, tail == y);
    }
    // One step: kUnroll float4s per thread, all loaded (load_step) before the first is used, then
    // (narrow output) a barrier, then the stores.
    const auto step = [&](int base, auto full) {
      constexpr bool kFull = decltype(full)::value;
      float4 v[kUnroll], b[kUnroll];
      load_step<kFull>(z4, b4, base, n4, v, b);
#pragma unroll
      for (int i = 0; i < kUnroll; ++i) {
        const int k = base + i * kThreads + threadIdx.x;
        if (kFull || k < n4) {
          const float4 x = transformed ? v[i] : transform4(v[i], b[i], tf);
          const int dy = y - kVec * k;  // the target's place in this float4, if it is here
          v[i] = make_float4(grad(x.x, dy == 0), grad(x.y, dy == 1), grad(x.z, dy == 2), grad(x.w, dy == 3));
        }
      }
      if constexpr (kNarrow) __syncthreads();  // every float4 of this step read before any store
#pragma unroll
      for (int i = 0; i < kUnroll; ++i) {
        const int k = base + i * kThreads + threadIdx.x;
        if (kFull || k < n4) {
          if constexpr (kNarrow) {
            reinterpret_cast<uint2*>(z)[k] =
                make_uint2(narrow2<Out>(v[i].x, v[i].y), narrow2<Out>(v[i].z, v[i].w));
          } else {
            z4[k] = v[i];
          }
        }
      }
    };
    const int full_end = n4 - n4 % kStep;
    for (int base = 0; base < full_end; base += kStep) step(base, std::true_type{});
    if (full_end < n4) step(full_end, std::false_type{});
    if constexpr (kNarrow) __syncthreads();  // the tail's narrow bytes may overlay other columns
    if (tail < cols) {
      if constexpr (kNarrow) {
        reinterpret_cast<Out*>(z)[tail] = narrow<Out>(tail_g);
      } else {
        z[tail] = tail_g;
      }
    }
  } else {
    for (int start = 0; start < cols; start += kThreads * kItems) {
      float g[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = start + i * kThreads + threadIdx.x;
        if (j >= cols) break;
        g[i] = grad(transformed ? z[j] : transform_at(z[j], j, tf), j == y);
      }
      if constexpr (kNarrow) __syncthreads();
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = start + i * kThreads + threadIdx.x;
        if (j >= cols) break;
        if constexpr (kNarrow) {
          reinterpret_cast<Out*>(z)[j] = narrow<Out>(g[i]);
        } else {
          z[j] = g[i];
        }
      }
    }
  }
}

// The vector kernels' layout: 16-byte-aligned rows (tile and leading dimension) and bias slice.
bool vectorizable(const float* tile, int64_t ld, const float* bias) {
  const auto aligned = [](const float* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return aligned(tile) && ld % kVec == 0 && (bias == nullptr || aligned(bias));
}

template <typename Out>
void launch_grad(bool vector, dim3 grid, cudaStream_t st, float* tile, int cols, int64_t ld, int64_t col0,
                 LogitTransform tf, bool transformed, const int64_t* targets, const float* lse, const float* lse_lo,
                 const float* A, const float* B, const float* C, const float* D) {
  if (vector) {
    logit_grad_kernel<Out, true><<<grid, kThreads, 0, st>>>(tile, cols, ld, col0, tf, transformed, targets, lse,
                                                            lse_lo, A, B, C, D);
  } else {
    logit_grad_kernel<Out, false><<<grid, kThreads, 0, st>>>(tile, cols, ld, col0, tf, transformed, targets, lse,
                                                             lse_lo, A, B, C, D);
  }
}

}  // namespace

int logit_stats(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t col0, LogitTransform tf,
                bool write_back, const int64_t* targets, float* m, float* s, float* t, float* u, float* zy,
                int64_t* argmax, void* stream) {
  if (rows == 0) return cudaSuccess;
  if (cols <= 0 || cols > INT_MAX || rows > INT_MAX) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(rows);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int n = static_cast<int>(cols);
  if (vectorizable(tile, ld, tf.bias)) {
    logit_stats_kernel<true><<<grid, kThreads, 0, st>>>(tile, n, ld, col0, tf, write_back, targets, m, s, t, u, zy,
                                                        argmax);
  } else {
    logit_stats_kernel<false><<<grid, kThreads, 0, st>>>(tile, n, ld, col0, tf, write_back, targets, m, s, t, u, zy,
                                                         argmax);
  }
  return cudaGetLastError();
}

int logit_grad(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t col0, LogitTransform tf,
               bool transformed, const int64_t* targets, const float* lse, const float* lse_lo, const float* A,
               const float* B, const float* C, const float* D, int out_kind, void* stream) {
  if (rows == 0) return cudaSuccess;
  if (cols <= 0 || cols > INT_MAX || rows > INT_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int n = static_cast<int>(cols);
  const bool vector = vectorizable(tile, ld, transformed ? nullptr : tf.bias);
  switch (out_kind) {
    case kGradFloat32:
      launch_grad<float>(vector, grid, st, tile, n, ld, col0, tf, transformed, targets, lse, lse_lo, A, B, C, D);
      break;
    case kGradBFloat16:
      launch_grad<__nv_bfloat16>(vector, grid, st, tile, n, ld, col0, tf, transformed, targets, lse, lse_lo, A, B, C,
                                 D);
      break;
    case kGradFloat16:
      launch_grad<__half>(vector, grid, st, tile, n, ld, col0, tf, transformed, targets, lse, lse_lo, A, B, C, D);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace hykernels
