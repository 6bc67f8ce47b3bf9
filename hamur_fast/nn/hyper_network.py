"""The domain-shared hyper-network of SPEC section 1: instance embedding -> representation matrix I_b."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .. import _checks
from ..ops import generated


class RepeatedUpdateBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose running statistics advance ``updates_per_step`` times per training forward.

    The released HAMUR code evaluates its hyper-network once per domain on the same batch, so
    its BatchNorm running statistics move D times per step while the outputs equal a single
    evaluation. ``n`` identical momentum updates have the closed form
    ``r_n = (1 - m)^n r_0 + (1 - (1 - m)^n) x``, i.e. one update with momentum ``1 - (1 - m)^n``.
    """

    def __init__(self, num_features: int, updates_per_step: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.updates_per_step = updates_per_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.updates_per_step == 1:
            return super().forward(x)
        effective = 1.0 - (1.0 - self.momentum) ** self.updates_per_step
        self.num_batches_tracked.add_(self.updates_per_step)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            True, effective, self.eps)


class HyperNetwork(nn.Module):
    """``hidden_dims`` layers of Linear -> BatchNorm1d -> ReLU -> Dropout, then one more to k*k.

    forward(e: (B, F)) -> rep: (B, k, k), row-major, ``rep[b, i, j] = out[b, i*k + j]``.
    The module layout (``net.0`` Linear, ``net.1`` BN, ``net.2`` ReLU, ``net.3`` Dropout, ...) mirrors
    the released ``hyper_net`` Sequential, so released checkpoints map index for index.
    """

    def __init__(self, in_features: int, hidden_dims, rank: int, dropout: float = 0.0,
                 stat_updates_per_step: int = 1):
        super().__init__()
        if in_features < 1 or rank < 1:
            raise ValueError(f"in_features and rank must be >= 1, got {in_features} and {rank}")
        self.in_features, self.rank = in_features, rank
        layers, width = [], in_features
        for out in [*hidden_dims, rank * rank]:
            layers += [nn.Linear(width, out), RepeatedUpdateBatchNorm1d(out, stat_updates_per_step),
                       nn.ReLU(), nn.Dropout(dropout)]
            width = out
        self.net = nn.Sequential(*layers)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        self._check_input(e)
        return self.net(e).view(-1, self.rank, self.rank)

    def _check_input(self, e: torch.Tensor) -> None:
        _checks.check_float("e", e, 2)
        _checks.check_batch("e", e)
        if e.shape[1] != self.in_features:
            raise ValueError(f"e must have {self.in_features} features, got shape {tuple(e.shape)}")

    # Fusion level 2: the last layer (Linear, BN, ReLU, Dropout = net[-4:]) runs inside the adapter cells.
    def can_generate_in_cells(self) -> bool:
        """False while the last layer's dropout is active (a fused cell applies no dropout) or its BatchNorm
        keeps a cumulative average (momentum None), which the fused update does not reproduce."""
        norm = self.net[-3]
        cumulative = isinstance(norm, nn.BatchNorm1d) and norm.momentum is None
        return not (self.training and (self.net[-1].p > 0 or cumulative))

    def generated(self, e: torch.Tensor) -> generated.GeneratedRep:
        """What fused cells need instead of I: the last hidden g, with the last Linear + BN folded into an
        affine map (:func:`hamur_fast.ops.generated.fold_generator`); advances the BN's running statistics
        exactly as :meth:`forward` would."""
        self._check_input(e)
        linear, norm = self.net[-4], self.net[-3]
        g = self.net[:-4](e)
        if isinstance(norm, nn.BatchNorm1d):
            repeats = getattr(norm, "updates_per_step", 1)
            gen = generated.Generator(linear.weight, linear.bias, norm.weight, norm.bias, norm.running_mean,
                                      norm.running_var, norm.momentum, norm.eps, repeats)
            if self.training and norm.num_batches_tracked is not None:
                norm.num_batches_tracked.add_(repeats)
        else:  # the BatchNorm was folded into the Linear for inference (hamur_fast.inference.folding)
            gen = generated.Generator(linear.weight, linear.bias, None, None, None, None)
        return generated.fold_generator(g, gen, self.training)
