"""The best possible time of released mode's two benchmarked workloads on this machine, from what must be computed.

    python benchmarks/floor_released.py --threads 2

Counts the FLOPs of the released adapter cell's forward+backward (bench_layers: B=4096, h=128, k=35, s=32, the
gradient of I included) and of the released HAMUR-MLP training step (bench_train: B=2048, 113 -> towers 256-128
on every row for each of the 3 domains, hyper-network 113 -> 64 -> k*k, one cell per tower on the shared I_b),
times torch.mm at exactly those GEMM shapes (best of 25 calls each: this machine's achievable GEMM rate there)
and the bytes that must cross memory at the measured copy bandwidth. The floor is the sum: it assumes every
GEMM at torch.mm's best and ignores every elementwise pass (BatchNorm, ReLU, sigmoid, DomainNorm, Adam), so a
real step is slower. A goal whose time budget sits below the floor is out of reach on this machine.
"""
from __future__ import annotations

import argparse
import time

import torch

B_CELL, B_STEP, FEATURES, WIDTH, RANK, BOTTLENECK, HYPER, TOWERS = 4096, 2048, 113, 128, 35, 32, 64, 3


def best_ms(fn, repeats=25):
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def mm_ms(m, k, n, transposed_a):
    a = torch.randn(k, m).t() if transposed_a else torch.randn(m, k)
    b, out = torch.randn(k, n), torch.empty(m, n)
    return best_ms(lambda: torch.mm(a, b, out=out))


def linear(rows, fan_in, fan_out, count=1, input_grad=True):
    """(m, k, n, transposed_a, count) of a linear layer's forward, weight gradient and (optional) input gradient."""
    return ([(rows, fan_in, fan_out, False, count), (fan_in, rows, fan_out, True, count)]
            + ([(rows, fan_out, fan_in, False, count)] if input_grad else []))


def report(label, gemms):
    flops = sum(2 * m * k * n * c for m, k, n, _, c in gemms)
    ms = sum(c * mm_ms(m, k, n, t) for m, k, n, t, c in gemms)
    print(f"  {label:54s} {flops / 1e9:6.3f} GFLOP {ms:8.2f} ms  ({flops / ms / 1e6:5.1f} GFLOP/s)")
    return flops, ms


def cell_products(rows, count):
    h, k, s = WIDTH, RANK, BOTTLENECK
    return linear(rows, h, k, count) + linear(rows, k, s, count) + linear(rows, s, k, count) + linear(rows, k, h, count)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kk = RANK * RANK
    source = torch.randn(B_CELL, kk)
    target = torch.empty_like(source)
    copy_gbs = 2 * source.numel() * 4 / best_ms(lambda: target.copy_(source)) / 1e6
    print(f"# floor_released: torch {torch.__version__}, threads {args.threads}, copy bandwidth {copy_gbs:.1f} GB/s")
    # Per row, the two products with I_b forward, I_b times two gradients and the two outer products of grad I_b.
    per_row_core = 12 * kk

    print(f"released cell fwd+bwd, B={B_CELL}: GEMMs at torch.mm's best")
    flops, ms = report("x.DL, q.DR, a.UL, v.UR: forward, input and weight grads", cell_products(B_CELL, 1))
    core_flops = B_CELL * per_row_core
    core_bytes = 4 * B_CELL * (3 * kk + 5 * WIDTH)  # I read twice, grad I written once; x, y, grad y, grad x, o
    core_ms = core_bytes / copy_gbs / 1e6
    print(f"  {'per-row I products (memory-bound: I twice, grad I, x, y)':54s} {core_flops / 1e9:6.3f} GFLOP "
          f"{core_ms:8.2f} ms  ({core_bytes / 2**20:.0f} MiB at the copy bandwidth)")
    print(f"  floor {ms + core_ms:.2f} ms for {(flops + core_flops) / 1e9:.3f} GFLOP")

    print(f"released HAMUR-MLP step, B={B_STEP}: GEMMs at torch.mm's best")
    parts = [report(f"{TOWERS} towers {FEATURES}-256-{WIDTH} on every row",
                    linear(B_STEP, FEATURES, 256, TOWERS, input_grad=False) + linear(B_STEP, 256, WIDTH, TOWERS)),
             report(f"hyper-network {FEATURES}-{HYPER}-{kk}",
                    linear(B_STEP, FEATURES, HYPER, input_grad=False) + linear(B_STEP, HYPER, kk)),
             report(f"{TOWERS} cells' dense products", cell_products(B_STEP, TOWERS))]
    regen_flops, regen_ms = report("(not counted) level 2's regeneration of I in backward",
                                   [(B_STEP, HYPER, kk, False, 1)])
    core_flops = TOWERS * B_STEP * per_row_core
    flops = sum(f for f, _ in parts) + core_flops
    ms = sum(m for _, m in parts)
    print(f"  per-row I products {core_flops / 1e9:.3f} GFLOP (in cache at level 2; not timed)")
    print(f"  floor {ms:.2f} ms for {flops / 1e9:.3f} GFLOP; with level 2's regeneration {ms + regen_ms:.2f} ms")


if __name__ == "__main__":
    main()
