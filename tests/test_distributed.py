"""Data-parallel training equals one process: 2 gloo CPU processes under torchrun against one process on the
same global batches (tests/distributed_workers.py runs the ranks; one launch serves every test here)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_workers as workers
from helpers import rel_err

from hamur_fast.distributed.statistics import local_moments, merge_moments
from hamur_fast.train import domain_metrics

HERE = Path(__file__).resolve().parent
WORLD = 2
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def torchrun(script_args: list, nproc: int = WORLD, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={nproc}", *script_args], capture_output=True, text=True,
                            env=env, timeout=timeout, cwd=HERE.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("ranks")
    torchrun([str(HERE / "distributed_workers.py"), str(out), *workers.SUITES])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_close(actual, expected, tolerance, what):
    error = rel_err(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"


def null_parameters(case) -> set:
    """Parameters that cannot change the loss: a bias just before a normalisation. Their exact gradient is 0 and
    both runs hold rounding noise there, so they are compared at the scale of all gradients (and of all
    parameters), not relative to their own noise. Found in float64: gradient <= 1e-12 of the largest, every step."""
    steps = workers.one_process((*case[:3], torch.float64))["steps"]
    null = None
    for step in steps:
        scale = max(g.abs().max().item() for g in step["grads"].values())
        tiny = {n for n, g in step["grads"].items() if g.abs().max() <= 1e-12 * scale}
        null = tiny if null is None else null & tiny
    assert all(name.endswith("bias") for name in null), null
    return null


@pytest.mark.parametrize("case", workers.CASES, ids=workers.case_key)
def test_two_ranks_train_like_one_process(ranks, case):
    """Loss, every gradient, every parameter and every running statistic after 1 and 3 steps."""
    tolerance = TOLERANCE[case[3]]
    reference = workers.one_process(case)
    null = null_parameters(case)
    key = workers.case_key(case)
    for index, (step, ref) in enumerate(zip((1, workers.STEPS), reference["steps"])):
        # Each rank reports the mean loss of its rows; the global batch's mean is their average.
        loss = sum(r["equivalence"][key]["steps"][index]["loss"] for r in ranks) / WORLD
        assert abs(loss - ref["loss"]) <= tolerance * abs(ref["loss"]), (step, loss, ref["loss"])
        scale = max(g.abs().max().item() for g in ref["grads"].values())
        for rank, rank_results in enumerate(ranks):
            mine = rank_results["equivalence"][key]["steps"][index]
            assert mine["grads"].keys() == ref["grads"].keys()
            for name, grad in ref["grads"].items():
                what = f"rank {rank} step {step} grad {name}"
                if name in null:
                    assert (mine["grads"][name] - grad).abs().max() <= tolerance * scale, what
                else:
                    assert_close(mine["grads"][name], grad, tolerance, what)
            assert mine["state"].keys() == ref["state"].keys()
            value_scale = max(v.abs().max().item() for v in ref["state"].values() if v.is_floating_point())
            for name, value in ref["state"].items():
                what = f"rank {rank} step {step} {name}"
                if name in null:
                    assert (mine["state"][name] - value).abs().max() <= tolerance * value_scale, what
                elif value.is_floating_point():
                    assert_close(mine["state"][name], value, tolerance, what)
                else:  # num_batches_tracked
                    assert torch.equal(mine["state"][name], value), what
    # Predictions of the trained model, each eval batch split across the ranks and gathered.
    for rank_results in ranks:
        assert_close(rank_results["equivalence"][key]["predictions"], reference["predictions"], tolerance,
                     "predictions")


def test_metrics_over_all_ranks_are_the_one_process_metrics_of_the_same_predictions(ranks):
    split = workers.eval_split(workers.feature_map())
    for key, got in ranks[0]["equivalence"].items():
        expected = domain_metrics(split.label.numpy(), got["predictions"].numpy(), split.domain.numpy(), 3)
        assert got["metrics"] == expected, key
        assert ranks[1]["equivalence"][key]["metrics"] == expected, key


def test_chan_merge_of_rank_moments_equals_moments_of_all_rows():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, dtype=torch.float64, generator=g) * 3 + 7
    groups = torch.randint(0, 4, (40,), generator=g)
    groups[groups == 3] = 0  # group 3 absent everywhere
    groups[:20][groups[:20] == 2] = 1  # group 2 absent from the first part
    parts = [local_moments(x[s], groups[s], 4) for s in (slice(0, 20), slice(20, 33), slice(33, 40))]
    count, mean, m2 = merge_moments(*(torch.stack(t) for t in zip(*parts)))
    expected_count, expected_mean, expected_m2 = local_moments(x, groups, 4)
    assert torch.equal(count, expected_count)
    assert_close(mean, expected_mean, 1e-14, "mean")
    assert_close(m2, expected_m2, 1e-13, "M2")
    assert torch.equal(mean[3], torch.zeros(5)) and torch.equal(m2[3], torch.zeros(5))


def test_cli_trains_on_two_processes_and_resumes_on_one(tmp_path):
    """``hamur-fast train --nproc 2``: rank 0 alone prints and writes one checkpoint; ``--resume`` with one
    process continues that run (the checkpoint does not depend on the number of processes)."""
    from hamur_fast import cli
    from hamur_fast.train import load_checkpoint

    run = tmp_path / "run"
    overrides = ["data.kind=synthetic", "data.rows=3000", "model.name=hamur_mlp", "model.dims=[16]",
                 "model.hyper_dims=[8]", "model.rank=4", "model.bottleneck=8", "train.epochs=2",
                 "train.batch_size=256", "train.device=cpu"]
    args = ["train", "--nproc", str(WORLD), "--quiet", "--output", str(run), *[a for o in overrides for a in ("--set", o)]]
    result = subprocess.run([sys.executable, "-m", "hamur_fast.cli", *args], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600, cwd=HERE.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("test metrics (hamur_mlp") == 1  # rank 0 only
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "learning_curves.png", "metrics.csv",
                                                    "metrics.json", "test_metrics.json"]
    payload = load_checkpoint(run / "checkpoint.pt")
    assert payload["progress"]["epoch"] == 2 and payload["config"]["train"]["batch_size"] == 256

    assert cli.main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "3", "--quiet"]) == 0
    history = load_checkpoint(run / "checkpoint.pt")["progress"]["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[:2] == payload["progress"]["history"]
