"""The contract every model of the zoo follows: ``forward(e, domain) -> probabilities``."""
from __future__ import annotations

import abc

import torch
from torch import nn

from .. import _checks


class MultiDomainModel(nn.Module, abc.ABC):
    """Base of every multi-domain CTR model in :mod:`hamur_fast.models`.

    ``logits(e: (B, input_dim) float, domain: (B,) int64) -> (B,)`` validates its inputs once
    (a ``ValueError`` naming the argument and the value) and calls ``compute_logits``;
    ``forward`` returns ``sigmoid(logits)``. Subclasses implement ``compute_logits`` only.
    """

    def __init__(self, input_dim: int, num_domains: int):
        super().__init__()
        if input_dim < 1 or num_domains < 1:
            raise ValueError(f"input_dim and num_domains must be >= 1, got {input_dim} and {num_domains}")
        self.input_dim, self.num_domains = input_dim, num_domains

    @abc.abstractmethod
    def compute_logits(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """Logits (B,) for inputs already validated by :meth:`logits`."""

    def logits(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        _checks.check_float("e", e, 2)
        batch = _checks.check_batch("e", e)
        if e.shape[1] != self.input_dim:
            raise ValueError(f"e must have shape (B, {self.input_dim}), got {tuple(e.shape)}")
        _checks.check_domain(domain, batch, self.num_domains)
        domain = domain.long()  # the check accepts int32 ids; layers index and one-hot with int64
        valid = None
        if not _checks.value_checks_active(domain):
            # Unchecked ids (value checks off, torch.compile, CUDA graphs): a row whose id is outside [0, D) runs as
            # domain 0, so nothing inside sees the bad id (or a NaN that would reach the weight gradients), and
            # its output becomes NaN below with no gradient flowing back. Elementwise on (B,), no host sync.
            valid = (domain >= 0) & (domain < self.num_domains)
            domain = torch.where(valid, domain, torch.zeros_like(domain))
        # The ids were range-checked once here; inner layers skip their own (device-syncing) check.
        with _checks.domain_values_checked():
            logits = self.compute_logits(e, domain)
        return logits if valid is None else torch.where(valid, logits, torch.full_like(logits, float("nan")))

    def forward(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(e, domain))

    def auxiliary_losses(self) -> dict:
        """Extra training losses of the latest forward in training mode, name -> scalar tensor (empty for
        most models). The Trainer adds them to the click loss and logs each per epoch; AdaSparse reports
        its sparsity regulariser here."""
        return {}
