#!/usr/bin/env bash
# The GPU check in ONE device call of at most 360 s of command time (a rerun still fits a 15-minute lease).
#
#   bash scripts/prepare_gpu_check.sh          # first, on the CPU machine: fills .gpu_prep/ (the extension built
#                                              # for the GPU image, the Triton cache for sm_90a, golden files)
#   device run, carry: [".gpu_prep"], timeout_s: 400, command:
#     OUT=$OUT bash benchmarks/gpu_check.sh
#   DRY_RUN=1 OUT=/tmp/out PYTHON=<the prepared venv's python> bash benchmarks/gpu_check.sh
#                                              # on the CPU: the same steps, checking that the carried extension
#                                              # loads and the carried Triton cache is hit, and printing what the
#                                              # device would run within which limit (nothing on a GPU runs)
#   bash benchmarks/gpu_check.sh --list-tests  # the pytest arguments of the correctness step (the preparation
#                                              # compiles their Triton specializations)
#
# Order, by what is learned per second: the environment and the carried extension (loaded, not built; a build only
# where it does not load), the correctness of every kernel family on CUDA against the float64 reference at small
# odd sizes, then the benchmarks that carry goals, then the goals (benchmarks/gpu_check_goals.py). The step limits
# add up to at most BUDGET_S (tests/test_benchmarks.py reads them), and a step is also cut to what is left of the
# budget. $OUT gets summary.txt and logs.tar.gz (every step's log, the junit XML in which pytest keeps each test's
# outcome when it is cut, triton_compiles.log): a device call returns at most 8 files. Every Triton compile that
# still happens on the device (a cache miss) is logged and counted in the summary.
# Exits non-zero when a step fails or times out, when no CUDA device is visible, and when the extension has no
# CUDA kernels: a check that quietly ran without them must not look like a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PREP=$ROOT/.gpu_prep
OUT=${OUT:-./out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
LOGS=$OUT/logs  # packed into $OUT/logs.tar.gz at the end: a device call returns at most 8 files from $OUT
mkdir -p "$LOGS"
SUMMARY="$LOGS/steps.txt"
failed=0
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # real GPU kernels, never the interpreter
export TRITON_CACHE_DIR=$PREP/triton_cache HAMUR_FAST_SHARED=$PREP/shared
export HAMUR_TRITON_COMPILE_LOG=$LOGS/triton_compiles.log
export PYTHONPATH=$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}  # triton_compile_log
LOGGED=("$PY" -m triton_compile_log)  # runs a module or script with every Triton compile logged

# The correctness step: every kernel family on CUDA at small odd sizes (cell and DomainNorm in both modes, train
# and eval, level 2, the grouped GEMM, sizes past one h tile, the cuda backend, golden parity on the carried
# golden files, CUDA-graph capture). torch.compile checks are left to the benchmarks (inductor compiles on the
# device are not cached here).
CORRECTNESS_TESTS=(tests/test_backends.py tests/test_csrc.py tests/test_triton_adapter.py tests/test_triton_tiling.py
                   tests/test_generated.py tests/test_grouped_linear.py tests/test_released_parity.py
                   tests/test_captured_step.py -k "not compile")

if [ "${1:-}" = --list-tests ]; then
  printf '%s\n' "${CORRECTNESS_TESTS[@]}"
  exit 0
fi

