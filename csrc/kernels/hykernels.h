// hykernels CUDA kernels: the C++ interface the binding calls.
//
// Plain C++ (no CUDA or torch headers): raw device pointers, sizes and a cudaStream_t passed as
// void*, so this header and every kernels/*.cu file compile with `nvcc -c` on any machine, and
// the binding (hykernels_cuda.cpp) needs nothing but torch/extension.h. Every launcher returns
// a cudaError_t as int (0 = success); error_string() turns it into a message.
//
// The workspace tiles these kernels read are the fp32 output of one cuBLAS GEMM: logits of
// `rows` tokens × a slice of `cols` vocabulary entries starting at global column `col0`,
// row-major with leading dimension `ld`. logit_stats and logit_grad move a tile in 16-byte
// vectors when the tile is 16-byte aligned, `ld` is a multiple of 4 and the bias slice they read
// is 16-byte aligned (hykernels/backends/cuda.py lays the workspace out so); any other layout
// runs their scalar kernels. Either way one thread block per row, cols < 2^31.
#pragma once

#include <cstdint>

namespace hykernels {

// z = s(x + bias[col]) · inv_temp, s(x) = softcap·tanh(x / softcap) when softcap > 0 (the model's
// softcap first, then the sampler's temperature: docs/math.md §1).
struct LogitTransform {
  const float* bias;  // [cols], this slice of the bias in fp32; nullptr for none
  float inv_temp;
  float softcap;  // 0: no softcap
};

// Per-row online-softmax partials of one workspace tile (hykernels/_partials.py): row max m,
// s = Σe^{z−m}, t = Σ(z−m)e^{z−m}, u = Σ(z−m), the target logit zy (0 when the row's target is
// not in this slice; targets are global ids, −1 = none) and the argmax as a global index (the
// first maximum on ties). Outputs are [rows] arrays. write_back stores the transformed logits z
// into the tile (4 more bytes per logit), for logit_grad(transformed = true) to reuse without a
// second GEMM; without it the tile is left exactly as it was. The caller asks for it only when z
// differs from the GEMM output (a bias, a softcap or inv_temp ≠ 1) and a gradient pass follows.
int logit_stats(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t col0, LogitTransform tf,
                bool write_back, const int64_t* targets, float* m, float* s, float* t, float* u, float* zy,
                int64_t* argmax, void* stream);

// Output element type of logit_grad, written in place over the fp32 tile.
enum GradOut : int { kGradFloat32 = 0, kGradBFloat16 = 1, kGradFloat16 = 2 };

// G = (dL/dz ∘ s′(x))/τ of docs/math.md §2 in lse-relative form (hykernels/_grad.py), the softcap
// slope taken from the final logit as s′ = 1 − (τ·z/c)²:
//   dL/dz_v = p_v·(A + B·log p_v) + C·[v = y] + D,  log p_v = (z_v − lse) − lse_lo,
// with per-row A, B, C, D, lse, lse_lo ([rows] fp32). `transformed`: the tile already holds z
// (logit_stats with write_back, or the GEMM output itself under the identity transform) and is
// read as it is; else it holds the GEMM output and the transform is applied to it. G overwrites
// the tile: fp32 in place,
// or bf16/fp16 packed at the start of each row (element j at byte 2j of the row, leading
// dimension 2·ld in those elements), ready as a GEMM operand.
int logit_grad(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t col0, LogitTransform tf,
               bool transformed, const int64_t* targets, const float* lse, const float* lse_lo, const float* A,
               const float* B, const float* C, const float* D, int out_kind, void* stream);

// out[ids[i]] += values[i] for i < n (out zeroed by the caller; ids validated by the caller).
int segment_sum(const float* values, const int64_t* ids, int64_t n, float* out, void* stream);

// PRG of docs/math.md §3 per trace: trace t's supports are support[offsets[t] : offsets[t+1]];
// writes its gains Δ_k at gains[offsets[t] − t ...] and scores[t] for `variant` (the index in
// hykernels._types.PRG_VARIANTS: 0 progressive, 1 monotone, 2 net, 3 mean_gain, 4 min_gain).
int prg_scores(const float* support, const int64_t* offsets, int64_t traces, int variant, float eps, float tau_g,
               float* gains, float* scores, void* stream);

const char* error_string(int code);

}  // namespace hykernels
