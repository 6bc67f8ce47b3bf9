"""Run-to-run reproducibility of a training step, and what deterministic algorithms cost.

For each backend and thread count: the same HAMUR-MLP (MovieLens sizes) takes the same forward+backward
``--repeats`` times on the same batch, with fresh allocations in between; the table gives the largest
difference of any gradient from the first repeat (0 = reproducible), with
``torch.use_deterministic_algorithms`` off and on (as the Trainer runs by default), and the median step
time of each setting, measured in the same run, the two settings taking turns.

    python benchmarks/bench_determinism.py --batch 2048 --threads 1 2
"""
from __future__ import annotations

import argparse
import statistics

import torch

import hamur_fast as hf
from timing import take_turns


def gradients(model, e, domain) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model.logits(e.clone(), domain).sum().backward()  # the clone moves the input: another alignment
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def spread(model, e, domain, repeats: int) -> float:
    first = gradients(model, e, domain)
    return max((gradients(model, e, domain) - first).abs().max().item() for _ in range(repeats - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    backends = [b for b in hf.available_backends() if b in ("torch", "cpu")]
    print(f"| backend | threads | max grad diff, default | max grad diff, deterministic | ms/step default "
          f"| ms/step deterministic |\n|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for backend in backends:
            torch.manual_seed(0)
            model = hf.models.HAMUR(113, 3, "mlp", preset="movielens", backend=backend)
            e, domain = torch.randn(args.batch, 113), torch.randint(0, 3, (args.batch,))
            diffs = []
            for deterministic in (False, True):
                torch.use_deterministic_algorithms(deterministic, warn_only=True)
                diffs.append(spread(model, e, domain, args.repeats))

            def step(deterministic):
                torch.use_deterministic_algorithms(deterministic, warn_only=True)
                gradients(model, e, domain)

            times = take_turns([lambda: step(False), lambda: step(True)], (), torch.device("cpu"), args.repeats)
            torch.use_deterministic_algorithms(False)
            print(f"| {backend} | {threads} | {diffs[0]:.2e} | {diffs[1]:.2e} | "
                  f"{statistics.median(times[0]) * 1e3:.1f} | {statistics.median(times[1]) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
