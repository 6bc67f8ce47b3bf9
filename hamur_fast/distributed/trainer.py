"""Data-parallel training: ``DistributedTrainer`` (DDP with synchronised batch statistics) and the runs behind
``hamur-fast train --nproc N`` / torchrun.

- Data: rank 0 fits the feature map once (reading every training row: fitting needs them) and broadcasts it;
  the other ranks read and encode only their shard of the training rows with it (rows ``rank, rank + N, ...``,
  kept chunk by chunk as the loaders read; :class:`~hamur_fast.data.RowShard`), and the whole validation and
  test splits. The shards are trimmed to a multiple of N rows in all, so that every rank takes the same number
  of equal steps. The whole data's fingerprint (a resume checks it) is the sum of the ranks' row digests.
- Steps: the global batch ``train.batch_size`` is split evenly, ``batch_size / N`` rows per rank; DDP averages
  the gradients, every normalisation merges its statistics over the ranks (:mod:`hamur_fast.ops.collectives`), and the
  loss is scaled so that a step equals one process's step on the union of the ranks' rows.
- Validation and test: every eval batch of one process is split across the ranks and the predictions are
  gathered, so every rank computes the metrics of the one-process predictions (identical numbers).
- Files: rank 0 alone writes checkpoints (atomically), metrics, plots and progress bars. A checkpoint does not
  depend on the number of processes, so ``--resume`` may use another one.
"""
from __future__ import annotations

import inspect
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import Batch, FeatureMap, MultiDomainData, RowShard, TensorSplit, load_dataset
from ..data.fingerprint import data_fingerprint, digest, fingerprint
from ..train import experiment
from ..train.trainer import LogitsModule, Trainer, TrainConfig
from . import runtime
from ..nn.sync_batch_norm import convert_batch_norms
from ..ops.collectives import synchronised

