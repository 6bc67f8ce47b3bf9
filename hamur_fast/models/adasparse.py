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

    Sparsity regulariser (the paper's flexible regularisation, reported through
    :meth:`auxiliary_losses` as ``"sparsity"``, which the Trainer adds to the loss): per layer,
    ``r^l`` = the batch's fraction of pruned neurons (``pi^l = 0``), and
    ``R = sum_l lambda^l * mean(pi^l)`` with ``lambda^l = +sparsity_weight`` while ``r^l`` is below the
    target band ``[target_sparsity - sparsity_tolerance, target_sparsity + sparsity_tolerance]`` (push the
    factors down: prune more), ``-sparsity_weight`` above it (prune less) and 0 inside it. ``r^l`` is
    measured without gradient and the sign is chosen on the device (no host sync).
    ``target_sparsity=None`` turns the regulariser off.
    """

    def __init__(self, input_dim: int, num_domains: int, dims=(256, 128), domain_embed_dim: int = 16,
                 alpha: float = 1.0, beta: float = 2.0, epsilon: float = 0.25, dropout: float = 0.0,
                 target_sparsity: float | None = 0.25, sparsity_tolerance: float = 0.05,
                 sparsity_weight: float = 0.1):
        super().__init__(input_dim, num_domains)
        if not 0 <= epsilon < beta:
            raise ValueError(f"epsilon must be in [0, beta={beta}) or every neuron is pruned, got {epsilon}")
        if target_sparsity is not None and not 0 <= target_sparsity < 1:
            raise ValueError(f"target_sparsity must be in [0, 1) or None, got {target_sparsity}")
        if sparsity_tolerance < 0 or sparsity_weight < 0:
            raise ValueError(f"sparsity_tolerance and sparsity_weight must be >= 0, got {sparsity_tolerance} "
                             f"and {sparsity_weight}")
        self.alpha, self.beta, self.epsilon = alpha, beta, epsilon
        self.target_sparsity, self.sparsity_tolerance = target_sparsity, sparsity_tolerance
        self.sparsity_weight = sparsity_weight
        self.domain_embedding = nn.Embedding(num_domains, domain_embed_dim)
        widths = [input_dim, *dims]
        self.layers = mlp_layers(input_dim, list(dims), dropout)
        self.pruners = nn.ModuleList(nn.Linear(i + domain_embed_dim, o) for i, o in zip(widths, widths[1:]))
        self.out = nn.Linear(widths[-1], 1)
        self._sparsity_loss = None

    def neuron_weights(self, pruner: nn.Linear, h: torch.Tensor, domain_embedding: torch.Tensor) -> torch.Tensor:
        """The weighting factors pi (B, width) of one layer; exact zeros mark pruned neurons."""
        pi = self.beta * torch.sigmoid(self.alpha * pruner(torch.cat([h, domain_embedding], dim=1)))
        return torch.where(pi > self.epsilon, pi, torch.zeros_like(pi))

    def compute_logits(self, e, domain):
        domain_embedding = self.domain_embedding(domain)
        regularised = self.training and self.target_sparsity is not None
        h, penalties = e, []
        for pruner, layer in zip(self.pruners, self.layers):
            pi = self.neuron_weights(pruner, h, domain_embedding)
            if regularised:
                penalties.append(self.sparsity_penalty(pi))
            h = layer[1:](pi * layer[0](h))  # layer = Linear, BN, ReLU, Dropout: pi acts after the Linear
        if self.training:
            self._sparsity_loss = sum(penalties) if regularised else None
        return self.out(h).squeeze(1)

    def sparsity_penalty(self, pi: torch.Tensor) -> torch.Tensor:
        """``lambda^l * mean(pi^l)`` with the sign of ``lambda^l`` set by the measured sparsity (see class doc)."""
        ratio = (pi.detach() == 0).float().mean()
        direction = ((ratio < self.target_sparsity - self.sparsity_tolerance).float()
                     - (ratio > self.target_sparsity + self.sparsity_tolerance).float())
        return self.sparsity_weight * direction * pi.mean()

    def auxiliary_losses(self) -> dict:
        if not self.training or self._sparsity_loss is None:
            return {}
        return {"sparsity": self._sparsity_loss}
