#!/usr/bin/env bash
# The GPU check in stages, each a whole device call inside its time budget (HK_BUDGET_S, default 540 s,
# counted from the script's start; every step's limit derives from what is left, see limit_for):
#
#   bash bench/gpu_check.sh first  OUT_DIR  # THE device call: install the peers, build the cuda extension,
#                                           # pytest -m gpu, then bench/smoke.py (every backend and every peer
#                                           # at N=16384 D=4096 V=151936 bf16); at most 8 files in OUT_DIR
#   bash bench/gpu_check.sh smoke  OUT_DIR  # build, then bench/smoke.py
#   bash bench/gpu_check.sh test   OUT_DIR  # pytest -m gpu, then the whole suite in the time left
#   bash bench/gpu_check.sh bench  OUT_DIR  # bench/run.py --preset lmhead (hykernels paths first)
#   bash bench/gpu_check.sh probes OUT_DIR  # bench/bench_probes.py: PRG probes on a random-init Qwen2.5-1.5B
#                                           # shape, 4,000 reasoning tokens, K=16, packed (FlexAttention block
#                                           # mask) vs separate vs batched, bf16 -> probes-gpu.json, then fp32 in
#                                           # the time left -> probes-gpu-fp32.json
#   bash bench/gpu_check.sh all    OUT_DIR  # smoke, test, bench, probes in a row (no budget: not one call)
#   bash bench/gpu_check.sh prep            # HERE, not on the GPU machine: fill .whl/ for the device call (the
#                                           # peers' wheels, torch 2.13's linear_cross_entropy*.py in
#                                           # .whl/torch_lce/; HK_CUTE=1 also nvidia-cutlass-dsl repacked) and
#                                           # print what the call would upload against its 64 MiB
#
# OUT_DIR defaults to $OUT, else /tmp/hk-gpu. Everything printed is in OUT_DIR/gpu_check-<stage>.log;
# OUT_DIR/steps.json holds the budget, the plan and every step's limit, status, exit code and time,
# rewritten before and after each step; the long steps also have their own log (build.log,
# pytest-gpu.log, smoke.log, ...); pytest writes one JSON line per test as it finishes
# (pytest-<name>.jsonl, a line when each test starts too), smoke.py rewrites smoke.json after every
# item: a step killed by its limit keeps what finished. `first` leaves exactly these 8 files:
# gpu_check-first.log device.txt steps.json build.log pytest-gpu.log pytest-gpu.jsonl smoke.log smoke.json.
#
# Every stage first: the wheels in .whl/*.whl installed with pip --no-index --no-deps --target $HK_SITE
# (default /tmp/hk-site, put on PYTHONPATH after the repository, so the machine's torch and triton stay),
# a repacked nvidia-cutlass-dsl (.whl/*.tar.xz, made by `prep` with HK_CUTE=1) unpacked there,
# HYKERNELS_TORCH_LCE_SRC=.whl/torch_lce when that folder exists, the device and versions in
# OUT_DIR/device.txt. The caches (the extension, Triton's kernels, hykernels' tuning choices) go to
# .gpu-cache/ in the repository (HK_GPU_CACHE moves it): it never comes back from the device machine, so
# every call is planned as a cold build; a second call to a machine still warm finds it. Knobs: HK_SKIP_INSTALL=1 skips the installs, HK_BUDGET_S the budget,
# HK_MAX_<STEP> a step's maximum (e.g. HK_MAX_PYTEST_GPU=60), HK_PYTEST_GPU_ARGS replaces the gpu tests'
# selection (default: -m gpu over the test files that use the marker), SMOKE_ARGS adds flags to
# bench/smoke.py, PROBES_ARGS to bench/bench_probes.py (later flags win), HK_DRY_RUN=1 runs nothing and
# lets every step take its whole limit on a simulated clock (the worst case of the budget arithmetic).
# The CPU tests (tests/test_bench_smoke.py) run `first` and `smoke` with HK_SKIP_INSTALL=1 and a tiny
# SMOKE_ARGS shape, kill `first` in mid-run, and check the dry run's worst case stays inside 540 s.
set -uo pipefail
stage=${1:-}
case "$stage" in first|smoke|test|bench|probes|all|prep) ;; *)
  echo "usage: bash bench/gpu_check.sh {first|smoke|test|bench|probes|all|prep} [OUT_DIR]" >&2; exit 2 ;;
