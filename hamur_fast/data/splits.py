"""From frames to encoded splits: random splitting and fit-on-train encoding, shared by every dataset."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from .errors import DataError
from .feature_map import FeatureMap
from .schema import Schema
from .shards import RowShard
from .tensors import MultiDomainData, TensorSplit

SPLIT_NAMES = ("train", "val", "test")


def random_split(frame: pd.DataFrame, fractions, seed: int) -> list:
    """Three frames from one, rows drawn by a seeded permutation (the released examples use 8:1:1, seed 2022)."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise DataError(f"split must be three non-negative fractions summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(frame))
    ends = np.round(np.cumsum(fractions) * len(frame)).astype(int)
    return [frame.iloc[part] for part in np.split(order, ends[:2])]


def encode_splits(chunks_by_split: dict, schema: Schema, prepare: str | None = None,
                  feature_map: FeatureMap | None = None) -> MultiDomainData:
    """``chunks_by_split``: for train, val and test, an iterable of ``(frame, where)``. Without a
    ``feature_map`` one is fitted on train; with one (a checkpoint's), every split is only encoded."""
    if feature_map is None:
        feature_map, train = FeatureMap.fit_transform(chunks_by_split["train"], schema, prepare)
    else:
        train = _encode_all(feature_map, chunks_by_split["train"], "train")
    val, test = (_encode_all(feature_map, chunks_by_split[name], name) for name in ("val", "test"))
    return MultiDomainData(train, val, test, feature_map)


def _encode_all(feature_map: FeatureMap, chunks: Iterable, name: str) -> TensorSplit:
    parts, sources = [], []
    for frame, where in chunks:
        sources.append(where)
        if len(frame):
            parts.append(feature_map.transform(frame, where))
    if not parts:
        raise DataError(f"{sources[0] if sources else 'input'}: the {name} split is empty")
    return TensorSplit.concat(parts)


def frames_by_split(frames: list, where: str, shard: RowShard | None = None) -> dict:
    """Three in-memory frames as single-chunk inputs for :func:`encode_splits`; none may be empty. With
    ``shard``, only its rows of the training split are given."""
    for name, frame in zip(SPLIT_NAMES, frames):
        if len(frame) == 0:
            rows = sum(len(f) for f in frames)
            raise DataError(f"{where}: the {name} split is empty ({rows} rows in all); give more rows or "
                            "another split")
    if shard is not None:
        frames = [shard.take(frames[0]), *frames[1:]]
    return {name: [(frame, f"{where} ({name} split)")] for name, frame in zip(SPLIT_NAMES, frames)}