# torch 2.13 renamed DDP's broadcast_buffers (older versions, e.g. the GPU machine's 2.11, know only that name).
NO_BUFFER_BROADCAST = ("forward_sync_buffers" if "forward_sync_buffers" in
                       inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")


class DistributedTrainer(Trainer):
    """A :class:`~hamur_fast.train.Trainer` for one rank of a data-parallel run (a plain Trainer when the
    context holds one process). ``config.batch_size`` is the global batch; it must divide by the number of
    processes. ``run_dir`` is used by rank 0 only."""

    def __init__(self, model: nn.Module, config: TrainConfig, feature_map, run_dir=None, run_config=None,
                 context: runtime.DistributedContext | None = None, whole_data_fingerprint: str | None = None):
        self.context = context or runtime.start(config.device)
        self.whole_data_fingerprint = whole_data_fingerprint  # of the unsharded data (see load_sharded)
        world = self.context.world_size
        if config.batch_size % world or config.eval_batch_size < world:
            raise ValueError(f"train.batch_size ({config.batch_size}) must be a multiple of the number of "
                             f"processes ({world}), and eval_batch_size at least that number")
        if config.cuda_graph and self.context.enabled:
            raise ValueError("cuda_graph does not combine with data-parallel training")
        if not self.context.is_main:
            config = replace(config, progress=False)
        convert_batch_norms(model)
        super().__init__(model, config, feature_map, run_dir if self.context.is_main else None, run_config)
        self.device = self.context.device if self.context.enabled else self.device
        self.ddp = None
        if self.context.enabled:
            # Paper-mode layers of a domain absent from a rank's rows get no gradient there: find_unused_parameters.
            # The running statistics are equal on every rank (synchronised), so buffers are not broadcast.
            self.ddp = DistributedDataParallel(
                LogitsModule(self.model), device_ids=[self.device] if self.device.type == "cuda" else None,
                process_group=self.context.group, find_unused_parameters=True, **{NO_BUFFER_BROADCAST: False})
            self.best_state = {k: v.clone() for k, v in self.model.state_dict().items()}  # rank 0's weights

    # ------------------------------------------------------------------ training
    def _data_fingerprint(self, data: MultiDomainData) -> str:
        # A checkpoint must not depend on the number of processes, so a resume with another one matches.
        return self.whole_data_fingerprint or super()._data_fingerprint(data)

    def _training_batches(self, split: TensorSplit):
        return split.batches(self.config.batch_size // self.context.world_size, shuffle=True,
                             seed=self.config.seed, epoch=self.epoch, device=self.device,
                             pin_memory=self.config.pin_memory)

    def _forward_logits(self, batch) -> torch.Tensor:
        if self.ddp is None:
            return super()._forward_logits(batch)
        # Every rank holds as many rows as the others and DDP averages the gradients over the ranks: the
        # average of the ranks' batch-mean losses is the global batch mean, so a step equals one process's
        # step on all the rows, the normalisations' statistics being merged over the ranks.
        with synchronised(self.context.stats_group):
            return self.ddp(batch.sparse, batch.dense, batch.domain)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, split: TensorSplit) -> torch.Tensor:
        """The one-process predictions, in the split's row order, on every rank: each eval batch is split
        across the ranks (batch statistics, in released mode, merged over them) and the parts gathered."""
        if not self.context.enabled:
            return super().predict(split)
        self.model.eval()
        world, rank = self.context.world_size, self.context.rank
        out = []
        for batch in split.batches(self.config.eval_batch_size, device=self.device):
            rows = len(batch.domain)
            share = -(-rows // world)  # ceil: ranks take [rank * share, (rank + 1) * share)
            if share * (world - 1) >= rows:
                # Too few rows to give every rank some: each computes the whole batch alone, as one process.
                out.append(self._probabilities(batch).cpu())
                continue
            mine = Batch(*(None if t is None else t[rank * share:(rank + 1) * share] for t in batch))
            with synchronised(self.context.stats_group):
                part = self._probabilities(mine)
            padded = torch.zeros(share, dtype=part.dtype, device=part.device)
            padded[:len(part)] = part
            gathered = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(gathered, padded, group=self.context.group)
            out.append(torch.cat(gathered)[:rows].cpu())
        return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------------------- data
def shard(split: TensorSplit, rank: int, world_size: int) -> TensorSplit:
    """Rows ``rank, rank + N, ...`` of the split trimmed to a multiple of N: equal shards, the same number of
    steps on every rank (at most N - 1 rows of the split go unused). What :func:`load_sharded` gives each rank."""
    return split.take(slice(rank, len(split) // world_size * world_size, world_size))


def load_sharded(data_config: dict, context: runtime.DistributedContext,
                 feature_map: FeatureMap | None = None) -> tuple:
    """``(data, fingerprint)`` for this rank: the feature map fitted once (by rank 0, unless given) and shared,
    this rank's :func:`shard` of the training rows (the only training rows the other ranks read and encode),
    the whole validation and test splits; ``fingerprint`` is the whole (unsharded) data's
    :func:`~hamur_fast.data.fingerprint.data_fingerprint`, the same for any number of processes."""
    if not context.enabled:
        data = load_dataset(data_config, feature_map=feature_map)
        return data, data_fingerprint(data)
    rows = RowShard(context.rank, context.world_size)
    whole = None
    if feature_map is None:
        message = [None]
        if context.is_main:
            whole = load_dataset(data_config)
            message = [whole.feature_map.to_dict()]
        dist.broadcast_object_list(message, src=0, group=context.group)
        feature_map = FeatureMap.from_dict(message[0])
    if whole is not None:  # rank 0 encoded every training row while fitting: it keeps its own
        data = whole
        data.train = whole.train.take(slice(rows.rank, None, rows.world_size))
    else:
        data = load_dataset(data_config, feature_map=feature_map, shard=rows)
    # Rank r holds the rows at positions r, r + N, ...: their digests add up to the whole split's.
    digests = [None] * rows.world_size
    dist.all_gather_object(digests, digest(data.train, rows.rank, rows.world_size), group=context.group)
    whole_train = sum(digests[1:], digests[0])
    data.train = data.train.take(slice(0, whole_train.rows // rows.world_size))  # = shard(whole train)
    return data, fingerprint(whole_train, digest(data.val), digest(data.test))


# ---------------------------------------------------------------------------- runs (the CLI's)
def train_run(config: dict, run_dir=None, progress: bool = True) -> experiment.RunResult:
    """:func:`hamur_fast.train.train_run` as one rank of the data-parallel run torchrun started."""
    context = runtime.start(config.get("train", {}).get("device", "auto"))
    try:
        data, fingerprint = load_sharded(config.get("data", experiment.DEFAULT_DATA), context)
        # Rank 0 alone locks and writes the run directory.
        return experiment.train_run({**config, "data": config.get("data", experiment.DEFAULT_DATA)}, data,
                                    run_dir if context.is_main else None, progress=progress,
                                    trainer_class=_bound(context, fingerprint))
    finally:
        runtime.stop()


def resume_run(checkpoint_path, epochs: int | None = None, progress: bool = True, overrides: list = (),
               run_dir=None) -> experiment.RunResult:
    """:func:`hamur_fast.train.resume_run` with any number of processes (the checkpoint does not depend on it)."""
    changes = experiment.resume_changes(overrides, epochs)
    payload = experiment.load_checkpoint(checkpoint_path)
    context = runtime.start(payload["config"]["train"].get("device", "auto"))
    try:
        feature_map = FeatureMap.from_dict(payload["feature_map"])
        # The recorded data with the resume's data.* changes (files moved since), as a one-process resume reads.
        data_config = experiment.with_data_changes(experiment.recorded_data(payload, checkpoint_path), changes)
        data, fingerprint = load_sharded(data_config, context, feature_map)
        return experiment.resume_run(checkpoint_path, data, epochs, progress, overrides, run_dir,
                                     trainer_class=_bound(context, fingerprint))
    finally:
        runtime.stop()


def _bound(context, whole_data_fingerprint):
    def make(*args, **kwargs):
        return DistributedTrainer(*args, context=context, whole_data_fingerprint=whole_data_fingerprint, **kwargs)
    return make
