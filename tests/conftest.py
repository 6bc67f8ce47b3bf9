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

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder (spec, golden vectors, data samples); tests skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: golden vectors and data samples are unavailable")
    return SHARED


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
