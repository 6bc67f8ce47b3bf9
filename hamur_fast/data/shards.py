"""One process's share of the training rows in a data-parallel run, read and encoded without the others'.

Rank ``r`` of ``N`` takes the training rows at positions ``r, r + N, r + 2N, ...`` (counted from 0 over the
whole training split, in file order or in the order of the random split). A loader given a :class:`RowShard`
keeps those rows of each chunk it reads, before any per-row check or encoding: the frames keep their line
numbers, so an error in a kept row still names its file and line. Fitting a feature map needs every row, so a
shard is always encoded with a feature map fitted beforehand (``hamur_fast.distributed`` fits it on rank 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import pandas as pd


@dataclass(frozen=True)
class RowShard:
    rank: int
    world_size: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {self.rank} of {self.world_size}")

    def take(self, frame: pd.DataFrame, first_position: int = 0) -> pd.DataFrame:
        """This shard's rows of ``frame``, whose first row is at ``first_position`` in the training split."""
        return frame.iloc[(self.rank - first_position) % self.world_size::self.world_size]

    def frames(self, frames: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """This shard's rows of consecutive chunks of the training split."""
        position = 0
        for frame in frames:
            yield self.take(frame, position)
            position += len(frame)
