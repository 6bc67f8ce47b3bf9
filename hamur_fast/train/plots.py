"""PNG plots (matplotlib, headless): learning curves, per-domain AUC by model, AUC against a swept value."""
from __future__ import annotations

import warnings

import numpy as np

from .files import atomic_path
from .report import MANY_DOMAINS, rare_domains


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)


def plot_learning_curves(history: list, path, title: str = "", train_counts: list | None = None) -> None:
    """Training loss and validation logloss (left), validation AUC overall and per domain (right; past
    MANY_DOMAINS domains: overall, worst, best and the rare domains' mean, ``train_counts`` naming the rare
    ones); with adapter diagnostics in the history (hamur_fast.train.diagnostics), a second row of three
    panels: contribution ratio, factor gradient norms (and the hyper-network's), factor shift from init."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    diagnostics = any(key.startswith("adapter") for key in history[0])
    figure, axes = plt.subplots(2 if diagnostics else 1, 2 if not diagnostics else 3,
                                figsize=(10 if not diagnostics else 14, 3.6 * (2 if diagnostics else 1)),
                                squeeze=False, layout="constrained")
    left, right = axes[0][0], axes[0][1]
    if diagnostics:
        axes[0][2].axis("off")
        _plot_adapter_diagnostics(history, epochs, axes[1])
    left.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
    left.plot(epochs, [row["val_logloss"] for row in history], marker="o", label="val logloss")
    left.set_xlabel("epoch"), left.set_ylabel("binary cross-entropy"), left.legend()
    right.plot(epochs, [row["val_auc"] for row in history], marker="o", linewidth=2, label="val AUC")
    _plot_domain_curves(right, history, epochs, train_counts)
    right.set_xlabel("epoch"), right.set_ylabel("AUC"), right.legend(fontsize=8)
    figure.suptitle(title or "learning curves")
    _save(figure, path)


def _plot_domain_curves(axis, history: list, epochs: list, train_counts: list | None) -> None:
    """One dashed line per domain; past MANY_DOMAINS, the worst, best and rare-domain mean per epoch (the
    rest is in metrics.csv). Domains without a validation AUC (too few rows, one class) are left out, and
    the legend says how many."""

    keys = sorted((k for k in history[0] if k.startswith("val_auc_d")), key=lambda k: int(k.removeprefix("val_auc_d")))
    aucs = np.array([[row[k] for k in keys] for row in history], dtype=np.float64).reshape(len(history), len(keys))
    shown = np.isfinite(aucs).any(axis=0)
    left_out = f" ({int((~shown).sum())} domain(s) n/a)" if not shown.all() else ""
    if len(keys) <= MANY_DOMAINS:
        for column in np.flatnonzero(shown):
            axis.plot(epochs, aucs[:, column], linestyle="--", label=keys[column].replace("val_auc_", "domain "))
        if left_out:
            axis.plot([], [], " ", label=left_out.strip(" ()"))
        return
    _plot_domain_spread(axis, epochs, aucs, train_counts)


def _plot_domain_spread(axis, x, aucs, train_counts: list | None) -> None:
    """For many domains (one line each would bury the plot): the worst and the best domain's AUC and the rare
    domains' mean at each x, ``aucs`` (len(x), domains); domains without any AUC are counted in the legend."""
    missing = int((~np.isfinite(aucs)).all(axis=0).sum())
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a point where no domain has an AUC
        axis.plot(x, np.nanmin(aucs, axis=1), linestyle="--",
                  label="worst domain" + (f" ({missing} domain(s) n/a)" if missing else ""))
        axis.plot(x, np.nanmax(aucs, axis=1), linestyle="--", label="best domain")
        if train_counts is not None:
            rare = [d for d in rare_domains(train_counts) if d < aucs.shape[1]]
            axis.plot(x, np.nanmean(aucs[:, rare], axis=1), linestyle=":", label=f"rare domains' mean ({len(rare)})")


