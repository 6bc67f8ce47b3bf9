"""Scratch memory of the level-1 Triton kernels' per-domain batch statistics, before and after the compact layout
(issue 13): computed from the shapes, no kernel runs.

    python benchmarks/statistics_memory.py [--batch 4096 65536] [--domains 3 100 1000] [--width 256]

Before: one (mean, M2) partial per (row block, domain), (blocks, D, h) fp32 each, plus counts (blocks, D), and
the same per range of MERGE_PARTS_PER_PROGRAM blocks in the merge's range pass.
After: the launchers' own allocation (kernels/domain_norm.py ``empty_partials``, here on the ``meta`` device):
min(rows per block, D) slots per block, plus the range pass's buffers of the merge when there are more than
MERGE_PARTS_PER_PROGRAM blocks. Per partial pair (mean and M2 forward, or dy and dy * xhat backward).
"""
from __future__ import annotations

import argparse

import torch
import triton

from hamur_fast.kernels import adapter_cell
from hamur_fast.kernels import domain_norm as dn


def bytes_before(batch, domains, width, rows_per_block):
    parts = [triton.cdiv(batch, rows_per_block)]
    if parts[0] > dn.MERGE_PARTS_PER_PROGRAM:  # the merge's range pass: (ranges, D, h) and counts
        parts.append(triton.cdiv(parts[0], dn.MERGE_PARTS_PER_PROGRAM))
    return sum(4 * (2 * n * domains * width + n * domains) for n in parts)


def bytes_after(batch, domains, width, rows_per_block):
    segments = dn.sort_groups(torch.zeros(batch, dtype=torch.int64, device="meta"), domains, per_domain=True)
    buffers = list(dn.empty_partials(segments, rows_per_block, width, "meta"))
    if triton.cdiv(batch, rows_per_block) > dn.MERGE_PARTS_PER_PROGRAM:  # the merge's range pass
        buffers += dn.empty_partials(segments, rows_per_block * dn.MERGE_PARTS_PER_PROGRAM, width, "meta")
    return sum(t.numel() * t.element_size() for t in buffers)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--domains", type=int, nargs="+", default=[3, 100, 1000])
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    print(f"h = {args.width}; MB (1e6 bytes) per partial pair")
    print("| kernel (rows per block) | B | D | before | after | after / before |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in (("adapter cell", adapter_cell.ROWS_PER_BLOCK), ("DomainNorm", dn.ROWS_PER_BLOCK)):
        for batch in args.batch:
            for domains in args.domains:
                before, after = (f(batch, domains, args.width, rows) for f in (bytes_before, bytes_after))
                print(f"| {name} ({rows}) | {batch} | {domains} | {before / 1e6:.1f} | {after / 1e6:.1f} "
                      f"| {after / before:.3f} |")


if __name__ == "__main__":
    main()
