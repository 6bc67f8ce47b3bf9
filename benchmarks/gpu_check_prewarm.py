"""Compile on the CPU machine, for sm_90a, the Triton specializations that benchmarks/gpu_check.sh launches.

    TRITON_CACHE_DIR=.gpu_prep/triton_cache \\
        python ../shared/tools/triton_sm90_compile.py benchmarks/gpu_check_prewarm.py [--no-tests] [--no-benchmarks]

scripts/prepare_gpu_check.sh runs it in the GPU image's versions (Triton 3.6). The compile tool fakes an sm_90
driver: each Triton launch is compiled into Triton's own cache, keyed as a launch on an H100/H200 with the same
dtypes, sizes and alignments is, and then skipped. Here the kernels are compiled (never interpreted) while
hamur_fast and the tests take the paths they take under the interpreter (TRITON_INTERPRET=1 as they see it), so
"triton" runs as a backend on CPU tensors and every launch of the workloads below reaches the compiler:
  - the correctness step's tests (`bash benchmarks/gpu_check.sh --list-tests`); the skipped launches leave garbage
    behind, so those tests fail here, and nothing is checked: only the compiles count;
  - the benchmarks' Triton paths at the GPU check's sizes: the cell (both modes) and generator+cell (level 1 and
    2) of bench_layers at B=65536, the training step of bench_train at B=4096, bench_infer's batches, the models of
    bench_domains at D=3 and 100.
Where a test's parametrization on the CPU differs from the GPU's (sizes kept small for the interpreter), the
device compiles what is missing; gpu_check.sh logs every compile there, so the hit rate is measured.
With TRITON_LIBCUDA_PATH pointing at a libcuda.so.1 to link against (prepare_gpu_check.sh makes an empty stub),
each kernel's launcher module (C, compiled by the host compiler on a kernel's first launch, cached beside it)
is built into the cache too; it cannot be loaded here, and where it does not load on the device, Triton
rebuilds it there.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import triton

triton.knobs.runtime.interpret = False  # kernels stay JIT functions: the compile tool intercepts their launches
os.environ["TRITON_INTERPRET"] = "1"  # hamur_fast and the tests: triton runs on CPU tensors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

if os.environ.get("HAMUR_TRITON_COMPILE_LOG"):
    import triton_compile_log  # noqa: E402

    triton_compile_log.install(os.environ["HAMUR_TRITON_COMPILE_LOG"])

CPU = torch.device("cpu")


def build_launchers_too() -> None:
    """After each compile by the tool's interceptor, the kernel's launcher module into the cache as well."""
    from triton.backends.nvidia.driver import CudaLauncher, CudaUtils
    from triton.runtime.jit import JITFunction

    compile_only, built = JITFunction.run, set()

    def build(make):
        try:
            make()
        except ImportError:  # built and cached, but not loadable without a driver
            pass

    def run(self, *args, **kwargs):
        kernel = compile_only(self, *args, **kwargs)
        # A launcher depends on the kernel's signature and constants only: one build for each.
        key = kernel is not None and repr((kernel.src.signature, kernel.src.constants))
        if key and key not in built:
            built.add(key)
            build(lambda: CudaLauncher(kernel.src, kernel.metadata))
        return kernel

    build(CudaUtils)
    JITFunction.run = run


class GpuSizes:
    """A pytest plugin: tests that skip sizes under the interpreter by asking their module's ``interpreted``
    (test_backends) take the GPU's sizes here, where nothing is interpreted."""

    def pytest_collection_modifyitems(self, items):
        for module in {item.module for item in items if getattr(item, "module", None)}:
            if hasattr(module, "interpreted"):
                module.interpreted = lambda name: False


def correctness_tests(args: list[str]) -> int:
    import pytest

    args = args or subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--list-tests"],
                                  capture_output=True, text=True, check=True).stdout.splitlines()
    return pytest.main(["-q", "-p", "no:cacheprovider", "--tb=no", "-o", "addopts=", *args], plugins=[GpuSizes()])