esac
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WHL=${HK_WHL_DIR:-$REPO/.whl}

# ------------------------------------------------------------------------------------ prep (CPU machine)
CUTLASS_VERSION=4.8.1
PIP_PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
              --platform manylinux1_x86_64)
UPLOAD_LIMIT=$((64 * 1024 * 1024))

upload_bytes() {  # what a device call with carry [.whl] sends: tracked + untracked-not-ignored files + .whl/
  (cd "$REPO" && { git ls-files -z --cached --others --exclude-standard; find .whl -type f -print0 2>/dev/null; } |
    sort -zu | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
}

prep() {
  set -e
  mkdir -p "$WHL/torch_lce"
  "$PY" -m pip download -q --no-deps "${PIP_PLATFORM[@]}" -d "$WHL" liger-kernel==0.8.5 cut-cross-entropy==25.1.1
  local tdir
  tdir=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'nn', 'modules'))")
  if [ -f "$tdir/linear_cross_entropy_options.py" ]; then
    cp "$tdir/linear_cross_entropy.py" "$tdir/linear_cross_entropy_options.py" "$WHL/torch_lce/"
  else
    echo "this torch ($("$PY" -c 'import torch; print(torch.__version__)')) has no linear_cross_entropy_options.py:" \
         "install torch 2.13 here (pip install torch==2.13.0) to copy it; torch_lce peers will be skipped" >&2
  fi
  if [ "${HK_CUTE:-0}" = 1 ]; then  # Liger's CuTe DSL kernels: nvidia-cutlass-dsl, its cu13 libraries repacked
    local tmp
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps "${PIP_PLATFORM[@]}" -d "$tmp/w" "nvidia-cutlass-dsl==$CUTLASS_VERSION" \
      "nvidia-cutlass-dsl-libs-base==$CUTLASS_VERSION" "nvidia-cutlass-dsl-libs-core==$CUTLASS_VERSION" \
      "nvidia-cutlass-dsl-libs-cu13==$CUTLASS_VERSION"
    mkdir -p "$tmp/site"
    for w in "$tmp"/w/*.whl; do (cd "$tmp/site" && "$PY" -m zipfile -e "$w" .); done
    # not needed to compile and run kernels: the in-kernel event tracing (iket: optional, cutlass imports it
    # under try/except); the rest stays
    rm -rf "$tmp/site/nvidia_cutlass_dsl/dsl_packages/iket"
    # x86 BCJ filter and a 192 MiB dictionary (the MLIR library is 193 MB): ~53 MB where plain xz -9e gives ~64 MB;
    # ~2 GB of memory and 10-15 min of one core here, 192 MiB and ~6 s to unpack there
    echo "xz of $(du -sh "$tmp/site" | cut -f1) (single-threaded: 10-15 minutes)"
    tar -C "$tmp/site" -cf - . | nice -n 15 xz --x86 --lzma2=preset=9e,dict=192MiB -T1 \
      > "$WHL/nvidia-cutlass-dsl-$CUTLASS_VERSION-cu13.tar.xz"
    rm -rf "$tmp"
  fi
  set +e
  ls -la "$WHL" "$WHL/torch_lce"
  local total
  total=$(upload_bytes)
  echo "a device call with carry [\".whl\"] uploads $total bytes ($((total * 100 / UPLOAD_LIMIT))% of 64 MiB)"
  if ((total > UPLOAD_LIMIT)); then
    echo "OVER the 64 MiB limit: remove $WHL/*.tar.xz (Liger's CuTe kernels are then skipped)" >&2
    return 1
  fi
}

if [ "$stage" = prep ]; then
  cd "$REPO" || exit 2
  prep
  exit $?
fi

# ------------------------------------------------------------------------------------ the budget
out=${2:-${OUT:-/tmp/hk-gpu}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$REPO" || exit 2

T0=$(date +%s)
DRY=${HK_DRY_RUN:-0}
SIM=0                                 # the simulated clock of a dry run, seconds since the start
if [ "$stage" = all ]; then BUDGET=${HK_BUDGET_S:-1000000}; else BUDGET=${HK_BUDGET_S:-540}; fi
RESERVE=${HK_RESERVE_S:-10}           # kept for the closing summary: the stage ends by BUDGET - RESERVE
GRACE=5                               # timeout --kill-after: a step ends at most GRACE s after its limit
MIN_STEP=5                            # a step with a smaller limit is skipped

# The plan of each stage: STEP:MAX:FLOOR. A step's limit (limit_for) is its MAX within what is left
# once the RESERVE and the FLOORs of the steps after it are kept back, less GRACE; so the steps'
# worst cases (each running to its limit and GRACE) add up to at most BUDGET - RESERVE, whatever
# each took. smoke's MAX is "the rest".
PROLOGUE=(install:30:0 cute:40:0 device:20:0)
case "$stage" in
  first)  PLAN=("${PROLOGUE[@]}" build:220:0 pytest-gpu:150:40 smoke:600:150) ;;
  smoke)  PLAN=("${PROLOGUE[@]}" build:240:0 smoke:600:150) ;;
  test)   PLAN=("${PROLOGUE[@]}" editable:60:0 pytest-gpu:200:60 pytest-all:600:60) ;;
  bench)  PLAN=("${PROLOGUE[@]}" bench:540:0) ;;
  probes) PLAN=("${PROLOGUE[@]}" probes:540:0 probes-fp32:540:0) ;;
  all)    PLAN=("${PROLOGUE[@]}" editable:60:0 build:240:0 smoke:600:0 pytest-gpu:300:0 pytest-all:1800:0
                bench:540:0 probes:540:0 probes-fp32:540:0) ;;
esac
OWN_LOG=" build pytest-gpu pytest-all smoke bench probes probes-fp32 "  # steps with a log of their own

now() { if [ "$DRY" = 1 ]; then echo "$SIM"; else echo $(($(date +%s) - T0)); fi; }
left() { echo $((BUDGET - $(now))); }

plan_max() {  # plan_max STEP: its MAX (HK_MAX_<STEP> overrides)
  local e var
  var=HK_MAX_$(echo "$1" | tr 'a-z-' 'A-Z_')
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  for e in "${PLAN[@]}"; do [ "${e%%:*}" = "$1" ] && { e=${e#*:}; echo "${e%%:*}"; return; }; done
  echo 0
}

floors_after() {  # floors_after STEP: the FLOORs of the steps after STEP in the plan
  local e seen=0 sum=0
  for e in "${PLAN[@]}"; do
    ((seen)) && sum=$((sum + ${e##*:}))
    [ "${e%%:*}" = "$1" ] && seen=1
  done
  echo "$sum"
}

limit_for() {  # limit_for STEP: the timeout of STEP now
  local max l
  max=$(plan_max "$1")
  l=$(($(left) - RESERVE - $(floors_after "$1")))
  ((l > max)) && l=$max
  echo $((l - GRACE))
}

# ------------------------------------------------------------------------------------ steps.json
STEPS=()  # one JSON object per step, in order
json_str() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/ }; printf '"%s"' "$s"; }

write_steps() {  # write_steps [RUNNING_OBJECT]: steps.json, atomically
  local plan="" e sep="" steps="" tmp="$out/.steps.json.tmp"
  for e in "${PLAN[@]}"; do
    plan+="$sep{\"step\": \"${e%%:*}\", \"max_s\": $(plan_max "${e%%:*}"), \"floor_s\": ${e##*:}}"
    sep=", "
  done
  sep=""
  for e in "${STEPS[@]}" ${1:+"$1"}; do steps+="$sep$e"; sep=$',\n  '; done
  printf '{"stage": "%s", "budget_s": %s, "reserve_s": %s, "grace_s": %s, "dry_run": %s, "started_utc": "%s",\n "elapsed_s": %s, "plan": [%s],\n "steps": [\n  %s\n ]}\n' \
    "$stage" "$BUDGET" "$RESERVE" "$GRACE" "$([ "$DRY" = 1 ] && echo true || echo false)" \
    "$(date -u -d "@$T0" +%FT%TZ)" "$(now)" "$plan" "$steps" > "$tmp" && mv -f "$tmp" "$out/steps.json"
}

record() {  # record NAME STATUS EXIT LIMIT START WALL NOTE
  STEPS+=("{\"step\": $(json_str "$1"), \"status\": \"$2\", \"exit\": ${3:-null}, \"limit_s\": ${4:-null}, \"start_s\": $5, \"wall_s\": ${6:-null}, \"note\": $(json_str "$7")}")
  write_steps
}

step() {  # step NAME LIMIT CMD...: CMD under `timeout LIMIT` (kill after GRACE), its output to the screen and,
  # for the long steps, to OUT_DIR/NAME.log (appended); returns its exit code (124: timed out; 125: skipped)
  local name=$1 secs=$2 rc t0 base=${1%%#*}
  shift 2
  t0=$(now)
  if ((secs < MIN_STEP)); then
    echo "=== $name: skipped, ${secs}s limit ($(left)s left of ${BUDGET}s)"
    record "$name" skipped "" "$secs" "$t0" 0 "not started: ${secs}s limit"
    return 125
  fi
  echo "=== $name: $* (limit ${secs}s, $(left)s left) $(date -u +%H:%M:%S)"
  write_steps "{\"step\": $(json_str "$name"), \"status\": \"running\", \"limit_s\": $secs, \"start_s\": $t0}"
  if [ "$DRY" = 1 ]; then  # the worst case: it runs to its limit, and GRACE more
    SIM=$((SIM + secs + GRACE))
    rc=124
  elif [[ "$OWN_LOG" == *" $base "* ]]; then
    timeout --kill-after="$GRACE" "$secs" "$@" 2>&1 | tee -a "$out/$base.log"
    rc=${PIPESTATUS[0]}
  else
    timeout --kill-after="$GRACE" "$secs" "$@" 2>&1
    rc=$?
  fi
  local status=ok
  ((rc == 124 || rc == 137)) && status=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && status=failed
  ((rc == 75)) && [ "$base" = smoke ] && status=item_timeout  # smoke.py's watchdog: resumed in a fresh process
  echo "=== $name: exit $rc ($status) after $(($(now) - t0))s $(date -u +%H:%M:%S)"
  record "$name" "$status" "$rc" "$secs" "$t0" "$(($(now) - t0))" ""
  return "$rc"
}

note_skip() {  # note_skip NAME WHY: a step of the plan that does not apply here
  echo "=== $1: skipped: $2"
  record "$1" skipped "" "" "$(now)" 0 "$2"
}

# ------------------------------------------------------------------------------------ environment
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
cache=${HK_GPU_CACHE:-$REPO/.gpu-cache}
export TORCH_EXTENSIONS_DIR=$cache/torch_extensions TRITON_CACHE_DIR=$cache/triton
export HYKERNELS_CACHE_DIR=${HYKERNELS_CACHE_DIR-$cache/hykernels}  # the triton backend's tuning choices
SITE=${HK_SITE:-/tmp/hk-site}
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}  # hykernels from this checkout, the peers from SITE
[ -d "$WHL/torch_lce" ] && export HYKERNELS_TORCH_LCE_SRC=${HYKERNELS_TORCH_LCE_SRC:-$WHL/torch_lce}
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT

cat > "$TMPD/device_info.py" <<'EOF'
"""The device, the versions and the settings of this check -> the file named by argv[1]."""
import importlib.metadata as md
import os
import platform
import subprocess
import sys

lines = []
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"{cmd[0]}: {type(exc).__name__}: {exc}"
lines.append("commit: " + run(["git", "-C", os.environ["REPO"], "rev-parse", "HEAD"]))
lines.append(run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                  "--format=csv"]))
import torch  # noqa: E402
lines.append(f"python {platform.python_version()} | torch {torch.__version__} | cuda {torch.version.cuda} | "
             f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    lines.append(f"device {torch.cuda.get_device_name(0)} | capability {p.major}.{p.minor} | memory GiB "
                 f"{p.total_memory / 2**30:.1f} | SMs {p.multi_processor_count}")
for dist in ("triton", "hykernels", "transformers", "liger-kernel", "cut-cross-entropy", "nvidia-cutlass-dsl",
             "cuda-bindings", "pytest", "pytest-timeout"):
    try:
        lines.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        lines.append(f"{dist} not installed")
for var in ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "HYKERNELS_CACHE_DIR", "PYTHONPATH",
            "HYKERNELS_TORCH_LCE_SRC"):
    lines.append(f"{var}={os.environ.get(var, '')}")
with open(sys.argv[1], "a") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

cat > "$TMPD/hk_pytest_log.py" <<'EOF'
"""pytest plugin: one JSON line per test when it starts and when it finishes, appended to
$HK_PYTEST_JSONL and flushed at once, so a run killed by its timeout keeps every finished result
(and which test was running)."""
import json
import os
import time

_PATH = os.environ["HK_PYTEST_JSONL"]


def _write(obj):
    with open(_PATH, "a") as f:
        f.write(json.dumps(obj) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _write({"nodeid": nodeid, "event": "start", "time": time.time()})


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # the result, or a setup/teardown problem
        _write({"nodeid": report.nodeid, "event": report.when, "outcome": report.outcome,
                "duration_s": round(report.duration, 3), "time": time.time(),
                "longrepr": None if report.passed else str(report.longrepr)[-3000:]})
EOF

# ------------------------------------------------------------------------------------ the steps
prologue() {
  mkdir -p "$TORCH_EXTENSIONS_DIR" "$TRITON_CACHE_DIR" "$SITE"
  shopt -s nullglob
  local whl=("$WHL"/*.whl) tars=("$WHL"/*.tar.xz)
  shopt -u nullglob
  if [ "${HK_SKIP_INSTALL:-0}" = 1 ]; then
    note_skip install "HK_SKIP_INSTALL=1: no installs (hykernels from PYTHONPATH)"
    note_skip cute "HK_SKIP_INSTALL=1"
  else
    if ((${#whl[@]})) || [ "$DRY" = 1 ]; then
      step install "$(limit_for install)" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "${whl[@]}"
    else
      note_skip install "no wheels in $WHL: the peers Liger and CCE are skipped (bash bench/gpu_check.sh prep)"
    fi
    if ((${#tars[@]})) || [ "$DRY" = 1 ]; then  # a repacked site-packages tree (nvidia-cutlass-dsl): unpack
      step cute "$(limit_for cute)" "$PY" -c "
import sys, tarfile
for t in sys.argv[2:]:
    with tarfile.open(t) as f:
        f.extractall(sys.argv[1], filter='data')
    print('unpacked', t)" "$SITE" "${tars[@]}"
    else
      note_skip cute "no $WHL/*.tar.xz: Liger's CuTe DSL kernels are skipped (HK_CUTE=1 bash bench/gpu_check.sh prep)"
    fi
  fi
  # nvidia_cutlass_dsl_packages.pth does this in a site-packages; PYTHONPATH folders read no .pth files
  [ -d "$SITE/nvidia_cutlass_dsl/dsl_packages" ] && export PYTHONPATH=$PYTHONPATH:$SITE/nvidia_cutlass_dsl/dsl_packages
  : > "$out/device.txt"
  echo "date: $(date -u +%FT%TZ)  stage: $stage  repo: $REPO  budget: ${BUDGET}s" >> "$out/device.txt"
  step device "$(limit_for device)" env REPO="$REPO" "$PY" "$TMPD/device_info.py" "$out/device.txt"
}

build() {  # the cuda extension (ninja, cold ~1-3 min); after a failed or unfinished build, later steps see
  # the cuda backend as unavailable at once instead of building again
  rm -f "$TORCH_EXTENSIONS_DIR"/*/lock  # left by a build killed earlier: torch would wait on it forever
  step build "$(limit_for build)" env HYKERNELS_BUILD_VERBOSE=1 "$PY" -c "
