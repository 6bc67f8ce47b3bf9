#!/usr/bin/env bash
# The one entry point on a fresh machine: installs what is missing, then runs a job.
#   bash scripts/run.sh demo     # train on the embedded synthetic data, print per-domain metrics
#   bash scripts/run.sh test     # the test suite (what CI runs)
# Extra arguments go to the job (e.g. `bash scripts/run.sh test -k triton`).
#
# The set-up runs once: stamps in build/run-sh/ record a hash of what the installed package was built from
# (csrc/, kernels/, setup.py, pyproject.toml, these scripts, the Python and torch versions); a later call whose
# hash matches starts the job at once. `demo` installs the package and its runtime dependencies only; `test`
# adds the test extras (pytest, Triton for its CPU interpreter, pyarrow, ONNX; read from the package's metadata) and TorchRec/FBGEMM, without
# building the package again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
job=${1:-}
shift || true
case "$job" in
  demo|test) ;;
  *) echo "usage: bash scripts/run.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
TEST_EXTRAS="test triton parquet onnx torchrec"

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
  "$PY" - <<'EOF'
import hashlib, importlib.metadata as md, pathlib, sys
h = hashlib.sha256(f"{sys.executable} {sys.version}".encode())
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

# pip's output, quiet but for what takes time: each dependency it fetches, ninja's "[i/n]" line per compiled
# file, the link, and any error.
build_progress() {
  local log=build/run-sh/pip.log status t0=$SECONDS line
  set +o pipefail  # the pip status is read below; the filters' own statuses do not matter
  "$PY" -m pip install -v --no-build-isolation -e . 2>&1 | tee "$log" |
    grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\]| -shared .* -o |^Collecting|^Installing collected|error:|^ERROR|^FAILED' |
    sed -u -E 's#^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+/)?([^ /]+\.(cpp|cu)) .*#\1 compiling \3#; s#^.* -shared .* -o ([^ ]+/)?([^ /]+\.so)( .*)?$#linking \2#' |
    while IFS= read -r line; do printf '    %4d s  %s\n' $((SECONDS - t0)) "${line:0:160}"; done
  status=${PIPESTATUS[0]}
  set -o pipefail
  if [ "$status" -ne 0 ]; then
    say "the install failed; its last lines (all of it in $log):"
    tail -40 "$log"
    exit 1
  fi
}

# The requirements of the package's extras, from its installed metadata (setup.py is the one list).
extras_requirements() {
  "$PY" - $TEST_EXTRAS <<'EOF'
import importlib.metadata as md, re, sys
for requirement in md.requires("hamur_fast") or []:
    name, _, marker = requirement.partition(";")
    extra = re.search(r"extra\s*==\s*[\"']([\w-]+)[\"']", marker)
    if extra and extra.group(1) in sys.argv[1:]:
        print(name.strip())
EOF
}

mkdir -p build/run-sh
hash=$(source_hash)
if [ "$(cat build/run-sh/build.stamp 2>/dev/null)" = "$hash" ]; then
  say "hamur_fast is installed and built from these sources (build/run-sh/build.stamp): nothing to build"
else
  # torch: keep an installed one (the GPU machine's CUDA build); otherwise the CPU 2.13.0 wheel. NumPy comes
  # with it, so that torch never starts without NumPy (its "Failed to initialize NumPy" warning).
  if "$PY" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('torch'))"; then
    step "NumPy and build tools" "$PY" -m pip install -q numpy setuptools wheel ninja
  else
    step "torch 2.13.0, NumPy and build tools" "$PY" -m pip install -q torch==2.13.0 numpy setuptools wheel ninja
  fi
  # The editable install builds hamur_fast._C (csrc/; the C++ build takes minutes on 2 cores).
  step "hamur_fast: dependencies and the C++ extension" build_progress
  hash=$(source_hash)  # torch may be new
  echo "$hash" > build/run-sh/build.stamp
fi
if [ "$job" = test ] && [ "$(cat build/run-sh/test.stamp 2>/dev/null)" != "$hash" ]; then
  mapfile -t requirements < <(extras_requirements)
  step "test extras: ${requirements[*]}" "$PY" -m pip install -q "${requirements[@]}"
  # After the extras (which bring TorchRec's other dependencies): FBGEMM, then TorchRec without its metadata's
  # GPU-only fbgemm-gpu requirement, so that pip has no unmet requirement to report.
  step "TorchRec and FBGEMM" env PYTHON="$PY" bash scripts/install_torchrec.sh
  echo "$hash" > build/run-sh/test.stamp
fi
[ $((SECONDS - started)) -lt 2 ] || say "set-up done in $((SECONDS - started)) s"

case "$job" in
  demo) exec "$PY" -m hamur_fast.cli demo "$@" ;;
  test) exec "$PY" -m pytest -q "$@" ;;
esac
