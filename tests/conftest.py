"""Test-wide set-up.

Triton kernels run on CPU tensors only under the interpreter, and TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports hamur_fast.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# HAMUR_FAST_SHARED points elsewhere where ../shared cannot be beside the checkout (the GPU check carries its
# golden files in .gpu_prep/shared: scripts/prepare_gpu_check.sh).
SHARED = Path(os.environ.get("HAMUR_FAST_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder: an optional extra test set (the released code's golden vectors, real
    data samples). Without it, the tests that use it are not collected (see below), so none is skipped."""
    return SHARED


def pytest_collection_modifyitems(config, items):
    """Everything the suite checks runs on data the tests generate; the tests on ../shared are extras. Where
    ../shared is absent they are deselected (counted as "deselected" and named in the summary)."""
    if SHARED.is_dir():
        return
    extras = [item for item in items if "shared_dir" in getattr(item, "fixturenames", ())]
    if extras:
        config.hook.pytest_deselected(items=extras)
        items[:] = [item for item in items if "shared_dir" not in getattr(item, "fixturenames", ())]
        config.stash[_EXTRAS] = len(extras)


_EXTRAS = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.stash.get(_EXTRAS, 0):
        terminalreporter.write_line(f"{config.stash[_EXTRAS]} optional tests on ../shared (golden vectors of the "
                                    f"released code, real data samples) not run: {SHARED} is absent")


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="module")
def one_thread():
    """These models are small: one intra-op thread is as fast, and far faster on shared, busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
