"""Load a golden file of ../shared/golden into a released-mode HAMUR model (used by parity tests)."""
from __future__ import annotations

import json

import numpy as np
import torch

import hamur_fast as hf

BUFFER_WORDS = ("running_mean", "running_var", "num_batches_tracked")


def load(path):
    return np.load(path)


def released_model(golden, dtype=torch.float64):
    """The released-mode model for a golden file, loaded through the released checkpoint layout."""
    dims = [int(v) for v in golden["config_fcn_dims"]]
    # MovieLens: one cell after the last layer; Ali-CCP: cells after layers 6 and 7 (1-based).
    adapter_after = [len(dims) - 1] if len(dims) == 2 else [5, 6]
    model = hf.models.HAMUR(
        golden["input_e"].shape[1], int(golden["config_domains"]), backbone="mlp", mode="released",
        dims=dims, adapter_after=adapter_after, hyper_dims=[int(v) for v in golden["config_hyper_dims"]],
        rank=int(golden["config_k"]), bottleneck=int(golden["config_bottleneck"]),
        eps=float(golden["config_eps"]),
    ).to(dtype)
    hf.compat.load_released_state_dict(model, released_state_dict(golden))
    return model


def released_keys(golden) -> dict:
    return json.loads(str(golden["released_keys"]))


def released_state_dict(golden) -> dict:
    """What the released code's ``state_dict()`` held before the golden forward."""
    state = {}
    for name, key in released_keys(golden).items():
        source = f"init/{name}" if name.endswith(BUFFER_WORDS) else name
        state[key] = torch.from_numpy(np.array(golden[source]))
    return state


def our_tensor(model, golden, name, kind):
    """Our counterpart of a golden parameter ('grad') or buffer ('after'), sliced to one tower."""
    key, domain = hf.compat._released_to_ours(model)[released_keys(golden)[name]]
    table = dict(model.named_parameters()) if kind == "grad" else dict(model.named_buffers())
    tensor = table[key].grad if kind == "grad" else table[key]
    return tensor if domain is None else tensor[domain]
