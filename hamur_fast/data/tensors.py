"""Encoded splits as a few compact tensors, and batching by index slicing (no per-row Dataset)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from .errors import DataError


class Batch(NamedTuple):
    sparse: torch.Tensor  # (B, S) int32 category ids, 0 = unseen
    dense: torch.Tensor  # (B, Dn) float32, scaled
    domain: torch.Tensor  # (B,) int64
    label: torch.Tensor | None  # (B,) float32 0/1, None when the split has no labels

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in self))


@dataclass
class TensorSplit:
    """One split, encoded: ``sparse`` (N, S) int32, ``dense`` (N, Dn) float32, ``domain`` (N,) int32,
    ``label`` (N,) float32 or None. Stored compactly; batches widen ``domain`` to int64."""

    sparse: torch.Tensor
    dense: torch.Tensor
    domain: torch.Tensor
    label: torch.Tensor | None = None

    def __post_init__(self):
        n = self.domain.shape[0]
        for name in ("sparse", "dense", "label"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != n:
                raise ValueError(f"{name} has {t.shape[0]} rows, domain has {n}")

    def __len__(self) -> int:
        return self.domain.shape[0]

    @classmethod
    def concat(cls, parts: list) -> "TensorSplit":
        labelled = all(p.label is not None for p in parts)
        return cls(torch.cat([p.sparse for p in parts]), torch.cat([p.dense for p in parts]),
                   torch.cat([p.domain for p in parts]),
                   torch.cat([p.label for p in parts]) if labelled else None)

    def take(self, rows) -> "TensorSplit":
        """The rows ``rows`` (a slice, e.g. ``slice(rank, None, N)``, or an index tensor) of the split, in
        tensors of their own when strided (so a shard does not hold on to the rows around it)."""
        return TensorSplit(*(None if t is None else t[rows].contiguous()
                             for t in (self.sparse, self.dense, self.domain, self.label)))

    def domain_counts(self, num_domains: int) -> list:
        return torch.bincount(self.domain.long(), minlength=num_domains).tolist()

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                device: torch.device | str | None = None, pin_memory: bool = False) -> Iterator[Batch]:
        """Batches in order, or shuffled by a permutation that depends only on (seed, epoch): a resumed
        run sees the same batches as an uninterrupted one."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = None
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        pin = pin_memory and torch.cuda.is_available()
        for start in range(0, len(self), batch_size):
            rows = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            batch = Batch(self.sparse[rows], self.dense[rows], self.domain[rows].long(),
                          None if self.label is None else self.label[rows])
            if pin:
                batch = Batch(*(None if t is None else t.pin_memory() for t in batch))
            yield batch if device is None else batch.to(device, non_blocking=pin)


@dataclass
class MultiDomainData:
    """The three encoded splits and the feature map fitted on ``train``."""

    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    feature_map: "FeatureMap"  # noqa: F821 (defined in feature_map.py, which imports this module)

    def __post_init__(self):
        for name in ("train", "val", "test"):
            if len(getattr(self, name)) == 0:
                raise DataError(f"the {name} split is empty")
