"""MMoE: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018), domains as tasks."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import DomainLinear
from .backbones import DomainTowers
from .base import MultiDomainModel
from .blocks import MLP, mixture


class MMoE(MultiDomainModel):
    """Shared experts mixed by one softmax gate per domain (the paper's tasks k are the domains d).

    ``f^d(e) = sum_i g^d(e)_i f_i(e)``, ``g^d(e) = softmax(W_{g,d} e)``, ``y_d = h^d(f^d(e))``.
    Experts ``f_i`` are MLPs ``expert_dims``; towers ``h^d`` are ``tower_dims -> 1``. Each row only
    needs its own domain's gate and tower, selected from stacked per-domain weights (no loop over domains).
    """

    def __init__(self, input_dim: int, num_domains: int, num_experts: int = 4, expert_dims=(256, 128),
                 tower_dims=(64,), dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.experts = nn.ModuleList(MLP(input_dim, list(expert_dims), dropout) for _ in range(num_experts))
        self.gates = DomainLinear(input_dim, num_experts, num_domains)
        self.towers = DomainTowers.plain(self.experts[0].output_dim, num_domains, tower_dims)

    def compute_logits(self, e, domain):
        experts = torch.stack([expert(e) for expert in self.experts], dim=1)  # (B, n, h)
        weights = torch.softmax(self.gates.routed(e, domain), dim=1)  # (B, n): row b's own domain gate
        return self.towers(mixture(weights, experts), domain, None)
