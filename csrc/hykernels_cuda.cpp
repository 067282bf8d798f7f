// The one binding of the cuda backend: torch tensors in, raw pointers to csrc/kernels out.
//
// Inputs were validated by hykernels._checks and shaped by hykernels/backends/cuda.py; the checks
// here only guard the binding's own contract (device, dtype, contiguity, sizes), so a bug in the
// Python layer fails loudly instead of reading out of bounds. The CUDA stream comes from Python
// (torch.cuda.current_stream().cuda_stream), which keeps this file free of CUDA headers.
#include <torch/extension.h>

#include "kernels/hykernels.h"

namespace {

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "hykernels cuda: ", what, " failed: ", hykernels::error_string(code));
}

void expect(const torch::Tensor& x, torch::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(x.is_cuda(), "hykernels cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == dtype, "hykernels cuda: ", name, " must be ", c10::toString(dtype), ", got ",
              c10::toString(x.scalar_type()));
  TORCH_CHECK(x.is_contiguous(), "hykernels cuda: ", name, " must be contiguous");
  TORCH_CHECK(numel < 0 || x.numel() == numel, "hykernels cuda: ", name, " must have ", numel, " elements, got ",
              x.numel());
}

// A workspace tile: [rows, cols] fp32 with unit column stride and leading dimension ≥ cols.
void expect_tile(const torch::Tensor& tile) {
  TORCH_CHECK(tile.is_cuda() && tile.scalar_type() == torch::kFloat32 && tile.dim() == 2,
              "hykernels cuda: tile must be a 2-D fp32 CUDA tensor");
  TORCH_CHECK(tile.stride(1) == 1 && tile.stride(0) >= tile.size(1),
              "hykernels cuda: tile must be row-major with unit column stride");
}

hykernels::LogitTransform make_transform(const c10::optional<torch::Tensor>& bias, int64_t cols, double inv_temp,
                                         double softcap) {
  const float* b = nullptr;
  if (bias.has_value()) {
    expect(*bias, torch::kFloat32, cols, "bias slice");
    b = bias->data_ptr<float>();
  }
  return {b, static_cast<float>(inv_temp), static_cast<float>(softcap)};
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(stream); }

void logit_stats(torch::Tensor tile, int64_t col0, c10::optional<torch::Tensor> bias, double inv_temp,
                 double softcap, bool write_back, torch::Tensor targets, torch::Tensor m, torch::Tensor s,
                 torch::Tensor t, torch::Tensor u, torch::Tensor zy, torch::Tensor argmax, int64_t stream) {
  expect_tile(tile);
  const int64_t rows = tile.size(0), cols = tile.size(1);
  expect(targets, torch::kInt64, rows, "targets");
  for (auto* x : {&m, &s, &t, &u, &zy}) expect(*x, torch::kFloat32, rows, "row statistic");
  expect(argmax, torch::kInt64, rows, "argmax");
  check_launch(hykernels::logit_stats(tile.data_ptr<float>(), rows, cols, tile.stride(0), col0,
                                      make_transform(bias, cols, inv_temp, softcap), write_back,
                                      targets.data_ptr<int64_t>(), m.data_ptr<float>(), s.data_ptr<float>(),
                                      t.data_ptr<float>(), u.data_ptr<float>(), zy.data_ptr<float>(),
                                      argmax.data_ptr<int64_t>(), as_stream(stream)),
               "logit_stats");
}

void logit_grad(torch::Tensor tile, int64_t col0, c10::optional<torch::Tensor> bias, double inv_temp,
                double softcap, bool transformed, torch::Tensor targets, torch::Tensor lse, torch::Tensor lse_lo,
                torch::Tensor A, torch::Tensor B, torch::Tensor C, torch::Tensor D, int64_t out_kind,
                int64_t stream) {
  expect_tile(tile);
  const int64_t rows = tile.size(0), cols = tile.size(1);
  expect(targets, torch::kInt64, rows, "targets");
  for (auto* x : {&lse, &lse_lo, &A, &B, &C, &D}) expect(*x, torch::kFloat32, rows, "row coefficient");
  check_launch(hykernels::logit_grad(tile.data_ptr<float>(), rows, cols, tile.stride(0), col0,
                                     make_transform(bias, cols, inv_temp, softcap), transformed,
                                     targets.data_ptr<int64_t>(), lse.data_ptr<float>(), lse_lo.data_ptr<float>(),
                                     A.data_ptr<float>(), B.data_ptr<float>(), C.data_ptr<float>(),
                                     D.data_ptr<float>(), static_cast<int>(out_kind), as_stream(stream)),
               "logit_grad");
}

void segment_sum(torch::Tensor values, torch::Tensor ids, torch::Tensor out, int64_t stream) {
  expect(values, torch::kFloat32, -1, "values");
  expect(ids, torch::kInt64, values.numel(), "segment ids");
  expect(out, torch::kFloat32, -1, "out");
  check_launch(hykernels::segment_sum(values.data_ptr<float>(), ids.data_ptr<int64_t>(), values.numel(),
                                      out.data_ptr<float>(), as_stream(stream)),
               "segment_sum");
}

void prg_scores(torch::Tensor support, torch::Tensor offsets, int64_t variant, double eps, double tau_g,
                torch::Tensor gains, torch::Tensor scores, int64_t stream) {
  const int64_t traces = offsets.numel() - 1;
  expect(support, torch::kFloat32, -1, "support");
  expect(offsets, torch::kInt64, -1, "probe offsets");
  expect(gains, torch::kFloat32, support.numel() - traces, "gains");
  expect(scores, torch::kFloat32, traces, "scores");
  check_launch(hykernels::prg_scores(support.data_ptr<float>(), offsets.data_ptr<int64_t>(), traces,
                                     static_cast<int>(variant), static_cast<float>(eps), static_cast<float>(tau_g),
                                     gains.data_ptr<float>(), scores.data_ptr<float>(), as_stream(stream)),
               "prg_scores");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "hykernels CUDA epilogue and segment kernels (see csrc/kernels/hykernels.h)";
  mod.def("logit_stats", &logit_stats);
  mod.def("logit_grad", &logit_grad);
  mod.def("segment_sum", &segment_sum);
  mod.def("prg_scores", &prg_scores);
}
