"""Launch every Triton kernel of backend="triton" at the sizes it must take, for a compile-only check.

    python ../shared/tools/triton_sm90_compile.py benchmarks/triton_sm90_sizes.py [--sizes presets|all]

Run through the compile tool (it fakes an sm_90 driver, compiles each launch, reports registers, spills and
shared memory, and fails past the H100/H200 limits): the launches here are skipped, so the numbers that
flow between kernels are garbage and nothing is checked but the compiles. Sizes: the released presets
(h=128 with k=30, 35, 45; h=64 with k=65; s=32) and h in {256, 512, 1024} x k in {5, 35, 65, 128}, each in
fp32 and bf16, paper and released mode, batch statistics (training) and running statistics (paper eval),
forward and backward of the adapter cell, and DomainNorm alone at every h. ``--sizes limits`` launches the
largest cell the kernels accept (MAX_WIDTH, MAX_RANK, MAX_BOTTLENECK) the same ways.
"""
from __future__ import annotations

import argparse
import itertools

import torch
from triton.runtime.jit import JITFunction

from hamur_fast.kernels import adapter_cell as cell
from hamur_fast.ops.backends import triton as table  # the fused forms: the split launchers in a row
from hamur_fast.ops.contract import Plan

PRESETS = [(128, 30), (128, 35), (128, 45), (64, 65)]
WIDE = list(itertools.product((256, 512, 1024), (5, 35, 65, 128)))
BOTTLENECK, DOMAINS, BATCH = 32, 3, 4096


LIMITS = [(cell.MAX_WIDTH, cell.MAX_RANK)]


def cell_params(width, rank, bottleneck, per_domain, dtype):
    lead = (DOMAINS,) if per_domain else ()
    shapes = [(width, rank), (rank, bottleneck), (bottleneck,), (bottleneck, rank), (rank, width), (width,),
              (width,), (width,)]
    return [torch.zeros(*lead, *shape, dtype=dtype) for shape in shapes]


def launch_cell(width, rank, per_domain, batch_stats, dtype, bottleneck=BOTTLENECK):
    x = torch.zeros(BATCH, width, dtype=dtype)
    rep = torch.zeros(BATCH, rank, rank, dtype=dtype)
    domain = torch.randint(0, DOMAINS, (BATCH,)) if per_domain else torch.zeros(BATCH, dtype=torch.int64)
    params = cell_params(width, rank, bottleneck, per_domain, dtype)
    running = [torch.zeros(DOMAINS, width), torch.ones(DOMAINS, width)] if per_domain else [None, None]
    plan = Plan(per_domain, batch_stats, not per_domain, 1e-5)
    y, count, mean, m2, rstd, *saved = table.cell_forward(x, rep, domain, params, *running, plan)
    table.cell_backward(torch.zeros_like(y), x, rep, domain, params, saved, count, mean, rstd, plan)


def launch_norm(width, per_domain, batch_stats, dtype):
    o = torch.zeros(BATCH, width, dtype=dtype)
    domain = torch.randint(0, DOMAINS, (BATCH,))
    shape = (DOMAINS, width) if per_domain else (width,)
    weight, bias = torch.ones(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    running = [torch.zeros(DOMAINS, width), torch.ones(DOMAINS, width)] if per_domain else [None, None]
    plan = Plan(per_domain, batch_stats, not per_domain, 1e-5)
    y, count, mean, m2, rstd = table.norm_forward(o, domain, weight, bias, *running, plan)
    table.norm_backward(torch.zeros_like(y), o, domain, weight, count, mean, rstd, plan)


def compiled_rows():
    """The compile tool's list of (kernel, regs, spill bytes, smem bytes, warps, stages), or None outside it."""
    return JITFunction.run.__globals__.get("_rows")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=("presets", "all", "limits"), default="all")
    args = parser.parse_args()
    sizes = {"presets": PRESETS, "all": PRESETS + WIDE, "limits": LIMITS}[args.sizes]
    bottleneck = cell.MAX_BOTTLENECK if args.sizes == "limits" else BOTTLENECK
    rows = compiled_rows()
    table = []
    print(f"| first launched at (B={BATCH}) | kernel | regs | spill B | smem B | warps |")
    print("|---|---|---|---|---|---|", flush=True)

    def run(label, launch, *launch_args):
        first = len(rows) if rows is not None else 0
        launch(*launch_args)
        for kernel, regs, spill, smem, warps, _ in (rows[first:] if rows is not None else []):
            table.append((label, kernel, regs, spill, smem, warps))
            print("| " + " | ".join(map(str, table[-1])) + " |", flush=True)

    # (paper, batch statistics), (paper, running statistics), (released: whole-batch statistics)
    variants = ((True, True), (True, False), (False, True))
    for dtype in (torch.float32, torch.bfloat16):
        dtype_name = str(dtype).removeprefix("torch.")
        for (width, rank), (per_domain, batch_stats) in itertools.product(sizes, variants):
            label = f"cell {dtype_name} h={width} k={rank} s={bottleneck} {'paper' if per_domain else 'released'} " \
                    f"{'batch' if batch_stats else 'running'}"
            run(label, launch_cell, width, rank, per_domain, batch_stats, dtype, bottleneck)
        for width, (per_domain, batch_stats) in itertools.product(sorted({w for w, _ in sizes}), variants):
            label = f"norm {dtype_name} h={width} {'paper' if per_domain else 'released'} " \
                    f"{'batch' if batch_stats else 'running'}"
            run(label, launch_norm, width, per_domain, batch_stats, dtype)
    if table:
        print(f"\nlargest shared memory: {max(int(r[4]) for r in table)} B; "
              f"kernels that spill: {sum(r[3] not in ('0', '?') for r in table)} of {len(table)}")


if __name__ == "__main__":
    main()
