"""Data: loaders (MovieLens-1M, Ali-CCP, your own CSV/Parquet, synthetic), the fitted feature map, tensor batches.

Every loader returns :class:`MultiDomainData` (train/val/test :class:`TensorSplit` and the
:class:`FeatureMap` fitted on train); :func:`load_dataset` picks one from a config's ``data:`` section.
"""
from .aliccp import load_aliccp
from .errors import DataError
from .feature_map import FeatureMap
from .load import check_data_section, load_dataset, read_prediction_input
from .movielens import load_movielens, read_movielens
from .schema import Schema
from .shards import RowShard
from .synthetic import generate, load_synthetic
from .table import load_table, read_schema
from .tensors import Batch, MultiDomainData, TensorSplit

__all__ = ["DataError", "FeatureMap", "Schema", "RowShard", "Batch", "TensorSplit", "MultiDomainData", "load_dataset",
           "check_data_section", "read_prediction_input", "load_movielens", "read_movielens", "load_aliccp",
           "load_table", "read_schema", "generate", "load_synthetic"]
