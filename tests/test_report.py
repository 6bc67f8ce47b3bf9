"""What a run reports: data summary, epoch lines, stopping decision, final table (console and train.log), and
per-domain AUCs that are "n/a" rather than noise for domains with too few rows."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hamur_fast import cli
from hamur_fast.train import domain_metrics, plots, report
from hamur_fast.train.files import write_json

RUN = [a for o in ("data.kind=synthetic", "data.rows=3000", "model.name=hamur_mlp", "model.dims=[16]",
                   "model.hyper_dims=[8]", "model.rank=4", "train.batch_size=256") for a in ("--set", o)]


def test_a_domain_under_min_rows_or_with_one_class_has_no_auc():
    rng = np.random.default_rng(0)
    domain = np.repeat([0, 1, 2], [200, 8, 60])
    label = rng.integers(0, 2, len(domain)).astype(float)
    label[domain == 2] = 1.0  # one class
    prob = rng.random(len(domain))
    metrics = domain_metrics(label, prob, domain, 3, min_rows=50)
    assert math.isfinite(metrics["auc_d0"]) and math.isnan(metrics["auc_d1"]) and math.isnan(metrics["auc_d2"])
    assert metrics["rows_d1"] == 8 and math.isfinite(metrics["logloss_d1"])
    assert math.isfinite(domain_metrics(label, prob, domain, 3)["auc_d1"])  # min_rows=0: every two-class domain
    table = report.metrics_table(metrics, "test metrics", 50)
    assert "| d1 | n/a |" in table and "| 8 |" in table and "0.0000" not in table
    assert "2 domain(s) without an AUC (n/a: fewer than 50 rows or one class in the split)" in table
    assert report.extremes(metrics) == (f"worst d0 {metrics['auc_d0']:.4f}, best d0 {metrics['auc_d0']:.4f}; "
                                        "2 domain(s) n/a")


def test_metrics_json_writes_null_never_nan(tmp_path):
    write_json(tmp_path / "m.json", {"auc": math.nan, "history": [{"x": np.float32("nan")}], "inf": math.inf,
                                     "ok": np.float64(0.5)})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"auc": None, "history": [{"x": None}], "inf": None, "ok": 0.5}


def test_train_reports_data_epochs_stopping_and_table_to_console_and_log(tmp_path, capsys):
    # lr 0: the validation AUC never improves after epoch 1, so patience 2 stops after epoch 3.
    run = tmp_path / "run"
    args = ["train", *RUN, "--set", "train.epochs=10", "--set", "train.patience=2", "--set", "train.lr=0",
            "--output", str(run)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for expected in ("data: 3 domains", "vocabulary sizes: user_id", "train: 2,400 rows, positive rate",
                     "rows per domain: d0", "epoch 1/10  train loss", "val AUC", "rows/s  best",
                     "early stopping after epoch 3: no better validation AUC for 2 epochs (train.patience=2)",
                     "test metrics (hamur_mlp, best epoch 1):", "| overall |"):
        assert expected in out, expected
    assert "epoch 4/10" not in out
    log = (run / report.LOG_NAME).read_text()
    assert "epoch 3/10  train loss" in log and "early stopping after epoch 3" in log and "| overall |" in log

    assert cli.main([*args, "--quiet", "--output", str(tmp_path / "quiet")]) == 0
    quiet = capsys.readouterr().out
    assert "| overall |" in quiet and "epoch 1/10" not in quiet and "data: 3 domains" not in quiet
    assert "epoch 1/10" in (tmp_path / "quiet" / report.LOG_NAME).read_text()  # the log keeps everything


def test_domains_too_small_are_named_in_the_data_summary(tmp_path, capsys):
    assert cli.main(["train", *RUN, "--set", "train.epochs=1", "--set", "train.min_domain_rows=100", "--quiet",
                     "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "| d2 | n/a |" in out and "without an AUC (n/a: fewer than 100 rows" in out
    log = (tmp_path / "run" / report.LOG_NAME).read_text()
    assert "domain(s) under 100 rows (AUC n/a)" in log
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["auc_d2"] is None


def test_learning_curves_past_eight_domains_draw_four_lines(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    rng = np.random.default_rng(1)
    history = [{"epoch": e, "train_loss": 0.6, "val_logloss": 0.6, "val_auc": 0.7,
                **{f"val_auc_d{d}": (math.nan if d == 19 else 0.6 + rng.random() / 10) for d in range(20)},
                **{f"adapter0_{what}_d{d}": rng.random() for what in ("ratio", "grad", "shift") for d in range(20)}}
               for e in (1, 2, 3)]
    plots.plot_learning_curves(history, tmp_path / "c.png", train_counts=list(range(100, 2100, 100)))
    auc_axis = figures[0].axes[1]
    labels = [text.get_text() for text in auc_axis.get_legend().get_texts()]
    assert labels == ["val AUC", "worst domain (1 domain(s) n/a)", "best domain", "rare domains' mean (2)"]
    diagnostics = figures[0].axes[3:]  # the second row: ratio, grad, shift
    assert [[t.get_text() for t in a.get_legend().get_texts()] for a in diagnostics] == [
        ["median of 20", "min to max"]] * 3
    few = [{key: value for key, value in row.items() if not key.startswith(("val_auc_d", "adapter"))
            or (key.startswith("val_auc_d") and int(key[9:]) < 3)} for row in history]
    plots.plot_learning_curves(few, tmp_path / "d.png")
    assert [t.get_text() for t in figures[1].axes[1].get_legend().get_texts()] == [
        "val AUC", "domain d0", "domain d1", "domain d2"]


def test_domain_bars_say_how_many_domains_have_no_auc(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    stats = {"auc": (0.7, 0.0), "auc_d0": (0.7, 0.01), "auc_d1": (math.nan, 0.0), "auc_d2": (0.6, 0.02)}
    plots.plot_domain_auc({"hamur_mlp": stats, "mlp": {**stats, "auc_d1": (0.65, 0.0)}}, ["d0", "d1", "d2"],
                          tmp_path / "b.png")
    labels = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert labels == ["hamur_mlp (1 domain(s) n/a)", "mlp"]


def test_sweep_plot_past_eight_domains_draws_four_lines(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    summary = [{"auc": (0.7, 0.0), **{f"auc_d{d}": (0.6 + d / 100 if d else math.nan, 0.0) for d in range(12)}}
               for _ in range(3)]
    plots.plot_sweep([8, 16, 35], summary, [f"d{d}" for d in range(12)], "k", tmp_path / "s.png",
                     train_counts=list(range(12)))
    labels = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert labels == ["overall", "worst domain (1 domain(s) n/a)", "best domain", "rare domains' mean (1)"]


@pytest.mark.parametrize("patience, epochs, expected", [(2, 5, "early stopping after epoch 3"),
                                                        (10, 3, "finished 3 epochs (train.epochs=3)")])
def test_stop_line_names_the_decision(patience, epochs, expected):
    line = report.stop_line(3, epochs, 2 if patience == 2 else 0, patience, 0.71, 1)
    assert line.startswith(expected) and "best epoch 1 (val AUC 0.7100)" in line
