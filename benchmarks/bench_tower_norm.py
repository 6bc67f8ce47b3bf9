"""Training-step time of the MLP backbone's tower_norm variants, side by side (what each costs per step).

    python benchmarks/bench_tower_norm.py [--batch 1024] [--calls 30] [--model mlp|hamur_mlp] [--device cpu] [--threads 1]

MovieLens sizes (F=113, towers 256-128, D=3; hamur_mlp adds the adapter cell and hyper-network), Adam;
the variants take turns step by step (benchmarks/timing.py), so load from other processes hits all alike.
Prints the median step time and its ratio to tower_norm="domain" and to the released mode.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hamur_fast as hf  # noqa: E402
from hamur_fast.models.backbones import TOWER_NORMS  # noqa: E402
from timing import take_turns  # noqa: E402

INPUT_DIM, DOMAINS = 113, 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--model", default="mlp", choices=["mlp", "hamur_mlp"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (busy shared cores: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    e = torch.randn(args.batch, INPUT_DIM, device=device)
    domain = torch.multinomial(torch.tensor([0.21, 0.395, 0.395]), args.batch, replacement=True).to(device)
    label = torch.randint(0, 2, (args.batch,), device=device).float()
    variants = {f"tower_norm={name}": dict(tower_norm=name) for name in TOWER_NORMS}
    variants["mode=released"] = dict(mode="released")
    steps = []
    for options in variants.values():
        model = hf.models.build(args.model, INPUT_DIM, DOMAINS, preset="movielens", **options).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(e, domain, label, model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.binary_cross_entropy_with_logits(model.logits(e, domain), label).backward()
            optimizer.step()
        step(e, domain, label)  # warm-up
        steps.append(step)
    samples = take_turns(steps, (e, domain, label), device, args.calls)
    medians = [statistics.median(s) for s in samples]
    base, released = medians[0], medians[-1]
    print(f"# bench_tower_norm: {args.model}, {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"B={args.batch}, F={INPUT_DIM}, towers [256, 128], D={DOMAINS}, median of {args.calls} steps")
    print("| variant | step ms | vs tower_norm=domain | vs released mode |\n|---|---|---|---|")
    for name, median in zip(variants, medians):
        print(f"| {name} | {median * 1e3:.2f} | {median / base:.2f}x | {median / released:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
