"""What a run says as it goes, as torch-rechub, FuxiCTR and RecBole users expect: a data summary at the start,
one line per epoch, the early-stopping decision and the final test table.

Lines go to the ``hamur_fast`` logger. The command line shows them on the console (``--quiet``: the final
table only, see :func:`console`), and every run directory keeps them in ``train.log`` (:func:`run_log`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("hamur_fast")
RESULT = logging.INFO + 5  # a final table: shown under --quiet too
logging.addLevelName(RESULT, "RESULT")
LOG_NAME = "train.log"
MANY_DOMAINS = 8  # above this, per-domain lists are summarised (smallest, median, largest)
RARE_FRACTION = 0.1  # "rare domains": the smallest 10% by training rows (at least one)


def rare_domains(train_counts: list) -> list:
    """The smallest ``RARE_FRACTION`` of the domains by training rows, at least one, smallest first."""
    order = np.argsort(np.asarray(train_counts), kind="stable")
    return [int(d) for d in order[:max(1, round(RARE_FRACTION * len(train_counts)))]]


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is at the time (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


_CONSOLE = _Stdout()
_CONSOLE.setFormatter(logging.Formatter("%(message)s"))


def console(quiet: bool) -> None:
    """Show the run's lines on stdout (once, however often it is called); ``quiet``: the final tables only."""
    _CONSOLE.setLevel(RESULT if quiet else logging.INFO)
    log.setLevel(logging.INFO)
    if _CONSOLE not in log.handlers:
        log.addHandler(_CONSOLE)


@contextlib.contextmanager
def run_log(run_dir):
    """Every line logged meanwhile also goes to ``run_dir/train.log`` (appended: a resume continues it)."""
    if run_dir is None:
        yield
        return
    handler = logging.FileHandler(Path(run_dir) / LOG_NAME, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


def _counts(counts: list) -> str:
    if len(counts) <= MANY_DOMAINS:
        return ", ".join(f"d{d} {n:,}" for d, n in enumerate(counts))
    order = np.argsort(counts, kind="stable")
    smallest, median, largest = (int(order[i]) for i in (0, len(order) // 2, -1))
    return (f"smallest d{smallest} {counts[smallest]:,}, median {counts[median]:,}, "
            f"largest d{largest} {counts[largest]:,}")


def data_summary(data, min_domain_rows: int) -> str:
    """Rows per split and per domain, positive rates, fields and vocabulary sizes; which domains are too small
    in val/test for a per-domain AUC."""
    fmap = data.feature_map
    d = fmap.num_domains
    lines = [f"data: {d} domains, {len(fmap.sparse_fields)} sparse fields, {fmap.num_dense} dense fields",
             "vocabulary sizes: " + ", ".join(f"{name} {size:,}" for name, size in zip(fmap.sparse_fields, fmap.vocab_sizes))]
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        counts = split.domain_counts(d)
        line = (f"{name}: {len(split):,} rows, positive rate {split.label.float().mean().item():.3f}; "
                f"rows per domain: {_counts(counts)}")
        small = sum(n < min_domain_rows for n in counts)
        if name != "train" and small:
            line += f"; {small} domain(s) under {min_domain_rows} rows (AUC n/a)"
        lines.append(line)
    return "\n".join(lines)


def _domain_aucs(metrics: dict, prefix: str) -> dict:
    return {int(key[len(prefix) + len("auc_d"):]): value for key, value in metrics.items()
            if key.startswith(prefix + "auc_d")}


def extremes(metrics: dict, prefix: str = "") -> str:
    """"worst d2 0.6100, best d0 0.7500" over the domains with an AUC, and how many have none."""
    aucs = _domain_aucs(metrics, prefix)
    defined = sorted((auc, d) for d, auc in aucs.items() if math.isfinite(auc))
    text = f"worst d{defined[0][1]} {defined[0][0]:.4f}, best d{defined[-1][1]} {defined[-1][0]:.4f}" if defined else ""
    missing = len(aucs) - len(defined)
    if missing:
        text += f"{'; ' if text else ''}{missing} domain(s) n/a"
    return text


def epoch_line(record: dict, epochs: int, best_auc: float, best_epoch: int) -> str:
    """One epoch: train loss, val AUC (overall, worst and best domain), time, throughput, best so far."""
    domains = extremes(record, "val_")
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}  "
            f"val AUC {record['val_auc']:.4f}{f' ({domains})' if domains else ''}  "
            f"{record['seconds']:.1f} s, {record['rows_per_s']:,.0f} rows/s  "
            f"best {best_auc:.4f} (epoch {best_epoch})")


def stop_line(epoch: int, epochs: int, bad_epochs: int, patience: int, best_auc: float, best_epoch: int) -> str:
    if bad_epochs >= patience:
        why = (f"early stopping after epoch {epoch}: no better validation AUC for {bad_epochs} epochs "
               f"(train.patience={patience})")
    else:
        why = f"finished {epoch} epochs (train.epochs={epochs})"
    return f"{why}; best epoch {best_epoch} (val AUC {best_auc:.4f}): its weights are kept"


def metrics_table(metrics: dict, title: str, min_domain_rows: int | None = None) -> str:
    """Markdown: overall and per domain AUC, logloss and rows; a domain without an AUC reads "n/a"."""
    lines = [f"{title}:", "| domain | AUC | logloss | rows |", "|---|---|---|---|"]
    missing = 0
    for suffix in ["", *sorted((k.removeprefix("auc") for k in metrics if k.startswith("auc_d")),
                               key=lambda s: int(s.removeprefix("_d")))]:
        missing += bool(suffix) and not math.isfinite(metrics["auc" + suffix])
        lines.append(f"| {suffix.lstrip('_') or 'overall'} | {_number(metrics['auc' + suffix])} | "
                     f"{_number(metrics['logloss' + suffix])} | {metrics['rows' + suffix]:,} |")
    if missing:
        under = f"fewer than {min_domain_rows} rows or " if min_domain_rows else ""
        lines.append(f"\n{missing} domain(s) without an AUC (n/a: {under}one class in the split)")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"
