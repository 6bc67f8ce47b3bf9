"""APG: Adaptive Parameter Generation network (Yan et al., NeurIPS 2022)."""
from __future__ import annotations

import torch
from torch import nn

from .base import MultiDomainModel
from .blocks import rowwise_matmul


def _normal_fan_in(*shape: int) -> nn.Parameter:
    # N(0, 1/fan_in) keeps the variance of a chain of factor products at one, where nn.Linear's
    # uniform init would shrink it by 3 per factor.
    return nn.Parameter(torch.randn(*shape) / shape[0] ** 0.5)


class APGLinear(nn.Module):
    """A layer whose weight is generated per instance through a low-rank decomposition.

    ``W_b = U S_b V`` (APG's low-rank parameterisation with parameter sharing): ``U`` (in, K)
    and ``V`` (K, out) are shared, ``S_b = reshape(G(z_b))`` (K, K) is generated from the condition
    ``z_b`` by the MLP ``G``. The product is evaluated right-to-left, ``((x U) S_b) V + b`` ("decomposed
    feed-forward"), so no (B, in, out) weight ever exists. Over-parameterisation: ``U =
    U_l U_r`` and ``V = V_l V_r`` through a wider ``overparam_dim``; the products are formed per call.
    """

    def __init__(self, in_features: int, out_features: int, condition_dim: int, rank: int,
                 overparam_dim: int, generator_hidden: int):
        super().__init__()
        self.rank = rank
        self.u_left, self.u_right = _normal_fan_in(in_features, overparam_dim), _normal_fan_in(overparam_dim, rank)
        self.v_left, self.v_right = _normal_fan_in(rank, overparam_dim), _normal_fan_in(overparam_dim, out_features)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.generator = nn.Sequential(nn.Linear(condition_dim, generator_hidden), nn.ReLU(),
                                       nn.Linear(generator_hidden, rank * rank))
        with torch.no_grad():  # S_b starts near the identity: the layer starts as a plain low-rank layer
            self.generator[-1].bias.copy_(torch.eye(rank).flatten())

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        specific = self.generator(condition).view(-1, self.rank, self.rank)
        down = x @ (self.u_left @ self.u_right)
        return rowwise_matmul(down, specific) @ (self.v_left @ self.v_right) + self.bias


class APG(MultiDomainModel):
    """An MLP ``dims -> 1`` whose hidden layers are :class:`APGLinear` (each followed by BN, ReLU, Dropout).

    Condition ``z_b`` = [domain embedding (a learned ``nn.Embedding``); ``e_b``]: the scenario plus
    the instance, so the generated weights are both domain-specific and instance-specific.
    """

    def __init__(self, input_dim: int, num_domains: int, dims=(256, 128), rank: int = 16,
                 overparam_dim: int = 64, generator_hidden: int = 64, domain_embed_dim: int = 16,
                 dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        self.domain_embedding = nn.Embedding(num_domains, domain_embed_dim)
        condition_dim = domain_embed_dim + input_dim
        widths = [input_dim, *dims]
        self.layers = nn.ModuleList(APGLinear(i, o, condition_dim, rank, overparam_dim, generator_hidden)
                                    for i, o in zip(widths, widths[1:]))
        self.activations = nn.ModuleList(nn.Sequential(nn.BatchNorm1d(o), nn.ReLU(), nn.Dropout(dropout))
                                         for o in widths[1:])
        self.out = nn.Linear(widths[-1], 1)

    def compute_logits(self, e, domain):
        condition = torch.cat([self.domain_embedding(domain), e], dim=1)
        h = e
        for layer, activation in zip(self.layers, self.activations):
            h = activation(layer(h, condition))
        return self.out(h).squeeze(1)