import sys, time, torch
if not torch.cuda.is_available():
    print('no CUDA device: nothing to build'); sys.exit(0)
from hykernels.backends import cuda
t = time.time()
reason = cuda.availability(torch.device('cuda'))
print('cuda backend:', reason or 'available', f'({time.time() - t:.0f} s)')
sys.exit(1 if reason else 0)"
  local rc=$?
  if ((rc != 0)); then
    echo "=== the cuda extension is not built (exit $rc): the cuda backend is off for the steps after this"
    export TORCH_EXTENSIONS_DIR=/dev/null/hk-cuda-build-did-not-finish  # cpp_extension cannot create it: fails at once
  fi
  return "$rc"
}

pytest_step() {  # pytest_step NAME ARGS...: pytest with per-test JSON lines (pytest-NAME.jsonl) and -rA
  local name=$1 secs per_test=() per=${HK_PER_TEST_S:-100}
  shift
  secs=$(limit_for "$name")
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    ((per > secs)) && per=$secs
    per_test=(--timeout="$per")
  else
    echo "pytest-timeout not installed: no per-test timeout, only the step's limit"
  fi
  step "$name" "$secs" env HK_PYTEST_JSONL="$out/$name.jsonl" PYTHONPATH="$TMPD:$PYTHONPATH" "$PY" -m pytest -v -rA \
    -p no:cacheprovider -p hk_pytest_log "${per_test[@]}" "$@"
}

