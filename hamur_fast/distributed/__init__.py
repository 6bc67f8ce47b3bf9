"""Data-parallel training: synchronised batch statistics, the process-group runtime, the distributed trainer.

:mod:`hamur_fast.ops.collectives` (low level, beside the ops it serves) merges batch statistics across ranks;
:mod:`.runtime` starts and describes the process group (torchrun's environment, gloo or NCCL);
:mod:`.trainer` is the data-parallel ``Trainer`` behind ``hamur-fast train --nproc N``.
"""
from . import runtime
from .runtime import DistributedContext, launch_with_torchrun, launched_by_torchrun, start, stop
from ..nn.sync_batch_norm import SyncBatchNorm1d, convert_batch_norms
from ..ops.collectives import merge_moments, synchronised
from ..ops.compose import split_norm as synchronised_norm

__all__ = ["DistributedContext", "start", "stop", "launch_with_torchrun", "launched_by_torchrun", "SyncBatchNorm1d",
           "convert_batch_norms", "merge_moments", "synchronised", "synchronised_norm"]
