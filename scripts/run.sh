#!/usr/bin/env bash
# The one entry point on a fresh machine: installs what is missing, then runs a job.
#   bash scripts/run.sh demo     # train on the embedded synthetic data, print per-domain metrics
#   bash scripts/run.sh test     # the test suite (what CI runs)
# Extra arguments go to the job (e.g. `bash scripts/run.sh test -k triton`).
#
# The set-up runs once: a stamp in build/run-sh/ records a hash of what the installed package was built from
# (csrc/, kernels/, setup.py, pyproject.toml, these scripts, the Python and torch versions); a later call whose
# hash matches starts the job at once. `demo` installs the package and its runtime dependencies only; `test`
# adds pytest, pyarrow, ONNX and TorchRec/FBGEMM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
job=${1:-}
shift || true
case "$job" in
  demo) extras="" ;;
  test) extras="[test,parquet,onnx,torchrec]" ;;
  *) echo "usage: bash scripts/run.sh {demo|test} [args...]" >&2; exit 2 ;;
esac

say() { echo "[run.sh] $*"; }
started=$SECONDS
step() {  # step "what" command...: one line before, the time after
  local what=$1 t0=$SECONDS
  shift
  say "$what ..."
  "$@"
  say "$what: done in $((SECONDS - t0)) s"
}

# What the installed package depends on; torch's version is read from its metadata (no torch import).
source_hash() {
  "$PY" - "$job" <<'EOF'
import hashlib, importlib.metadata as md, pathlib, sys
h = hashlib.sha256(f"{sys.argv[1]} {sys.executable} {sys.version}".encode())
try:
    h.update(md.version("torch").encode())
except md.PackageNotFoundError:
    h.update(b"no torch")
paths = [p for root in ("csrc", "kernels") for p in sorted(pathlib.Path(root).rglob("*")) if p.is_file()]
for path in paths + [pathlib.Path(p) for p in ("setup.py", "pyproject.toml", "scripts/run.sh", "scripts/install_torchrec.sh")]:
    if "__pycache__" not in path.parts:
        h.update(str(path).encode() + path.read_bytes())
print(h.hexdigest())
EOF
}

# pip's output, quiet but for the C++ build: ninja's "[i/n]" lines (one per compiled file) and any error.
build_progress() {
  local log=build/run-sh/pip.log status t0=$SECONDS line
  set +o pipefail  # the pip status is read below; the filters' own statuses do not matter
  "$PY" -m pip install -v --no-build-isolation -e ".$extras" 2>&1 | tee "$log" |
    grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\]|error:|^ERROR|^FAILED' |
    sed -u -E 's#^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+/)?([^ /]+\.(cpp|cu)) .*#\1 compiling \3#; s#^ *(\[[0-9]+/[0-9]+\]) .* -o ([^ ]+/)?([^ /]+\.so)$#\1 linking \3#' |
    while IFS= read -r line; do printf '    %4d s  %s\n' $((SECONDS - t0)) "${line:0:160}"; done
  status=${PIPESTATUS[0]}
  set -o pipefail
  if [ "$status" -ne 0 ]; then
    say "the install failed; its last lines (all of it in $log):"
    tail -40 "$log"
    exit 1
  fi
}

mkdir -p build/run-sh
stamp=build/run-sh/$job.stamp
if [ "$(cat "$stamp" 2>/dev/null)" = "$(source_hash)" ]; then
  say "set-up unchanged since the last call ($stamp): nothing to install or build"
else
  # torch: keep an installed one (the GPU machine's CUDA build); otherwise the CPU 2.13.0 wheel. NumPy comes
  # with it, so that torch never starts without NumPy (its "Failed to initialize NumPy" warning).
  if "$PY" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('torch'))"; then
    step "NumPy and build tools" "$PY" -m pip install -q numpy setuptools wheel ninja
  else
    step "torch 2.13.0, NumPy and build tools" "$PY" -m pip install -q torch==2.13.0 numpy setuptools wheel ninja
  fi
  # The editable install builds hamur_fast._C (csrc/; the C++ build takes minutes on 2 cores).
  step "hamur_fast$extras: dependencies and the C++ extension" build_progress
  if [ "$job" = test ]; then
    # After the extras (which bring TorchRec's other dependencies): FBGEMM, then TorchRec without its metadata's
    # GPU-only fbgemm-gpu requirement, so that pip has no unmet requirement to report.
    step "TorchRec and FBGEMM" env PYTHON="$PY" bash scripts/install_torchrec.sh
  fi
  source_hash > "$stamp"
  say "set-up done in $((SECONDS - started)) s"
fi

case "$job" in
  demo) exec "$PY" -m hamur_fast.cli demo "$@" ;;
  test) exec "$PY" -m pytest -q "$@" ;;
esac
