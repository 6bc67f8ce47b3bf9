#!/usr/bin/env bash
# The `torchrec` extra: TorchRec and FBGEMM matched to the installed torch (does nothing when both are installed).
#   bash scripts/install_torchrec.sh
# TorchRec declares a dependency on the GPU build `fbgemm-gpu`, so the FBGEMM build for this torch goes in first
# (`fbgemm-gpu-cpu` for a CPU torch, `fbgemm-gpu` for a CUDA one), then torchrec without dependencies, then the
# rest of its dependencies come with the `torchrec` extra (`pip install --no-build-isolation -e ".[torchrec]"`,
# which scripts/run.sh does). Both follow torch's minor version: 1.<minor - 5>.0, e.g.
# torch 2.13 -> 1.8.0 (verified on the CPU machines), torch 2.11 -> 1.6.0 (by the same rule, not yet verified).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torchrec') and u.find_spec('fbgemm_gpu')))"; then
  exit 0
fi
read -r pair flavour < <("$PY" -c "
import torch
major, minor = (int(v) for v in torch.__version__.split('+')[0].split('.')[:2])
print(f'1.{minor - 5}.0', 'fbgemm-gpu' if torch.version.cuda else 'fbgemm-gpu-cpu')")
"$PY" -m pip install -q "$flavour==$pair"
"$PY" -m pip install -q --no-deps "torchrec==$pair"
