"""Checkpoints: one file with model, optimizer, feature map, config and training progress, written atomically.

Version 2: ``model`` holds the last weights (where a resume continues), ``best_model`` the best by validation
AUC, ``config.train`` every setting of the run (thread count included) and ``run`` the data fingerprint and
the torch version and device it ran with. Version 1 files (``model`` = the best weights at the end of a run)
are still read.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .files import atomic_path

FORMAT = "hamur_fast.checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
REQUIRED_KEYS = ("config", "feature_map", "model", "best_model", "optimizer", "progress")


class CheckpointError(RuntimeError):
    """The file is not a usable hamur_fast checkpoint (truncated, corrupt, or something else)."""


def save_checkpoint(path, payload: dict) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, handle)


def load_checkpoint(path) -> dict:
    """The checkpoint's dict on CPU. Only tensors and plain containers are unpickled (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a hamur_fast checkpoint")
    if payload.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}; "
                              f"this hamur_fast reads versions {list(READABLE_VERSIONS)}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    return payload
