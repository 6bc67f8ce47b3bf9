"""One entry point from a config's ``data:`` section to encoded splits, and from a raw file to model input."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import _checks
from .aliccp import load_aliccp
from .errors import DataError
from .feature_map import FeatureMap
from .movielens import add_derived_columns, load_movielens
from .readers import existing_file, read_table
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
    check_data_section(config)
    if shard is not None and feature_map is None:
        raise ValueError("a shard of the training rows is encoded with a feature map fitted on all of them: "
                         "give feature_map")
    try:
        return LOADERS[kind](**options, feature_map=feature_map, shard=shard)
    except TypeError as err:
        if "argument" not in str(err):
            raise
        raise DataError(f"data section for kind {kind!r}: {err}") from None


# The range of every numeric option of the loaders (synthetic data's process included): whole numbers, and the
# least value each may take.
_WHOLE_NUMBERS = {"seed": 0, "split_seed": 0, "rows": 1, "chunksize": 1, "domains": 1, "users": 1, "items": 1,
                  "rank": 1}
_FRACTIONS = ("specificity",)
_NON_NEGATIVE = ("zipf",)


def check_data_section(config: dict) -> None:
    """The cheap checks of a data section, before any file is read: its kind, its numeric options, and that the
    files it names exist (a DataError naming the problem)."""
    kind = config.get("kind")
    if kind not in LOADERS:
        raise DataError(f"data.kind must be one of {sorted(LOADERS)}, got {_checks.shown(kind)}")
    check_numeric_options(config)
    for key in ("path", "train", "val", "test"):
        if isinstance(config.get(key), (str, Path)):
            if not Path(config[key]).exists():
                raise DataError(f"data file not found: {config[key]} (data.{key})")
    if isinstance(config.get("schema"), (str, Path)):
        existing_file(config["schema"])


def check_numeric_options(options: dict) -> None:
    """DataError naming ``data.<key>`` for a numeric data option of the wrong type or out of its range."""
    for key, least in _WHOLE_NUMBERS.items():
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or value < least):
            raise DataError(f"data.{key} must be a whole number >= {least}, got {_checks.shown(value)}")
    for key in (*_FRACTIONS, *_NON_NEGATIVE):
        value = options.get(key)
        if value is not None and not (_finite_number(value) and value >= 0 and (key not in _FRACTIONS or value <= 1)):
            raise DataError(f"data.{key} must be a number in {'[0, 1]' if key in _FRACTIONS else '[0, inf)'}, "
                            f"got {_checks.shown(value)}")
    split = options.get("split")
    if split is not None and not (isinstance(split, (list, tuple)) and len(split) == 3
                                  and all(_finite_number(f) and f >= 0 for f in split)
                                  and abs(sum(split) - 1) < 1e-6):
        raise DataError(f"data.split must be three fractions >= 0 summing to 1 (train, val, test), got "
                        f"{_checks.shown(split)}")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


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