gpu_tests() {
  local sel
  if [ -n "${HK_PYTEST_GPU_ARGS:-}" ]; then
    read -r -a sel <<< "$HK_PYTEST_GPU_ARGS"
  else  # only the files that use the marker: collecting the whole suite costs time
    mapfile -t sel < <(grep -lE 'mark\.gpu\b' tests/test_*.py)
    sel=(-m gpu "${sel[@]}")
  fi
  pytest_step pytest-gpu "${sel[@]}"
}

smoke() {  # bench/smoke.py until it completes or its limit is spent: when an item overruns its own cap
  # (smoke.py's watchdog, exit 75) or the process dies otherwise, a fresh one resumes with the items not yet
  # done (at most 5 processes)
  local attempt=1 rc=0 secs resume=() name=smoke
  while :; do
    secs=$(limit_for smoke)
    if ((secs < 20 && attempt > 1)); then echo "=== smoke: not resumed, ${secs}s limit"; break; fi
    # shellcheck disable=SC2086  # SMOKE_ARGS: extra flags, e.g. a tiny shape for a CPU dry run
    step "$name" "$secs" "$PY" bench/smoke.py --out "$out/smoke.json" --deadline "$(($(date +%s) + secs))" \
      "${resume[@]}" ${SMOKE_ARGS:-}
    rc=$?
    ((rc == 0 || rc == 124 || rc == 125 || attempt >= 5)) && break  # 124: its limit, all the time it had
    attempt=$((attempt + 1))
    name="smoke#$attempt"
    resume=(--resume --previous-exit "$rc")
  done
  return "$rc"
}

