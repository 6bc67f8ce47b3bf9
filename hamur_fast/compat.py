"""The released HAMUR code's world: its checkpoint layout and its adapter-cell math.

``load_released_state_dict`` reads checkpoints saved by the authors' released MLP models
(``MLP_adap_2_layer_1_adp`` for MovieLens, the 7-layer two-cell Ali-CCP model) into a
``mode="released"`` :class:`hamur_fast.models.HAMUR` with the "mlp" backbone.
``released_cell`` is the released einsum formulation of the cell, kept as the baseline that
benchmarks measure against (it forms a (B, h, s) weight tensor per call).
"""
from __future__ import annotations

import re

import torch


def _released_to_ours(model) -> dict:
    """Map each released state_dict key to (our key, domain index or None)."""
    towers = model.backbone
    num_layers = len(towers.linears)
    mapping = {}
    for d in range(model.num_domains):
        for j in range(num_layers):
            for name in ("weight", "bias"):
                mapping[f"layer_list.{d}.{3 * j}.{name}"] = (f"backbone.linears.{j}.{name}", d)
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                mapping[f"layer_list.{d}.{3 * j + 1}.{name}"] = (f"backbone.norms.{j}.{name}", d)
        for name in ("weight", "bias"):
            mapping[f"layer_list.{d}.{3 * num_layers}.{name}"] = (f"backbone.out.{name}", d)
    for c in range(len(towers.adapters)):
        cell = f"backbone.adapters.{c}"
        mapping.update({
            f"u.{2 * c}": (f"{cell}.down_left", None), f"u.{2 * c + 1}": (f"{cell}.up_left", None),
            f"v.{2 * c}": (f"{cell}.down_right", None), f"v.{2 * c + 1}": (f"{cell}.up_right", None),
            f"b_list.{2 * c}": (f"{cell}.down_bias", None), f"b_list.{2 * c + 1}": (f"{cell}.up_bias", None),
            f"gamma{c + 1}": (f"{cell}.norm_weight", None), f"bias{c + 1}": (f"{cell}.norm_bias", None),
        })
    for key in model.state_dict():
        if key.startswith("hyper.net."):
            mapping["hyper_net." + key[len("hyper.net."):]] = (key, None)
    return mapping


def load_released_state_dict(model, state_dict: dict) -> None:
    """Load a state_dict saved by the released HAMUR MLP code into ``model`` (in place).

    ``model`` must be ``HAMUR(..., backbone="mlp", mode="released")`` with the released sizes.
    Every released key must be present and every parameter and buffer of ``model`` covered;
    a missing, unexpected or mis-shaped entry raises ``ValueError`` naming it, and ``model`` is
    left unchanged.
    """
    if getattr(model, "mode", None) != "released" or getattr(model, "backbone_name", None) != "mlp":
        raise ValueError("released checkpoints exist for the MLP models only: build "
                         "HAMUR(..., backbone='mlp', mode='released') to load one")
    if model.hyper is None:
        raise ValueError("the released models all have adapters; build the model with use_adapter=True")
    mapping = _released_to_ours(model)
    missing = sorted(set(mapping) - set(state_dict), key=_natural)
    unexpected = sorted(set(state_dict) - set(mapping), key=_natural)
    if missing or unexpected:
        raise ValueError(f"released state_dict does not match this model: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    for released_key, (key, d) in mapping.items():
        value = torch.as_tensor(state_dict[released_key])
        target = ours[key] if d is None else ours[key][d]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{released_key}: shape {tuple(value.shape)} does not fit {key} "
                             f"{'[' + str(d) + '] ' if d is not None else ''}of shape {tuple(target.shape)}")
        target.copy_(value)
    covered = {key for key, _ in mapping.values()}
    uncovered = sorted(set(ours) - covered)
    if uncovered:
        raise ValueError(f"model entries not set by the released checkpoint: {uncovered}")
    model.load_state_dict(ours, strict=True)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def released_cell(x, rep, u_down, v_down, b_down, u_up, v_up, b_up, gamma, beta, eps=1e-5):
    """The adapter cell exactly as the released code computes it (einsum, (B, h, s) weights)."""
    w1 = torch.einsum("mi,bij,jn->bmn", u_down, rep, v_down)
    hidden = torch.sigmoid(torch.einsum("bf,bfj->bj", x, w1) + b_down)
    w2 = torch.einsum("mi,bij,jn->bmn", u_up, rep, v_up)
    o = torch.einsum("bf,bfj->bj", hidden, w2) + b_up
    mean = o.mean(dim=0)
    var = o.var(dim=0)
    return x + gamma * (o - mean) / torch.sqrt(var + eps) + beta
