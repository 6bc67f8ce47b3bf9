"""AdaSparse: adaptively sparse structures for multi-domain CTR (Yang et al., CIKM 2022)."""
from __future__ import annotations

import torch
from torch import nn

from .base import MultiDomainModel
from .blocks import mlp_layers


class AdaSparse(MultiDomainModel):
    """An MLP ``dims -> 1`` whose neurons are weighted, and pruned, per domain by a pruner per layer.

    Fusion pruner (binarisation + scaling): ``pi^l = beta * sigmoid(alpha * W_pi^l [h^l ; e_d] + b)``,
    then ``pi^l = 0`` where ``pi^l <= epsilon`` (the neuron is pruned for this instance), and
    ``h^{l+1} = ReLU(BN(pi^l * (W^l h^l + b^l)))``. ``e_d`` is a learned embedding of the domain id.
    Defaults alpha = 1, beta = 2, epsilon = 0.25.
    """

    def __init__(self, input_dim: int, num_domains: int, dims=(256, 128), domain_embed_dim: int = 16,
                 alpha: float = 1.0, beta: float = 2.0, epsilon: float = 0.25, dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        if not 0 <= epsilon < beta:
            raise ValueError(f"epsilon must be in [0, beta={beta}) or every neuron is pruned, got {epsilon}")
        self.alpha, self.beta, self.epsilon = alpha, beta, epsilon
        self.domain_embedding = nn.Embedding(num_domains, domain_embed_dim)
        widths = [input_dim, *dims]
        self.layers = mlp_layers(input_dim, list(dims), dropout)
        self.pruners = nn.ModuleList(nn.Linear(i + domain_embed_dim, o) for i, o in zip(widths, widths[1:]))
        self.out = nn.Linear(widths[-1], 1)

    def neuron_weights(self, pruner: nn.Linear, h: torch.Tensor, domain_embedding: torch.Tensor) -> torch.Tensor:
        """The weighting factors pi (B, width) of one layer; exact zeros mark pruned neurons."""
        pi = self.beta * torch.sigmoid(self.alpha * pruner(torch.cat([h, domain_embedding], dim=1)))
        return torch.where(pi > self.epsilon, pi, torch.zeros_like(pi))

    def compute_logits(self, e, domain):
        domain_embedding = self.domain_embedding(domain)
        h = e
        for pruner, layer in zip(self.pruners, self.layers):
            pi = self.neuron_weights(pruner, h, domain_embedding)
            h = layer[1:](pi * layer[0](h))  # layer = Linear, BN, ReLU, Dropout: pi acts after the Linear
        return self.out(h).squeeze(1)
