"""PPNet: the parameter personalised network of PEPNet (Chang et al., KDD 2023), on its own."""
from __future__ import annotations

import torch
from torch import nn

from .base import MultiDomainModel
from .blocks import mlp_layers
from .epnet import GateNU


class GatedMLP(nn.Module):
    """PPNet's DNN: ``H^{l+1} = f((delta^l * H^l) W^l + b^l)``, ``delta^l = GateNU^l(prior)``, then
    ``logit = w^T H^L + b``; ``f`` = BN, ReLU, Dropout. One gate per layer, on the layer's input."""

    def __init__(self, input_dim: int, prior_dim: int, dims, dropout: float = 0.0):
        super().__init__()
        widths = [input_dim, *dims]
        self.layers = mlp_layers(input_dim, list(dims), dropout)
        self.layer_gates = nn.ModuleList(GateNU(prior_dim, width) for width in widths[:-1])
        self.out = nn.Linear(widths[-1], 1)

    def forward(self, h: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        for gate, layer in zip(self.layer_gates, self.layers):
            h = layer(gate(prior) * h)
        return self.out(h).squeeze(1)


class PPNet(MultiDomainModel):
    """The per-layer gates of PEPNet without its embedding gate: ``H^0 = e``,
    ``delta^l = GateNU^l(E(F_d) ; stopgrad(e))``, ``logit = GatedMLP(e)`` (see :class:`GatedMLP`).

    PEPNet's PPNet conditions its gates on a persona prior (user, item and author id embeddings) next
    to the stop-gradient of the other features. Here the persona is the domain: ``E(F_d)`` is a learned
    ``nn.Embedding`` of the domain id, so every layer's neurons are scaled per domain and per instance
    while the DNN itself is shared. The stop-gradient keeps the gates from reshaping ``e``.
    """

    def __init__(self, input_dim: int, num_domains: int, dims=(256, 128), domain_embed_dim: int = 16,
                 dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        self.domain_embedding = nn.Embedding(num_domains, domain_embed_dim)
        self.dnn = GatedMLP(input_dim, domain_embed_dim + input_dim, dims, dropout)

    def compute_logits(self, e, domain):
        return self.dnn(e, torch.cat([self.domain_embedding(domain), e.detach()], dim=1))
