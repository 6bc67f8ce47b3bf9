#!/usr/bin/env bash
# Prepare, on the CPU machine, everything the GPU check can use ready-made, in ONE ignored folder: .gpu_prep/.
#
#   bash scripts/prepare_gpu_check.sh            # ~15-30 min on 2 busy cores; the venv is kept for the next run
#
# The device call then carries it and runs the check (benchmarks/gpu_check.sh):
#   device run, carry: [".gpu_prep"], timeout_s: 400, command: OUT=$OUT bash benchmarks/gpu_check.sh
# and its CPU dry run is: DRY_RUN=1 OUT=/tmp/gpu_dry PYTHON=$GPU_PREP_VENV/bin/python bash benchmarks/gpu_check.sh
#
# What lands in .gpu_prep/ (under the 64 MiB a device call carries; the script fails above it):
#   ext/_C.cpython-312-x86_64-linux-gnu.so  hamur_fast._C built for the GPU image: Python 3.12, torch 2.11.0+cu130,
#                              CPU and CUDA kernels (nvcc 13, sm_80 and sm_90); gpu_check.sh loads it, building
#                              only where it does not load
#   triton_cache/              every Triton specialization gpu_check.sh launches (as far as the CPU run reaches:
#                              benchmarks/gpu_check_prewarm.py), compiled for sm_90a with Triton 3.6, binaries and
#                              metadata only (benchmarks/triton_cache_carry.py); the device points TRITON_CACHE_DIR
#                              at it and logs each compile that still happens
#   shared/golden/             the golden files of the released code (from ../shared) for the golden-parity tests
#   sm90_compile_table.txt     registers, spills and shared memory of each compiled specialization (Triton 3.6)
#   manifest.json              versions, sizes, date
#
# Versions, pinned here to the GPU image's (KINDS.md, FACTS.md): Python 3.12, torch 2.11.0 (pip takes the cu130
# build; it imports and builds on the CPU), Triton 3.6.0. NumPy is pinned below 2.4 in this venv: Triton 3.6's
# interpreter (TRITON_INTERPRET=1, CPU runs of the kernels) fails with NumPy >= 2.4 ("only 0-dimensional arrays
# can be converted to Python scalars"; Triton 3.9 is fixed). The image itself has NumPy 2.5, which is fine there:
# on a GPU nothing is interpreted, and nothing carried depends on NumPy.
#
# Environment: GPU_PREP_VENV (default ~/.cache/hamur_fast/gpu-image-venv), CUDA_HOME (default: setup.py's search),
# SM90_COMPILE_TOOL (default ../shared/tools/triton_sm90_compile.py), GOLDEN (default ../shared/golden).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PREP=$ROOT/.gpu_prep
VENV=${GPU_PREP_VENV:-$HOME/.cache/hamur_fast/gpu-image-venv}
TOOL=${SM90_COMPILE_TOOL:-$ROOT/../shared/tools/triton_sm90_compile.py}
GOLDEN=${GOLDEN:-$ROOT/../shared/golden}
LIMIT_MIB=60  # of the 64 MiB a device call carries, with room for the working tree itself
SECONDS=0

python312() {  # the GPU image's Python minor version; pyenv's shim needs the version named
  if python3.12 -c "" 2>/dev/null; then
    command -v python3.12
  else
    PYENV_VERSION=$(pyenv versions --bare | grep -E '^3\.12' | tail -1) pyenv which python3.12
  fi
}

echo "== venv $VENV (Python 3.12, torch 2.11.0, Triton 3.6.0)"
[ -x "$VENV/bin/python" ] || "$(python312)" -m venv "$VENV"
PY=$VENV/bin/python
"$PY" -m pip install -q "torch==2.11.0" "triton==3.6.0" "numpy<2.4" pytest pyyaml tqdm pandas matplotlib \
  scikit-learn
