"""STAR: Star Topology Adaptive Recommender (Sheng et al., CIKM 2021)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.backends.torch import project_per_domain
from .base import MultiDomainModel
from .blocks import MLP, fan_in_uniform_


class PartitionedNorm(nn.Module):
    """Partitioned normalisation: ``z' = (g * g_d) (z - mu) / sqrt(var + eps) + (b + b_d)``.

    STAR trains on single-domain batches, so its batch statistics are one domain's statistics; on a
    mixed batch that is per-domain statistics of the batch (paper-mode DomainNorm). In eval, each
    domain's moving averages are used , so a row never depends on the rest of the batch.
    """

    def __init__(self, width: int, num_domains: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.shared_weight = nn.Parameter(torch.ones(width))
        self.shared_bias = nn.Parameter(torch.zeros(width))
        self.domain_weight = nn.Parameter(torch.ones(num_domains, width))
        self.domain_bias = nn.Parameter(torch.zeros(num_domains, width))
        self.register_buffer("running_mean", torch.zeros(num_domains, width))
        self.register_buffer("running_var", torch.ones(num_domains, width))

    def forward(self, z: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return ops.domain_norm(z, domain, self.shared_weight * self.domain_weight,
                               self.shared_bias + self.domain_bias, self.running_mean, self.running_var,
                               mode="paper", training=self.training, momentum=self.momentum, eps=self.eps)


class StarLinear(nn.Module):
    """Star-topology FC layer: ``W*_d = W_d (elementwise) W``, ``b*_d = b_d + b``.

    The shared ``W`` starts as nn.Linear does and every domain's ``W_d`` at ones, so all domains start
    from the shared network and specialise from there.
    """

    def __init__(self, in_features: int, out_features: int, num_domains: int):
        super().__init__()
        self.shared_weight = nn.Parameter(fan_in_uniform_(torch.empty(in_features, out_features), in_features))
        self.shared_bias = nn.Parameter(fan_in_uniform_(torch.empty(out_features), in_features))
        self.domain_weight = nn.Parameter(torch.ones(num_domains, in_features, out_features))
        self.domain_bias = nn.Parameter(torch.zeros(num_domains, out_features))

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        weight = self.domain_weight * self.shared_weight  # (D, in, out), then each row's own slice
        return project_per_domain(x, weight, domain) + self.shared_bias + self.domain_bias[domain]


class STAR(MultiDomainModel):
    """STAR: partitioned normalisation of ``e``, a star-topology FCN ``dims -> 1`` and an auxiliary
    network: ``logit = s_m + s_a`` where ``s_a`` is a small MLP ``aux_dims -> 1`` on the domain
    indicator's embedding (a learned ``nn.Embedding`` of ``domain``) concatenated with ``e``.
    """

    def __init__(self, input_dim: int, num_domains: int, dims=(256, 128), aux_dims=(64,),
                 domain_embed_dim: int = 16, dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        self.norm = PartitionedNorm(input_dim, num_domains)
        widths = [input_dim, *dims, 1]
        self.layers = nn.ModuleList(StarLinear(i, o, num_domains) for i, o in zip(widths, widths[1:]))
        self.dropout = nn.Dropout(dropout)
        self.domain_embedding = nn.Embedding(num_domains, domain_embed_dim)
        self.auxiliary = MLP(domain_embed_dim + input_dim, list(aux_dims), dropout)
        self.auxiliary_out = nn.Linear(self.auxiliary.output_dim, 1)

    def compute_logits(self, e, domain):
        h = self.norm(e, domain)
        for layer in self.layers[:-1]:
            h = self.dropout(torch.relu(layer(h, domain)))
        main = self.layers[-1](h, domain)
        auxiliary = self.auxiliary_out(self.auxiliary(torch.cat([self.domain_embedding(domain), e], dim=1)))
        return (main + auxiliary).squeeze(1)
