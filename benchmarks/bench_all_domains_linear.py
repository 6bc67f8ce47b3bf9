"""Every domain's linear layer on its own slice, forward+backward: baddbmm, torch.compile of it, and the per-domain
GEMM loop of hamur_fast.ops.all_domains_linear.

    python benchmarks/bench_all_domains_linear.py                 # B=2048, 2 threads, the MovieLens towers
    python benchmarks/bench_all_domains_linear.py --threads 1 --step   # also the released training step, loop on/off

Providers on the same x (D, B, in) in this one run, taking turns call by call: "baddbmm" (one batched call, the
form before the loop, and the one CUDA and the compilers take), "compiled" (torch.compile of that form, unless
``--no-compile``), "loop" (``all_domains_linear``: one addmm/mm per domain into slices of one output, forward and
backward). A call is the forward and the gradients of x, weight and bias; its time is wall time (the loop's point
is how the D products share the threads), the median over ``--repeats`` calls. The layers: the released towers'
second layer (256 -> 128, x (D, B, 256) as the fused tower norm writes it: side by side) and the logit layer
(128 -> 1). With ``--step``, benchmarks/bench_train.py's released training step of ours with the loop on and off
(off: every layer takes the baddbmm form), step by step in this process.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hamur_fast.ops import all_domains_linear as op  # noqa: E402
from timing import machine, take_turns  # noqa: E402


def providers(compile_too: bool) -> dict:
    found = {"baddbmm": op.batched_form}
    if compile_too:
        found["compiled"] = torch.compile(op.batched_form)
    found["loop"] = op.all_domains_linear  # on the CPU in eager mode: PerDomainGemms
    return found


def bench_layer(domains, batch, fan_in, fan_out, repeats, forms):
    """{provider: median wall ms, or the error text of a provider that raised} of forward+backward, the providers
    alternating call by call (timing.take_turns) after 3 warm-up turns (the compiler's first calls)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, domains, fan_in, generator=g).transpose(0, 1).requires_grad_()
    weight = (torch.randn(domains, fan_in, fan_out, generator=g) * fan_in ** -0.5).requires_grad_()
    bias = torch.randn(domains, fan_out, generator=g).requires_grad_()
    grad_out = torch.randn(domains, batch, fan_out, generator=g)
    calls = [lambda form=form: torch.autograd.grad(form(x, weight, bias), (x, weight, bias), grad_out)
             for form in forms.values()]
    cpu = torch.device("cpu")
    take_turns(calls, (), cpu, 3)
    samples = take_turns(calls, (), cpu, repeats)
    return {name: times if isinstance(times, str) else 1e3 * statistics.median(times)
            for name, times in zip(forms, samples)}


def bench_step(batch, repeats):
    """{"baddbmm"|"loop": median wall ms} of one released training step, the loop on and off step by step."""
    import bench_train

    applies = op.applies
    try:
        return bench_train.time_released_step(
            batch, repeats, ("baddbmm", "loop"),
            lambda name: setattr(op, "applies", applies if name == "loop" else (lambda *args: False)), time.perf_counter)
    finally:
        op.applies = applies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--step", action="store_true", help="also time the released training step, loop on and off")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# bench_all_domains_linear: {machine(args.threads)}")
    print(f"B={args.batch} D={args.domains}: linear forward+backward on x (D, B, in), median wall ms of "
          f"{args.repeats} alternating calls; ratio = provider / loop")
    forms = providers(not args.no_compile)
    print(f"{'layer':<14}" + "".join(f"{name + ' ms':>14}" for name in forms)
          + "".join(f"{name + '/loop':>16}" for name in forms if name != "loop"))
    for fan_in, fan_out in ((256, 128), (128, 1)):
        times = bench_layer(args.domains, args.batch, fan_in, fan_out, args.repeats, forms)
        failed = {name: error for name, error in times.items() if isinstance(error, str)}
        if failed:
            print(f"{f'{fan_in} -> {fan_out}':<14}FAILED " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
            continue
        print(f"{f'{fan_in} -> {fan_out}':<14}" + "".join(f"{t:>14.3f}" for t in times.values())
              + "".join(f"{times[name] / times['loop']:>16.2f}" for name in forms if name != "loop"))
    if args.step:
        times = bench_step(args.batch, args.repeats)
        print(f"released training step: baddbmm {times['baddbmm']:.2f} ms, loop {times['loop']:.2f} ms, "
              f"baddbmm/loop {times['baddbmm'] / times['loop']:.3f}")


if __name__ == "__main__":
    main()
