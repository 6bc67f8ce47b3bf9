"""Every ```python and ```bash block of the README runs, as written, on this (CPU-only) machine.

The blocks run in a scratch directory that looks like a checkout: configs/ (linked), data/ml-1m (small
files in the GroupLens layout, written here in place of the download) and new.csv for `predict`. Python
blocks run in order in one namespace, as a reader would paste them. Bash lines run through the CLI's entry
point in this process (`hamur-fast` is `hamur_fast.cli:main`), except the lines in NOT_RUN, and long jobs get
the small overrides of SMALLER appended (for argparse, the last value of an option wins).
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from hamur_fast.cli import main

from data_files import write_merged_csv, write_ml1m

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)

NOT_RUN = {
    "bash scripts/run.sh demo": "installs with pip (network) and then runs `hamur-fast demo`, which runs here",
    "bash scripts/run.sh test": "installs with pip (network) and then runs this very suite",
    "hamur-fast download movielens-1m": "needs the internet: tests/test_download.py runs it against a local "
                                        "server, and data/ml-1m is written here instead",
    "cmake -S examples/serve_cpp": "the C++ build: tests/test_serving.py builds examples/serve_cpp this way",
    "cmake --build build/serve_cpp": "the C++ build: tests/test_serving.py builds examples/serve_cpp this way",
    "build/serve_cpp/hamur_serve": "the C++ runner: tests/test_serving.py runs it against predict --checkpoint",
}
SMALLER = {
    "demo": ["--epochs", "1", "--seeds", "1", "--set", "data.rows=3000"],
    "train": ["--epochs", "2"],
    "compare": ["--epochs", "1", "--seeds", "1"],
    "sweep": ["--epochs", "1", "--seeds", "1"],
}
NO_QUIET = {"doctor"}  # the one command without a --quiet flag (it draws no progress bars)
# Optional packages, and the import that marks a README python block needing one: such blocks run in
# test_python_blocks_needing_an_optional_package, skipped with the reason where the package is absent (the GPU
# image has no torchrec).
OPTIONAL = {"torchrec": "from hamur_fast.features_torchrec import"}

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks(language: str) -> list:
    return [code for lang, code in BLOCK.findall((REPO / "README.md").read_text()) if lang == language]


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    write_ml1m(tmp_path / "data" / "ml-1m")
    write_merged_csv(tmp_path / "new.csv", ratings=30, seed=3)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 5 and len(blocks("bash")) >= 2
    lines = [line for code in blocks("bash") for line in code.splitlines()]
    assert all(any(line.startswith(skipped) for line in lines) for skipped in NOT_RUN)  # no stale entries


def needs_optional(code: str) -> bool:
    return any(marker in code for marker in OPTIONAL.values())


def run_blocks(numbered_blocks) -> None:
    namespace = {"__name__": "__readme__"}
    for number, code in numbered_blocks:
        try:
            exec(compile(code, f"README.md python block {number + 1}", "exec"), namespace)
        except Exception as err:
            pytest.fail(f"README python block {number + 1} failed: {type(err).__name__}: {err}\n{code}")


def test_python_blocks_run_in_order(checkout):
    run_blocks((number, code) for number, code in enumerate(blocks("python")) if not needs_optional(code))
    assert (checkout / "runs" / "model.pt2").is_file() and (checkout / "runs" / "x" / "checkpoint.pt").is_file()
    assert not (checkout / "model.pt2").exists()  # examples write into runs/, never the checkout's root


@pytest.mark.parametrize("package", sorted(OPTIONAL))
def test_python_blocks_needing_an_optional_package(package, checkout):
    numbered = [(number, code) for number, code in enumerate(blocks("python")) if OPTIONAL[package] in code]
    assert numbered, f"no README python block uses {package} any more: drop it from OPTIONAL"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed here: {len(numbered)} README block(s) that use it not run")
    run_blocks(numbered)


def test_bash_blocks_run(checkout, capsys):
    ran = 0
    for code in blocks("bash"):
        for line in code.splitlines():
            words = shlex.split(line, comments=True)
            if not words or any(line.startswith(skipped) for skipped in NOT_RUN):
                continue
            assert words[0] == "hamur-fast", f"README bash line not covered by this test: {line}"
            args = words[1:] + SMALLER.get(words[1], []) + (["--quiet"] if words[1] not in NO_QUIET else [])
            status = main(args)
            assert status == 0, f"README line failed ({status}): {line}\n{capsys.readouterr().err}"
            ran += 1
    assert ran >= 9
    assert (checkout / "runs" / "scored.csv").is_file() and (checkout / "runs" / "model.pt2").is_file()
    assert {p.name for p in checkout.iterdir()} == {"configs", "data", "new.csv", "runs"}  # nothing in the root
    assert (checkout / "runs" / "released" / "checkpoint.pt").is_file()
