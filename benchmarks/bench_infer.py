"""Inference latency per call, p50 and p99: the released model vs ours eager vs the Predictor.

    python benchmarks/bench_infer.py                       # batches 1 8 64 512 4096
    python benchmarks/bench_infer.py --calls 50 --batch 1 64

MovieLens MLP configuration (F=113, towers 256-128, hyper [64], k=35, D=3), all in eval mode with
settled BatchNorm statistics, inputs already on the device. Each call is timed alone (synchronised
on CUDA; the providers take turns call by call); the table gives the median (p50) and 99th
percentile (p99) in microseconds. The released model returns NaN at batch 1 (its DomainNorm takes
the unbiased variance of one row); its time is still what the released code spends.
Providers:
- "released eager": hamur_fast.compat.ReleasedMLP under torch.inference_mode (the released loop:
  every tower and the hyper-network once per domain on the whole batch);
- "ours eager": hf.models.HAMUR (paper mode, backend "auto") under torch.inference_mode;
- "Predictor": hamur_fast.inference.Predictor of the same model (folded; on CUDA one graph per
  batch bucket, the inputs padded to the next bucket).
"""
from __future__ import annotations

import argparse
import platform
import warnings

import torch

import hamur_fast as hf
from hamur_fast.compat import ReleasedMLP
from timing import failure, take_turns

INPUT_DIM, DOMAINS = 113, 3
SIZES = dict(dims=[256, 128], hyper_dims=[64], rank=35)
BATCHES = (1, 8, 64, 512, 4096)


def settle(model):
    """Run a few training batches so BatchNorm running statistics are realistic, then eval."""
    torch.manual_seed(0)
    device = next(model.parameters()).device
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(512, INPUT_DIM, device=device), torch.randint(0, DOMAINS, (512,), device=device))
    return model.eval()


def providers(device):
    """(label, fn(e, domain) -> probabilities, or the error text when it could not be built), on ``device``."""
    torch.manual_seed(0)

    def eager(model):
        def run(e, domain):
            with torch.inference_mode():
                return model(e, domain)
        return run

    def released():
        return eager(settle(ReleasedMLP(INPUT_DIM, DOMAINS, SIZES["dims"], SIZES["hyper_dims"],
                                        SIZES["rank"]).to(device)))

    def ours():
        return settle(hf.models.HAMUR(INPUT_DIM, DOMAINS, backbone="mlp", **SIZES).to(device))

    rows = []
    for label, build in (("released eager", released), ("ours eager", lambda: eager(ours())),
                         ("Predictor", lambda: hf.inference.Predictor(ours(), device, batch_buckets=BATCHES).predict)):
        try:  # one provider failing must not lose the others' rows
            rows.append((label, build()))
        except Exception as err:  # noqa: BLE001 - printed as a FAILED row with its reason
            rows.append((label, failure(err)))
    return rows


def percentiles_us(fns, inputs, device, calls, warmup):
    """(p50, p99) per function, or its error text; the functions take turns call by call, so load from other
    processes hits all of them alike."""
    ready = []
    for fn in fns:
        try:
            for _ in range(warmup):
                fn(*inputs)
            ready.append(fn)
        except Exception as err:  # noqa: BLE001
            ready.append(failure(err))
    timed = take_turns([fn for fn in ready if not isinstance(fn, str)], inputs, device, calls)
    results = []
    for fn in ready:
        samples = fn if isinstance(fn, str) else timed.pop(0)
        results.append(samples if isinstance(samples, str) else
                       (_percentile([t * 1e6 for t in samples], 0.5), _percentile([t * 1e6 for t in samples], 0.99)))
    return results


def _percentile(samples, q):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def calls_for(batch, args):
    """Fewer calls for big batches on the CPU, where one call takes a long time."""
    return max(5, args.calls // 10) if batch >= 4096 and args.device == "cpu" else args.calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier numbers on busy cores)")
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--calls", type=int, default=200, help="timed calls per batch and provider")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # The released DomainNorm at batch 1 warns (unbiased variance of one row); the timing is the point here.
    warnings.filterwarnings("ignore", message="var\\(\\): degrees of freedom")
    hf.set_value_checks(False)  # as on a serving path: no domain-id read-back (a host sync) inside a timed call
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_infer: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"F={INPUT_DIM} towers {SIZES['dims']} hyper {SIZES['hyper_dims']} k={SIZES['rank']} D={DOMAINS}, "
          f"backends {hf.available_backends()}")
    rows = providers(device)
    print("\nlatency per call, microseconds (p50 / p99); speed-up of p50 vs released eager")
    print(f"{'batch':>6} {'provider':16} {'p50 us':>10} {'p99 us':>10} {'speed-up':>9}")
    g = torch.Generator().manual_seed(1)
    predictor_p99 = {}
    for batch in args.batch:
        inputs = (torch.randn(batch, INPUT_DIM, generator=g).to(device),
                  torch.randint(0, DOMAINS, (batch,), generator=g).to(device))
        built = [(label, fn) for label, fn in rows if not isinstance(fn, str)]
        results = dict(zip([label for label, _ in built],
                           percentiles_us([fn for _, fn in built], inputs, device, calls_for(batch, args), args.warmup)))
        base = results.get("released eager")
        base = base[0] if isinstance(base, tuple) else float("nan")
        for label, fn in rows:
            result = fn if isinstance(fn, str) else results[label]
            if isinstance(result, str):
                print(f"{batch:6d} {label:16} FAILED {result}")
                continue
            p50, p99 = result
            print(f"{batch:6d} {label:16} {p50:10.1f} {p99:10.1f} {base / p50:8.1f}x")
            if label == "Predictor":
                predictor_p99[batch] = p99
    if device.type == "cuda":  # the serving goal (reported; it fails nothing)
        small = {b: p99 for b, p99 in predictor_p99.items() if b <= 512}
        worst = max(small.values(), default=float("nan"))
        print(f"\ngoal: Predictor p99 < 150 us for batches up to 512: worst {worst:.1f} us "
              f"({'met' if worst < 150 else 'NOT met'})")


if __name__ == "__main__":
    main()
