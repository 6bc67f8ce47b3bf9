"""The hamur-fast command end to end on tiny synthetic data; everything is written under tmp_path."""
from __future__ import annotations

import contextlib
import json

import pandas as pd
import pytest
import torch
import yaml

from hamur_fast.cli import main
from hamur_fast.data import generate
from hamur_fast.train import experiment as ex


pytestmark = pytest.mark.usefixtures("one_thread")


TINY_MODEL = {"dims": [16, 8], "hyper_dims": [8], "rank": 4, "bottleneck": 8}


@pytest.fixture
def config_file(tmp_path):
    config = {"data": {"kind": "synthetic", "rows": 2_000, "seed": 2},
              "model": {"name": "hamur_mlp", **TINY_MODEL},
              "train": {"epochs": 2, "batch_size": 256, "seed": 3},
              "output": str(tmp_path / "run")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_demo_prints_the_per_domain_table(tmp_path, capsys):
    assert main(["demo", "--quiet", "--output", str(tmp_path / "demo"), "--epochs", "1", "--seeds", "1",
                 "--set", "data.rows=2000", "--set", "train.batch_size=256"]) == 0
    out = capsys.readouterr().out
    assert "| hamur_mlp |" in out and "| mlp |" in out and "AUC d2 (2)" in out
    assert (tmp_path / "demo" / "compare_domain_auc.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "runs" / "hamur_mlp" / "seed1" / "learning_curves.png").is_file()


def test_train_eval_predict(config_file, tmp_path, capsys):
    assert main(["train", "--config", str(config_file), "--quiet", "--set", "train.lr=0.002"]) == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert checkpoint.is_file() and "| overall |" in capsys.readouterr().out
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(history) == 2 and {"train_loss", "val_auc", "val_auc_d2", "rows_per_s"} <= set(history[0])

    assert main(["eval", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "eval.json")]) == 0
    test_metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text()) == pytest.approx(test_metrics)

    raw = generate(rows=50, seed=9).drop(columns=["click"])  # labels are not needed to predict
    raw.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "new.csv"),
                 "--output", str(tmp_path / "pred.parquet")]) == 0
    predictions = pd.read_parquet(tmp_path / "pred.parquet")
    assert len(predictions) == 50 and predictions["probability"].between(0, 1).all()
    assert (predictions["domain_id"].to_numpy() == raw["domain"].to_numpy()).all()

    assert main(["train", "--resume", str(checkpoint), "--epochs", "3", "--quiet"]) == 0
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())) == 3


