"""Trainer, metrics (against scikit-learn), checkpoints: round trip, resume, corruption, atomic writes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from hamur_fast.data import load_synthetic
from hamur_fast.features import build_ctr_model
from hamur_fast.train import (CheckpointError, TrainConfig, Trainer, auc, domain_metrics, load_checkpoint, load_trained,
                              logloss, resume_run, train_run)
from hamur_fast.train.files import atomic_path


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL_HAMUR = {"name": "hamur_mlp", "dims": [32, 16], "hyper_dims": [8], "rank": 4, "bottleneck": 8}
QUIET = {"batch_size": 256, "progress": False, "seed": 7}


@pytest.fixture(scope="module")
def planted():
    """Synthetic clicks with a planted, learnable signal (user/item/context/dense effects per domain)."""
    return load_synthetic(rows=6_000, seed=1)


# ------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_logloss_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, 500)
    score = np.round(rng.uniform(size=500), 2)  # many ties
    score[:5] = [0.0, 1.0, 1e-20, 1 - 1e-17, 0.5]  # the clipping edges
    assert auc(label, score) == pytest.approx(roc_auc_score(label, score), abs=1e-12)
    assert logloss(label, score) == pytest.approx(log_loss(label, score), rel=1e-9)
    domain = rng.integers(0, 3, 500)
    metrics = domain_metrics(label, score, domain, 3)
    for d in range(3):
        rows = domain == d
        assert metrics[f"auc_d{d}"] == pytest.approx(roc_auc_score(label[rows], score[rows]), abs=1e-12)
        assert metrics[f"logloss_d{d}"] == pytest.approx(log_loss(label[rows], score[rows]), rel=1e-9)
        assert metrics[f"rows_d{d}"] == rows.sum()


def test_auc_is_nan_for_one_class_and_empty_domain():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    metrics = domain_metrics([0, 1], [0.2, 0.7], [0, 0], 2)
    assert metrics["auc"] == 1.0 and metrics["rows_d1"] == 0 and math.isnan(metrics["auc_d1"])


# ------------------------------------------------------------------------------ training
def test_short_run_learns_the_planted_signal(planted):
    result = train_run({"model": SMALL_HAMUR, "train": {**QUIET, "epochs": 4}}, planted, progress=False)
    best_val = max(row["val_auc"] for row in result.history)
    assert best_val > 0.62 and result.test["auc"] > 0.6, (best_val, result.test)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_early_stopping_restores_the_best_weights(planted):
    torch.manual_seed(0)
    model = build_ctr_model(planted.feature_map, {**SMALL_HAMUR, "name": "mlp"})
    trainer = Trainer(model, TrainConfig(epochs=30, patience=2, lr=3e-3, **QUIET), planted.feature_map)
    history = trainer.fit(planted)
    assert len(history) < 30  # stopped early (the data are small, the model overfits)
    assert len(history) == trainer.best_epoch + 2
    best = max(row["val_auc"] for row in history)
    assert trainer.evaluate(planted.val)["auc"] == pytest.approx(best, abs=1e-12)


def test_grad_clip_and_adamw_options_train(planted):
    torch.manual_seed(0)
    model = build_ctr_model(planted.feature_map, SMALL_HAMUR)
    trainer = Trainer(model, TrainConfig(epochs=1, optimizer="adamw", grad_clip=0.1, **QUIET), planted.feature_map)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(planted)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="optimizer must be"):
        TrainConfig(optimizer="sgd")


@pytest.mark.parametrize("model", [{"name": "mlp", "dims": [32, 16]}, SMALL_HAMUR], ids=["mlp", "hamur_mlp"])
def test_bf16_autocast_option_trains(planted, model):
    # CPU autocast exercises the same code path as the GPU one; HAMUR's cells run in fp32 under it.
    runs = [train_run({"model": model, "train": {**QUIET, "epochs": 3, "bf16": bf16}}, planted, progress=False)
            for bf16 in (False, True)]
    full, half = ([row["train_loss"] for row in run.history] for run in runs)
    assert full != half and full == pytest.approx(half, abs=0.01)  # bf16 really ran, and learned alike
    assert runs[1].test["auc"] > 0.6


def test_cuda_graph_option_gives_the_losses_of_plain_steps(planted):
    """The captured-step path (eager off CUDA) trains exactly like the plain path on full batches."""
    assert len(planted.train) % 240 == 0  # every batch full, so the captured path skips none
    config = {"model": SMALL_HAMUR, "train": {**QUIET, "batch_size": 240, "epochs": 2}}
    plain = train_run(config, planted, progress=False)
    captured = train_run({**config, "train": {**config["train"], "cuda_graph": True}}, planted, progress=False)
    assert [r["train_loss"] for r in captured.history] == [r["train_loss"] for r in plain.history]
    assert captured.test == plain.test
    with pytest.raises(ValueError, match="cuda_graph does not combine with bf16 or grad_clip"):
        TrainConfig(cuda_graph=True, grad_clip=1.0)


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_predicts_identically(planted, tmp_path):
    result = train_run({"data": {"kind": "synthetic", "rows": 6_000, "seed": 1}, "model": SMALL_HAMUR,
                        "train": {**QUIET, "epochs": 2}}, planted, run_dir=tmp_path, progress=False)
    for name in ("checkpoint.pt", "metrics.csv", "metrics.json", "learning_curves.png", "test_metrics.json"):
        assert (tmp_path / name).is_file(), name
    trainer, payload = load_trained(tmp_path / "checkpoint.pt")
    assert payload["feature_map"] == planted.feature_map.to_dict()
    assert set(payload["config"]) == {"data", "model", "train"}
    assert trainer.evaluate(planted.test) == pytest.approx(result.test)
    assert len(list(tmp_path.glob(".*tmp"))) == 0  # no temporary file left behind


def test_resume_gives_the_losses_of_an_uninterrupted_run(planted, tmp_path):
    # Wide & Deep has dropout: equal losses need the random state restored too.
    config = {"data": {"kind": "synthetic", "rows": 6_000, "seed": 1},
              "model": {"name": "hamur_wide_deep", "dims": [32, 16], "hyper_dims": [8], "rank": 4, "bottleneck": 8},
              "train": {**QUIET, "epochs": 4, "patience": 10}}
    full = train_run(config, planted, run_dir=tmp_path / "full", progress=False)
    train_run({**config, "train": {**config["train"], "epochs": 2}}, planted, run_dir=tmp_path / "cut",
              progress=False)
    resumed = resume_run(tmp_path / "cut" / "checkpoint.pt", planted, epochs=4, progress=False)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    assert [r["val_auc"] for r in resumed.history] == [r["val_auc"] for r in full.history]
    assert resumed.test == full.test


def test_corrupt_checkpoint_gives_a_clear_error(planted, tmp_path):
    train_run({"data": {"kind": "synthetic"}, "model": SMALL_HAMUR, "train": {**QUIET, "epochs": 1}}, planted,
              run_dir=tmp_path, progress=False)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match=f"{name} is not a readable checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="not a hamur_fast checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