run_tests() {  # the gpu-marked tests, then the whole suite in the time left
  gpu_tests
  local rc=$?
  pytest_step pytest-all --durations=15 || rc=$?
  return "$rc"
}

editable() {
  if [ "${HK_SKIP_INSTALL:-0}" = 1 ]; then note_skip editable "HK_SKIP_INSTALL=1"; return 0; fi
  step editable "$(limit_for editable)" "$PY" -m pip install -q --no-deps --no-build-isolation -e .
}

bench() {  # hykernels paths first; every finished result is already in the JSON when the limit hits
  step bench "$(limit_for bench)" "$PY" bench/run.py --device cuda --preset lmhead --out "$out/gpu-lmhead.json"
}

probes() {  # each path has its own 240 s alarm and the JSON is rewritten after every path. Then, in the
  # time left, the same at fp32 (one trace, one repeat): the support difference without bf16 rounding
  local args=(bench/bench_probes.py --device cuda --model-shape qwen2.5-1.5b --reasoning-tokens 4000 --steps 16
              --attn flex) rc secs
  # shellcheck disable=SC2086  # PROBES_ARGS: extra flags, e.g. a CPU dry run at a tiny size
  step probes "$(limit_for probes)" "$PY" "${args[@]}" --traces 2 --repeats 3 --out "$out/probes-gpu.json" \
    ${PROBES_ARGS:-}
  rc=$?
  secs=$(limit_for probes-fp32)
  if ((secs >= 60)); then
    # shellcheck disable=SC2086
    step probes-fp32 "$secs" "$PY" "${args[@]}" --traces 1 --repeats 1 --dtype float32 \
      --out "$out/probes-gpu-fp32.json" ${PROBES_ARGS:-} || rc=$?
  else
    note_skip probes-fp32 "${secs}s limit (< 60 s)"
  fi
  return "$rc"
}

