"""Training-step cost against the number of domains: time, peak memory and FLOPs for D = 3 ... 300.

    python benchmarks/bench_domains.py                                 # GPU, or CPU with its defaults
    python benchmarks/bench_domains.py --threads 1 --repeats 3 --warmup 1 --stacked-max-domains 100

HAMUR-MLP (paper mode, MovieLens sizes: F=113, towers 256-128, hyper [64], k=35) and STAR (towers
256-128) at B=4096, one step each = forward, BCE, backward, Adam. Every per-domain product of a
model runs through the grouped per-domain linear op (hamur_fast/ops/grouped_linear.py); each row
of the table puts one of its forms under the model's layers and the torch backend's cell (:func:`form_under`):
- "segments": one GEMM per domain (reads the ids on the host; the torch backends' form on the CPU),
- "sync-free": torch._grouped_mm on sorted rows where torch has it for the dtype and device, else the
  stacked form (the torch backends' form on a GPU),
- "triton": the grouped GEMM kernel (GPU's pick; skipped on the CPU, where it runs interpreted),
- "stacked": every row against all D weights, then a gather (the pre-grouped-op GPU path, D x FLOPs),
and HAMUR's adapter cell runs on each adapter backend "auto" may pick on the device, plus "torch".
Columns: median step ms (providers take turns step by step, so a busy machine slows all alike), peak
MiB (CUDA: the allocator's peak above what the model held; CPU: bytes of live tensors one step
created), GFLOP of the step as torch.utils.flop_counter counts the ops run, and each ratio to the same
row at the smallest D. "GPU path GFLOP" is the same step on the ``meta`` device with the Triton kernel's op as the
form (shape-only): what the GPU would compute, measured without a GPU.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import unittest.mock

import torch
from torch.utils.flop_counter import FlopCounterMode

import hamur_fast as hf
from bench_layers import LiveTensorPeak
from bench_train import eager_backends, warm_up
from timing import failure, take_turns
from hamur_fast.ops import grouped_linear
from hamur_fast.train.captured_step import bce_step

INPUT_DIM, BATCH = 113, 4096
HAMUR_SIZES = dict(dims=[256, 128], hyper_dims=[64], rank=35)
LR = 1e-3


def build(model_name, num_domains, adapter_backend, device):
    torch.manual_seed(0)
    if model_name == "hamur_mlp":
        return hf.models.HAMUR(INPUT_DIM, num_domains, backbone="mlp", backend=adapter_backend,
                               **HAMUR_SIZES).to(device)
    return hf.models.build("star", INPUT_DIM, num_domains, dims=(256, 128)).to(device)


def make_batch(num_domains, device, batch=BATCH):
    g = torch.Generator().manual_seed(1)
    e = torch.randn(batch, INPUT_DIM, generator=g)
    domain = torch.randint(0, num_domains, (batch,), generator=g)
    label = torch.randint(0, 2, (batch,), generator=g).float()
    return e.to(device), domain.to(device), label.to(device)


FORMS = {"segments": grouped_linear.segments, "sync-free": grouped_linear.sync_free, "stacked": grouped_linear.stacked,
         "triton": grouped_linear.grouped_linear_kernel}


def form_under(provider):
    """The layers' grouped linear calls (``grouped_linear.run``) and the eager cell's (``torch_form``) run the form
    ``provider`` inside this block."""
    form = FORMS[provider]
    return unittest.mock.patch.multiple(grouped_linear, torch_form=form, run=lambda x, domain, weight, bias=None,
                                        backend="auto": form(x, domain.long(), weight, bias))


def step_under(provider, model):
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def step(e, domain, label):
        with form_under(provider):
            return bce_step(model, optimizer, e, domain, label)
    return step


def gpu_path_gflop(model_name, num_domains):
    """FLOPs of one forward + backward on meta with the GPU's grouped kernel as the form."""
    with torch.device("meta"):
        model = build(model_name, num_domains, "auto", "meta")
        e, label = torch.empty(BATCH, INPUT_DIM), torch.empty(BATCH)
        domain = torch.empty(BATCH, dtype=torch.long)
    with FlopCounterMode(display=False) as flops, form_under("triton"):
        torch.nn.functional.binary_cross_entropy_with_logits(model.logits(e, domain), label).backward()
    return flops.get_total_flops() / 1e9


