"""``hamur-fast train --nproc N`` as a command: user errors before any worker starts, SIGTERM ends the workers,
a data-parallel resume reads moved data."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hamur_fast.cli import main
from hamur_fast.data import generate

HERE = Path(__file__).resolve().parent
TINY = ["--set", "data.kind=synthetic", "--set", "data.rows=3000", "--set", "model.name=hamur_mlp",
        "--set", "model.dims=[16]", "--set", "model.hyper_dims=[8]", "--set", "model.rank=4",
        "--set", "model.bottleneck=8", "--set", "train.batch_size=256", "--set", "train.device=cpu", "--quiet"]


def run_cli(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hamur_fast.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=timeout, cwd=HERE.parent)


@pytest.mark.parametrize("error, message", [
    (["--set", "train.grad_clip=-1"], "train.grad_clip"),
    (["--set", "model.dropout=2.0"], "model.dropout must satisfy"),
    (["--set", "data.kind=table", "--set", "data.path=/no/such/file.csv"], "data file not found: /no/such/file.csv"),
    (["--resume", "/no/such/checkpoint.pt"], "checkpoint not found"),
])
def test_a_user_error_under_nproc_is_one_line_before_any_worker_starts(tmp_path, error, message):
    started = time.perf_counter()
    args = ["train", "--nproc", "2", "--output", str(tmp_path / "run")]
    result = run_cli(args + (TINY + error if error[0] != "--resume" else error), timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert "ChildFailedError" not in result.stderr and not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 60


def processes_naming(text: str) -> list:
    """Ids of the live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_sigterm_to_train_nproc_2_ends_its_workers(tmp_path):
    run = tmp_path / "sigterm-run"
    command = [sys.executable, "-m", "hamur_fast.cli", "train", "--nproc", "2", "--output", str(run), *TINY,
               "--set", "train.epochs=500", "--set", "train.patience=500"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.json").exists():  # the workers have trained an epoch
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        assert len(processes_naming(str(run))) >= 3  # this command, torchrun's agent (or the command), 2 workers
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) != 0
        deadline = time.monotonic() + 60
        while processes_naming(str(run)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_naming(str(run)), "workers still run after the command ended"
    finally:
        for pid in processes_naming(str(run)):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def test_a_data_parallel_resume_reads_moved_data(tmp_path):
    first, moved = tmp_path / "first" / "clicks.csv", tmp_path / "moved" / "clicks.csv"
    first.parent.mkdir()
    generate(rows=3000, seed=4).to_csv(first, index=False)
    model = ["--set", "model.name=hamur_mlp", "--set", "model.dims=[16]", "--set", "model.hyper_dims=[8]",
             "--set", "model.rank=4", "--set", "model.bottleneck=8"]
    data = ["--set", "data.kind=table", "--set", f"data.path={first}",
            "--set", "data.schema={label: click, domain: domain, sparse: [user_id, item_id], dense: [x_num]}"]
    train = ["--set", "train.batch_size=256", "--set", "train.device=cpu", "--set", "train.epochs=1", "--quiet"]
    assert main(["train", "--output", str(tmp_path / "run"), *model, *data, *train]) == 0
    shutil.move(first.parent, moved.parent)
    result = run_cli(["train", "--nproc", "2", "--resume", str(tmp_path / "run" / "checkpoint.pt"), "--epochs", "2",
                      "--set", f"data.path={moved}", "--quiet"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test metrics (hamur_mlp") == 1
