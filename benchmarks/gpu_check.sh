#!/usr/bin/env bash
# The GPU check, in two device calls; logs under $OUT, a short table last.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh 1   # <= 300 s: install, doctor, GPU tests of the kernel backends,
#                                                 #   a small bench_layers
#   OUT=/tmp/out bash benchmarks/gpu_check.sh 2   # <= 540 s: the benchmarks, bench_domains last (installs first
#                                                 #   only when needed)
# Each call's step limits add up to at most its budget (tests/test_benchmarks.py reads them), and a step is also
# cut to what is left of the budget. Exits non-zero when any step fails or times out, and when no CUDA device is
# visible: a GPU check that quietly ran on the CPU, or skipped its tests, must not look like a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
CALL=${1:-1}
OUT=${OUT:-./out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # real GPU kernels, never the interpreter
SUMMARY="$OUT/summary_call$CALL.txt"
: >"$SUMMARY"
failed=0

# step NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log, records rc and seconds.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 10 ]; then
    printf '%-18s %-8s (no time left in the %ss budget)\n' "$name" SKIPPED "$BUDGET_S" >>"$SUMMARY"
    failed=1
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  if [ "$rc" -eq 124 ]; then verdict=TIMEOUT; elif [ "$rc" -ne 0 ]; then verdict=FAILED; fi
  [ "$verdict" = ok ] || failed=1
  printf '%-18s %-8s rc=%-4s %4ss\n' "$name" "$verdict" "$rc" "$((SECONDS - start))" >>"$SUMMARY"
  tail -n 3 "$OUT/$name.log"
  return "$rc"
}

finish() {
  echo
  echo "================ gpu_check call $CALL summary ================"
  cat "$SUMMARY"
  if [ -f "$OUT/goals.txt" ] && [ "$CALL" = 2 ]; then cat "$OUT/goals.txt"; fi
  if [ "$failed" -ne 0 ]; then echo "GPU CHECK CALL $CALL FAILED (logs in $OUT)"; exit 1; fi
  echo "GPU check call $CALL passed (logs in $OUT)"
}

DEVICE_CHECK="
import torch, triton
assert torch.cuda.is_available(), 'no CUDA device visible: this script checks the GPU path and must not pass without one'
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
"
INSTALL=("$PY" -m pip install --no-build-isolation --no-deps -e .)

call_1() {
  BUDGET_S=300
  step device 15 "$PY" -c "$DEVICE_CHECK" || { finish; exit 1; }
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
  step install 110 "${INSTALL[@]}" || { finish; exit 1; }
  # Versions, backends built (or why not), every backend's self-check on the GPU; exit 1 on a failed check.
  step doctor 45 "$PY" -m hamur_fast.doctor --repeats 3
  # The GPU tests of the kernel backends (conftest leaves TRITON_INTERPRET unset when CUDA exists). Each size and
  # mode compiles its own kernels, so the tests run in parallel where pytest-xdist is there. -rs lists skips; a
  # run where nothing passed is a failure.
  local parallel=()
  if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
  local files=(tests/test_backends.py tests/test_contract.py tests/test_triton_adapter.py tests/test_csrc.py
               tests/test_captured_step.py)
  [ -f tests/test_invalid_domain_ids.py ] && files+=(tests/test_invalid_domain_ids.py)
  step tests 100 "$PY" -m pytest -q -rs "${parallel[@]}" "${files[@]}" -p no:cacheprovider
  grep -Eq "[0-9]+ passed" "$OUT/tests.log" || { echo "tests: none passed" >>"$SUMMARY"; failed=1; }
  step bench_layers_small 30 "$PY" benchmarks/bench_layers.py --batch 4096 --repeats 5 --no-compile
}

