"""Data-parallel training: synchronised batch statistics, the process-group runtime, the distributed trainer.

:mod:`.statistics` (imported by the ops and layers) merges per-domain batch statistics across ranks;
:mod:`.runtime` starts and describes the process group (torchrun's environment, gloo or NCCL);
:mod:`.trainer` is the data-parallel ``Trainer`` behind ``hamur-fast train --nproc N``.
"""
from . import runtime
from .runtime import DistributedContext, launch_with_torchrun, launched_by_torchrun, start, stop
from .statistics import SyncBatchNorm1d, convert_batch_norms, merge_moments, synchronised, synchronised_norm

__all__ = ["DistributedContext", "start", "stop", "launch_with_torchrun", "launched_by_torchrun", "SyncBatchNorm1d",
           "convert_batch_norms", "merge_moments", "synchronised", "synchronised_norm"]
