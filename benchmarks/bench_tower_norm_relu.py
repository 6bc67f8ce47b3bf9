"""The released towers' BatchNorm1d + ReLU, forward+backward: the ATen form against the fused C++ CPU op.

    python benchmarks/bench_tower_norm_relu.py                  # B=2048, 1 thread, the MovieLens towers (D=3, 256-128)
    python benchmarks/bench_tower_norm_relu.py --repeats 61
    python benchmarks/bench_tower_norm_relu.py --step       # also the whole released training step, op on and off

Both providers run ``DomainBatchNorm1d`` in training mode on the same z (D, B, C) in this one run, taking turns call
by call: "aten" = ``relu(all_domains(z))`` (z permuted to (B, D*C), F.batch_norm, relu), "fused" =
``all_domains_relu(z)`` (hamur_fast.ops.tower_norm_relu). A call is the forward and the gradients of z, weight and
bias. With ``--step``, a second table: benchmarks/bench_train.py's released-mode training step of ours (backend
"auto", B rows), with the fused op ("fused") and without it ("aten": the op switched off, the layers then run
their ATen form), taking turns step by step in this process. A call's time is the calling thread's CPU time
(``time.thread_time``: on cores shared with other processes it moves less than wall time; with ``--threads`` above 1
it misses the other threads' share, so judge ratios at 1 thread), the median over ``--repeats`` calls. The first
tower layer's z is a view of the (B, D*C) product the towers' first GEMM writes ("side by side"); a deeper layer's
is a (D, B, C) tensor.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hamur_fast.nn.domain_layers import DomainBatchNorm1d  # noqa: E402
from hamur_fast.ops import tower_norm_relu  # noqa: E402
from timing import machine  # noqa: E402

PROVIDERS = {"aten": lambda layer, z: torch.relu(layer.all_domains(z)), "fused": DomainBatchNorm1d.all_domains_relu}


def make_z(towers, batch, width, side_by_side, generator):
    if side_by_side:
        return torch.randn(batch, towers, width, generator=generator).transpose(0, 1)
    return torch.randn(towers, batch, width, generator=generator)


def one_call(forward, layer, z, grad_y):
    y = forward(layer, z)
    torch.autograd.grad(y, (z, layer.weight, layer.bias), grad_y)


def bench_layer(towers, batch, width, side_by_side, repeats):
    """{provider: median thread-CPU ms} of forward+backward, the providers alternating call by call."""
    generator = torch.Generator().manual_seed(0)
    z = make_z(towers, batch, width, side_by_side, generator).requires_grad_()
    grad_y = torch.randn(towers, batch, width, generator=generator)
    layer = DomainBatchNorm1d(width, towers)
    samples = {name: [] for name in PROVIDERS}
    for _ in range(2):  # warm-up
        for forward in PROVIDERS.values():
            one_call(forward, layer, z, grad_y)
    for _ in range(repeats):
        for name, forward in PROVIDERS.items():
            start = time.thread_time()
            one_call(forward, layer, z, grad_y)
            samples[name].append(time.thread_time() - start)
    return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


def bench_step(batch, repeats):
    """{provider: median thread-CPU ms} of one released training step, the fused op on and off step by step."""
    import bench_train

    try:
        return bench_train.time_released_step(batch, repeats, PROVIDERS,
                                               lambda name: setattr(tower_norm_relu, "AVAILABLE", name == "fused"),
                                               time.thread_time)
    finally:
        tower_norm_relu.AVAILABLE = True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 128], help="the towers' widths, first to last")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--step", action="store_true", help="also time the released training step, op on and off")
    args = parser.parse_args(argv)
    if not tower_norm_relu.AVAILABLE:
        sys.exit("hamur_fast._C has no compiled_tower_norm_relu_forward: build it with "
                 "pip install --no-build-isolation -e .")
    torch.set_num_threads(args.threads)
    print(f"# bench_tower_norm_relu: {machine(args.threads)}")
    print(f"B={args.batch} D={args.domains}: BatchNorm1d + ReLU forward+backward, median thread-CPU ms of "
          f"{args.repeats} alternating calls")
    print(f"{'layer':<28}{'aten ms':>10}{'fused ms':>10}{'fused/aten':>12}")
    for depth, width in enumerate(args.dims):
        side_by_side = depth == 0
        times = bench_layer(args.domains, args.batch, width, side_by_side, args.repeats)
        label = f"C={width} " + ("(side by side)" if side_by_side else "(D, B, C)")
        print(f"{label:<28}{times['aten']:>10.3f}{times['fused']:>10.3f}{times['fused'] / times['aten']:>12.3f}")
    if args.step:
        times = bench_step(args.batch, args.repeats)
        print(f"{'released training step':<28}{times['aten']:>10.3f}{times['fused']:>10.3f}"
              f"{times['fused'] / times['aten']:>12.3f}")


if __name__ == "__main__":
    main()
