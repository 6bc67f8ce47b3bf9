"""The shared MLP: one network for all domains, the domain only as an input feature."""
from __future__ import annotations

from torch import nn

from .base import MultiDomainModel
from .blocks import MLP


class MLPShared(MultiDomainModel):
    """``y = w^T f(e) + b`` with ``f`` one MLP ``dims`` (Linear, BN, ReLU, Dropout) for every domain.

    No parameter is domain-specific: the domain reaches the model only through ``e``, which carries the
    domain indicator's embedding (SPEC section 1). The first baseline of any multi-domain study: what
    pooling all domains into one model scores. Default widths are the MLP backbone's MovieLens
    widths (256, 128), so it is the per-domain ``mlp`` with its towers merged into one.
    """

    def __init__(self, input_dim: int, num_domains: int, dims=(256, 128), dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        self.mlp = MLP(input_dim, list(dims), dropout)
        self.out = nn.Linear(self.mlp.output_dim, 1)

    def compute_logits(self, e, domain):
        return self.out(self.mlp(e)).squeeze(1)
