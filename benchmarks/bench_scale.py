"""Data-parallel scaling: training rows/s with 1 and 2 processes, and the bytes each rank communicates per step.

    python benchmarks/bench_scale.py [--batch 4096] [--steps 20] [--mode paper] [--gpu-step-ms 17.7]

Runs HAMUR-MLP with the released MovieLens sizes (preset movielens, embedding dim 16) as ``DistributedTrainer``
steps under torchrun, global batch ``--batch``, on ``--movielens DIR`` (e.g. ../shared/data/ml-1m-sample),
``--aliccp DIR`` (ali_ccp_train.csv, ali_ccp_val.csv, ali_ccp_test.csv in the released processed layout) or, by
default, the built-in synthetic data; each process one thread, plus one process with two threads.
Measured per rank and step, by counting what goes into the collectives:
- gradients: the bytes DDP all-reduces (its buckets, seen by a comm hook);
- statistics: the per-domain (count, mean, M2) all_gathers of the forward, the (dmean, dvar) all_reduces of
  the backward and the rows-per-domain all_reduce (hamur_fast.ops.collectives);
- embedding all-to-all: what a TorchRec table-wise or row-wise feature stage would exchange instead of
  all-reducing the embedding tables' gradients (pooled rows forward and their gradients backward, plus the ids),
  computed from the sizes.
And the seconds and the memory peak of each rank loading its data (``load_sharded``), fitting the feature map
(rank 0 reads every training row, the other ranks only their shard of them) and with a given one (a resume).
Then a projection for 8 GPUs from those bytes and a single-GPU step time (default: the FACTS.md anchor, 17.7 ms
for this model at B=4096 on an H200, released math, eager), with stated link bandwidths and latencies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Assumed links for the projection (stated, not measured here): NCCL ring bus bandwidth within an 8-GPU NVLink
# node, over 400 Gb/s InfiniBand between nodes, and the latency of one small collective.
NVLINK_BUS_GBPS = 350.0
INFINIBAND_GBPS = 45.0
SMALL_COLLECTIVE_US = 15.0


class CountingCollectives:
    """Stands in for ``torch.distributed`` inside hamur_fast.ops.collectives: counts payload bytes."""

    def __init__(self, dist):
        self._dist, self.gathered, self.reduced, self.gathers, self.reduces = dist, 0, 0, 0, 0

    def __getattr__(self, name):
        return getattr(self._dist, name)

    def all_gather(self, outputs, tensor, group=None):
        self.gathered, self.gathers = self.gathered + tensor.numel() * tensor.element_size(), self.gathers + 1
        return self._dist.all_gather(outputs, tensor, group=group)

    def all_reduce(self, tensor, group=None):
        self.reduced, self.reduces = self.reduced + tensor.numel() * tensor.element_size(), self.reduces + 1
        return self._dist.all_reduce(tensor, group=group)


def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    import hamur_fast as hf
    from hamur_fast.distributed import runtime
    from hamur_fast.ops import collectives as statistics
    from hamur_fast.distributed.trainer import DistributedTrainer, load_sharded

    torch.set_num_threads(args.threads)
    context = runtime.start("cpu")
    source = data_source(args)
    # Each rank's seconds to load and its memory peak while loading: fitting the feature map (rank 0), then as a
    # resume does, with the feature map given.
    loading, feature_map = {}, None
    for how in ("fitted", "given"):
        data = None  # the previous pass's data is no part of this pass's memory
        reset_peak_memory()
        started = time.perf_counter()
        data, _ = load_sharded(source, context, feature_map)
        mine = (time.perf_counter() - started, peak_memory_mib())
        feature_map = data.feature_map
        loading[how] = [mine] * context.world_size
        if context.enabled:
            dist.all_gather_object(loading[how], mine, group=context.group)
    torch.manual_seed(0)
    model = hf.features.build_ctr_model(data.feature_map, {"name": "hamur_mlp", "preset": "movielens",
                                                            "mode": args.mode, "embed_dim": 16})
    config = hf.train.TrainConfig(batch_size=args.batch, progress=False, device="cpu")
    trainer = DistributedTrainer(model, config, data.feature_map, context=context)
    grad_bytes = [0]
    if trainer.ddp is not None:
        def counting_hook(state, bucket):
            grad_bytes[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)
        trainer.ddp.register_comm_hook(context.group, counting_hook)
    counter = statistics.dist = CountingCollectives(statistics.dist)
    batches = [b for _, b in zip(range(args.steps + args.warmup), trainer._training_batches(data.train))]
    for batch in batches[:args.warmup]:
        trainer._step(batch)
    grad_bytes[0], counter.gathered, counter.reduced, counter.gathers, counter.reduces = 0, 0, 0, 0, 0
    if context.enabled:
        dist.barrier()
    started = time.perf_counter()
    for batch in batches[args.warmup:]:
        trainer._step(batch)
    seconds = (time.perf_counter() - started) / args.steps
    tables = sum(p.numel() for p in model.features.parameters())
    dense = sum(p.numel() for p in model.core.parameters())
    if context.is_main:
        Path(args.out).write_text(json.dumps({
            "processes": context.world_size, "threads": args.threads, "step_ms": seconds * 1e3,
            "rows_per_s": args.batch / seconds, "grad_bytes": grad_bytes[0] / args.steps,
            "stats_gathered": counter.gathered / args.steps, "stats_reduced": counter.reduced / args.steps,
            "stats_gathers": counter.gathers / args.steps, "stats_reduces": counter.reduces / args.steps,
            "table_params": tables, "dense_params": dense, "fields": len(data.feature_map.sparse_fields),
            "embed_dim": 16, "loading": loading}))
    runtime.stop()


def reset_peak_memory() -> None:
    """Linux: the peak resident set size (VmHWM) restarts from the current size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib() -> float:
    """The peak resident set size since :func:`reset_peak_memory` (the imports' memory included)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def launch(args, processes: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   __file__, "--worker", "--out", str(out), "--threads", str(threads), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--mode", args.mode,
                   "--rows", str(args.rows), *(["--movielens", args.movielens] if args.movielens else []),
                   *(["--aliccp", args.aliccp] if args.aliccp else [])]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())


def data_source(args) -> dict:
    if args.movielens:
        return {"kind": "movielens", "path": args.movielens}
    if args.aliccp:  # chunks of 100,000 rows: a file of a few of them reads as the 42M-row one does in 500,000s
        return {"kind": "aliccp", "chunksize": 100_000, **{split: str(Path(args.aliccp) / f"ali_ccp_{split}.csv")
                                                           for split in ("train", "val", "test")}}
    return {"kind": "synthetic", "rows": args.rows, "seed": 0}


def embedding_all_to_all_bytes(batch: int, ranks: int, fields: int, dim: int) -> float:
    """Per rank and step, table-wise TorchRec: of its B/N rows' F pooled vectors, (N-1)/N come from other ranks
    (forward) and as many gradients go back (backward); the ids (int64) and lengths (int32) go out first."""
    remote = (ranks - 1) / ranks
    rows = batch / ranks
    return rows * fields * remote * (2 * dim * 4 + 8 + 4)


def row_wise_bytes(batch: int, ranks: int, fields: int, dim: int) -> float:
    """Per rank and step, row-wise TorchRec, on the wire of a ring: every rank pools the ids of all B rows that
    fall in its rows of each table, a reduce-scatter sums those partial vectors into each rank's B/N rows
    (forward) and an all-gather sends their gradients back (backward), (N-1)/N of B x F vectors each way; first
    the ids go to the ranks that hold their rows ((N-1)/N of them, int64) with one length per row, field and
    rank (int32)."""
    remote = (ranks - 1) / ranks
    rows = batch / ranks
    return 2 * remote * batch * fields * dim * 4 + rows * fields * (remote * 8 + (ranks - 1) * 4)


def report(args, results: list) -> None:
    print(f"HAMUR-MLP (preset movielens, {args.mode} mode) on {args.movielens or args.aliccp or 'synthetic data'}, global batch "
          f"{args.batch}, CPU, gloo; "
          f"{args.steps} timed steps after {args.warmup}\n")
    print("| processes x threads | step ms | rows/s | vs 1 process, 1 thread |")
    print("|---|---|---|---|")
    base = results[0]["rows_per_s"]
    for r in results:
        print(f"| {r['processes']} x {r['threads']} | {r['step_ms']:.1f} | {r['rows_per_s']:,.0f} | "
              f"{r['rows_per_s'] / base:.2f}x |")
    print("\nData loading per rank (load_sharded), seconds and peak resident MiB while loading (imports included). "
          "Fitted: rank 0 fits the feature map on every training row, the others wait for it, then read and "
          "encode only their shard; given (a resume): every rank reads and encodes only its shard.\n")
    print("| processes x threads | feature map | rank 0: s | rank 0: MiB | other ranks: s | other ranks: MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for how, ranks in r["loading"].items():
            (seconds, peak), others = ranks[0], ranks[1:]
            print(f"| {r['processes']} x {r['threads']} | {how} | {seconds:.2f} | {peak:,.0f} | "
                  f"{', '.join(f'{s:.2f}' for s, _ in others) or '-'} | "
                  f"{', '.join(f'{m:,.0f}' for _, m in others) or '-'} |")
    two = next(r for r in results if r["processes"] == 2)
    fields, dim = two["fields"], two["embed_dim"]
    table_bytes = two["table_params"] * 4
    print(f"\nParameters: {two['dense_params']:,} dense (the model), {two['table_params']:,} in embedding tables "
          f"({fields} fields x dim {dim}).")
    print("\nBytes per rank per step, 2 processes (payload handed to the collectives, measured):\n")
    print("| what | bytes | collectives |")
    print("|---|---|---|")
    print(f"| gradients (DDP all-reduce, embedding tables included) | {two['grad_bytes']:,.0f} | buckets |")
    print(f"| batch statistics: all_gather of (count, mean, M2) | {two['stats_gathered']:,.0f} | "
          f"{two['stats_gathers']:.0f} |")
    print(f"| batch statistics: all_reduce of the backward, rows per domain | {two['stats_reduced']:,.0f} | "
          f"{two['stats_reduces']:.0f} |")
    print(f"| of the gradients: the embedding tables' | {table_bytes:,} | - |")
    print(f"| TorchRec table-wise instead of replicated tables: embedding all-to-all (computed) | "
          f"{embedding_all_to_all_bytes(args.batch, 2, fields, dim):,.0f} | 4 |")
    print(f"| TorchRec row-wise instead: ids all-to-all, pooled reduce-scatter and gradient all-gather (computed, "
          f"wire) | {row_wise_bytes(args.batch, 2, fields, dim):,.0f} | 4 |")

    ranks = 8
    dense_bytes = two["dense_params"] * 4
    ring = 2 * (ranks - 1) / ranks  # ring all-reduce: bytes on the wire per byte of payload, per rank
    statistics_wire = two["stats_gathered"] * (ranks - 1) + two["stats_reduced"] * ring
    alltoall = embedding_all_to_all_bytes(args.batch * ranks, ranks, fields, dim)
    one_gpu_rows = args.batch / args.gpu_step_ms * 1e3
    print(f"\nProjection, 8 GPUs, {args.batch} rows per GPU (global batch {args.batch * ranks}), from a single-GPU "
          f"step of {args.gpu_step_ms} ms ({one_gpu_rows:,.0f} rows/s):\n")
    print("| setup | wire bytes per rank per step | comms ms (NVLink / IB) | step ms, no overlap (NVLink / IB) | "
          "rows/s, 8 GPUs (NVLink / IB) | vs 8 x 1 GPU |")
    print("|---|---|---|---|---|---|")
    collectives = two["stats_gathers"] + two["stats_reduces"]
    latency_ms = collectives * SMALL_COLLECTIVE_US / 1e3
    for name, wire in (("DDP, tables replicated", ring * (dense_bytes + table_bytes)),
                       ("DDP dense + TorchRec table-wise", ring * dense_bytes + alltoall),
                       ("DDP dense + TorchRec row-wise", ring * dense_bytes
                        + row_wise_bytes(args.batch * ranks, ranks, fields, dim))):
        total = wire + statistics_wire
        comms = [total / (bandwidth * 1e9) * 1e3 + latency_ms for bandwidth in (NVLINK_BUS_GBPS, INFINIBAND_GBPS)]
        steps = [args.gpu_step_ms + c for c in comms]
        rows = [ranks * args.batch / s * 1e3 for s in steps]
        print(f"| {name} | {total:,.0f} | {comms[0]:.2f} / {comms[1]:.2f} | {steps[0]:.1f} / {steps[1]:.1f} | "
              f"{rows[0]:,.0f} / {rows[1]:,.0f} | {rows[0] / (ranks * one_gpu_rows):.2f} / "
              f"{rows[1] / (ranks * one_gpu_rows):.2f} |")
    print(f"\nAssumed: NCCL bus bandwidth {NVLINK_BUS_GBPS:.0f} GB/s in an NVLink node, {INFINIBAND_GBPS:.0f} GB/s "
          f"per GPU over 400 Gb/s InfiniBand, {SMALL_COLLECTIVE_US:.0f} us per small statistics collective "
          f"({collectives:.0f} per step, latency-bound, on the critical path). DDP overlaps the "
          "gradient all-reduce with the backward, so the no-overlap step is an upper bound. Tables this small are "
          "cheaper replicated; TorchRec pays off once the tables' gradients outweigh the all-to-all.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mode", choices=["paper", "released"], default="paper")
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic rows (without --movielens)")
    parser.add_argument("--movielens", help="a MovieLens-1M directory (or merged CSV) instead of synthetic data")
    parser.add_argument("--aliccp", help="a directory of Ali-CCP CSV files (ali_ccp_train.csv ...) instead")
    parser.add_argument("--gpu-step-ms", type=float, default=17.7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = [launch(args, 1, 1), launch(args, 1, 2), launch(args, 2, 1)]
    report(args, results)


if __name__ == "__main__":
    main()
