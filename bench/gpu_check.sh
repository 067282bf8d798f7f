#!/usr/bin/env bash
# The GPU check in stages, each ending well inside one 10-minute device call:
#
#   bash bench/gpu_check.sh smoke OUT_DIR   # build the cuda extension; bench/smoke.py: every backend once at
#                                           # N=16384 D=4096 V=151936 bf16, Triton n_regs/n_spills, 8192³ matmul
#   bash bench/gpu_check.sh test  OUT_DIR   # the gpu-marked tests, then the whole suite, per-test timeout, no -x
#   bash bench/gpu_check.sh bench OUT_DIR   # bench/run.py --preset lmhead (hykernels paths first), timeout 540
#   bash bench/gpu_check.sh probes OUT_DIR  # bench/bench_probes.py: PRG probes on a random-init Qwen2.5-1.5B shape,
#                                           # 4,000 reasoning tokens, K=16, packed (FlexAttention block mask) vs
#                                           # separate vs batched, bf16 -> OUT_DIR/probes-gpu.json, then fp32 in the
#                                           # time left -> probes-gpu-fp32.json; timeout 540 in all
#   bash bench/gpu_check.sh all   OUT_DIR   # the four in a row (only where no 10-minute limit applies)
#
# OUT_DIR defaults to $OUT, else /tmp/hk-gpu. Everything printed is also in OUT_DIR/gpu_check-<stage>.log,
# each step's output in its own log beside it; JSON results are rewritten as they finish, so a kill keeps
# what ran. Every stage first: the caches under the repo's .gpu-cache/ (git-ignored: a later device call
# carries it, so the extension and the Triton kernels are built once), the peers from .whl/*.whl if any
# (pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1), hykernels in editable
# mode without dependencies (the machine's torch and triton stay), the device and versions in
# OUT_DIR/device.txt. HK_SKIP_INSTALL=1 skips the pip installs, SMOKE_ARGS adds flags to bench/smoke.py,
# PROBES_ARGS to bench/bench_probes.py (later flags win), HK_GPU_CACHE moves the cache folder
# (the CPU tests run `HK_SKIP_INSTALL=1 SMOKE_ARGS="--n 64 --d 32 --v 301 --dtype float32" ... smoke` and
# `HK_SKIP_INSTALL=1 PROBES_ARGS="--device cpu --layers 1 --reasoning-tokens 40 ..." ... probes`).
set -uo pipefail
stage=${1:-}
case "$stage" in smoke|test|bench|probes|all) ;; *)
  echo "usage: bash bench/gpu_check.sh {smoke|test|bench|probes|all} [OUT_DIR]" >&2; exit 2 ;;
esac
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${2:-${OUT:-/tmp/hk-gpu}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
cache=${HK_GPU_CACHE:-$REPO/.gpu-cache}
export TORCH_EXTENSIONS_DIR=$cache/torch_extensions TRITON_CACHE_DIR=$cache/triton
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # hykernels importable even if the editable install fails

step() {  # step NAME SECONDS CMD...: run CMD under `timeout`, its output to OUT_DIR/NAME.log and the screen
  local name=$1 secs=$2 rc
  shift 2
  echo "=== $name: $* (timeout ${secs}s) $(date -u +%H:%M:%S)"
  timeout --kill-after=15 "$secs" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)') $(date -u +%H:%M:%S)"
  return "$rc"
}

