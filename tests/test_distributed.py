"""Data-parallel training equals one process: 2 gloo CPU processes under torchrun against one process on the
same global batches (tests/distributed_workers.py runs the ranks; one launch serves every test here)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_workers as workers
from helpers import FP32_FACTOR, fp32_bound, rel_err

from hamur_fast.ops.collectives import merge_moments
from hamur_fast.ops.eager import group_statistics
from hamur_fast.train import domain_metrics

HERE = Path(__file__).resolve().parent
WORLD = 2
FP64_TOLERANCE = 1e-10
# fp32: the N-rank run's error against the float64 run of the same computation, within helpers.fp32_bound of one
# process's (plain PyTorch's) error there. A fixed 1e-5 failed at 1.85e-5 in a fresh venv; some gradients here
# reach 2.2e-5 in plain PyTorch; seen: at most 4.4x one process's error. A missed reduction is off by far more.
# A gradient zero in exact arithmetic (a bias before a normalisation) is a cancelling sum over the batch: its
# residue is judged at the scale of the largest gradient, where both runs leave a few ulps times its terms.
FP32_NULL_FLOOR = 64 * 2.0 ** -24


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
    suites = [name for name in workers.SUITES if name != "torchrec" or importlib.util.find_spec("torchrec")]
    torchrun([str(HERE / "distributed_workers.py"), str(out), *suites])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_close(actual, expected, tolerance, what):
    error = rel_err(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"


def as_float64(case):
    """The same case in float64 (the Triton interpreter's float64 is the torch backend's math)."""
    name, mode, backend, _ = case
    return name, mode, "torch" if backend == "triton" else backend, torch.float64


class Judge:
    """Compares an N-rank value with one process's. float64: within FP64_TOLERANCE of it. float32: against the
    float64 run of the same computation (``exact``), within fp32_bound of one process's fp32 error there.
    ``scale``: judge the error at this size instead of the expected value's own (a quantity zero in exact math)."""

    def __init__(self, dtype):
        self.fp32 = dtype == torch.float32

    def __call__(self, actual, one_process, exact, what, scale=None):
        actual, one_process = torch.as_tensor(actual), torch.as_tensor(one_process)
        target = torch.as_tensor(exact if self.fp32 else one_process).to(torch.float64)
        size = scale if scale is not None else target.abs().max().item()

        def error(value):
            diff = (value.to(torch.float64) - target).abs().max().item()
            return diff / size if size > 0 else diff

        if not self.fp32:
            bound = FP64_TOLERANCE
        elif scale is not None:  # a cancelling sum: its own floor
            bound = FP32_FACTOR * error(one_process) + FP32_NULL_FLOOR
        else:
            bound = fp32_bound(error(one_process))
        assert error(actual) <= bound, f"{what}: relative error {error(actual):.3g} > {bound:.3g}"


def null_parameters(case) -> set:
    """Parameters that cannot change the loss: a bias just before a normalisation. Their exact gradient is 0 and
    both runs hold rounding noise there, so they are compared at the scale of all gradients (and of all
    parameters), not relative to their own noise. Found in float64: gradient <= 1e-12 of the largest, every step."""
    name, mode, backend, _ = case  # a property of the model: found with a float64-capable backend
    steps = workers.one_process((name, mode, "torch" if backend == "triton" else backend, torch.float64))["steps"]
    null = None
    for step in steps:
        scale = max(g.abs().max().item() for g in step["grads"].values())
        tiny = {n for n, g in step["grads"].items() if g.abs().max() <= 1e-12 * scale}
        null = tiny if null is None else null & tiny
    assert all(name.endswith("bias") for name in null), null
    return null


