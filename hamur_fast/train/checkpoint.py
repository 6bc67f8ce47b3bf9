"""Checkpoints: one file with model, optimizer, feature map, config and training progress, written atomically.

Version 2: ``model`` holds the last weights (where a resume continues), ``best_model`` the best by validation
AUC, ``config.train`` every setting of the run (thread count included) and ``run`` the data fingerprint and
the torch version and device it ran with. Version 1 files (``model`` = the best weights at the end of a run)
are still read.
"""
from __future__ import annotations

import math
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
    _check_sections(payload, path)
    return payload


def _check_sections(payload: dict, path) -> None:
    """The plain-data sections are dicts where the readers expect dicts (their contents are checked by the code
    that reads them: the config by the model and train options, the tensors by check_weights and the like)."""
    config = payload["config"]
    sections = {"config": config, "feature_map": payload["feature_map"], "progress": payload["progress"]}
    if isinstance(config, dict):
        sections.update({f"config.{name}": config.get(name) for name in ("model", "train")})
        if config.get("data") is not None:
            sections["config.data"] = config["data"]
    for name, value in sections.items():
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: its {name} is {_describe(value)}, not a mapping (a corrupt checkpoint)")


# ---------------------------------------------------------------------------- validation against the model
# Every tensor of a checkpoint is checked against the model and optimizer it is about to be loaded into, before
# anything is loaded: a mis-shaped optimizer moment would otherwise reach the fused Adam kernel (which trusts
# shapes), and corrupt best weights would surface only after an epoch of training.
def check_weights(state, model: torch.nn.Module, what: str) -> None:
    """``state`` holds exactly ``model``'s state-dict keys, each a tensor of its shape and dtype, all finite."""
    expected = model.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: a {type(state).__name__}, not a state dict of tensors")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{what} do not fit the model its config describes: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    for key, reference in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != reference.shape or value.dtype != reference.dtype:
            raise CheckpointError(f"{what} do not fit the model its config describes: {key} must be a "
                                  f"{reference.dtype} tensor of shape {tuple(reference.shape)}, got {_describe(value)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{what}: {key} holds NaN or infinite values (a diverged or corrupt run)")


def check_optimizer_state(state, optimizer: torch.optim.Optimizer) -> None:
    """``state`` is a state dict of ``optimizer``: its groups hold as many parameters, every per-parameter tensor
    (Adam's moments) has its parameter's shape and dtype, and every number is finite."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        raise CheckpointError("the optimizer state is not a torch optimizer state dict")
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"the optimizer state has {len(state['param_groups'])} parameter groups, the "
                              f"optimizer {len(optimizer.param_groups)}")
    params = {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list) \
                or len(saved["params"]) != len(group["params"]):
            raise CheckpointError("the optimizer state's parameter groups do not fit the model's parameters")
        for name, value in saved.items():
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise CheckpointError(f"the optimizer state's {name} is {value}")
        params.update(zip(saved["params"], group["params"]))
    if len(params) != sum(len(group["params"]) for group in optimizer.param_groups):
        raise CheckpointError("the optimizer state names a parameter twice")
    for index, entry in state["state"].items():
        if index not in params or not isinstance(entry, dict):
            raise CheckpointError(f"the optimizer state holds an entry for unknown parameter {index!r}")
        param = params[index]
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"the optimizer state's {name} of parameter {index} is {_describe(value)}")
            if value.dim() and (value.shape != param.shape or value.dtype != param.dtype):
                raise CheckpointError(f"the optimizer state's {name} of parameter {index} is {_describe(value)}, "
                                      f"the parameter a {param.dtype} tensor of shape {tuple(param.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"the optimizer state's {name} of parameter {index} holds NaN or infinity")


def check_progress(progress) -> None:
    """The training progress a resume continues from: counters, the history and the random state."""
    if not isinstance(progress, dict):
        raise CheckpointError(f"the checkpoint's progress is a {type(progress).__name__}, not a dict")
    for name, kind in (("epoch", int), ("best_epoch", int), ("bad_epochs", int), ("best_auc", (int, float))):
        value = progress.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0) \
                or (name == "best_auc" and not math.isfinite(value) and value != float("-inf")):
            raise CheckpointError(f"the checkpoint's progress.{name} is {_describe(value)}")
    history = progress.get("history")
    if not isinstance(history, list) or not all(isinstance(row, dict) and isinstance(row.get("epoch"), int)
                                                for row in history):
        raise CheckpointError("the checkpoint's progress.history is not a list of per-epoch records")
    rng, reference = progress.get("rng"), torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != reference.dtype or rng.shape != reference.shape:
        raise CheckpointError(f"the checkpoint's random state is {_describe(rng)}, not a CPU generator state "
                              f"({reference.dtype}, {tuple(reference.shape)})")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"
