"""SAR-Net: Scenario-Aware Ranking Network (Shen et al., CIKM 2021), on the embedded instance."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import DomainBatchNorm1d, DomainLinear
from .base import MultiDomainModel
from .blocks import MLP, mixture


class SARNet(MultiDomainModel):
    """Scenario-specific transfer of the instance, a mixture of shared and scenario-specific debias
    experts, and a shared tower.

    - Scenario-specific transformation: ``t = w_d * e + b_d`` (element-wise; ``w_d`` starts at ones and
      ``b_d`` at zeros, so every scenario starts from the shared representation).
    - Debias experts: ``E_i(t) = W_i BN_i(t) + c_i``, ``shared_experts`` of them used by every scenario and
      ``specific_experts`` per scenario, each of width ``expert_dim``. The shared experts normalise one
      input, so they share one BatchNorm (their per-expert affine maps fold into ``W_i``) and run as one
      stacked Linear; a scenario's experts normalise with that scenario's statistics (per-domain
      BatchNorm, running statistics in eval) and run as one per-domain Linear on the row's own domain.
    - Multi-gate mixture: ``g = softmax(W_{g,d} t + b_{g,d})`` over the ``shared + specific`` experts of
      the row's scenario, ``z = sum_i g_i E_i(t)``.
    - Tower and scenario bias: ``logit = MLP_tower(z) + beta_d``: the paper's debias network fits each
      scenario's own click bias; with the scenario id as its only context that is one learned
      offset ``beta_d`` per domain.

    Reduction to our inputs: SAR-Net's scenario-specific attention runs over the user's behaviour
    sequence (cross-scenario behaviour extraction) with the target item and scenario as the query. The
    zoo's models see the embedded instance ``e`` (sparse-field embeddings concatenated, dense appended),
    with no behaviour sequence to attend over, so ``e`` stands in for the attention's output and the
    model starts at the scenario-specific transformation. Defaults: 8 shared and 2 specific experts of
    width 16, tower 32-32 (the benchmark implementation's sizes).
    """

    def __init__(self, input_dim: int, num_domains: int, shared_experts: int = 8, specific_experts: int = 2,
                 expert_dim: int = 16, tower_dims=(32, 32), dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        if min(shared_experts, specific_experts, expert_dim) < 1:
            raise ValueError(f"SAR-Net needs >= 1 shared and >= 1 specific expert of width >= 1, got shared_experts="
                             f"{shared_experts}, specific_experts={specific_experts}, expert_dim={expert_dim}")
        self.num_experts, self.expert_dim = shared_experts + specific_experts, expert_dim
        self.scenario_weight = nn.Parameter(torch.ones(num_domains, input_dim))
        self.scenario_bias = nn.Parameter(torch.zeros(num_domains, input_dim))
        self.shared_norm = nn.BatchNorm1d(input_dim)
        self.shared_experts = nn.Linear(input_dim, shared_experts * expert_dim)
        self.specific_norm = DomainBatchNorm1d(input_dim, num_domains)
        self.specific_experts = DomainLinear(input_dim, specific_experts * expert_dim, num_domains)
        self.gates = DomainLinear(input_dim, self.num_experts, num_domains)
        self.tower = MLP(expert_dim, list(tower_dims), dropout)
        self.out = nn.Linear(self.tower.output_dim, 1)
        self.scenario_logit_bias = nn.Parameter(torch.zeros(num_domains))

    def compute_logits(self, e, domain):
        t = self.scenario_weight[domain] * e + self.scenario_bias[domain]
        shared = self.shared_experts(self.shared_norm(t))
        specific = self.specific_experts.routed(self.specific_norm.routed(t, domain), domain)
        experts = torch.cat([shared, specific], dim=1).view(-1, self.num_experts, self.expert_dim)
        weights = torch.softmax(self.gates.routed(t, domain), dim=1)
        z = mixture(weights, experts)
        return self.out(self.tower(z)).squeeze(1) + self.scenario_logit_bias[domain]