def test_compare_and_sweep_write_table_and_plot(config_file, tmp_path, capsys):
    assert main(["compare", "--config", str(config_file), "--quiet", "--epochs", "1", "--seeds", "1,2",
                 "--models", "hamur_mlp,hamur_mlp:mode=released,mlp", "--output", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count("\n") == 5 and "| hamur_mlp:mode=released |" in table  # header, rule, 3 models
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["seed"] for r in summary["runs"]["mlp"]] == [1, 2]
    assert (tmp_path / "cmp" / "compare_domain_auc.png").is_file()

    assert main(["sweep", "--config", str(config_file), "--quiet", "--epochs", "1", "--param", "k=2,4",
                 "--output", str(tmp_path / "sw")]) == 0
    assert "| 2 |" in (tmp_path / "sw" / "sweep_k.md").read_text()
    assert (tmp_path / "sw" / "sweep_k.png").is_file()
    assert "Test AUC against k" in capsys.readouterr().out


def test_config_overrides_and_value_lists():
    config = ex.apply_overrides({"train": {"epochs": 5}}, ["train.epochs=2", "model.dims=[32, 16]", "train.bf16=true"])
    assert config == {"train": {"epochs": 2, "bf16": True}, "model": {"dims": [32, 16]}}
    assert ex.split_values("8,16, 35") == [8, 16, 35]
    assert ex.split_values("[32],[64,32],static") == [[32], [64, 32], "static"]
    label, section = ex.model_section("hamur_mlp:mode=released:rank=16", {"embed_dim": 8, "preset": "aliccp",
                                                                          "dims": [4]})
    assert label == "hamur_mlp:mode=released:rank=16"
    assert section == {"name": "hamur_mlp", "mode": "released", "rank": 16, "embed_dim": 8, "preset": "aliccp"}
    assert ex.model_section("star", {"embed_dim": 8, "preset": "aliccp"})[1] == {"name": "star", "embed_dim": 8}
    with pytest.raises(ValueError, match="must look like section.key=value"):
        ex.apply_overrides({}, ["epochs"])


def test_errors_exit_with_a_message(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("data: {kind: nowhere}\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--quiet", "--output", str(tmp_path / "x")]) == 2
    assert "data.kind must be one of" in capsys.readouterr().err
    assert main(["compare", "--quiet", "--output", str(tmp_path / "y")]) == 2
    assert "name the models" in capsys.readouterr().err


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["train", "--threads", "-1"], "--threads: expected a whole number >= 1, got -1"),
    (["train", "--threads", "two"], "--threads: expected a whole number >= 1, got 'two'"),
    (["train", "--set", "train.lr=[1,"], "override 'train.lr=[1,': the value is not valid YAML"),
    (["train", "--set", "train=3"], "override 'train=3': the key must be section.key"),
    (["train", "--set", "trian.lr=1"], "the key must be section.key with a section among"),
    (["train", "--set", "train.lr=fast"], "train.lr must be a number, got 'fast'"),
    (["train", "--set", "train.batch_size=1"], "train.batch_size must be >= 2"),
    (["train", "--device", "cuda:7"], "device 'cuda:7'"),
    (["train", "--set", "data.kind=table", "--set", "data.path=DIR/empty.csv", "--set", "data.schema={label: a, "
      "domain: b, sparse: [c]}"], "empty.csv: the file is empty"),
    (["train", "--set", "data.kind=table", "--set", "data.path=DIR/latin1.csv", "--set", "data.schema={label: a, "
      "domain: b, sparse: [c]}"], "latin1.csv, line 3: not UTF-8 text"),
    (["eval", "--checkpoint", "DIR/nothing.pt"], "checkpoint not found: DIR/nothing.pt"),
    (["train", "--output", "DIR/empty.csv/run"], "cannot write into the output directory DIR/empty.csv/run"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "latin1.csv").write_bytes(b"a,b,c\n1,0,x\n0,1,caf\xe9\n")
    args = [a.replace("DIR", str(tmp_path)) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    if args[0] == "train" and args[1:3] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) if args[1] == "--threads" else contextlib.nullcontext():
        assert main(args + ["--quiet"]) == 2
    assert message.replace("DIR", str(tmp_path)) in _error_line(capsys)


def test_usage_errors_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--threads", "0"])
    assert stop.value.code == 2 and "--threads: expected a whole number >= 1, got 0" in _error_line(capsys)


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["train", "--device", "cuda", "--output", str(tmp_path), "--quiet"]) == 2
    assert "device 'cuda' was asked for, but CUDA is not available here" in _error_line(capsys)


def test_runs_that_cannot_train_fail_loudly(config_file, tmp_path, capsys):
    assert main(["train", "--config", str(config_file), "--quiet", "--set", "train.lr=1e12"]) == 1
    assert "the training loss became nan" in _error_line(capsys)
    assert main(["train", "--config", str(config_file), "--quiet", "--set", "train.lr=1e-3"]) == 0  # parses
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    assert main(["train", "--resume", checkpoint, "--set", "train.lr=0.1", "--quiet"]) == 2
    assert "--resume continues a run with its recorded settings, so ['train.lr'] cannot change" in _error_line(capsys)
    assert main(["train", "--resume", checkpoint, "--epochs", "3", "--output", str(tmp_path / "more"), "--quiet"]) == 0
    assert len(json.loads((tmp_path / "more" / "metrics.json").read_text())) == 3
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())) == 2  # the original run is untouched