def assert_like_one_process(rank_steps: list, reference_steps: list, case, tables=None, exact_steps=None):
    """Each rank's records after steps 1 and 3 against one process's: the mean loss over the ranks, every
    gradient, every parameter and buffer. ``tables``: TorchRec name -> plain name; their shards (the tables'
    gradients are applied inside the backward, so they show in the rows after the step) are compared with the
    plain tables' rows, and together must cover them. ``exact_steps``: the float64 run that judges float32."""
    close = Judge(case[3])
    exact_steps = exact_steps or reference_steps
    null = null_parameters(case)
    for index, (ref, exact) in enumerate(zip(reference_steps, exact_steps)):
        step = (1, workers.STEPS)[index]
        # Each rank reports the mean loss of its rows; the global batch's mean is their average.
        loss = sum(steps[index]["loss"] for steps in rank_steps) / WORLD
        close(loss, ref["loss"], exact["loss"], f"step {step} loss")
        scale = max(g.abs().max().item() for g in exact["grads"].values())
        value_scale = max(v.abs().max().item() for v in exact["state"].values() if v.is_floating_point())
        covered = {}
        for rank, steps in enumerate(rank_steps):
            mine = steps[index]
            expected_grads = {n: g for n, g in ref["grads"].items() if not (tables and n in tables.values())}
            assert mine["grads"].keys() == expected_grads.keys()
            for name, grad in expected_grads.items():
                close(mine["grads"][name], grad, exact["grads"][name], f"rank {rank} step {step} grad {name}",
                      scale if name in null else None)
            for key, value in mine["state"].items():
                what = f"rank {rank} step {step} {key}"
                if isinstance(key, tuple):  # (TorchRec table, first row) -> this rank's shard
                    name, first = tables[key[0]], key[1]
                    rows = slice(first, first + len(value))
                    covered[name] = covered.get(name, 0) + len(value)
                    close(value, ref["state"][name][rows], exact["state"][name][rows], what)
                elif value.is_floating_point():
                    close(value, ref["state"][key], exact["state"][key], what, value_scale if key in null else None)
                else:  # num_batches_tracked
                    assert torch.equal(value, ref["state"][key]), what
            plain_keys = {k for k in mine["state"] if not isinstance(k, tuple)}
            assert plain_keys == set(ref["state"]) - set((tables or {}).values())
        if tables:
            assert covered == {name: len(ref["state"][name]) for name in tables.values()}


@pytest.mark.parametrize("case", workers.CASES, ids=workers.case_key)
def test_two_ranks_train_like_one_process(ranks, case):
    """Loss, every gradient, every parameter and every running statistic after 1 and 3 steps."""
    reference, exact = workers.one_process(case), workers.one_process(as_float64(case))
    key = workers.case_key(case)
    assert_like_one_process([r["equivalence"][key]["steps"] for r in ranks], reference["steps"], case,
                            exact_steps=exact["steps"])
    # Predictions of the trained model, each eval batch split across the ranks and gathered.
    for rank_results in ranks:
        Judge(case[3])(rank_results["equivalence"][key]["predictions"], reference["predictions"],
                       exact["predictions"], "predictions")


# Each kernel backend's split passes: where they live, and which the adapter cell of a synchronised step runs
# (Triton splits its fused cell; the C++ cell projects by torch ops and normalises by its norm passes).
PASS_MODULES = {"cpu": {"hamur_fast.ops.backends.compiled"},
                "triton": {"hamur_fast.ops.backends.triton", "hamur_fast.kernels.domain_norm",
                           "hamur_fast.kernels.adapter_cell"}}
CELL_PASSES = {"cpu": {f"norm.{name}" for name in workers.SPLIT_PASSES["norm"]},
               "triton": {f"cell.{name.removeprefix('cell_')}" for name in workers.SPLIT_PASSES["cell"]}}


@pytest.mark.parametrize("case", [c for c in workers.CASES if c[2] in PASS_MODULES], ids=workers.case_key)
def test_under_sync_the_kernel_backend_runs_its_own_split_passes(ranks, case):
    """The model's adapter cell (the hamur op of hamur_mlp), in each of the three synchronised steps, ran the
    chosen kernel backend's split passes (its kernels), not the torch backend's: counted by wrapping every
    backend's passes in the workers."""
    backend = case[2]
    for rank_results in ranks:
        calls = rank_results["equivalence"][workers.case_key(case)]["passes"]
        assert {b for b, _, _ in calls} == {backend}, calls
        assert {module for _, _, module in calls} <= PASS_MODULES[backend], calls
        per_pass = {name: n for (_, name, _), n in calls.items()}
        assert set(per_pass) == CELL_PASSES[backend], calls
        # every pass equally often: once per cell call (one cell; one per tower in released mode) and step
        calls_per_step, remainder = divmod(per_pass.popitem()[1], workers.STEPS)
        assert calls_per_step > 0 and remainder == 0 and set(per_pass.values()) == {calls_per_step * workers.STEPS}