def bench_layers_paths(batch: int = 65536) -> None:
    """bench_layers' triton providers: the cell in both modes, generator+cell at levels 1 and 2."""
    import bench_layers

    args = argparse.Namespace(width=128, rank=35, bottleneck=32, domains=3, hidden=64)
    for mode in ("released", "paper"):
        inputs = bench_layers.make_inputs(batch, args.width, args.rank, args.bottleneck, args.domains, mode, CPU)
        bench_layers.run_step(bench_layers.backend_step("triton", mode), inputs)
    inputs = bench_layers.make_generator_inputs(batch, args, CPU)
    for step in (bench_layers.level1_step("triton"), bench_layers.level2_step("triton")):
        bench_layers.run_generator_step(step, inputs)


def model_paths() -> None:
    """backend="auto"'s self-check of triton on the GPU (the models' first call there), then the models of
    bench_train (B=4096, both modes), bench_infer (its batches) and bench_domains (D=3, 100)."""
    import bench_domains
    import bench_infer
    import bench_train

    import hamur_fast as hf
    from hamur_fast.ops.selfcheck import self_check

    self_check(hf.ops.registry.get_backend("triton"), CPU, torch.float32)

    inputs = bench_train.make_batch(4096, CPU)
    for mode in ("paper", "released"):
        bench_train.ours_eager_step(mode, "triton", CPU)(*inputs)
    model = bench_infer.settle(hf.models.HAMUR(bench_infer.INPUT_DIM, bench_infer.DOMAINS, backbone="mlp",
                                               backend="triton", **bench_infer.SIZES))
    with torch.inference_mode():
        for batch in bench_infer.BATCHES:
            model(torch.randn(batch, bench_infer.INPUT_DIM), torch.randint(0, bench_infer.DOMAINS, (batch,)))
    for num_domains in (3, 100):
        for model_name in ("hamur_mlp", "star"):
            step = bench_domains.step_under("triton", bench_domains.build(model_name, num_domains, "triton", CPU))
            step(*bench_domains.make_batch(num_domains, CPU))


def check_only() -> None:
    """Replaces the compile tool's interceptor by one that only gets each launch's kernel (from the cache where it
    is there, else compiled: a miss, which triton_compile_log logs) and lists it in the tool's table without
    ptxas: a packed cache entry holds no PTX. For gpu_check.sh's dry run on the carried cache."""
    from triton.runtime.jit import JITFunction

    tool = JITFunction.run.__globals__  # the compile tool's module: its real launcher and its table
    launch, rows, seen = tool["_launch"], tool["_rows"], set()

    def run(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel.hash not in seen:
            seen.add(kernel.hash)
            meta = kernel.metadata
            rows.append((self.fn.__name__, "cache", "cache", meta.shared, meta.num_warps, meta.num_stages))
        return kernel

    JITFunction.run = run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--check-only", action="store_true", help="list the kernels each launch gets, no ptxas")
    parser.add_argument("--tests", nargs="+", default=[],
                        help="pytest arguments instead of the correctness step's (gpu_check.sh --list-tests)")
    parser.add_argument("--no-benchmarks", action="store_true")
    args = parser.parse_args()
    if args.check_only:
        check_only()
    elif os.environ.get("TRITON_LIBCUDA_PATH"):
        build_launchers_too()
    if not args.no_benchmarks:
        for paths in (bench_layers_paths, model_paths):
            try:  # garbage from the skipped launches may stop a path early: the compiles before it are kept
                paths()
            except Exception as err:  # noqa: BLE001 - reported, the other paths still compile
                print(f"{paths.__name__} stopped early: {type(err).__name__}: {str(err)[:200]}")
    if not args.no_tests:
        print(f"correctness tests (their outcomes mean nothing here): pytest exit {correctness_tests(args.tests)}")


if __name__ == "__main__":
    main()
