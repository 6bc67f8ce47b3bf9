"""Build and install hamur_fast.

``kernels/`` installs as ``hamur_fast.kernels`` (never as a top-level ``kernels`` module).
Installs offline with ``pip install --no-build-isolation -e .`` when torch is present.

The compiled core ``hamur_fast._C`` (csrc/): the CPU kernels are always built; the CUDA kernels join when
torch has CUDA and an nvcc of the same CUDA major version is found (or ``HAMUR_FAST_FORCE_CUDA=1``). ``HAMUR_FAST_NO_EXT=1`` builds no
extension; the package then works with its Python backends.

CUDA_HOME is the toolkit folder (``include/cuda_runtime_api.h`` and ``bin/nvcc``): an explicit ``CUDA_HOME``, else the
toolkit of the nvcc on PATH (asked from nvcc itself, so a wrapper script outside the toolkit works), else
/usr/local/cuda or the newest /usr/local/cuda-*. Each csrc/cpu/*.cpp is its own translation unit and ninja compiles
them in parallel, ``MAX_JOBS`` at a time (default: the CPUs this process may use).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["hamur_fast", "hamur_fast.*"]) + ["hamur_fast.kernels"]


def nvcc_major(nvcc):
    """nvcc's CUDA major version ("13"); torch refuses to build with a different major than its own."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.", out)
    if found is None:
        return None
    return found.group(1)


def is_toolkit(folder):
    """A CUDA toolkit folder: the runtime headers and nvcc itself."""
    return bool(folder) and os.path.isfile(os.path.join(folder, "include", "cuda_runtime_api.h")) and os.path.isfile(
        os.path.join(folder, "bin", "nvcc"))


def toolkit_of_nvcc_on_path():
    """The toolkit the nvcc on PATH really runs. nvcc's dry run names its own folder (_HERE_), also where the nvcc
    on PATH is a wrapper script outside the toolkit, whose parent folder torch would take for CUDA_HOME."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    here = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    folder = here and os.path.dirname(here.group(1).strip())
    return folder if is_toolkit(folder) else None


def cuda_folder_version(folder):
    """(13, 0) for /usr/local/cuda-13.0, so that the newest toolkit sorts first."""
    return tuple(int(part) for part in re.findall(r"\d+", os.path.basename(folder)))


def cuda_toolkit():
    """CUDA_HOME for the build (order in the module docstring), or None where no toolkit is found."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit
    usual = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=cuda_folder_version, reverse=True)
    return toolkit_of_nvcc_on_path() or next((folder for folder in usual if is_toolkit(folder)), None)


def compiled_core():
    """(ext_modules, cmdclass) for hamur_fast._C, or nothing when HAMUR_FAST_NO_EXT=1."""
    if os.environ.get("HAMUR_FAST_NO_EXT") == "1":
        return [], {}
    toolkit = cuda_toolkit()
    if toolkit:  # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import
        os.environ["CUDA_HOME"] = toolkit
    # One compile job per CPU: more only oversubscribes the cores (and memory) the build shares.
    os.environ.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                          else os.cpu_count() or 1))
    import torch
    from torch.utils import cpp_extension

    # torch's own OpenMP: at::parallel_for expands to `#pragma omp parallel` inside our objects.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-DNDEBUG"] + openmp
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    nvcc = toolkit and os.path.join(toolkit, "bin", "nvcc")
    with_cuda = os.environ.get("HAMUR_FAST_FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
        and nvcc_major(nvcc) == torch.version.cuda.split(".")[0])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # A100, H100/H200
        extension = cpp_extension.CUDAExtension(
            "hamur_fast._C", sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DNDEBUG"]},
            extra_link_args=openmp)
    else:
        extension = cpp_extension.CppExtension("hamur_fast._C", sources, extra_compile_args={"cxx": cxx_flags},
                                               extra_link_args=openmp)
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = compiled_core()

setup(
    name="hamur_fast",
    version="0.1.0",
    description="Fast, trustworthy HAMUR (Hyper Adapter for Multi-Domain Recommendation) for PyTorch",
    packages=packages,
    package_dir={"hamur_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pandas",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    # Triton is an extra: torch's CUDA wheels bring the Triton they were built with, and on a CPU-only machine
    # Triton runs our kernels only under its interpreter (the tests), so the demo need not download it.
    extras_require={"test": ["pytest"], "triton": ["triton; platform_system == 'Linux'"], "parquet": ["pyarrow"], "onnx": ["onnx", "onnxscript", "onnxruntime"],
                    # TorchRec's dependencies but FBGEMM and itself: scripts/install_torchrec.sh installs the pair
                    # matching the installed torch first (torchrec's metadata asks for the GPU fbgemm-gpu).
                    "torchrec": ["tensordict", "torchmetrics==1.0.3", "pyre-extensions", "pyvers"]},
    entry_points={"console_scripts": ["hamur-fast=hamur_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
