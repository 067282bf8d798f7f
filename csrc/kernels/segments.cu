// Segment reductions of docs/math.md §3: answer-span sums and the PRG gains/scores per trace.
// Both are tiny next to the lm_head (S probes, T traces ≪ N·V): simple, exact-order kernels.
#include <cuda_runtime.h>

#include <cmath>

#include "hykernels.h"

namespace hykernels {
namespace {

constexpr int kThreads = 256;

__global__ void segment_sum_kernel(const float* values, const int64_t* ids, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    atomicAdd(out + ids[i], values[i]);
  }
}

// One thread per trace: a trace has K + 1 ≤ a few dozen probes, so a serial walk is cheapest.
__global__ void prg_kernel(const float* c, const int64_t* offsets, int64_t traces, int variant, float eps,
                           float tau_g, float* gains, float* scores) {
  const int64_t tr = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (tr >= traces) return;
  const int64_t start = offsets[tr], end = offsets[tr + 1];
  const int64_t k = end - start - 1;  // gains of this trace, written from gains[start − tr]
  float rise = 0.f, total = 0.f, rising = 0.f, low = INFINITY;
  for (int64_t j = 0; j < k; ++j) {
    const float d = c[start + j + 1] - c[start + j];
    gains[start - tr + j] = d;
    rise += fmaxf(d, 0.f);
    total += fabsf(d);
    rising += d > 0.f ? 1.f : 0.f;
    low = fminf(low, d);
  }
  const float net = c[end - 1] - c[start];  // 0 for K = 0
  const float per_k = k > 0 ? float(k) : 1.f;
  float score;
  switch (variant) {
    case 0:  // progressive: ρ·σ(net/τ_g), ρ = 1/2 without gains
      score = (k > 0 ? rise / (total + eps) : 0.5f) / (1.f + expf(-net / tau_g));
      break;
    case 1:  // monotone
      score = k > 0 ? rising / per_k : 0.5f;
      break;
    case 2:  // net
      score = net;
      break;
    case 3:  // mean_gain: Σ_k Δ_k telescopes to c_K − c_0
      score = net / per_k;
      break;
    default:  // min_gain
      score = k > 0 ? low : 0.f;
      break;
  }
  scores[tr] = score;
}

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

}  // namespace

int segment_sum(const float* values, const int64_t* ids, int64_t n, float* out, void* stream) {
  if (n == 0) return cudaSuccess;
  segment_sum_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(values, ids, n, out);
  return cudaGetLastError();
}

int prg_scores(const float* support, const int64_t* offsets, int64_t traces, int variant, float eps, float tau_g,
               float* gains, float* scores, void* stream) {
  if (traces == 0) return cudaSuccess;
  if (variant < 0 || variant > 4) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>((traces + kThreads - 1) / kThreads);
  prg_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(support, offsets, traces, variant, eps, tau_g,
                                                                      gains, scores);
  return cudaGetLastError();
}

}  // namespace hykernels