@pytest.mark.parametrize("sharding", workers.TORCHREC_SHARDINGS)
@pytest.mark.parametrize("case", workers.TORCHREC_CASES, ids=workers.case_key)
def test_torchrec_sharded_feature_stage_trains_like_nn_embedding(ranks, case, sharding):
    """The feature stage as a TorchRec EmbeddingBagCollection sharded by DistributedModelParallel (table-wise:
    each table on one rank; row-wise: each table's rows split over both; fused SGD on the tables), HAMUR as the
    dense part, 2 ranks, against one process with nn.Embedding tables."""
    if "torchrec" not in ranks[0]:
        pytest.skip("torchrec is not installed (pip install hamur_fast[torchrec])")
    fields = workers.feature_map().sparse_fields
    tables = {f"features.ebc.embedding_bags.table_{field}.weight": f"features.tables.{i}.weight"
              for i, field in enumerate(fields)}
    key = f"{sharding}-{workers.case_key(case)}"
    holders = {name: {rank for rank, r in enumerate(ranks) for k in r["torchrec"][key][0]["state"]
                      if isinstance(k, tuple) and k[0] == name} for name in tables}
    # Table-wise: each table whole on one rank; row-wise: each table's rows split over both ranks.
    assert all(len(held) == (WORLD if sharding == "row_wise" else 1) for held in holders.values()), holders
    assert_like_one_process([r["torchrec"][key] for r in ranks], workers.one_process_embedding(case), case, tables,
                            workers.one_process_embedding(as_float64(case)))


def test_metrics_over_all_ranks_are_the_one_process_metrics_of_the_same_predictions(ranks):
    split = workers.eval_split(workers.feature_map())
    for key, got in ranks[0]["equivalence"].items():
        expected = domain_metrics(split.label.numpy(), got["predictions"].numpy(), split.domain.numpy(), 3,
                                  workers.config().min_domain_rows)
        assert got["metrics"] == expected, key
        assert ranks[1]["equivalence"][key]["metrics"] == expected, key


def test_chan_merge_of_rank_moments_equals_moments_of_all_rows():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, dtype=torch.float64, generator=g) * 3 + 7
    groups = torch.randint(0, 4, (40,), generator=g)
    groups[groups == 3] = 0  # group 3 absent everywhere
    groups[:20][groups[:20] == 2] = 1  # group 2 absent from the first part
    parts = [group_statistics(x[s], groups[s], 4) for s in (slice(0, 20), slice(20, 33), slice(33, 40))]
    count, mean, m2 = merge_moments(*(torch.stack(t) for t in zip(*parts)))
    expected_count, expected_mean, expected_m2 = group_statistics(x, groups, 4)
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
                                                    "metrics.json", "test_metrics.json", "train.log"]
    payload = load_checkpoint(run / "checkpoint.pt")
    assert payload["progress"]["epoch"] == 2 and payload["config"]["train"]["batch_size"] == 256

    assert cli.main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "3", "--quiet"]) == 0
    history = load_checkpoint(run / "checkpoint.pt")["progress"]["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert repr(history[:2]) == repr(payload["progress"]["history"])  # repr: nan == nan


def test_converted_batch_norms_keep_their_state_and_single_process_results():
    """Outside synchronised() a converted model is the same model: same state_dict keys, outputs and updates
    (the hyper-network's released-mode D-fold running-statistics update included)."""
    import copy

    import hamur_fast as hf
    from hamur_fast.distributed import SyncBatchNorm1d, convert_batch_norms

    torch.manual_seed(0)
    model = hf.models.build("hamur_dcn", 13, 3, mode="released", dims=[8], hyper_dims=[6], rank=3).double()
    converted = convert_batch_norms(copy.deepcopy(model))
    assert sum(isinstance(m, SyncBatchNorm1d) for m in converted.modules()) == 3  # shared MLP and hyper-network
    assert list(converted.state_dict()) == list(model.state_dict())
    e, domain = torch.randn(10, 13, dtype=torch.float64), torch.randint(0, 3, (10,))
    for _ in range(2):
        assert torch.equal(converted(e, domain), model(e, domain))
    for (name, a), b in zip(converted.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_shards_are_equal_disjoint_and_cover_all_but_the_remainder():
    from hamur_fast.data import TensorSplit
    from hamur_fast.distributed.trainer import shard

    split = TensorSplit(torch.arange(11).view(-1, 1).int(), torch.zeros(11, 1), torch.zeros(11).short(),
                        torch.zeros(11))
    parts = [shard(split, rank, 3) for rank in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted(torch.cat([p.sparse for p in parts]).view(-1).tolist()) == list(range(9))


def test_the_relaunched_command_leaves_nproc_to_torchrun():
    from hamur_fast.distributed.runtime import _without_nproc

    assert _without_nproc(["train", "--nproc", "2", "--config", "c.yaml", "--nproc=4", "--quiet"]) == [
        "train", "--config", "c.yaml", "--quiet"]