prologue() {
  mkdir -p "$TORCH_EXTENSIONS_DIR" "$TRITON_CACHE_DIR"
  shopt -s nullglob
  local whl=(.whl/*.whl)
  shopt -u nullglob
  if [ "${HK_SKIP_INSTALL:-0}" = 1 ]; then
    echo "HK_SKIP_INSTALL=1: no pip installs (hykernels from PYTHONPATH)"
  elif ((${#whl[@]})); then
    step pip-peers 60 "$PY" -m pip install -q --no-deps "${whl[@]}"
  else
    echo "no wheels in .whl/: Liger and CCE are skipped (pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1)"
  fi
  [ "${HK_SKIP_INSTALL:-0}" = 1 ] || step pip-hykernels 90 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  {
    echo "date: $(date -u +%FT%TZ)  stage: $stage  repo: $REPO"
    git -C "$REPO" rev-parse HEAD 2>/dev/null | sed 's/^/commit: /'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 || true
    timeout 60 "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "| capability", f"{p.major}.{p.minor}",
          "| memory GiB", round(p.total_memory / 2**30, 1), "| SMs", p.multi_processor_count)
for dist in ("triton", "hykernels", "transformers", "liger-kernel", "cut-cross-entropy", "pytest", "pytest-timeout"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
    echo "TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR TRITON_CACHE_DIR=$TRITON_CACHE_DIR"
  } > "$out/device.txt"
  cat "$out/device.txt"
}

smoke() {  # ≤ 3 min cold; the step timeouts bound it at ~8 min
  step build 240 env HYKERNELS_BUILD_VERBOSE=1 "$PY" -c "
import time, torch
from hykernels.backends import cuda
t = time.time()
print('cuda backend:', cuda.availability(torch.device('cuda')) or 'available', f'({time.time() - t:.0f} s)')"
  # shellcheck disable=SC2086  # SMOKE_ARGS: extra flags, e.g. a tiny shape for a CPU dry run
  step smoke 240 "$PY" bench/smoke.py --out "$out/smoke.json" ${SMOKE_ARGS:-}
}

run_tests() {  # ≤ 9 min: the gpu-marked tests (≤ 4 min), then the whole suite (≤ 4.5 min)
  local per_test=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    per_test=(--timeout=120)
  else
    echo "pytest-timeout not installed: no per-test timeout, only the overall timeout of each run"
  fi
  step pytest-gpu 240 "$PY" -m pytest -m gpu -v -rfEs -p no:cacheprovider "${per_test[@]}" \
    --junitxml="$out/pytest-gpu.xml"
  step pytest-all 270 "$PY" -m pytest -q -rfEs -p no:cacheprovider "${per_test[@]}" --durations=15 \
    --junitxml="$out/pytest-all.xml"
}

bench() {  # hykernels paths first; every finished result is already in the JSON when the timeout hits
  local secs=540
  if [ "$stage" = bench ]; then  # less whatever the prologue took beyond 30 s
    secs=$((570 - SECONDS))
    ((secs > 540)) && secs=540
    ((secs < 60)) && secs=60
  fi
  step bench "$secs" "$PY" bench/run.py --device cuda --preset lmhead --out "$out/gpu-lmhead.json"
}

probes() {  # ~2-3 min expected (flex compile + 2 x 17 separate forwards of up to 4.1k tokens); each path
  # has its own 240 s alarm and the JSON is rewritten after every path, so a timeout keeps what ran.
  # Then, in whatever time is left, the same at fp32 (one trace, one repeat): the support difference
  # without bf16 rounding, so a mask error cannot hide in it.
  local t0=$SECONDS secs=540 left rc
  if [ "$stage" = probes ]; then  # less whatever the prologue took beyond 30 s
    secs=$((570 - SECONDS))
    ((secs > 540)) && secs=540
    ((secs < 60)) && secs=60
  fi
  local args=(bench/bench_probes.py --device cuda --model-shape qwen2.5-1.5b --reasoning-tokens 4000 --steps 16
              --attn flex)
  # shellcheck disable=SC2086  # PROBES_ARGS: extra flags, e.g. a CPU dry run at a tiny size
  step probes "$secs" "$PY" "${args[@]}" --traces 2 --repeats 3 --out "$out/probes-gpu.json" ${PROBES_ARGS:-}
  rc=$?
  left=$((secs - (SECONDS - t0)))
  if ((left >= 60)); then
    # shellcheck disable=SC2086
    step probes-fp32 "$left" "$PY" "${args[@]}" --traces 1 --repeats 1 --dtype float32 \
      --out "$out/probes-gpu-fp32.json" ${PROBES_ARGS:-} || rc=$?
  else
    echo "=== probes-fp32: skipped, ${left}s left"
  fi
  return "$rc"
}

main() {
  echo "gpu_check $stage -> $out ($(date -u +%FT%TZ))"
  prologue
  case "$stage" in
    smoke) smoke ;;
    test) run_tests ;;
    bench) bench ;;
    probes) probes ;;
    all) smoke; run_tests; bench; probes ;;
  esac
  local rc=$?
  echo "gpu_check $stage: done, exit $rc ($(date -u +%FT%TZ)); files in $out:"
  ls -la "$out"
  return "$rc"
}

main 2>&1 | tee -a "$out/gpu_check-$stage.log"
exit "${PIPESTATUS[0]}"
