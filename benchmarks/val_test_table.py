"""Validation AND test AUC per domain, mean ± std over seeds, from the run directories that ``compare`` and
``sweep`` write (``<output>/runs/<label>/seed<k>/metrics.json`` and ``test_metrics.json``).

    python benchmarks/val_test_table.py runs/ml1m_tower_norm runs/ml1m_tower_norm_hamur [--mark "tower_norm=whole"]
    python benchmarks/val_test_table.py --by-value runs/ml1m_tower_norm runs/synthetic_tower_norm ...

``--by-value`` prints instead one row per swept value (the label after "="): its mean validation AUC in each
output directory and the mean over the directories (over those that have it for every directory).

The validation figures are those of each run's best epoch (the epoch whose weights were restored and
tested), the numbers a default is chosen by; the test figures are reported, never chosen on.
``--mark`` appends " (default)" to the rows whose label contains the given text.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hamur_fast.train.experiment import RunResult, format_table, summarize  # noqa: E402


def load_runs(output: Path) -> dict:
    """label -> ([val RunResult per seed], [test RunResult per seed]), in the order the runs were made."""
    runs = {}
    for seed_dir in sorted(output.glob("runs/*/seed*"), key=lambda p: (p / "metrics.json").stat().st_mtime):
        if not (seed_dir / "test_metrics.json").is_file():
            continue  # a run still in progress
        history = json.loads((seed_dir / "metrics.json").read_text())
        test = json.loads((seed_dir / "test_metrics.json").read_text())
        best = max(history, key=lambda row: row["val_auc"])  # the first best: what early stopping restored
        val = {k[len("val_"):]: v for k, v in best.items() if k.startswith("val_")}
        seed, seconds = int(seed_dir.name[len("seed"):]), sum(row["seconds"] for row in history)
        label = seed_dir.parent.name
        pair = runs.setdefault(label, ([], []))
        pair[0].append(RunResult(label, seed, val, history, best["epoch"], seconds, seed_dir))
        pair[1].append(RunResult(label, seed, test, history, best["epoch"], seconds, seed_dir))
    return runs


def by_value_table(outputs: list) -> str:
    means = {}  # value -> {output: mean validation AUC}
    for output in outputs:
        for label, (val, _) in load_runs(output).items():
            value = label.split("=", 1)[-1]
            means.setdefault(value, {})[output.name] = sum(r.test["auc"] for r in val) / len(val)
    names = [output.name for output in outputs]
    lines = ["| value | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
    for value, row in means.items():
        cells = [f"{row[n]:.4f}" if n in row else "-" for n in names]
        mean = f"{sum(row.values()) / len(row):.5f}" if len(row) == len(names) else "-"
        lines.append(f"| {value} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="compare/sweep output directories")
    parser.add_argument("--mark", help="label text of the chosen default's rows")
    parser.add_argument("--by-value", action="store_true", help="mean validation AUC per swept value")
    args = parser.parse_args(argv)
    if args.by_value:
        print(by_value_table(args.outputs))
        return 0
    val_rows, test_rows, domains = {}, {}, None
    for output in args.outputs:
        written = output.glob("*.json")  # compare.json or sweep_<param>.json, once the runs are done
        domains = domains or next((json.loads(p.read_text()).get("domains") for p in written), None)
        for label, (val, test) in load_runs(output).items():
            name = f"{output.name}: {label}" + (" (default)" if args.mark and args.mark in f"{output.name}: {label}"
                                                  else "")
            val_rows[name], test_rows[name] = summarize(val), summarize(test)
    if not val_rows:
        raise SystemExit("no runs found under " + ", ".join(map(str, args.outputs)))
    domains = domains or [f"d{d}" for d in range(sum(k.startswith("auc_d") for k in next(iter(val_rows.values()))))]
    print("Validation AUC (best epoch), mean ± std over seeds:\n")
    print(format_table(val_rows, domains, first_column="run"))
    print("\nTest AUC (same runs), mean ± std over seeds:\n")
    print(format_table(test_rows, domains, first_column="run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
