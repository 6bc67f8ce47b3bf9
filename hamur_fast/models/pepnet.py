"""PEPNet: Parameter and Embedding Personalized Network (Chang et al., KDD 2023), one task (CTR)."""
from __future__ import annotations

import torch

from .base import MultiDomainModel
from .epnet import EmbeddingPersonalizedGate
from .ppnet import GatedMLP


class PEPNet(MultiDomainModel):
    """EPNet on the embedding, then PPNet gates on every layer of the DNN.

    - EPNet: ``O_ep = GateNU(E(F_d) ; stopgrad(E)) * E`` (:class:`EmbeddingPersonalizedGate`).
    - PPNet: ``delta^l = GateNU^l(P ; stopgrad(O_ep))``, ``H^{l+1} = f((delta^l * H^l) W^l + b^l)`` with
      ``H^0 = O_ep`` and ``f`` = BN, ReLU, Dropout; ``logit = w^T H^L + b`` (:class:`GatedMLP`).

    The persona prior ``P`` (user, item and author id embeddings in the paper) is the instance
    embedding ``e`` itself: the model sees ``e``, not per-field ids.
    """

    def __init__(self, input_dim: int, num_domains: int, dims=(256, 128), domain_embed_dim: int = 16,
                 dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        self.embedding_gate = EmbeddingPersonalizedGate(input_dim, num_domains, domain_embed_dim)
        self.dnn = GatedMLP(input_dim, 2 * input_dim, dims, dropout)

    def compute_logits(self, e, domain):
        h = self.embedding_gate(e, domain)
        return self.dnn(h, torch.cat([e, h.detach()], dim=1))
