#!/usr/bin/env bash
# What the cuda/triton backends owe a GPU: build the extension, the test suite on the GPU (cuda
# and triton in the shared suite, the gpu-marked tests incl. compute-sanitizer memcheck), then the
# issue-7 bench matrix. Each stage fits one 10-minute device call; "all" runs them in a row.
#   bash bench/gpu_check.sh {test|bench|all} [OUT_DIR]   (logs, JSON: OUT_DIR, default $OUT or /tmp/hk-gpu)
set -uo pipefail
stage=${1:-all}
out=${2:-${OUT:-/tmp/hk-gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$out/device.txt"
# 1. build (ninja, cached) and say why not if it fails
HYKERNELS_BUILD_VERBOSE=1 python3 -c "
import torch; from hykernels.backends import cuda
print('cuda backend:', cuda.availability(torch.device('cuda')) or 'available')" 2>&1 | tee "$out/build.log" | tail -5
[ "$stage" = bench ] || {
# 2. correctness on the GPU: the shared suite (reference, torch_chunked, triton, cuda) + gpu-marked tests
timeout 480 python3 -m pytest -q -x -p no:cacheprovider tests/test_token_stats.py tests/test_fused_loss.py \
  tests/test_prg.py tests/test_hytuning.py tests/test_cuda.py tests/test_triton.py 2>&1 | tee "$out/pytest-gpu.log" | tail -15
}
[ "$stage" = test ] || {
# 3. speed and memory: cuda against reference, torch_chunked, triton and the peers, one run
timeout 570 python3 bench/run.py --device cuda --preset lmhead --out "$out/gpu-lmhead.json" 2>&1 \
  | tee "$out/bench.log" | tail -40
}