# step NAME LIMIT_S COMMAND...: COMMAND's output in $LOGS/NAME.log; rc, seconds and new Triton cache entries noted.
# DRY_RUN=1 prints the command and its limit instead, except for the steps marked to run on the CPU too.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 5 ]; then
    printf '%-14s %-8s (no time left in the %ss budget)\n' "$name" SKIPPED "$BUDGET_S" >>"$SUMMARY"
    failed=1
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS before
  before=$(cache_entries)
  local shown="$*"
  echo "== $name (limit ${limit}s): ${shown%%$'\n'*}"  # a python -c program: its first line
  if [ "$DRY_RUN" = 1 ] && [ "${RUN_ON_CPU:-0}" != 1 ]; then
    printf '%-14s %-8s limit %3ss: %s\n' "$name" "would run" "$limit" "${shown%%$'\n'*}" >>"$SUMMARY"
    return 0
  fi
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  if [ "$rc" -eq 124 ]; then verdict=TIMEOUT; elif [ "$rc" -ne 0 ]; then verdict=FAILED; fi
  [ "$verdict" = ok ] || failed=1
  printf '%-14s %-8s rc=%-4s %4ss of %3ss  new cache entries: %s\n' "$name" "$verdict" "$rc" "$((SECONDS - start))" \
    "$limit" "$(($(cache_entries) - before))" >>"$SUMMARY"
  tail -n 3 "$LOGS/$name.log"
  return "$rc"
}

cache_entries() { find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l; }

finish() {
  {
    echo
    echo "================ gpu_check summary (budget ${BUDGET_S}s, ${SECONDS}s used) ================"
    cat "$SUMMARY"
    # The compile counter: every Triton compile() of this call, a cache hit or a compile that happened here.
    if [ -f "$HAMUR_TRITON_COMPILE_LOG" ]; then
      echo "Triton compiles: $(grep -c '^miss ' "$HAMUR_TRITON_COMPILE_LOG") cache misses (compiled here)," \
           "$(grep -c '^hit ' "$HAMUR_TRITON_COMPILE_LOG") hits in the carried cache (log: triton_compiles.log)"
    else
      echo "Triton compiles: none logged"
    fi
    [ -f "$LOGS/goals.log" ] && cat "$LOGS/goals.log"
    if [ "$failed" -ne 0 ]; then echo "GPU CHECK FAILED"; else echo "GPU check passed"; fi
    echo "(every step's log, the junit XML and the compile log: $OUT/logs.tar.gz)"
  } | tee "$OUT/summary.txt"
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
  [ "$failed" -eq 0 ]
  exit
}

ENVIRONMENT="
import os, sys, numpy, torch, triton
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
      triton.__version__, 'numpy', numpy.__version__)
