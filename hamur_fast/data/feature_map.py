"""The fitted feature map: category vocabularies, dense ranges and the domain mapping.

Fitted on the training split only (one pass, chunk by chunk); every other split and every prediction input
is encoded with it. Category id 0 is reserved for values the training split never showed. The map
serialises to a json-able dict that is stored in every checkpoint.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
import torch

from .errors import DataError, shown
from .readers import check_columns, check_complete
from .schema import Schema, value_keys
from .tensors import TensorSplit

DOMAIN_FIELD = "domain_indicator"
UNSEEN = 0


class FeatureMap:
    """Encodes a prepared frame into a :class:`TensorSplit`.

    ``sparse_fields`` are the embedded fields in column order of ``TensorSplit.sparse``: the schema's sparse
    columns, then ``domain_indicator`` (domain id + 1) unless the domain column is itself a sparse column.
    ``prepare`` names the dataset-specific step that derives feature columns from a raw table (e.g. the
    MovieLens first genre), so that predictions read the same raw layout as training.
    """

    def __init__(self, schema: Schema, vocabularies: dict, dense_ranges: dict, domain_mapping: dict,
                 prepare: str | None = None):
        self.schema, self.prepare = schema, prepare
        self.vocabularies = vocabularies  # column -> pd.Index of the training values (id = position + 1)
        self.dense_ranges = dense_ranges  # column -> (min, max) on the training split
        self.domain_mapping = domain_mapping  # raw value key (str) -> domain id

    # ---------------------------------------------------------------- description
    @property
    def num_domains(self) -> int:
        return max(self.domain_mapping.values()) + 1

    @property
    def sparse_fields(self) -> list:
        extra = [] if self.schema.domain_is_sparse else [DOMAIN_FIELD]
        return [*self.schema.sparse, *extra]

    @property
    def vocab_sizes(self) -> list:
        """Embedding rows per sparse field, the reserved unseen id included."""
        sizes = [len(self.vocabularies[c]) + 1 for c in self.schema.sparse]
        return sizes if self.schema.domain_is_sparse else [*sizes, self.num_domains + 1]

    @property
    def num_dense(self) -> int:
        return len(self.schema.dense)

    def domain_names(self) -> list:
        """For each domain id, the raw values that map to it (e.g. ['1', '18'])."""
        names = [[] for _ in range(self.num_domains)]
        for key, d in self.domain_mapping.items():
            names[d].append(key)
        return ["/".join(n) for n in names]

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {
            "schema": self.schema.to_dict(),
            "prepare": self.prepare,
            "vocabularies": {c: idx.tolist() for c, idx in self.vocabularies.items()},
            "dense_ranges": {c: list(r) for c, r in self.dense_ranges.items()},
            "domain_mapping": dict(self.domain_mapping),
        }

    @classmethod
    def from_dict(cls, state: dict) -> "FeatureMap":
        try:
            return cls(Schema(**state["schema"]), {c: pd.Index(v) for c, v in state["vocabularies"].items()},
                       {c: tuple(r) for c, r in state["dense_ranges"].items()},
                       {str(k): int(v) for k, v in state["domain_mapping"].items()}, state.get("prepare"))
        except (KeyError, TypeError) as err:
            raise DataError(f"not a valid feature map: {err!r}") from None

    # ---------------------------------------------------------------- fitting and encoding
    @classmethod
    def fit_transform(cls, chunks: Iterable, schema: Schema, prepare: str | None = None):
        """Fit on the training split, given as ``(frame, where)`` chunks (frames indexed by line number), and
        encode it in the same pass; returns ``(feature_map, split)``. Dense columns are scaled once the whole
        split has been seen."""
        fm = cls(schema, {}, {}, dict(schema.domain_mapping or {}), prepare)
        parts, lows, highs, sources = [], [], [], []
        for frame, where in chunks:
            sources.append(where)
            if len(frame) == 0:
                continue
            fm._grow(frame, where)
            parts.append(fm._encode(frame, where, with_label=True, scale=False))
            lows.append(parts[-1].dense.amin(0))
            highs.append(parts[-1].dense.amax(0))
        if not parts:
            raise DataError(f"{sources[0] if sources else 'input'}: the training split is empty")
        low, high = torch.stack(lows).amin(0), torch.stack(highs).amax(0)
        fm.dense_ranges = {c: (float(low[i]), float(high[i])) for i, c in enumerate(schema.dense)}
        split = TensorSplit.concat(parts)
        fm._scale(split.dense)
        return fm, split

    def transform(self, frame: pd.DataFrame, where="input", with_label: bool = True, scale: bool = True) -> TensorSplit:
        """Encode a frame with the fitted map; unseen categories get id 0, dense values the training scaling
        (``scale=False``: the raw values, for a serving graph that scales them itself)."""
        return self._encode(frame, where, with_label, scale=scale)

    def _grow(self, frame: pd.DataFrame, where) -> None:
        """Extend vocabularies (and an order-of-appearance domain mapping) with this chunk's new values."""
        check_columns(frame, self.schema.required_columns(), where)
        # An empty cell would turn an integer column into floats (1 -> "1.0") and reach the mapping as NaN.
        check_complete(frame, [self.schema.domain, *self.schema.sparse], where)
        for column in self.schema.sparse:
            keys = _category_keys(frame[column])
            known = self.vocabularies.get(column)
            if known is None:
                self.vocabularies[column] = pd.Index(pd.unique(keys))
                continue
            if known.dtype.kind != keys.dtype.kind and len(known) and len(keys):
                raise DataError(f"{where}: column {column!r} mixes numbers and text across the file")
            new = pd.unique(keys)
            new = new[known.get_indexer(new) < 0]
            if len(new):
                self.vocabularies[column] = known.append(pd.Index(new))
        if self.schema.domain_mapping is None:
            for key in value_keys(pd.Series(pd.unique(frame[self.schema.domain]))):
                self.domain_mapping.setdefault(key, len(self.domain_mapping))

    def _encode(self, frame, where, with_label: bool, scale: bool) -> TensorSplit:
        check_columns(frame, self.schema.required_columns(with_label), where)
        check_complete(frame, [self.schema.domain, *([self.schema.label] if with_label else [])], where)
        domain = self._domain_ids(frame[self.schema.domain], where)
        sparse = [self._category_ids(frame[c], c) for c in self.schema.sparse]
        if not self.schema.domain_is_sparse:
            sparse.append(domain.astype(np.int32) + 1)
        dense = self._dense_values(frame, where)
        if scale:
            self._scale(dense)
        label = (torch.from_numpy(self.schema.binary_label(frame[self.schema.label], where))
                 if with_label else None)
        sparse_tensor = (torch.from_numpy(np.stack(sparse, axis=1)) if sparse
                         else torch.zeros(len(frame), 0, dtype=torch.int32))
        return TensorSplit(sparse_tensor, dense, torch.from_numpy(domain.astype(np.int32)), label)

    def _domain_ids(self, values: pd.Series, where) -> np.ndarray:
        keys = list(self.domain_mapping)
        if pd.api.types.is_integer_dtype(values) and all(k.lstrip("-").isdigit() for k in keys):
            # integer codes (Ali-CCP's field 301) are looked up as integers: no text per row
            position = pd.Index([int(k) for k in keys]).get_indexer(values.to_numpy())
        else:
            position = pd.Index(keys).get_indexer(value_keys(values).to_numpy(object))
        outside = position < 0
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            raise DataError(f"{where}, line {values.index[row]}: domain value {shown(values.iloc[row])} of column "
                            f"{self.schema.domain!r} is outside the mapping {self.domain_mapping}")
        return np.array(list(self.domain_mapping.values()), dtype=np.int64)[position]

    def _category_ids(self, values: pd.Series, column: str) -> np.ndarray:
        vocabulary = self.vocabularies[column]
        if vocabulary.dtype.kind in "iu":
            numeric = values if pd.api.types.is_integer_dtype(values) else pd.to_numeric(values, errors="coerce")
            integral = (numeric.notna() & (numeric % 1 == 0)).to_numpy()
            ids = np.full(len(values), UNSEEN, dtype=np.int32)
            ids[integral] = vocabulary.get_indexer(numeric[integral].to_numpy(np.int64)) + 1
            return ids
        return (vocabulary.get_indexer(value_keys(values).to_numpy(object)) + 1).astype(np.int32)

    def _dense_values(self, frame, where) -> torch.Tensor:
        if not self.schema.dense:
            return torch.zeros(len(frame), 0)
        block = frame[self.schema.dense].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
        bad = ~np.isfinite(block)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            column = self.schema.dense[col]
            raise DataError(f"{where}, line {frame.index[row]}: dense column {column!r} needs a finite number, "
                            f"got {shown(frame[column].iloc[row])}")
        return torch.tensor(block)  # a copy: scaling happens in place

    def _scale(self, dense: torch.Tensor) -> None:
        """Min-max scaling with the training range, in place (a constant column becomes 0)."""
        if not self.schema.dense:
            return
        low, high = (torch.tensor(bound, dtype=dense.dtype)
                     for bound in zip(*(self.dense_ranges[c] for c in self.schema.dense)))
        dense.sub_(low).div_(torch.where(high > low, high - low, torch.ones_like(low)))


def _category_keys(values: pd.Series) -> np.ndarray:
    """Integers stay integers (fast hashing for large id columns); everything else becomes text."""
    if pd.api.types.is_integer_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values.to_numpy(np.int64)
    if pd.api.types.is_float_dtype(values) and values.notna().all() and (values % 1 == 0).all():
        return values.to_numpy(np.int64)
    return value_keys(values).to_numpy(object)