call_2() {
  BUDGET_S=540
  step device 15 "$PY" -c "$DEVICE_CHECK" || { finish; exit 1; }
  # A fresh machine has not run call 1: install there; a warm one keeps call 1's build.
  if ! "$PY" -c "import hamur_fast, hamur_fast._C" 2>/dev/null; then
    step install 110 "${INSTALL[@]}" || { finish; exit 1; }
  fi
  step bench_layers 110 "$PY" benchmarks/bench_layers.py --batch 4096 65536
  # Whole training step (released, released under torch.compile, ours eager and CUDA graph) and serving latency.
  step bench_train 150 "$PY" benchmarks/bench_train.py --batch 4096 40960 --repeats 10
  step bench_infer 45 "$PY" benchmarks/bench_infer.py --no-artifacts  # AOTInductor compiles do not fit 45 s
  step bench_cuda_infer 45 "$PY" benchmarks/bench_cuda_infer.py  # eval cell, batch 1..512: "cuda" vs "triton"
  # Training-step time, memory and FLOPs against the number of domains (goal: D=100 within 1.5x of D=3).
  step bench_domains 60 "$PY" benchmarks/bench_domains.py --domains 3 100 300 --repeats 5 --stacked-max-domains 100
  goals
}

# The issue's goals, from the B=65536 table of bench_layers (h=128, k=35, s=32, D=3, fp32, fwd+bwd).
goals() {
  "$PY" - "$OUT/bench_layers.log" "$OUT/bench_domains.log" >"$OUT/goals.txt" 2>&1 <<'EOF' || failed=1
import re, sys
rows, batch = {}, None
for line in open(sys.argv[1]):
    head = re.match(r"B=(\d+):", line)
    if head:
        batch = int(head.group(1))
    row = re.match(r"(released|paper)\s+(.+?)\s+([\d.]+)\s+\S+\s+[\d.]+x\s+(\d+)\s+(\d+)%", line)
    if row and batch == 65536:
        rows[(row.group(1), row.group(2))] = (float(row.group(3)), int(row.group(5)))
if not rows:
    sys.exit("goals: no B=65536 table in bench_layers.log")
print("goals at B=65536 (fwd+bwd; performance goals are reported, they do not fail the check)")
for mode in ("released", "paper"):
    triton = rows.get((mode, "triton"))
    compiled = rows.get((mode, "torch+compile"))
    if triton is None:
        sys.exit(f"goals: no triton row for mode {mode}")
    checks = [(">= 50% of copy bandwidth", triton[1] >= 50, f"{triton[1]}%")]
    if compiled:
        checks.append((">= 6x torch+compile", compiled[0] / triton[0] >= 6, f"{compiled[0] / triton[0]:.1f}x"))
    einsum = rows.get((mode, "released einsum"))
    if einsum:
        checks.append((">= 40x released einsum", einsum[0] / triton[0] >= 40, f"{einsum[0] / triton[0]:.1f}x"))
    for what, passed, value in checks:
        print(f"  {mode:8} triton {triton[0]:.3f} ms  {what:26} {value:>7}  {'met' if passed else 'NOT met'}")
# Fusion level 2: the generator+cell table's "level 2 triton" row at B=65536 (speed-up vs torch.compile of the
# eager generator+cell; goal >= 8x). bench_train.log reports the training-step goals itself.
batch, generator = None, False
for line in open(sys.argv[1]):
    head = re.match(r"B=(\d+): (generator)?", line)
    if head:
        batch, generator = int(head.group(1)), bool(head.group(2))
    row = re.match(r"level 2 triton\s+([\d.]+)\s+([\d.]+)x", line)
    if row and generator and batch == 65536:
        speed = float(row.group(2))
        print(f"  level 2 triton {float(row.group(1)):.3f} ms  generator+cell >= 8x torch.compile "
              f"{speed:6.1f}x  {'met' if speed >= 8 else 'NOT met'}")
# bench_domains: "model, B=...:" heads, then rows "D adapter grouped-op ms x ..." (x: ratio to D=3).
model = None
try:
    lines = open(sys.argv[2]).read().splitlines()
except OSError:
    lines = []
print("goals of bench_domains (training step at D=100 within 1.5x of D=3)")
for line in lines:
    head = re.match(r"(\w+), B=\d+:", line)
    if head:
        model = head.group(1)
    row = re.match(r"\s*100\s+(\S+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s", line)
    if row and row.group(2) != "stacked":
        ratio = float(row.group(4))
        print(f"  {model:10} adapter {row.group(1):7} {row.group(2):9} {ratio:5.2f}x  {'met' if ratio <= 1.5 else 'NOT met'}")
EOF
}

case "$CALL" in
  1) call_1 ;;
  2) call_2 ;;
  *) echo "usage: bash benchmarks/gpu_check.sh 1|2"; exit 2 ;;
esac
finish
