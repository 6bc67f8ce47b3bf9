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


class ReleasedMLP(torch.nn.Module):
    """The released MLP model's forward, loop for loop: the baseline benchmarks measure against.

    For each domain d: the hyper-network on the whole batch, tower d on the whole batch with the
    einsum adapter cell (:func:`released_cell`) after the layers in ``adapter_after``, the output
    layer and sigmoid; then each row keeps its own domain's probability. Parameter names follow the
    released ``state_dict`` (``layer_list``, ``hyper_net``, ``u``, ``v``, ``b_list``, ``gamma1``,
    ``bias1``, ...), so its state loads into a released-mode HAMUR with :func:`load_released_state_dict`.
    Factors start at ones, as released. ``forward(e, domain) -> probabilities (B,)``.
    """

    def __init__(self, input_dim: int, num_domains: int, dims=(256, 128), hyper_dims=(64,), rank: int = 35,
                 bottleneck: int = 32, adapter_after=None, eps: float = 1e-5):
        super().__init__()
        nn = torch.nn
        self.num_domains, self.rank, self.eps = num_domains, rank, eps
        self.adapter_after = sorted(adapter_after) if adapter_after is not None else [len(dims) - 1]
        if not self.adapter_after or not all(0 <= j < len(dims) for j in self.adapter_after):
            raise ValueError(f"adapter_after must list layers in [0, {len(dims)}), got {adapter_after}")
        widths = [input_dim, *dims]

        def tower():
            layers = []
            for i, o in zip(widths, widths[1:]):
                layers += [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU()]
            return nn.Sequential(*layers, nn.Linear(widths[-1], 1))

        self.layer_list = nn.ModuleList(tower() for _ in range(num_domains))
        hyper, width = [], input_dim
        for out in [*hyper_dims, rank * rank]:
            hyper += [nn.Linear(width, out), nn.BatchNorm1d(out), nn.ReLU(), nn.Dropout(0.0)]
            width = out
        self.hyper_net = nn.Sequential(*hyper)
        cell_widths = [widths[j + 1] for j in self.adapter_after]
        self.u = nn.ParameterList(p for h in cell_widths for p in (_ones(h, rank), _ones(bottleneck, rank)))
        self.v = nn.ParameterList(p for h in cell_widths for p in (_ones(rank, bottleneck), _ones(rank, h)))
        self.b_list = nn.ParameterList(nn.Parameter(torch.zeros(n)) for h in cell_widths for n in (bottleneck, h))
        for c, h in enumerate(cell_widths):
            setattr(self, f"gamma{c + 1}", _ones(h))
            setattr(self, f"bias{c + 1}", nn.Parameter(torch.zeros(h)))

    def forward(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        outputs = []
        starts = [0] + [j + 1 for j in self.adapter_after]  # tower layers between the cells
        for d in range(self.num_domains):
            rep = self.hyper_net(e).view(-1, self.rank, self.rank)
            tower, h = self.layer_list[d], e
            for c, j in enumerate(self.adapter_after):
                h = tower[3 * starts[c]:3 * (j + 1)](h)
                h = released_cell(h, rep, self.u[2 * c], self.v[2 * c], self.b_list[2 * c], self.u[2 * c + 1],
                                  self.v[2 * c + 1], self.b_list[2 * c + 1], getattr(self, f"gamma{c + 1}"),
                                  getattr(self, f"bias{c + 1}"), self.eps)
            outputs.append(torch.sigmoid(tower[3 * starts[-1]:](h)).squeeze(1))
        prediction = torch.zeros_like(outputs[0])
        for d, out in enumerate(outputs):
            prediction = torch.where(domain == d, out, prediction)
        return prediction


def _ones(*shape) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.ones(*shape))
