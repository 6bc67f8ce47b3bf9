"""Bring-your-own data: a CSV or Parquet file plus a small YAML schema.

Schema file (or the same keys inline in a config's ``data.schema``)::

    label: {column: clicked, positive: "== yes"}   # or just `label: click` for a 0/1 column
    domain: {column: region, mapping: {north: 0, south: 1}}   # or mapping: order (by first appearance)
    sparse: [user, item, category]
    dense: [price, age]

Either one file split at random (``split``, ``seed``) or separate ``val`` and ``test`` files.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .. import _yaml
from .errors import DataError
from .readers import existing_file, iter_table, read_table
from .schema import Schema
from .splits import encode_splits, frames_by_split, random_split


def read_schema(schema) -> Schema:
    """A :class:`Schema` from a dict, a Schema, or the path of a YAML file."""
    if isinstance(schema, Schema):
        return schema
    if isinstance(schema, (str, Path)):
        try:
            spec = _yaml.load(existing_file(schema).read_text())
        except yaml.YAMLError as err:
            raise DataError(f"{schema}: not valid YAML: {' '.join(str(err).split())[:300]}") from None
        if not isinstance(spec, dict):
            raise DataError(f"{schema}: the schema must be a YAML mapping")
        return Schema.from_dict(spec)
    return Schema.from_dict(schema)


def load_table(path, schema, val=None, test=None, split=(0.8, 0.1, 0.1), seed: int = 2022, feature_map=None,
               shard=None):
    """Encoded splits of a user table; the feature map is fitted on the training split (unless given).
    ``shard``: only those training rows, kept chunk by chunk from a training file of its own (a file split at
    random is read whole: the split needs every row)."""
    schema = feature_map.schema if feature_map is not None else read_schema(schema)
    if (val is None) != (test is None):
        raise DataError("give both val and test files, or neither (then the file is split at random)")
    if val is None:
        chunks = frames_by_split(random_split(read_table(path), split, seed), str(path), shard)
    else:
        train = iter_table(path) if shard is None else shard.frames(iter_table(path))
        chunks = {"train": ((frame, str(path)) for frame in train),
                  **{name: [(read_table(p), str(p))] for name, p in (("val", val), ("test", test))}}
    return encode_splits(chunks, schema, None, feature_map)
