"""Building blocks shared by the baselines: the MLP block, expert mixtures, per-row matrices."""
from __future__ import annotations

import math

import torch
from torch import nn


def mlp_layers(input_dim: int, dims, dropout: float = 0.0) -> nn.ModuleList:
    """One ``Linear -> BatchNorm1d -> ReLU -> Dropout`` block per width in ``dims``.

    Returned as a list of blocks (not one Sequential) so that models can act between layers
    (adapter cells, gates, pruning masks).
    """
    widths = [input_dim, *dims]
    return nn.ModuleList(
        nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU(), nn.Dropout(dropout))
        for i, o in zip(widths, widths[1:])
    )


class MLP(nn.Module):
    """``mlp_layers`` run in sequence; ``output_dim`` is the last width (the input width if dims is empty)."""

    def __init__(self, input_dim: int, dims, dropout: float = 0.0):
        super().__init__()
        self.layers = mlp_layers(input_dim, dims, dropout)
        self.output_dim = dims[-1] if len(dims) else input_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def mixture(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs: weights (..., n), experts (..., n, h) -> (..., h)."""
    return (weights.unsqueeze(-1) * experts).sum(dim=-2)


def rowwise_matmul(v: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``v[b] @ matrices[b]`` for v (B, k) and matrices (B, k, m) -> (B, m)."""
    return torch.bmm(v.unsqueeze(1), matrices).squeeze(1)


def fan_in_uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """nn.Linear's default initialisation, for weights stored outside an nn.Linear."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)
