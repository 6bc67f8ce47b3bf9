"""Run a module or a script with every Triton compile of the process logged.

    HAMUR_TRITON_COMPILE_LOG=compiles.log python -m triton_compile_log pytest -q tests/test_backends.py
    HAMUR_TRITON_COMPILE_LOG=compiles.log python -m triton_compile_log benchmarks/bench_layers.py --batch 65536

Triton calls its compiler once per kernel specialization and process (the first launch); each call appends a
line "hit|miss KERNEL HASH MICROSECONDS SIGNATURE" to $HAMUR_TRITON_COMPILE_LOG: "hit" where the kernel came from
the cache (TRITON_CACHE_DIR), "miss" where it was compiled here. benchmarks/gpu_check.sh counts them: on the
device, the misses are the specializations the cache carried from the CPU machine did not hold.
"""
from __future__ import annotations

import os
import runpy
import sys


def install(path: str) -> None:
    """Log every Triton compile of this process to ``path`` (Triton's compilation listener)."""
    import triton

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        signature = getattr(src, "signature", "")
        with open(path, "a") as log:
            log.write(f"{'hit' if cache_hit else 'miss'} {metadata.get('name')} {metadata.get('hash')} "
                      f"{times.total} {signature}\n")

    triton.knobs.compilation.listener = listener


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    path = os.environ.get("HAMUR_TRITON_COMPILE_LOG")
    if path:
        install(path)
    if argv[0].endswith(".py"):
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    else:
        sys.argv = [argv[0]] + argv[1:]
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
