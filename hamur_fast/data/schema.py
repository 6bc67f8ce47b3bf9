"""What the columns of a table mean: label (and its positive rule), domain, sparse and dense features."""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .errors import DataError, shown

_COMPARISONS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
                ">": operator.gt, "<": operator.lt}


@dataclass
class Schema:
    """Column roles of a table.

    ``positive`` turns the label column into 0/1: ``None`` (the column already holds 0/1), a comparison
    string such as ``"> 3"`` or ``"== yes"``, or a list of the values that count as positive.
    ``domain_mapping`` maps raw domain values to domain ids 0..D-1; ``None`` means "by order of first
    appearance in the training split" (fixed when the feature map is fitted).
    """

    label: str
    domain: str
    sparse: list = field(default_factory=list)
    dense: list = field(default_factory=list)
    positive: object = None
    domain_mapping: dict | None = None

    def __post_init__(self):
        for role in ("sparse", "dense"):
            if not isinstance(getattr(self, role), (list, tuple)):
                raise DataError(f"schema {role} must be a list of column names, got {shown(getattr(self, role))}")
        self.sparse, self.dense = [str(c) for c in self.sparse], [str(c) for c in self.dense]
        if self.domain_mapping is not None:
            self.domain_mapping = _domain_mapping(self.domain_mapping)
        self._check_roles()
        if not self.sparse and not self.dense:
            raise DataError("the schema names no feature column (sparse or dense)")

    def _check_roles(self) -> None:
        """One role per column, except that the domain column may also be a feature (MovieLens' age is): a label
        that is also a feature or the domain would leak into the model's input."""
        roles = [self.label, *self.sparse, *self.dense]
        twice = sorted({column for column in roles if roles.count(column) > 1} |
                       ({self.label} if self.label == self.domain else set()))
        if twice:
            raise DataError(f"a column has two roles (label, domain, a feature twice): {twice}")

    @classmethod
    def from_dict(cls, spec: dict) -> "Schema":
        """Accepts the YAML form: ``label: {column, positive}``, ``domain: {column, mapping}``, sparse, dense."""
        spec = dict(spec)
        unknown = set(spec) - {"label", "domain", "sparse", "dense", "positive", "domain_mapping"}
        if unknown:
            raise DataError(f"unknown schema key(s) {sorted(unknown)}")
        for key in ("label", "domain"):
            if key not in spec or (isinstance(spec[key], dict) and "column" not in spec[key]):
                raise DataError(f"the schema must name the {key} column ('{key}: name' or '{key}: {{column: name}}')")
        label, domain = spec.pop("label"), spec.pop("domain")
        if isinstance(label, dict):
            spec["positive"] = label.get("positive")
            label = label["column"]
        if isinstance(domain, dict):
            mapping = domain.get("mapping", "order")
            spec["domain_mapping"] = None if mapping == "order" else mapping
            domain = domain["column"]
        return cls(label=str(label), domain=str(domain), **spec)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def domain_is_sparse(self) -> bool:
        return self.domain in self.sparse

    def required_columns(self, with_label: bool = True) -> list:
        columns = [self.domain, *self.sparse, *self.dense]
        return list(dict.fromkeys([self.label, *columns] if with_label else columns))

    def binary_label(self, values: pd.Series, where) -> np.ndarray:
        """0/1 float32 labels; a non-binary column without a positive rule is an error."""
        if self.positive is None:
            numeric = pd.to_numeric(values, errors="coerce")
            bad = ~numeric.isin([0, 1])
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(f"{where}, line {values.index[row]}: label column {self.label!r} must hold 0 or 1, "
                                f"got {shown(values.iloc[row])}; give the schema a positive rule (e.g. '> 3')")
            return numeric.to_numpy(np.float32)
        if isinstance(self.positive, (list, tuple)):
            keys = {value_key(v) for v in self.positive}
            return value_keys(values).isin(keys).to_numpy(np.float32)
        op, threshold = parse_comparison(self.positive)
        if isinstance(threshold, str):
            return op(value_keys(values), threshold).to_numpy(np.float32)
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.isna().any():
            row = int(np.flatnonzero(numeric.isna().to_numpy())[0])
            raise DataError(f"{where}, line {values.index[row]}: label column {self.label!r} is not numeric: "
                            f"{shown(values.iloc[row])}")
        return op(numeric, threshold).to_numpy(np.float32)


def _domain_mapping(mapping) -> dict:
    """``{raw value: id}`` with the ids 0..D-1 without gaps, or a DataError."""
    if not isinstance(mapping, dict):
        raise DataError(f"the domain mapping must be a mapping of raw value to id (e.g. {{F: 0, M: 1}}), "
                        f"got {shown(mapping)}")
    try:
        mapping = {value_key(k): int(v) for k, v in mapping.items()}
    except (TypeError, ValueError):
        raise DataError(f"the domain mapping's ids must be whole numbers, got {shown(mapping)}") from None
    ids = sorted(set(mapping.values()))
    if ids != list(range(len(ids))):
        raise DataError(f"domain mapping must use the ids 0..D-1 without gaps, got {shown(ids)}")
    return mapping


def parse_comparison(rule: str):
    """``"> 3"`` -> (operator.gt, 3.0); ``"== yes"`` -> (operator.eq, "yes")."""
    text = str(rule).strip()
    for symbol in sorted(_COMPARISONS, key=len, reverse=True):
        if text.startswith(symbol):
            raw = text[len(symbol):].strip()
            try:
                return _COMPARISONS[symbol], float(raw)
            except ValueError:
                return _COMPARISONS[symbol], raw
    raise DataError(f"positive rule {rule!r} must start with one of {list(_COMPARISONS)} or be a list of values")


def value_key(value) -> str:
    """The string key of one raw value: integral numbers print without a decimal point (1.0 -> "1")."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def value_keys(values: pd.Series) -> pd.Series:
    """Vectorised ``value_key`` for a column."""
    if pd.api.types.is_float_dtype(values) and values.notna().all() and (values % 1 == 0).all():
        return values.astype(np.int64).astype(str)
    return values.astype(str)
