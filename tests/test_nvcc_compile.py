"""The CUDA sources compile, on machines without a GPU too, so that CUDA code that does not build fails CI.

Every csrc/cuda/*.cu file is compiled by nvcc to an object file holding sm_80 (A100) and sm_90 (H100, H200)
code, and the CUDA bindings (csrc/cuda/*.cpp) are compiled by the host compiler against the installed
torch headers, as setup.py compiles them when torch has CUDA.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90": "-gencode=arch=compute_90,code=sm_90"}


class Toolkit:
    def __init__(self, nvcc: str, home: Path):
        self.nvcc, self.include = nvcc, home / "include"
        self.cuobjdump = shutil.which("cuobjdump") or str(home / "bin" / "cuobjdump")


def find_toolkit():
    """nvcc (which may be a wrapper script on PATH) and the toolkit folder that holds the CUDA headers."""
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"] + ([Path(nvcc).resolve().parents[1]] if nvcc else [])
    for home in filter(None, homes):
        home = Path(home)
        if (home / "include" / "cuda_runtime_api.h").exists():
            nvcc = nvcc or (str(home / "bin" / "nvcc") if (home / "bin" / "nvcc").exists() else None)
            return Toolkit(nvcc, home) if nvcc else None
    return None


@pytest.fixture(scope="module")
def cuda_toolkit():
    toolkit = find_toolkit()
    if toolkit is None:
        pytest.skip("nvcc or the CUDA headers not found (PATH, CUDA_HOME, /usr/local/cuda): "
                    "the CUDA sources cannot be compile-checked here")
    return toolkit


def test_there_are_cuda_sources():
    assert sorted(CUDA_DIR.glob("*.cu")) and sorted(CUDA_DIR.glob("*.cpp"))


@pytest.mark.parametrize("source", sorted(CUDA_DIR.glob("*.cu")), ids=lambda p: p.name)
def test_cu_file_compiles_for_sm80_and_sm90(source, cuda_toolkit, tmp_path):
    obj = tmp_path / (source.stem + ".o")
    done = subprocess.run([cuda_toolkit.nvcc, "-O3", "-std=c++17", *ARCHS.values(), "-c",
                           str(source), "-o", str(obj)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if Path(cuda_toolkit.cuobjdump).exists():
        listing = subprocess.run([cuda_toolkit.cuobjdump, "--list-elf", str(obj)], capture_output=True,
                                 text=True).stdout
    else:  # without cuobjdump: the fat binary records each architecture it was assembled for
        listing = obj.read_bytes().decode("latin-1")
    for arch in ARCHS:
        assert arch in listing, f"{source.name}: no {arch} code in the object file"


@pytest.mark.parametrize("source", sorted(CUDA_DIR.glob("*.cpp")), ids=lambda p: p.name)
def test_cuda_bindings_compile_against_torch_headers(source, cuda_toolkit, tmp_path):
    from torch.utils.cpp_extension import include_paths

    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no host compiler {compiler!r}")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{cuda_toolkit.include}", f"-I{CUDA_DIR}"]
    done = subprocess.run([compiler, "-std=c++20", "-fsyntax-only", *includes, str(source)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
