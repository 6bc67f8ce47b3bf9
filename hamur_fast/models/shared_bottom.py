"""Shared-Bottom (Caruana, "Multitask Learning", Machine Learning 1997), domains as tasks."""
from __future__ import annotations

from .backbones import DomainTowers
from .base import MultiDomainModel
from .blocks import MLP


class SharedBottom(MultiDomainModel):
    """Hard parameter sharing: one bottom network for all domains, one tower per domain.

    ``y_d = t_d(f(e))``: ``f`` = shared MLP ``bottom_dims`` (Linear, BN, ReLU, Dropout), ``t_d`` = domain
    d's tower ``tower_dims -> 1``; row b is scored by its own domain's tower only.
    """

    def __init__(self, input_dim: int, num_domains: int, bottom_dims=(256, 128), tower_dims=(64,),
                 dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        self.bottom = MLP(input_dim, list(bottom_dims), dropout)
        self.towers = DomainTowers.plain(self.bottom.output_dim, num_domains, tower_dims)

    def compute_logits(self, e, domain):
        return self.towers(self.bottom(e), domain, None)