summary() {
  echo "gpu_check $stage: done, exit $1, $(now)s of ${BUDGET}s$([ "$DRY" = 1 ] && echo ' (dry run: simulated)') ($(date -u +%FT%TZ)); steps:"
  "$PY" - "$out/steps.json" <<'EOF' 2>/dev/null || cat "$out/steps.json"
import json, sys
s = json.load(open(sys.argv[1]))
print(f"| step | status | exit | limit s | start s | wall s |\n|---|---|---:|---:|---:|---:|")
for r in s["steps"]:
    print(f"| {r['step']} | {r['status']} | {r.get('exit')} | {r.get('limit_s')} | {r['start_s']} | {r.get('wall_s')} |")
EOF
  rm -f "$out"/.*.tmp  # a temporary file of a write that was killed: only the results come back
  echo "files in $out:"
  ls -la "$out"
}

main() {
  echo "gpu_check $stage -> $out ($(date -u +%FT%TZ)), budget ${BUDGET}s$([ "$DRY" = 1 ] && echo ', DRY RUN')"
  write_steps
  prologue
  local rc=0
  case "$stage" in
    first) build || rc=$?; gpu_tests || rc=$?; smoke || rc=$? ;;
    smoke) build || rc=$?; smoke || rc=$? ;;
    test) editable; run_tests || rc=$? ;;
    bench) bench || rc=$? ;;
    probes) probes || rc=$? ;;
    all) editable; build; smoke; run_tests; bench; probes || rc=$? ;;
  esac
  summary "$rc"
  return "$rc"
}

for f in "gpu_check-$stage.log" steps.json device.txt; do rm -f "$out/$f"; done
for e in "${PLAN[@]}"; do rm -f "$out/${e%%:*}.log" "$out/${e%%:*}.jsonl"; done
main 2>&1 | tee -a "$out/gpu_check-$stage.log"
exit "${PIPESTATUS[0]}"
