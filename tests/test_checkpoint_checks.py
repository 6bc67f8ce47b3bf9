"""A checkpoint is checked against the model and optimizer before anything is loaded: every corrupt part gives
one clear error (exit 2 from the CLI), before an epoch is trained; nothing reaches a kernel unchecked."""
import pytest
import torch

from hamur_fast.cli import main
from hamur_fast.train import CheckpointError, load_trained, resume_run

from test_inference import train_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    checkpoint, _data = train_checkpoint(run_dir)
    return checkpoint, torch.load(checkpoint, weights_only=True)


def first_moment_key(payload):
    return next(iter(payload["optimizer"]["state"]))


def corrupt_moment_shape(payload):
    entry = payload["optimizer"]["state"][first_moment_key(payload)]
    entry["exp_avg"] = torch.zeros(entry["exp_avg"].numel() + 7)


def corrupt_moment_dtype(payload):
    entry = payload["optimizer"]["state"][first_moment_key(payload)]
    entry["exp_avg_sq"] = entry["exp_avg_sq"].double()


def corrupt_moment_values(payload):
    payload["optimizer"]["state"][first_moment_key(payload)]["exp_avg"].view(-1)[0] = float("nan")


def corrupt_optimizer_groups(payload):
    payload["optimizer"]["param_groups"][0]["params"] = payload["optimizer"]["param_groups"][0]["params"][:-1]


def corrupt_unknown_parameter(payload):
    payload["optimizer"]["state"][10**6] = {}


def corrupt_lr(payload):
    payload["optimizer"]["param_groups"][0]["lr"] = float("nan")


def corrupt_rng(payload):
    payload["progress"]["rng"] = torch.zeros(3, dtype=torch.uint8)


def corrupt_rng_type(payload):
    payload["progress"]["rng"] = "seed"


def corrupt_history(payload):
    payload["progress"]["history"] = "a string"


def corrupt_epoch(payload):
    payload["progress"]["epoch"] = -4


def corrupt_progress(payload):
    payload["progress"] = [1, 2]


def corrupt_last_weights(payload):
    key = next(iter(payload["model"]))
    payload["model"][key] = torch.zeros(1)


def corrupt_best_weights(payload):
    key = next(k for k, v in payload["best_model"].items() if v.is_floating_point())
    payload["best_model"][key] = torch.full_like(payload["best_model"][key], float("nan"))


def corrupt_config(payload):
    payload["config"] = ["not", "a", "dict"]


def corrupt_train_config(payload):
    payload["config"]["train"] = "adam"


RESUME_CORRUPTIONS = {
    corrupt_moment_shape: "exp_avg of parameter .* is a torch.float32 tensor of shape",
    corrupt_moment_dtype: "exp_avg_sq of parameter .* is a torch.float64 tensor",
    corrupt_moment_values: "exp_avg of parameter .* holds NaN",
    corrupt_optimizer_groups: "parameter groups do not fit",
    corrupt_unknown_parameter: "unknown parameter 1000000",
    corrupt_lr: "optimizer state's lr is nan",
    corrupt_rng: "random state is a torch.uint8 tensor of shape \\(3,\\)",
    corrupt_rng_type: "random state is str 'seed'",
    corrupt_history: "progress.history is not a list",
    corrupt_epoch: "progress.epoch is int -4",
    corrupt_progress: "its progress is list \\[1, 2\\], not a mapping",
    corrupt_last_weights: "last weights do not fit the model its config describes: .* must be a torch.float32",
    corrupt_best_weights: "best weights: .* holds NaN",
    corrupt_config: "its config is list .*, not a mapping",
    corrupt_train_config: "its config.train is str 'adam', not a mapping",
}


def write_corrupt(trained, tmp_path, corrupt):
    checkpoint, payload = trained
    payload = torch.load(checkpoint, weights_only=True)  # a fresh copy to corrupt
    corrupt(payload)
    path = tmp_path / "corrupt" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("corrupt", list(RESUME_CORRUPTIONS), ids=lambda f: f.__name__)
def test_resume_refuses_a_corrupt_checkpoint_before_training(trained, tmp_path, corrupt, monkeypatch):
    path = write_corrupt(trained, tmp_path, corrupt)
    from hamur_fast.train import Trainer

    def no_training(*args, **kwargs):
        raise AssertionError("an epoch was trained on a corrupt checkpoint")

    monkeypatch.setattr(Trainer, "fit", no_training)
    with pytest.raises(CheckpointError, match=RESUME_CORRUPTIONS[corrupt]):
        resume_run(path, epochs=3, progress=False)


@pytest.mark.parametrize("corrupt", [corrupt_moment_shape, corrupt_rng, corrupt_history, corrupt_best_weights],
                         ids=lambda f: f.__name__)
def test_cli_resume_of_a_corrupt_checkpoint_is_one_line_exit_2(trained, tmp_path, corrupt, capsys):
    path = write_corrupt(trained, tmp_path, corrupt)
    assert main(["train", "--resume", str(path), "--epochs", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err


def test_eval_refuses_nan_best_weights(trained, tmp_path, capsys):
    path = write_corrupt(trained, tmp_path, corrupt_best_weights)
    with pytest.raises(CheckpointError, match="its weights: .* holds NaN"):
        load_trained(path, "cpu")
    assert main(["eval", "--checkpoint", str(path)]) == 2
    assert "holds NaN or infinite values" in capsys.readouterr().err


def test_an_intact_checkpoint_still_resumes(trained, tmp_path):
    checkpoint, _payload = trained
    result = resume_run(checkpoint, epochs=2, progress=False, run_dir=tmp_path / "more")
    assert result.best_epoch >= 1
