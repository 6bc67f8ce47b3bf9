"""M3oE: Multi-Domain Multi-Task Mixture-of-Experts (Zhang et al., SIGIR 2024), one task (CTR)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..nn import DomainLinear
from .base import MultiDomainModel
from .blocks import mixture
from .star import StarLinear


def layer_norm_mlp(input_dim: int, dims) -> nn.Sequential:
    """``Linear -> LayerNorm -> ReLU`` per width in ``dims`` (M3oE's expert block)."""
    widths = [input_dim, *dims]
    return nn.Sequential(*[block for i, o in zip(widths, widths[1:])
                           for block in (nn.Linear(i, o), nn.LayerNorm(o), nn.ReLU())])


class DomainLayerNorm(nn.Module):
    """LayerNorm with one affine map per domain: statistics per row, ``weight[d]``/``bias[d]`` after."""

    def __init__(self, width: int, num_domains: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_domains, width))
        self.bias = nn.Parameter(torch.zeros(num_domains, width))

    def routed(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """x (B, width): row b uses domain d_b's affine map."""
        return F.layer_norm(x, x.shape[-1:]) * self.weight[domain] + self.bias[domain]

    def all_domains(self, x: torch.Tensor) -> torch.Tensor:
        """x (D, B, width): slice d uses domain d's affine map."""
        return F.layer_norm(x, x.shape[-1:]) * self.weight.unsqueeze(1) + self.bias.unsqueeze(1)


class DomainExperts(nn.Module):
    """One ``layer_norm_mlp`` expert per domain, every domain's expert on every row: (B, in) -> (D, B, out)."""

    def __init__(self, input_dim: int, dims, num_domains: int):
        super().__init__()
        widths = [input_dim, *dims]
        self.linears = nn.ModuleList(DomainLinear(i, o, num_domains) for i, o in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(DomainLayerNorm(o, num_domains) for o in widths[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for depth, (linear, norm) in enumerate(zip(self.linears, self.norms)):  # the first layer: one shared input
            x = torch.relu(norm.all_domains(linear.every_domain(x) if depth == 0 else linear.all_domains(x)))
        return x


class M3oE(MultiDomainModel):
    """Shared, domain and task experts fused by learned weights, then the domain's tower.

    - Multi-domain input fusion (star topology, :class:`StarLinear`): ``h = f(e (W * W_d) + b + b_d) + f_s(e)``
      with ``f``, ``f_s`` = ``Linear -> LayerNorm -> ReLU`` blocks (``star_dims``; ``f_s`` the skip path).
    - Shared experts ``E_i(h)``, ``i < num_experts``, mixed by the domain's gate on the stop-gradient of
      ``h``: ``S_d = sum_i softmax(W_{g,d} sg(h))_i E_i(h)``.
    - Domain experts ``D_j(h)``, one per domain, balanced between the row's own and the others':
      ``B_d = beta_d D_d(h) + (1 - beta_d) / (D - 1) sum_{j != d} D_j(h)``.
    - Task experts, balanced the same way over tasks with ``beta_t``: with one task (CTR) this is the one
      task expert ``T(h)``.
    - Fusion: ``z = S_d + alpha_d B_d + alpha_t T(h)``, ``y_d = tower_d(z)`` with ``tower_d`` =
      ``Linear -> LayerNorm -> ReLU -> Linear(., 1)`` per domain.

    ``alpha_d, alpha_t, beta_d = sigmoid(theta)`` are the fusion weights that M3oE searches by AutoML; as
    in the released code (a sigmoid of a learned scalar each) they are learned jointly with the model by
    ordinary gradient descent, not by a separate bi-level search; ``theta`` starts at 0 (weights 0.5). The
    star-topology input layer follows the released code. Experts are ``expert_dims`` wide
    ``layer_norm_mlp`` blocks. The balancing mixes every domain's expert, so all D domain experts run on
    every row (stacked per-domain layers); towers and gates run per row on its own domain only.

    Reduction to our inputs: the paper trains several tasks (e.g. click and conversion); the zoo scores
    one task, so the task-balancing weight ``beta_t`` has nothing to balance and is absent, and the task
    expert is a single expert used by every row.
    """

    def __init__(self, input_dim: int, num_domains: int, star_dims=(256, 128), expert_dims=(64,),
                 num_experts: int = 4):
        super().__init__(input_dim, num_domains)
        if len(star_dims) != 2 or len(expert_dims) < 1 or num_experts < 1:
            raise ValueError(f"M3oE needs star_dims of two widths, >= 1 expert width and >= 1 shared expert, got "
                             f"star_dims={star_dims}, expert_dims={expert_dims}, num_experts={num_experts}")
        self.star = StarLinear(input_dim, star_dims[0], num_domains)
        self.star_mlp = layer_norm_mlp(star_dims[0], star_dims[1:])
        self.skip = layer_norm_mlp(input_dim, star_dims[1:])
        width, expert_width = star_dims[1], expert_dims[-1]
        self.shared_experts = nn.ModuleList(layer_norm_mlp(width, expert_dims) for _ in range(num_experts))
        self.gates = DomainLinear(width, num_experts, num_domains)
        self.domain_experts = DomainExperts(width, expert_dims, num_domains)
        self.task_expert = layer_norm_mlp(width, expert_dims)
        self.fusion_theta = nn.Parameter(torch.zeros(3))  # alpha_d, alpha_t, beta_d before the sigmoid
        self.tower_hidden = DomainLinear(expert_width, expert_width, num_domains)
        self.tower_norm = DomainLayerNorm(expert_width, num_domains)
        self.tower_out = DomainLinear(expert_width, 1, num_domains)

    def compute_logits(self, e, domain):
        h = self.star_mlp(self.star(e, domain)) + self.skip(e)
        experts = torch.stack([expert(h) for expert in self.shared_experts], dim=1)  # (B, n, w)
        shared = mixture(torch.softmax(self.gates.routed(h.detach(), domain), dim=1), experts)
        alpha_domain, alpha_task, beta_domain = torch.sigmoid(self.fusion_theta).unbind()
        z = (shared + alpha_domain * self.balanced_domain_experts(h, domain, beta_domain)
             + alpha_task * self.task_expert(h))
        z = torch.relu(self.tower_norm.routed(self.tower_hidden.routed(z, domain), domain))
        return self.tower_out.routed(z, domain).squeeze(1)

    def balanced_domain_experts(self, h: torch.Tensor, domain: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """``B_d = beta D_d(h) + (1 - beta) mean_{j != d} D_j(h)``; with one domain, ``D_d(h)`` alone."""
        every_domain = self.domain_experts(h)  # (D, B, w)
        own = every_domain[domain, torch.arange(h.shape[0], device=h.device)]
        if self.num_domains == 1:
            return own
        others = (every_domain.sum(dim=0) - own) / (self.num_domains - 1)
        return beta * own + (1 - beta) * others
