"""Eval-mode folding: a separate copy of a model whose normalisations are merged into weights.

In eval, every normalisation that uses running statistics is an affine map per channel
(``y = z * scale + shift`` with ``scale = weight / sqrt(running_var + eps)``,
``shift = bias - running_mean * scale``), so it merges exactly into the linear map before it:
- per-domain tower BatchNorm (``DomainBatchNorm1d``, and the running-statistics tower_norm variants)
  into the preceding ``DomainLinear``;
- shared ``BatchNorm1d`` into the preceding ``nn.Linear`` of a ``Linear -> BN -> ...`` block, in the
  hyper-network and in the shared MLPs (``SharedMLP``, ``MLP``);
- the adapter cell's running-statistics normalisation (paper DomainNorm, and the "batch" ablation)
  into the cell's up-projection ``up_right`` / ``up_bias`` (column scaling per domain), leaving
  ``y = x + o`` with no normalisation at all.
Folding is done in float64 and cast back, so the folded copy differs from the original by the
rounding of one multiply per weight. Folding happens only inside modules whose forward is known to
run a linear map straight into its normalisation (a model may well call ``block[0]`` and ``block[1:]``
with something in between); every other module is left as it is.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.backbones import DomainTowers, SharedMLP
from ..models.blocks import MLP
from ..nn import DomainNorm, HyperAdapter, HyperNetwork
from ..ops import generated
from ..ops.eager import adapter_projection
from ..ops.registry import resolve


def fold_for_inference(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """A folded eval-mode copy of ``model`` on ``device`` (default: the model's device); ``model`` is untouched."""
    folded = copy.deepcopy(model).eval()
    if device is not None:
        folded = folded.to(device)
    device = _device_of(folded)
    for module in list(folded.modules()):
        # Exact types: a subclass may override forward and call its layers in another order.
        if type(module) is DomainTowers:
            _fold_towers(module)
        elif type(module) is HyperNetwork:
            _fold_sequential(module.net)
        elif type(module) in (SharedMLP, MLP):
            for block in module.layers:
                _fold_sequential(block)
    _replace_adapters(folded, device)
    return folded


def needs_whole_batch(model: nn.Module) -> bool:
    """True when an eval prediction depends on the other rows of the batch.

    Released-mode DomainNorm standardises over the whole batch even in eval, and so does a
    BatchNorm without running statistics (``track_running_stats=False``): padding or splitting a
    batch would change every prediction of such a model.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            return True
        if isinstance(module, DomainNorm) and module.mode == "released":
            return True
        if isinstance(module, HyperAdapter) and module.mode == "released" and module.norm == "domain":
            return True
    return False


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _affine(weight, bias, running_mean, running_var, eps):
    """(scale, shift) in float64 of the eval normalisation ``(z - mean) / sqrt(var + eps) * weight + bias``."""
    scale = weight.double() * torch.rsqrt(running_var.double() + eps)
    return scale, bias.double() - running_mean.double() * scale


@torch.no_grad()
def _merge_into_linear(linear_weight, linear_bias, scale, shift) -> None:
    """In place: ``z -> z * scale + shift`` after ``x W^T + b`` becomes one linear map (W: (..., out, in))."""
    linear_weight.copy_(linear_weight.double() * scale.unsqueeze(-1))
    linear_bias.copy_(linear_bias.double() * scale + shift)


class NormFoldedAway(nn.Module):
    """Stands where a folded normalisation was; passes its input through in every calling convention."""

    def forward(self, z, domain=None):
        return z

    def routed(self, z, domain, sizes=None):
        return z

    def all_domains(self, z):
        return z

    def all_domains_relu(self, z):
        return torch.relu(z)


def _fold_towers(towers: DomainTowers) -> None:
    for j, (linear, norm) in enumerate(zip(towers.linears, towers.norms)):
        if getattr(norm, "running_mean", None) is None:
            continue  # tower_norm "layer" (statistics of each row) or "none": nothing to fold
        scale, shift = _affine(norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps)
        _merge_into_linear(linear.weight, linear.bias, scale, shift)
        towers.norms[j] = NormFoldedAway()


def _fold_sequential(sequence: nn.Sequential) -> None:
    """Fold every ``nn.Linear`` directly followed by a ``BatchNorm1d`` with running statistics."""
    for i in range(len(sequence) - 1):
        linear, norm = sequence[i], sequence[i + 1]
        if not (isinstance(linear, nn.Linear) and isinstance(norm, nn.BatchNorm1d)):
            continue
        if norm.running_mean is None or linear.bias is None:
            continue  # batch statistics in eval (track_running_stats=False) or no bias to absorb the shift
        weight = norm.weight if norm.affine else torch.ones_like(norm.running_mean)
        bias = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        scale, shift = _affine(weight, bias, norm.running_mean, norm.running_var, norm.eps)
        _merge_into_linear(linear.weight, linear.bias, scale, shift)
        sequence[i + 1] = nn.Identity()


class FoldedHyperAdapter(nn.Module):
    """An eval-only adapter cell whose normalisation is merged into ``up_right`` / ``up_bias``.

    forward(x, rep, domain) = ``x + o`` with ``o`` the cell's projection (SPEC section 2), computed
    right-to-left through the rank-k space by the eager ops.
    """

    def __init__(self, cell: HyperAdapter):
        super().__init__()
        scale, shift = _affine(cell.norm_weight, cell.norm_bias, cell.running_mean, cell.running_var, cell.eps)
        self.per_domain = cell.mode == "paper"
        dtype = cell.up_right.dtype
        for name in ("down_left", "down_right", "down_bias", "up_left"):
            self.register_buffer(name, getattr(cell, name).detach().clone())
        # o * scale + shift, column by column (per domain in paper mode): scale the columns of up_right.
        self.register_buffer("up_right", (cell.up_right.double() * scale.unsqueeze(-2)).to(dtype))
        self.register_buffer("up_bias", (cell.up_bias.double() * scale + shift).to(dtype))

    def forward(self, x, rep, domain):
        if isinstance(rep, generated.GeneratedRep):  # fused generation was forced on an eager backend
            rep = rep.materialise()
        return x + adapter_projection(x, rep, domain, self.down_left, self.down_right, self.down_bias,
                                      self.up_left, self.up_right, self.up_bias, per_domain=self.per_domain)


def _foldable_cell(cell: HyperAdapter, device: torch.device) -> bool:
    """Folding pays where the cell's normalisation runs as separate ops; a backend whose kernels fuse it
    (``capabilities.fused_cell``) applies the affine in registers, so its cells are kept as they are."""
    uses_running_stats = cell.norm == "batch" or (cell.norm == "domain" and cell.mode == "paper")
    if not uses_running_stats:
        return False
    backend = resolve(cell.backend, device, cell.up_right.dtype, cell.width, cell.rank, cell.bottleneck)
    return not backend.capabilities.fused_cell


def _replace_adapters(model: nn.Module, device: torch.device) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, HyperAdapter) and _foldable_cell(child, device):
                setattr(parent, name, FoldedHyperAdapter(child))
