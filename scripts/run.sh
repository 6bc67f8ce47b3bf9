#!/usr/bin/env bash
# The one entry point on a fresh machine: installs what is missing, then runs a job.
#   bash scripts/run.sh demo     # train on the embedded synthetic data, print per-domain metrics
#   bash scripts/run.sh test     # the test suite (what CI runs)
# Extra arguments go to the job (e.g. `bash scripts/run.sh test -k triton`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch: keep an installed one (the GPU machine's CUDA build); otherwise take the CPU 2.13.0 wheel.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q setuptools wheel pybind11 ninja
PYTHON="$PY" bash scripts/install_torchrec.sh   # FBGEMM + TorchRec matched to torch (scaling out; tested in CI)
"$PY" -m pip install -q --no-build-isolation -e ".[test,parquet,onnx,torchrec]"

job=${1:-}
shift || true
case "$job" in
  demo) exec hamur-fast demo "$@" ;;
  test) exec "$PY" -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/run.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
