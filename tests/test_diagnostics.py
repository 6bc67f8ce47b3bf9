"""Adapter diagnostics: in every run's metrics and plot, finite, zero for a cell that contributes nothing,
and printed by ``hamur-fast eval --diagnostics``."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hamur_fast import cli
from hamur_fast.data import load_synthetic
from hamur_fast.features import build_ctr_model
from hamur_fast.nn import HyperAdapter
from hamur_fast.train import TrainConfig, Trainer
from hamur_fast.train.diagnostics import diagnose

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_HAMUR = {"name": "hamur_mlp", "dims": [32, 16], "hyper_dims": [8], "rank": 4, "bottleneck": 8,
               "backend": "torch"}
QUIET = TrainConfig(epochs=2, batch_size=256, progress=False, seed=7)


@pytest.fixture(scope="module")
def data():
    return load_synthetic(rows=3_000, seed=1)


def cells(model):
    return [m for m in model.modules() if isinstance(m, HyperAdapter)]


def fit(data, model_config, run_dir=None, freeze_up=False):
    torch.manual_seed(0)
    model = build_ctr_model(data.feature_map, model_config)
    if freeze_up:  # up projection (and the norm's bias) frozen at zero: the cell adds exactly nothing
        for cell in cells(model):
            for param in (cell.up_left, cell.up_right, cell.up_bias, cell.norm_bias):
                param.data.zero_()
                param.requires_grad_(False)
    trainer = Trainer(model, QUIET, data.feature_map, run_dir, {"model": model_config})
    return trainer, trainer.fit(data)


def adapter_keys(row):
    return [k for k in row if k.startswith(("adapter", "hyper"))]


def test_every_epoch_records_finite_diagnostics_in_metrics_and_plot(data, tmp_path):
    _, history = fit(data, SMALL_HAMUR, tmp_path)
    recorded = json.loads((tmp_path / "metrics.json").read_text())
    assert len(recorded) == 2
    for row in recorded:
        expected = {f"adapter0_{what}_d{d}" for what in ("ratio", "grad", "shift") for d in range(3)}
        assert set(adapter_keys(row)) == expected | {"hyper_grad"}
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in adapter_keys(row)), row
    # the factors keep moving away from their initialisation
    assert all(recorded[1][f"adapter0_shift_d{d}"] > recorded[0][f"adapter0_shift_d{d}"] for d in range(3))
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    assert "adapter0_ratio_d0" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_a_cell_with_its_up_projection_frozen_at_zero_reports_zero_contribution(data):
    _, history = fit(data, SMALL_HAMUR, freeze_up=True)
    for row in history:
        for d in range(3):
            assert row[f"adapter0_ratio_d{d}"] == 0.0
            assert row[f"adapter0_grad_d{d}"] == 0.0  # nothing reaches the down factors either
        assert math.isfinite(row["hyper_grad"])


def test_released_mode_reports_shared_factors_and_models_without_cells_report_nothing(data):
    _, history = fit(data, {**SMALL_HAMUR, "mode": "released"})
    keys = adapter_keys(history[-1])
    assert {"adapter0_grad_shared", "adapter0_shift_shared", "adapter0_ratio_d2"} <= set(keys)
    assert all(math.isfinite(history[-1][k]) for k in keys)
    _, history = fit(data, {"name": "mlp", "dims": [32, 16]})
    assert adapter_keys(history[-1]) == []


def test_diagnose_changes_no_parameter(data):
    trainer, _ = fit(data, SMALL_HAMUR)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batches = [(batch, batch.label) for batch in data.val.batches(1000)]
    values = diagnose(trainer.model, batches, trainer.diagnostics.initial)
    assert all(math.isfinite(v) for v in values.values()) and values["adapter0_shift_d0"] > 0
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_eval_diagnostics_prints_the_table(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--set", "data.kind=synthetic", "--set", "data.rows=2000", "--set", "train.epochs=1",
                     "--set", "train.batch_size=256", "--set", "model.name=hamur_mlp", "--set", "model.dims=[16,8]",
                     "--quiet", "--output", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--split", "val", "--diagnostics"]) == 0
    out = capsys.readouterr().out
    assert "adapter diagnostics on the val split" in out and "recorded while training, epoch 1" in out
    assert "| adapter0 | d2 |" in out and "hyper-network gradient norm" in out
