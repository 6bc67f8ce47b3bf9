"""Trainer, metrics (against scikit-learn), checkpoints: round trip, resume, corruption, atomic writes."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from hamur_fast.data import DataError, MultiDomainData, TensorSplit, generate, load_synthetic
from hamur_fast.features import build_ctr_model
from hamur_fast.train import (CheckpointError, TrainConfig, Trainer, auc, domain_metrics, load_checkpoint, load_config,
                              load_trained, logloss, resume_run, train_run)
from hamur_fast.train.experiment import apply_overrides, set_path
from hamur_fast.train.files import RunDirectoryError, atomic_path
from hamur_fast.train.trainer import TrainingError


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
    assert trainer.evaluate(planted.test) == pytest.approx(result.test, nan_ok=True)  # nan: small domain
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


# ------------------------------------------------------------------------------ honest runs
def _with_labels(data, split: str, value: float):
    """A copy of ``data`` whose ``split`` has every label set to ``value`` (one class)."""
    part = getattr(data, split)
    one_class = TensorSplit(part.sparse, part.dense, part.domain, torch.full_like(part.label, value))
    return MultiDomainData(**{**{n: getattr(data, n) for n in ("train", "val", "test")}, split: one_class},
                           feature_map=data.feature_map)


def test_configurations_that_cannot_train_stop_before_the_first_epoch(planted, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 2.*every batch would be skipped"):
        TrainConfig(batch_size=1)
    for split in ("train", "val", "test"):
        with pytest.raises(DataError, match=f"the {split} split has one class only .*all labelled 0"):
            train_run({"model": SMALL_HAMUR, "train": {**QUIET, "epochs": 1}}, _with_labels(planted, split, 0.0),
                      run_dir=tmp_path / split, progress=False)
        assert not (tmp_path / split / "checkpoint.pt").exists()  # nothing kept as a "best epoch 0"


def test_a_diverging_run_stops_with_an_error(planted, tmp_path):
    config = {"model": {"name": "mlp", "dims": [16, 8]}, "train": {**QUIET, "epochs": 3, "lr": 1e12}}
    with pytest.raises(TrainingError, match="the training loss became nan in epoch 1 .* lower train.lr"):
        train_run(config, planted, run_dir=tmp_path, progress=False)


def test_options_are_parsed_and_type_checked():
    assert TrainConfig(lr="1e-3", epochs="3", grad_clip="0.5").lr == 0.001
    assert apply_overrides({}, ["train.lr=1e-3", "train.weight_decay=1E-5"])["train"] == {"lr": 0.001,
                                                                                            "weight_decay": 1e-5}
    assert load_config_text("train: {lr: 1e-3}")["train"]["lr"] == 0.001
    for bad, message in (({"lr": "fast"}, "train.lr must be a number, got 'fast'"),
                         ({"epochs": 2.5}, "train.epochs must be an integer"),
                         ({"bf16": "yes"}, "train.bf16 must be true or false"),
                         ({"threads": 0}, "train.threads must be >= 1"),
                         ({"device": "tpu"}, "unknown device 'tpu'")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)


def load_config_text(text: str) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "c.yaml"
        path.write_text(text)
        return load_config(path)


def test_resume_continues_from_the_last_epoch_not_the_best(planted, tmp_path):
    """A finished 5-epoch run resumed to 7 epochs equals a 7-epoch run (the final checkpoint keeps both the
    last weights, where training goes on, and the best ones)."""
    config = {"model": {"name": "mlp", "dims": [32, 16]}, "train": {**QUIET, "lr": 3e-3, "patience": 10}}
    five = train_run(set_path(config, "train.epochs", 5), planted, run_dir=tmp_path / "a", progress=False)
    assert five.best_epoch < 5  # the data overfit: the best epoch is not the last, which is the case in point
    payload = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert not all(torch.equal(payload["model"][k], payload["best_model"][k]) for k in payload["model"])
    seven = train_run(set_path(config, "train.epochs", 7), planted, run_dir=tmp_path / "b", progress=False)
    resumed = resume_run(tmp_path / "a" / "checkpoint.pt", planted, epochs=7, progress=False)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in seven.history]
    assert resumed.test == seven.test and resumed.best_epoch == seven.best_epoch


def test_resume_applies_or_refuses_overrides_explicitly(planted, tmp_path):
    train_run({"model": SMALL_HAMUR, "train": {**QUIET, "epochs": 1}}, planted, run_dir=tmp_path / "run",
              progress=False)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    for refused in ("train.lr=0.1", "model.rank=8", "train.seed=1", "train.batch_size=64"):
        with pytest.raises(ValueError, match=r"--resume continues a run with its recorded settings, so \[.*\] cannot"):
            resume_run(checkpoint, planted, overrides=[refused], progress=False)
    # --output: the run goes on in another directory; the original is left as it was
    resumed = resume_run(checkpoint, planted, overrides=["train.epochs=2", "train.threads=1"],
                         run_dir=tmp_path / "fork", progress=False)
    assert len(resumed.history) == 2 and (tmp_path / "fork" / "checkpoint.pt").is_file()
    assert checkpoint.read_bytes() == before
    other = load_synthetic(rows=6_000, seed=2)
    with pytest.raises(DataError, match="these data differ from the data the checkpoint's run was trained on"):
        resume_run(checkpoint, other, epochs=2, progress=False)


def test_resume_from_another_directory_finds_relative_data_paths(tmp_path, monkeypatch):
    frame = generate(rows=1_500, seed=4)
    (tmp_path / "project").mkdir()
    frame.to_csv(tmp_path / "project" / "clicks.csv", index=False)
    schema = {"label": "click", "domain": "domain", "sparse": ["user_id", "item_id"], "dense": ["x_num"]}
    monkeypatch.chdir(tmp_path / "project")
    train_run({"data": {"kind": "table", "path": "clicks.csv", "schema": schema},
               "model": {"name": "mlp", "dims": [8]}, "train": {**QUIET, "epochs": 1}}, run_dir="run", progress=False)
    monkeypatch.chdir(tmp_path)
    resumed = resume_run("project/run/checkpoint.pt", epochs=2, progress=False)
    assert len(resumed.history) == 2


def test_checkpoint_whose_config_does_not_fit_its_weights(planted, tmp_path):
    train_run({"data": {"kind": "synthetic"}, "model": SMALL_HAMUR, "train": {**QUIET, "epochs": 1}}, planted,
              run_dir=tmp_path, progress=False)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    payload["config"]["model"]["dims"] = [64, 16]
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mismatch.pt: its weights do not fit the model its config describes"):
        load_trained(tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="last weights do not fit the model its config describes"):
        resume_run(tmp_path / "mismatch.pt", planted, epochs=2, progress=False)


def test_output_directory_is_checked_locked_and_cleaned(planted, tmp_path, monkeypatch):
    config = {"model": {"name": "mlp", "dims": [8]}, "train": {**QUIET, "epochs": 1}}
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(RunDirectoryError, match="cannot write into the output directory"):
        train_run(config, planted, run_dir=tmp_path / "file" / "run", progress=False)
    # a temporary file left by a writer killed mid-write (its process is gone) is removed by the next run
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "run" / f".checkpoint.pt.{int(gone.stdout)}.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    # another process holds the directory's lock, as a running train would: this run is refused at once
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], "
                               "os.O_RDONLY), fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                               str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryError, match="is in use by another run"):
            train_run(config, planted, run_dir=tmp_path / "run", progress=False)
    finally:
        holder.communicate("")  # the holder ends; the kernel releases its lock
    assert stale.exists()  # the refused run touched nothing
    train_run(config, planted, run_dir=tmp_path / "run", progress=False)
    assert not stale.exists()
    with pytest.warns(UserWarning, match="holds an earlier run"):
        train_run(config, planted, run_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    with pytest.raises(RunDirectoryError, match="not enough free space in .*full"):
        train_run(config, planted, run_dir=tmp_path / "full", progress=False)
    assert not (tmp_path / "full" / "metrics.csv").exists()  # found before an epoch ran
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []


def test_two_runs_with_one_seed_agree_at_two_threads(tmp_path):
    """Several threads accumulate gradients in a varying order unless deterministic algorithms are on."""
    data = load_synthetic(rows=6_000, seed=5)
    config = {"model": {"name": "hamur_mlp", "dims": [64, 32], "hyper_dims": [16], "rank": 8, "bottleneck": 8},
              "train": {"epochs": 1, "batch_size": 2048, "seed": 11, "progress": False}}
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the process's setting (train.threads unset): recorded in the checkpoint as used
    try:
        runs = [train_run(config, data, run_dir=tmp_path / str(i), progress=False) for i in range(2)]
    finally:
        torch.set_num_threads(before)
    assert runs[0].test == runs[1].test and runs[0].history[0]["train_loss"] == runs[1].history[0]["train_loss"]
    assert load_checkpoint(tmp_path / "0" / "checkpoint.pt")["config"]["train"]["threads"] == 2
