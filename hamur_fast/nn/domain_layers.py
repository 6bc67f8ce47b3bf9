"""Per-domain (tower) layers that run without a Python loop over domains.

Each layer stores the D domains' parameters stacked on a leading axis and offers two ways to run:
- ``routed(x, domain)``: row b goes through domain d_b's layer only (paper-mode towers);
- ``all_domains(x)``: every domain's layer sees the whole batch, giving (D, B, ...) (released mode,
  where each tower runs on the whole mixed batch and a row later takes its own tower's output).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from .. import ops
from ..ops.backends.torch import project_per_domain


class DomainLinear(nn.Module):
    """D independent ``nn.Linear(in_features, out_features)`` layers, weights (D, out, in)."""

    def __init__(self, in_features: int, out_features: int, num_domains: int):
        super().__init__()
        self.in_features, self.out_features, self.num_domains = in_features, out_features, num_domains
        self.weight = nn.Parameter(torch.empty(num_domains, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_domains, out_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default, per domain
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def routed(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return project_per_domain(x, self.weight.transpose(1, 2), domain) + self.bias[domain]

    def all_domains(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in) shared by all domains or (D, B, in) one slice per domain -> (D, B, out)."""
        if x.dim() == 2:
            return torch.einsum("bi,doi->dbo", x, self.weight) + self.bias.unsqueeze(1)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, num_domains={self.num_domains}"


class DomainBatchNorm1d(nn.Module):
    """D independent ``nn.BatchNorm1d(num_features)``; statistics per domain (routed) or per tower."""

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5, momentum: float = 0.1,
                 backend: str = "auto"):
        super().__init__()
        self.num_features, self.num_domains, self.eps, self.momentum = num_features, num_domains, eps, momentum
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(num_domains, num_features))
        self.bias = nn.Parameter(torch.zeros(num_domains, num_features))
        self.register_buffer("running_mean", torch.zeros(num_domains, num_features))
        self.register_buffer("running_var", torch.ones(num_domains, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_domains, dtype=torch.long))

    def routed(self, z: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                seen = F.one_hot(domain, self.num_domains).sum(dim=0) >= 2
                self.num_batches_tracked.add_(seen.long())
        # Per-domain batch normalisation is exactly paper-mode DomainNorm.
        return ops.domain_norm(z, domain, self.weight, self.bias, self.running_mean, self.running_var,
                               mode="paper", training=self.training, momentum=self.momentum, eps=self.eps,
                               backend=self.backend)

    def all_domains(self, z: torch.Tensor) -> torch.Tensor:
        """z: (D, B, C); domain d's statistics span the whole batch of slice d (BatchNorm1d per tower)."""
        num_domains, batch, channels = z.shape
        if self.training:
            self.num_batches_tracked.add_(1)
        flat = z.permute(1, 0, 2).reshape(batch, num_domains * channels)
        out = F.batch_norm(flat, self.running_mean.view(-1), self.running_var.view(-1),
                           self.weight.reshape(-1), self.bias.reshape(-1), self.training, self.momentum, self.eps)
        return out.view(batch, num_domains, channels).permute(1, 0, 2)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_domains={self.num_domains}"