def row_labels(model_name, num_domains, args, device):
    providers = (["triton"] if device.type == "cuda" else ["segments"]) + ["sync-free"]
    if num_domains <= args.stacked_max_domains:
        providers.append("stacked")
    backends = eager_backends(device) if model_name == "hamur_mlp" else ["-"]
    return [(backend, provider) for backend in backends for provider in providers]


def measure(model_name, num_domains, args, device):
    """Rows (adapter backend, provider, ms, peak MiB, GFLOP), and failures (label, error)."""
    inputs = make_batch(num_domains, device)
    ready, failed = [], []
    for backend, provider in row_labels(model_name, num_domains, args, device):
        try:
            step = step_under(provider, build(model_name, num_domains, "auto" if backend == "-" else backend, device))
            peak = warm_up(step, inputs, device, args.warmup)
            with FlopCounterMode(display=False) as flops, LiveTensorPeak() as tracker:
                step(*inputs)  # after the warm-up: Adam's state exists already, as in every later step
            peak = tracker.peak / 2**20 if peak is None else peak
            ready.append(((backend, provider), step, peak, flops.get_total_flops() / 1e9))
        except Exception as err:  # noqa: BLE001 - reported in the table; the other rows still run
            failed.append(((backend, provider), failure(err)))
    samples = take_turns([step for _, step, _, _ in ready], inputs, device, args.repeats)
    rows = []
    for (label, _, peak, gflop), times in zip(ready, samples):
        if isinstance(times, str):  # it raised while timed: take_turns dropped it
            failed.append((label, times))
        else:
            rows.append((*label, statistics.median(times) * 1e3, peak, gflop))
    return rows, failed


def print_table(model_name, results, gpu_flops):
    print(f"\n{model_name}, B={BATCH}: one training step; x = ratio to the same row at D={min(results)}")
    print(f"{'D':>4} {'adapter':>8} {'grouped op':>10} {'ms':>10} {'x':>6} {'peak MiB':>9} {'x':>6} "
          f"{'GFLOP':>8} {'x':>6} {'GPU path GFLOP':>15} {'x':>6}")
    first = {}
    smallest = min(results)
    for num_domains, (rows, failed) in sorted(results.items()):
        for backend, provider, ms, mib, gflop in rows:
            base = first.setdefault((backend, provider), (ms, mib, gflop))
            gpu, gpu_base = gpu_flops[num_domains], gpu_flops[smallest]
            print(f"{num_domains:4d} {backend:>8} {provider:>10} {ms:10.1f} {ms / base[0]:6.2f} {mib:9.1f} "
                  f"{mib / base[1]:6.2f} {gflop:8.2f} {gflop / base[2]:6.2f} {gpu:15.2f} {gpu / gpu_base:6.2f}")
        for (backend, provider), error in failed:
            print(f"{num_domains:4d} {backend:>8} {provider:>10} FAILED {error}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier numbers on busy cores)")
    parser.add_argument("--domains", type=int, nargs="+", default=[3, 10, 30, 100, 300])
    parser.add_argument("--models", nargs="+", default=["hamur_mlp", "star"], choices=["hamur_mlp", "star"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stacked-max-domains", type=int, default=1000,
                        help="run the stacked form only up to this D (it costs D times the work: on a CPU, "
                             "D = 300 takes minutes a step)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hf.set_value_checks(False)  # as on a serving path: no domain-id read-back (a host sync) inside a timed step
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_domains: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"B={BATCH}, F={INPUT_DIM}, adapter backends {hf.available_backends()}")
    for model_name in args.models:
        results = {d: measure(model_name, d, args, device) for d in args.domains}
        gpu_flops = {d: gpu_path_gflop(model_name, d) for d in args.domains}
        print_table(model_name, results, gpu_flops)


if __name__ == "__main__":
    main()
