"""One entry point from a config's ``data:`` section to encoded splits, and from a raw file to model input."""
from __future__ import annotations

from .aliccp import load_aliccp
from .errors import DataError
from .feature_map import FeatureMap
from .movielens import add_derived_columns, load_movielens
from .readers import read_table
from .shards import RowShard
from .synthetic import load_synthetic
from .table import load_table
from .tensors import MultiDomainData

LOADERS = {"movielens": load_movielens, "aliccp": load_aliccp, "table": load_table, "synthetic": load_synthetic}

# Dataset-specific columns derived from the raw layout, applied again to prediction inputs.
PREPARE = {"movielens": add_derived_columns}


def load_dataset(config: dict, feature_map: FeatureMap | None = None,
                 shard: RowShard | None = None) -> MultiDomainData:
    """``config``: ``{kind: movielens|aliccp|table|synthetic, ...the loader's keyword arguments}``.

    With ``feature_map`` (from a checkpoint) nothing is fitted: the splits are encoded as at training time.
    With ``shard`` too, only that shard's training rows are encoded (validation and test whole).
    """
    options = dict(config)
    kind = options.pop("kind", None)
    if kind not in LOADERS:
        raise DataError(f"data.kind must be one of {sorted(LOADERS)}, got {kind!r}")
    if shard is not None and feature_map is None:
        raise ValueError("a shard of the training rows is encoded with a feature map fitted on all of them: "
                         "give feature_map")
    try:
        return LOADERS[kind](**options, feature_map=feature_map, shard=shard)
    except TypeError as err:
        if "argument" not in str(err):
            raise
        raise DataError(f"data section for kind {kind!r}: {err}") from None


def read_prediction_input(path, feature_map: FeatureMap, scale: bool = True) -> tuple:
    """``(raw frame, encoded split)`` for a CSV/Parquet file in the training data's raw layout; the label
    column is optional here (encoded when present); ``scale=False`` keeps the dense values raw."""
    # Columns whose training vocabulary is text are read as text (a code like "02138" keeps its zero).
    text_columns = {c: str for c, vocabulary in feature_map.vocabularies.items() if vocabulary.dtype.kind == "O"}
    frame = read_table(path, dtype=text_columns)
    if feature_map.prepare is not None:
        frame = PREPARE[feature_map.prepare](frame)
    with_label = feature_map.schema.label in frame.columns
    return frame, feature_map.transform(frame, str(path), with_label=with_label, scale=scale)