if torch.cuda.is_available():
    print('GPU:', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
elif os.environ.get('DRY_RUN') == '1':
    print('DRY RUN: no CUDA device here; the GPU steps are listed, not run')
else:
    sys.exit('no CUDA device visible: this script checks the GPU path and must not pass without one')
"

# The package importable as installed (kernels/ is hamur_fast.kernels) without building anything, then the
# carried extension in place: loading it takes a second, building it a minute or more.
CARRIED_EXTENSION="
import glob, hashlib, json, os, shutil, sys, sysconfig
prep = os.environ['PREP']
carried = glob.glob(os.path.join(prep, 'ext', '_C' + sysconfig.get_config_var('EXT_SUFFIX')))
if not carried:
    sys.exit('no carried extension for this Python in ' + prep + '/ext (run scripts/prepare_gpu_check.sh)')
target = os.path.join('hamur_fast', os.path.basename(carried[0]))
shutil.copyfile(carried[0], target)
import torch
from hamur_fast.ops.backends import compiled  # imports hamur_fast._C: fails where the carried one does not load
print('loaded the carried extension', carried[0], 'sha256', hashlib.sha256(open(target, 'rb').read()).hexdigest()[:16])
print('prepared:', json.load(open(os.path.join(prep, 'manifest.json')))['built_for'])
print('CUDA kernels:', compiled.has_kernel('CUDA'), '| CPU kernels:', compiled.has_kernel('CPU'))
"
CUDA_KERNELS="
import sys
from hamur_fast.ops.backends import compiled
sys.exit(0 if compiled.has_kernel('CUDA') else 'the extension has no CUDA kernels: the cuda backend cannot be checked')
"

# DRY_RUN=1 on the CPU: what pytest collects without the interpreter (as on a GPU; the parametrization there can
# differ where a test picks its device or sizes itself), and the
# carried Triton cache checked by the preparation's launches again through the sm_90 compile tool (nothing runs;
# every compile is logged as a hit or a miss; their count is the summary's compile counter).
dry_run_checks() {
  TRITON_INTERPRET=0 "$PY" -m pytest --collect-only -q -p no:cacheprovider "${CORRECTNESS_TESTS[@]}" \
    >"$LOGS/correctness_collected.log" 2>&1
  echo "correctness would run: $(grep -E '[0-9]+ (tests )?(selected|collected)' "$LOGS/correctness_collected.log" \
    | tail -1)" >>"$SUMMARY"
  # On a copy elsewhere (as on the device, the paths differ from the preparation's), so that the carried folder
  # stays as prepared even where something misses.
  local budget=$BUDGET_S start=$SECONDS carried=$TRITON_CACHE_DIR
  TRITON_CACHE_DIR=$(mktemp -d)
  cp -r "$carried/." "$TRITON_CACHE_DIR/"
  "$PY" benchmarks/triton_cache_carry.py unpack "$TRITON_CACHE_DIR" >>"$SUMMARY"
  BUDGET_S=$((SECONDS + 1200))  # a CPU-only step: its time is not the device's, so the budget moves with it
  # DRY_RUN_TESTS="tests/test_x.py ..." narrows the tests it replays (all of the correctness step's by default).
  RUN_ON_CPU=1 step cache_check 1200 "$PY" "${SM90_COMPILE_TOOL:-../shared/tools/triton_sm90_compile.py}" \
    benchmarks/gpu_check_prewarm.py --check-only ${DRY_RUN_TESTS:+--tests $DRY_RUN_TESTS}
  rm -rf "$TRITON_CACHE_DIR"
  TRITON_CACHE_DIR=$carried BUDGET_S=$((budget + SECONDS - start))
}

main() {
  BUDGET_S=360
  : >"$SUMMARY"
  : >"$HAMUR_TRITON_COMPILE_LOG"
  nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1
  RUN_ON_CPU=1 step environment 10 env DRY_RUN="$DRY_RUN" "$PY" -c "$ENVIRONMENT" || finish
  RUN_ON_CPU=1 step install 20 env HAMUR_FAST_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    || finish
  if ! RUN_ON_CPU=1 step extension 10 env PREP="$PREP" "$PY" -c "$CARRIED_EXTENSION"; then
    # Only where the carried extension does not load: build it here (CPU translation units in parallel, nvcc).
    step build 70 env MAX_JOBS=16 "$PY" -m pip install -q --no-build-isolation --no-deps -e . || finish
  fi
  RUN_ON_CPU=1 step cuda_kernels 10 "$PY" -c "$CUDA_KERNELS"  # a failure, but the other checks still run
  # The carried Triton cache, its files listed by path on this machine (Triton misses files it cannot find).
  RUN_ON_CPU=1 step triton_cache 5 "$PY" benchmarks/triton_cache_carry.py unpack "$TRITON_CACHE_DIR"
  step correctness 90 "${LOGGED[@]}" pytest -rA --junitxml="$LOGS/correctness.xml" -p no:cacheprovider \
    "${CORRECTNESS_TESTS[@]}"
  [ "$DRY_RUN" = 1 ] && dry_run_checks
  # The goals: cell and generator+cell at B=65536 (torch.compile baselines included), the training step at
  # B=4096, serving latency, and the training step at D=3 and D=100.
  step bench_layers 55 "${LOGGED[@]}" benchmarks/bench_layers.py --batch 65536 --repeats 10
  step bench_train 40 "${LOGGED[@]}" benchmarks/bench_train.py --batch 4096 --repeats 10
  step bench_infer 15 "${LOGGED[@]}" benchmarks/bench_infer.py --calls 100 --no-artifacts
  step bench_domains 30 "${LOGGED[@]}" benchmarks/bench_domains.py --domains 3 100 --repeats 5 \
    --stacked-max-domains 100
  step goals 5 "$PY" benchmarks/gpu_check_goals.py "$LOGS/bench_layers.log" "$LOGS/bench_domains.log"
  finish
}

main
