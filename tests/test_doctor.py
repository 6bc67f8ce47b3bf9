"""``hamur-fast doctor`` / ``python -m hamur_fast.doctor``: the installation's report and its exit status."""
import subprocess
import sys

import pytest
import torch

from hamur_fast import cli
from hamur_fast.ops import contract, grouped_linear, registry
from hamur_fast.ops import eager as torch_backend


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the doctor's default device


def test_python_m_doctor_reports_every_backend_and_passes():
    done = subprocess.run([sys.executable, "-m", "hamur_fast.doctor", "--repeats", "1", "--dtypes", "float32,float64"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in (f"torch {torch.__version__}", "backends:", "| torch | float32 | ok |", "| torch | float64 | ok |",
                 "all checks passed"):
        assert line in done.stdout
    for name in registry.available_backends(DEVICE):
        assert f"| {name} | float32 | ok |" in done.stdout
    for name in registry.unavailable_backends():
        assert f"{name:<10} NOT available: " in done.stdout


@pytest.fixture
def wrong_backend(monkeypatch):
    """A backend whose output is off by 1e-2, registered for this test only."""
    def off(*args):
        y, stats = torch_backend.hyper_adapter(*args)
        return y + 1e-2, stats

    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    registry.register_backend(contract.Backend("off_by_a_little", off, torch_backend.domain_norm, contract.Capabilities(
        devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32})), passes=torch_backend.PASSES,
        grouped_linear=grouped_linear.torch_form))


def test_a_failing_check_is_shown_and_exits_1(wrong_backend, capsys):
    assert cli.main(["doctor", "--device", "cpu", "--repeats", "0", "--dtypes", "float32"]) == 1
    out = capsys.readouterr().out
    assert "| off_by_a_little | float32 | FAILED: relative error" in out
    assert "| torch | float32 | ok |" in out and "SOME CHECKS FAILED" in out
