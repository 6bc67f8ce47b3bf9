"""``BatchNorm1d`` whose training statistics span every data-parallel rank (:mod:`hamur_fast.ops.collectives`)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.compose import batch_norm


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics span every rank while :func:`synchronised` is active.

    ``updates_per_step`` keeps the hyper-network's released-mode behaviour (running statistics advanced
    D times per step: one update with momentum ``1 - (1 - m)^D``, see ``RepeatedUpdateBatchNorm1d``).
    Parameters, buffers and state_dict keys are those of the ``BatchNorm1d`` it replaces."""

    updates_per_step = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(self.updates_per_step)
        if self.momentum is None:  # cumulative moving average, as BatchNorm1d(momentum=None)
            momentum = 1.0 / float(self.num_batches_tracked)
        elif self.updates_per_step == 1:
            momentum = self.momentum
        else:
            momentum = 1.0 - (1.0 - self.momentum) ** self.updates_per_step
        return batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps)


def convert_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` inside ``module`` (in place) by a :class:`SyncBatchNorm1d` sharing
    its parameters and buffers; returns ``module`` (or the replacement, if ``module`` itself is one)."""
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, SyncBatchNorm1d):
        converted = SyncBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        converted.updates_per_step = getattr(module, "updates_per_step", 1)
        converted.__dict__["_parameters"] = module._parameters
        converted.__dict__["_buffers"] = module._buffers
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        replacement = convert_batch_norms(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
