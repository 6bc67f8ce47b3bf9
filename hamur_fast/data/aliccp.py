"""Ali-CCP in the processed CSV layout of the released HAMUR examples (SPEC section 5).

Label ``click``; domain = field ``301`` (1, 2, 3 -> 0, 1, 2); the eight ``D*`` columns are dense, every other
column except ``purchase`` is a sparse id field. The given train/val/test files are read in chunks (pandas C
parser) straight into int32/float32 tensors, so the ~42M-row training file never exists as a Python object per
row. A file whose first line is data (the paddlerec test.csv) takes its columns from the training file.

The layout is fixed: the training file's columns must be those of the released processed files (33 columns)
or of the paddlerec rows (20 columns, no dense fields); a missing or unexpected column is an error naming it
(for other column sets, use ``kind: table`` with a schema).
"""
from __future__ import annotations

from .readers import check_columns, check_complete, csv_header, existing_file, iter_csv, to_numeric
from .errors import DataError
from .schema import Schema
from .splits import encode_splits

DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]
LABEL, DOMAIN, UNUSED = "click", "301", ("purchase",)
DOMAIN_MAPPING = {1: 0, 2: 1, 3: 2}
_ID_FIELDS = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207"]
LAYOUTS = {
    "released processed CSV": [LABEL, "purchase", *_ID_FIELDS, "210", "216", "508", "509", "702", "853", DOMAIN,
                               "109_14", "110_14", "127_14", "150_14", *DENSE],
    "paddlerec rows": [LABEL, "purchase", *_ID_FIELDS, "216", "508", "509", "702", "853", DOMAIN],
}


def aliccp_schema(columns: list, where="the training file") -> Schema:
    """The schema of a file with these columns, which must be one of :data:`LAYOUTS` exactly."""
    name, expected = min(LAYOUTS.items(), key=lambda layout: len(set(layout[1]) ^ set(columns)))
    missing = [c for c in expected if c not in columns]
    unexpected = [c for c in columns if c not in expected]
    if missing or unexpected:
        raise DataError(f"{where}: not an Ali-CCP file: closest is the {name} layout, which "
                        + (f"also has the column(s) {missing}" if missing else "")
                        + (" and " if missing and unexpected else "")
                        + (f"has no column(s) {unexpected}" if unexpected else "")
                        + "; for other columns use data.kind: table with a schema")
    sparse = [c for c in columns if c not in DENSE and c != LABEL and c not in UNUSED]
    return Schema(label=LABEL, domain=DOMAIN, domain_mapping=DOMAIN_MAPPING, sparse=sparse,
                  dense=[c for c in DENSE if c in columns])


def load_aliccp(train, val, test, chunksize: int = 500_000, feature_map=None, shard=None):
    """Encoded splits from the three given files, the feature map fitted on ``train`` (unless given).
    ``shard``: only those rows of ``train`` are kept (each chunk's, before the checks and the encoding)."""
    for path in (train, val, test):
        existing_file(path)  # fail before a long pass over the training file, not after it
    columns = csv_header(train)
    if columns is None:
        raise DataError(f"{train}: the training file needs a header line naming the columns")
    schema = feature_map.schema if feature_map is not None else aliccp_schema(columns, train)
    chunks = {name: _checked_chunks(path, schema, chunksize, columns, shard if name == "train" else None)
              for name, path in (("train", train), ("val", val), ("test", test))}
    return encode_splits(chunks, schema, None, feature_map)


def _checked_chunks(path, schema: Schema, chunksize: int, train_columns: list, shard=None):
    """Chunks (``shard``'s rows of them) with every used column present, complete and numeric (errors name
    the line)."""
    names = None if csv_header(path) is not None else train_columns
    integer_columns = [schema.label, *schema.sparse]
    chunks = iter_csv(path, chunksize, names=names)
    for chunk in (chunks if shard is None else shard.frames(chunks)):
        used = schema.required_columns()
        check_columns(chunk, used, path)
        check_complete(chunk, used, path)
        to_numeric(chunk, integer_columns, path, integer=True)
        yield to_numeric(chunk, schema.dense, path), str(path)
