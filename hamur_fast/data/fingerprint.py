"""The data fingerprint a resume checks: a digest of the encoded splits that does not depend on how the training
rows were divided between processes.

Each row is hashed together with its position in its split (pandas' ``hash_pandas_object``, 64 bits a row); a
split's digest is its row count, its columns' widths and types, and the sum of its row hashes modulo 2**64. A
sum does not care which process added which rows, so N processes holding rows ``r, r + N, ...`` of the training
split each digest their own rows and add the digests: the same fingerprint as one process's, for any N
(``hamur_fast.distributed.trainer.load_sharded``), without any process encoding all the rows.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .tensors import MultiDomainData, TensorSplit

_MODULUS = 1 << 64
_BLOCK_ROWS = 1 << 18


@dataclass(frozen=True)
class SplitDigest:
    rows: int
    layout: str  # each tensor's row shape and dtype
    row_hash_sum: int  # modulo 2**64

    def __add__(self, other: "SplitDigest") -> "SplitDigest":
        """The digest of two disjoint sets of rows of one split (hashed with their positions in it)."""
        if other.layout != self.layout:
            raise ValueError(f"digests of splits with different columns: {self.layout} and {other.layout}")
        return SplitDigest(self.rows + other.rows, self.layout, (self.row_hash_sum + other.row_hash_sum) % _MODULUS)


def digest(split: TensorSplit, first: int = 0, step: int = 1) -> SplitDigest:
    """The digest of the split's rows, taken to sit at positions ``first, first + step, ...`` of the whole split
    (defaults: the split is the whole split). Hashed block by block, so the memory it takes stays small."""
    tensors = (split.sparse, split.dense, split.domain, split.label)
    layout = str([None if t is None else (tuple(t.shape[1:]), str(t.dtype)) for t in tensors])
    total = 0
    for start in range(0, len(split), _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        total += _row_hash_sum([t[rows] for t in tensors if t is not None], first + start * step, step)
    return SplitDigest(len(split), layout, total % _MODULUS)


def _row_hash_sum(columns: list, first: int, step: int) -> int:
    """The sum of the rows' 64-bit hashes (each row's bytes as 32-bit words, with its position)."""
    columns = [t if t.dim() == 2 else t.unsqueeze(1) for t in columns]
    # Ids as they are, floats by their bits (int32 domain ids hash as the int16 ones older versions stored).
    words = np.concatenate([(c.view(torch.int32) if c.dtype == torch.float32 else c.to(torch.int32)).numpy()
                            for c in columns], axis=1)
    positions = pd.RangeIndex(first, first + step * len(words), step)
    hashes = pd.util.hash_pandas_object(pd.DataFrame(words, index=positions, copy=False), index=True).to_numpy()
    return int(hashes.sum(dtype=np.uint64))


def fingerprint(train: SplitDigest, val: SplitDigest, test: SplitDigest) -> str:
    text = repr([(d.rows, d.layout, d.row_hash_sum) for d in (train, val, test)])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def data_fingerprint(data: MultiDomainData) -> str:
    """A digest of the encoded splits: a resume checks that it continues on the data it started on."""
    return fingerprint(digest(data.train), digest(data.val), digest(data.test))