def _plot_adapter_diagnostics(history: list, epochs: list, axes) -> None:
    panels = [("ratio", "||DomainNorm(o)|| / ||x||"), ("grad", "factor gradient norm"),
              ("shift", "||W - W0|| / ||W0||")]

    for axis, (what, ylabel) in zip(axes, panels):
        keys = sorted(k for k in history[0] if k.startswith("adapter") and f"_{what}_" in k)
        if len(keys) <= MANY_DOMAINS:
            for key in keys:
                axis.plot(epochs, [row[key] for row in history], marker=".", label=key.replace(f"_{what}_", " "))
        else:  # one line per domain and cell would bury the panel: the median and the range over them
            values = np.array([[row[key] for key in keys] for row in history], dtype=np.float64)
            axis.plot(epochs, np.nanmedian(values, axis=1), marker=".", label=f"median of {len(keys)}")
            axis.fill_between(epochs, np.nanmin(values, axis=1), np.nanmax(values, axis=1), alpha=0.2,
                              label="min to max")
        if what == "grad" and "hyper_grad" in history[0]:
            axis.plot(epochs, [row["hyper_grad"] for row in history], linestyle="--", color="k",
                      label="hyper-network")
            axis.set_yscale("log")
        axis.set_xlabel("epoch"), axis.set_ylabel(ylabel), axis.legend(fontsize=7)
        axis.set_title(f"adapter {what}", fontsize=9)


def plot_domain_auc(summary: dict, domain_labels: list, path, title: str = "") -> None:
    """Grouped bars: for each domain (and overall), the mean test AUC of each model, std as error bars.

    ``summary``: model label -> {"auc": (mean, std), "auc_d0": (mean, std), ...}.
    """
    plt = _pyplot()
    keys = ["auc", *[f"auc_d{d}" for d in range(len(domain_labels))]]
    groups = ["overall", *domain_labels]
    width = 0.8 / max(len(summary), 1)
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(groups) * max(1, len(summary) / 3), 3.8))
    x = np.arange(len(groups))
    for i, (label, stats) in enumerate(summary.items()):
        means = [stats[k][0] for k in keys]
        stds = [stats[k][1] for k in keys]
        missing = sum(not np.isfinite(m) for m in means[1:])  # no bar: too few test rows, or one class
        axis.bar(x + (i - (len(summary) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
                 label=label + (f" ({missing} domain(s) n/a)" if missing else ""))
    values = [stats[k][0] for stats in summary.values() for k in keys if np.isfinite(stats[k][0])]
    if values:
        axis.set_ylim(max(0.0, min(values) - 0.03), min(1.0, max(values) + 0.02))
    axis.set_xticks(x, groups), axis.set_ylabel("test AUC"), axis.legend(fontsize=8, ncols=2)
    axis.set_title(title or "test AUC per domain")
    _save(figure, path)


def plot_domain_auc_by_size(summary: dict, train_counts: list, path, title: str = "") -> None:
    """For many domains: each domain's mean test AUC against its training rows (log axis), one marker
    series per model, so the long tail of rare domains reads at a glance."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    counts = np.maximum(np.asarray(train_counts, dtype=np.float64), 1)
    for label, stats in summary.items():
        means = np.array([stats[f"auc_d{d}"][0] for d in range(len(counts))])
        shown = np.isfinite(means)
        left_out = f", {int((~shown).sum())} domain(s) n/a" if not shown.all() else ""
        axis.scatter(counts[shown], means[shown], s=18, alpha=0.75,
                     label=f"{label} (overall {stats['auc'][0]:.4f}{left_out})")
    axis.set_xscale("log"), axis.set_xlabel("training rows of the domain"), axis.set_ylabel("test AUC")
    axis.legend(fontsize=8), axis.set_title(title or "test AUC per domain")
    _save(figure, path)


def plot_sweep(values: list, summary: list, domain_labels: list, param: str, path,
               train_counts: list | None = None) -> None:
    """Test AUC (mean, std as band) overall and per domain against the swept value; past MANY_DOMAINS
    domains, overall, worst, best and the rare domains' mean (``train_counts`` naming the rare ones)."""

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.8))
    x = np.arange(len(values))
    if len(domain_labels) <= MANY_DOMAINS:
        for key, label in [("auc", "overall"), *[(f"auc_d{d}", name) for d, name in enumerate(domain_labels)]]:
            means = np.array([s[key][0] for s in summary])
            stds = np.array([s[key][1] for s in summary])
            axis.plot(x, means, marker="o", linewidth=2 if key == "auc" else 1, label=label)
            axis.fill_between(x, means - stds, means + stds, alpha=0.15)
    else:
        aucs = np.array([[s[f"auc_d{d}"][0] for d in range(len(domain_labels))] for s in summary])
        axis.plot(x, [s["auc"][0] for s in summary], marker="o", linewidth=2, label="overall")
        _plot_domain_spread(axis, x, aucs, train_counts)
    axis.set_xticks(x, [str(v) for v in values]), axis.set_xlabel(param), axis.set_ylabel("test AUC")
    axis.legend(fontsize=8), axis.set_title(f"test AUC against {param}")
    _save(figure, path)
