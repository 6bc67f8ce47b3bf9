"""Is a model hurt by its eval-time (running) normalisation statistics, or by what it learned in training?

    python benchmarks/split_statistics_check.py runs/ml1m_tower_norm/runs/tower_norm=domain/seed*/checkpoint.pt

For each checkpoint: validation AUC in eval mode (running statistics), and with every batch-statistics
normalisation standardising by the statistics of the WHOLE validation split instead (train-mode forward
of the split as one batch, running statistics left as they are): exact population statistics per
domain (for tower_norm="domain", 2.5k-4.7k rows per domain on the ML-1M sample). Equal AUCs mean the
running statistics are not the problem.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hamur_fast.data import load_dataset  # noqa: E402
from hamur_fast.train import experiment as ex  # noqa: E402
from hamur_fast.train.metrics import domain_metrics  # noqa: E402


def main(paths) -> int:
    torch.set_num_threads(1)
    print("| checkpoint | val AUC, running statistics | val AUC, statistics of the whole val split |\n|---|---|---|")
    for path in paths:
        trainer, payload = ex.load_trained(path, "cpu")
        data = load_dataset(ex.recorded_data(payload, path), feature_map=trainer.feature_map)
        split = data.val
        running = trainer.evaluate(split)["auc"]
        model = trainer.model.train()
        for module in model.modules():
            if hasattr(module, "momentum"):
                module.momentum = 0.0  # train-mode statistics without moving the running ones
        with torch.no_grad():
            prob = model(next(split.batches(len(split)))).numpy()
        whole = domain_metrics(split.label.numpy(), prob, split.domain.numpy(), trainer.feature_map.num_domains)
        print(f"| {path} | {running:.4f} | {whole['auc']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