"$PY" -c "import sys, torch, triton; assert sys.version_info[:2] == (3, 12) and torch.__version__.startswith('2.11.0') \
and torch.version.cuda and triton.__version__ == '3.6.0', (sys.version, torch.__version__, triton.__version__)"

rm -rf "$PREP"
mkdir -p "$PREP/ext" "$PREP/shared"
echo "${PREP#$ROOT/}/ (scripts/prepare_gpu_check.sh): carried by the device call, never committed" >"$PREP/README"

echo "== extension for the GPU image (CPU + CUDA kernels)"
BUILD_TMP=$(mktemp -d)
start=$SECONDS
HAMUR_FAST_FORCE_CUDA=1 "$PY" setup.py -q build_ext --build-lib "$BUILD_TMP/lib" --build-temp "$BUILD_TMP/tmp" \
  >"$BUILD_TMP/build.log" 2>&1 || { tail -30 "$BUILD_TMP/build.log"; exit 1; }
echo "built in $((SECONDS - start)) s"
cp "$BUILD_TMP"/lib/hamur_fast/_C.*.so "$PREP/ext/"
strip --strip-debug "$PREP"/ext/_C.*.so  # debug sections only (13 of 15.5 MB here): the dynamic symbols stay
rm -rf "$BUILD_TMP"
# The package in the venv as on the device (installed without a build, the carried extension copied in).
HAMUR_FAST_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
cp "$PREP"/ext/_C.*.so hamur_fast/
"$PY" -c "from hamur_fast.ops.backends import compiled; assert compiled.has_kernel('CUDA') and compiled.has_kernel('CPU')"

echo "== golden files"
cp -r "$GOLDEN" "$PREP/shared/golden"

echo "== Triton specializations of the GPU check, compiled for sm_90a (Triton 3.6)"
FULL_CACHE=$(mktemp -d) STUB=$(mktemp -d)
# The kernels' launcher modules link against libcuda.so.1, absent here: an empty stub with its name will do
# (the device loads its own driver's).
printf '' | cc -shared -x c - -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1"
start=$SECONDS
TRITON_CACHE_DIR=$FULL_CACHE TRITON_LIBCUDA_PATH=$STUB "$PY" "$TOOL" benchmarks/gpu_check_prewarm.py \
  >"$PREP/prewarm.log" 2>&1 || echo "(the compile tool reported problems: see the end of $PREP/prewarm.log)"
rm -rf "$STUB"
sed -n '/^# Triton .* specializations compiled/,$p' "$PREP/prewarm.log" >"$PREP/sm90_compile_table.txt"
echo "compiled in $((SECONDS - start)) s: $(head -1 "$PREP/sm90_compile_table.txt")"
"$PY" benchmarks/triton_cache_carry.py pack "$FULL_CACHE" "$PREP/triton_cache"
rm -rf "$FULL_CACHE"

mib=$(du -sm "$PREP" | cut -f1)
"$PY" - "$PREP" "$mib" <<'EOF'
import json, platform, sys, time
import numpy, torch, triton
prep, mib = sys.argv[1], int(sys.argv[2])
built_for = f"Python {platform.python_version()}, torch {torch.__version__}, Triton {triton.__version__}"
json.dump({"built_for": built_for, "numpy": numpy.__version__, "size_mib": mib, "cpu": platform.processor(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, open(f"{prep}/manifest.json", "w"), indent=1)
EOF
echo "== .gpu_prep: ${mib} MiB ($(du -sm "$PREP/ext" | cut -f1) ext, $(du -sm "$PREP/triton_cache" | cut -f1) triton_cache," \
  "$(du -sm "$PREP/shared" | cut -f1) golden), $(find "$PREP/triton_cache" -name '__grp__*' | wc -l) kernels, ${SECONDS} s"
[ "$mib" -le "$LIMIT_MIB" ] || { echo "too large to carry (> $LIMIT_MIB MiB)"; exit 1; }
