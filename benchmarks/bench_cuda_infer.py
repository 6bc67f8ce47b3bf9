"""Eval-mode adapter cell latency on the GPU at batch 1..512: backend "cuda" (the whole cell in one launch,
DomainNorm folded from the running statistics) against "triton" and "torch".

    python benchmarks/bench_cuda_infer.py                    # batches 1 2 4 ... 512, h=128 k=35 s=32 D=3, fp32
    python benchmarks/bench_cuda_infer.py --batch 1 64 --replays 2000

Each provider's call (hf.ops.hyper_adapter, eval with running statistics, under torch.no_grad) is
captured once in a CUDA graph; the graph is replayed --replays times between two CUDA events, and the
time per call is elapsed / replays, graph launch included. Before timing, every provider's output is
compared with backend="torch" (max relative error printed; above 1e-5 the script fails). Needs CUDA.
"""
from __future__ import annotations

import argparse
import sys

import torch

import hamur_fast as hf
from timing import failure

GOAL_US = 15.0


def make_inputs(batch, width, rank, bottleneck, domains, device):
    torch.manual_seed(batch)
    x = torch.randn(batch, width, device=device)
    rep = torch.relu(torch.randn(batch, rank, rank, device=device))
    domain = torch.randint(0, domains, (batch,), device=device)
    params = [torch.randn(domains, width, rank, device=device) * width ** -0.5,
              torch.randn(domains, rank, bottleneck, device=device) * rank ** -0.5,
              torch.randn(domains, bottleneck, device=device) * 0.1,
              torch.randn(domains, bottleneck, rank, device=device) * bottleneck ** -0.5,
              torch.randn(domains, rank, width, device=device) * rank ** -0.5,
              torch.randn(domains, width, device=device) * 0.1,
              1 + 0.1 * torch.randn(domains, width, device=device), 0.1 * torch.randn(domains, width, device=device)]
    stats = [0.1 * torch.randn(domains, width, device=device), 0.5 + torch.rand(domains, width, device=device)]
    return x, rep, domain, params, stats


def cell_call(backend, inputs):
    x, rep, domain, params, stats = inputs

    def call():
        return hf.ops.hyper_adapter(x, rep, domain, *params, *stats, training=False, backend=backend)
    return call


def graph_time_us(call, replays):
    """Microseconds per call of ``call`` replayed as a captured CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the graph (kernel compilation, allocator)
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rank", type=int, default=35)
    parser.add_argument("--bottleneck", type=int, default=32)
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--replays", type=int, default=1000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_infer: needs a CUDA device")
    if "cuda" not in hf.available_backends():
        sys.exit(f"bench_cuda_infer: backend 'cuda' not built (available: {hf.available_backends()})")
    hf.set_value_checks(False)  # as on a serving path: no domain-id read-back (a host sync) inside a timed call
    device = torch.device("cuda")
    providers = [name for name in ("cuda", "triton", "torch") if name in hf.available_backends()]
    print(f"# bench_cuda_infer: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"h={args.width} k={args.rank} s={args.bottleneck} D={args.domains}, fp32, eval, graph-captured, "
          f"{args.replays} replays")
    print(f"{'batch':>6} " + " ".join(f"{name + ' us':>10}" for name in providers) + f" {'cuda rel err':>13}  goal")
    failed = False
    with torch.no_grad():
        for batch in args.batch:
            inputs = make_inputs(batch, args.width, args.rank, args.bottleneck, args.domains, device)
            expected = cell_call("torch", inputs)().double()
            errors, times, broken = {}, {}, {}
            for name in providers:
                try:  # one provider failing must not lose the others' columns
                    got = cell_call(name, inputs)().double()
                    errors[name] = ((got - expected).abs().max() / expected.abs().max()).item()
                    times[name] = graph_time_us(cell_call(name, inputs), args.replays)
                except Exception as err:  # noqa: BLE001 - printed as FAILED with its reason
                    broken[name] = failure(err)
            met = "cuda" in times and times["cuda"] < GOAL_US and all(times["cuda"] < t for n, t in times.items()
                                                                      if n != "cuda")
            print(f"{batch:>6} " + " ".join(f"{times[name]:10.2f}" if name in times else f"{'FAILED':>10}"
                                            for name in providers)
                  + f" {errors.get('cuda', float('nan')):13.1e}  {'met' if met else 'NOT met'} (< {GOAL_US:g} us and "
                    "fastest)")
            for name, reason in broken.items():
                print(f"       {name} FAILED {reason}")
            failed |= any(e > 1e-5 for e in errors.values()) or bool(broken)
    if failed:
        sys.exit("bench_cuda_infer: a provider failed, or its output differs from backend='torch' by more than 1e-5")


if __name__ == "__main__":
    main()
