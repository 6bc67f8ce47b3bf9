"""EPNet: the embedding personalised network of PEPNet (Chang et al., KDD 2023), on its own."""
from __future__ import annotations

import torch
from torch import nn

from .base import MultiDomainModel
from .blocks import MLP


class GateNU(nn.Module):
    """PEPNet's gate neural unit: ``delta = gamma * sigmoid(W_2 ReLU(W_1 x + b_1) + b_2)``, gamma = 2.

    With gamma = 2 the gate starts near 1 (sigmoid ~ 0.5) and can amplify as well as suppress.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 2.0):
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(nn.Linear(in_features, out_features), nn.ReLU(),
                                 nn.Linear(out_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.net(x))


class EmbeddingPersonalizedGate(nn.Module):
    """EPNet: ``delta_domain = GateNU(E(F_d) ; stopgrad(E))``, ``O_ep = delta_domain * E``.

    ``E`` is the instance embedding ``e``; the domain-side embedding ``E(F_d)`` is a learned
    ``nn.Embedding`` of the domain id. The stop-gradient keeps the gate from reshaping ``E`` itself.
    """

    def __init__(self, input_dim: int, num_domains: int, domain_embed_dim: int = 16):
        super().__init__()
        self.domain_embedding = nn.Embedding(num_domains, domain_embed_dim)
        self.gate = GateNU(domain_embed_dim + input_dim, input_dim)

    def forward(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return self.gate(torch.cat([self.domain_embedding(domain), e.detach()], dim=1)) * e


class EPNet(MultiDomainModel):
    """The embedding gate alone in front of a shared MLP ``dims -> 1``: ``logit = MLP(O_ep)``."""

    def __init__(self, input_dim: int, num_domains: int, dims=(256, 128), domain_embed_dim: int = 16,
                 dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        self.embedding_gate = EmbeddingPersonalizedGate(input_dim, num_domains, domain_embed_dim)
        self.mlp = MLP(input_dim, list(dims), dropout)
        self.out = nn.Linear(self.mlp.output_dim, 1)

    def compute_logits(self, e, domain):
        return self.out(self.mlp(self.embedding_gate(e, domain))).squeeze(1)
