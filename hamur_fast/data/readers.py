"""File readers that fail with the file and line at fault. pandas (C parser) and pyarrow do the parsing.

Every frame returned here is indexed by the physical line number of its rows (counted from 1, a header is
line 1), so that an error found later, even after a random split, can still name its line. Blank lines are
kept as rows so that the count stays right; they then fail as lines with missing values.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .errors import DataError, shown

# A control character that never occurs in text data: "::" is rewritten to it so that the fast C parser,
# which only takes one-character separators, can read the GroupLens files.
_UNIT_SEPARATOR = "\x1f"


def existing_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def read_double_colon(path, names: list, numeric: list, encoding: str = "latin-1") -> pd.DataFrame:
    """Read a GroupLens ``a::b::c`` file without header; ``numeric`` columns must parse as integers."""
    path = existing_file(path)
    text = path.read_text(encoding=encoding)
    if _UNIT_SEPARATOR in text:
        raise DataError(f"{path}: unexpected control character \\x1f in the file")
    try:
        frame = pd.read_csv(io.StringIO(text.replace("::", _UNIT_SEPARATOR)), sep=_UNIT_SEPARATOR, header=None,
                            names=names, index_col=False, dtype=str, keep_default_na=False, na_values=[""],
                            skip_blank_lines=False, quoting=3)
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed line ({_parser_detail(err)}); expected {len(names)} '::'-separated "
                        f"fields {names}") from None
    frame.index = pd.RangeIndex(1, len(frame) + 1)
    if len(frame) == 0:
        raise DataError(f"{path}: the file is empty")
    check_complete(frame, names, path)
    return to_numeric(frame, numeric, path, integer=True)


def check_unique(frame: pd.DataFrame, key: str, where) -> None:
    """A side table (users, movies) lists each key once: a second line would duplicate every joined row."""
    repeated = frame[key].duplicated(keep="first").to_numpy()
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        value = frame[key].iloc[row]
        first = frame.index[int(np.flatnonzero((frame[key] == value).to_numpy())[0])]
        raise DataError(f"{where}, line {frame.index[row]}: {key} {shown(value)} is listed a second time "
                        f"(first on line {first})")


def csv_header(path) -> list | None:
    """The header fields of a CSV file, or None when the first line is data (all fields numeric)."""
    with open(existing_file(path), encoding="utf-8", errors="replace") as handle:
        first = handle.readline().rstrip("\r\n")
    if not first:
        raise DataError(f"{path}: the file is empty")
    fields = first.split(",")
    return None if all(_is_number(f) for f in fields) else fields


def iter_csv(path, chunksize: int, names: list | None = None, dtype: dict | None = None) -> Iterator[pd.DataFrame]:
    """Chunks of a CSV file, indexed by line number.

    ``names`` given: the file has no header line and these are its columns. ``dtype``: column -> type for
    columns that must not be inferred (e.g. codes with leading zeros read as text).
    """
    path = existing_file(path)
    check_text(path)
    if not names:
        check_header(path)
    header_lines = 0 if names else 1
    start = header_lines + 1
    try:
        reader = pd.read_csv(path, chunksize=chunksize, header=None if names else 0, names=names, encoding="utf-8",
                             index_col=False, skip_blank_lines=False, low_memory=False, dtype=dtype)
        for chunk in reader:
            chunk.index = pd.RangeIndex(start, start + len(chunk))
            yield chunk
            start += len(chunk)
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed line ({_parser_detail(err)})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}, line {_first_non_utf8_line(path)}: not UTF-8 text; re-save the file as UTF-8") from None


def check_text(path, block: int = 1 << 24) -> None:
    """A CSV file holds no NUL byte (pandas would cut the value short or keep it, silently): a DataError with the
    line of the first one (one fast pass over the bytes)."""
    lines = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            at = chunk.find(b"\0")
            if at >= 0:
                line = lines + chunk.count(b"\n", 0, at) + 1
                raise DataError(f"{path}, line {line}: a NUL byte (\\x00): not a text CSV file")
            lines += chunk.count(b"\n")


def check_header(path) -> None:
    """Each column name once in the header line (pandas would rename a second 'a' to 'a.1' silently)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        header = next(csv.reader(handle), [])
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path}, line 1: column name(s) {repeated} appear more than once in the header")


def read_table(path, dtype: dict | None = None) -> pd.DataFrame:
    """A whole CSV or Parquet file, indexed by line number (Parquet rows count from 1). ``dtype`` as for
    :func:`iter_csv` (Parquet files carry their own types)."""
    chunks = [chunk for chunk in iter_table(path, dtype) if len(chunk)]
    if not chunks:
        raise DataError(f"{path}: the file has a header but no rows")
    return pd.concat(chunks)


def iter_table(path, dtype: dict | None = None, chunksize: int = 1 << 20) -> Iterator[pd.DataFrame]:
    """Chunks of a CSV or Parquet file, indexed as by :func:`read_table` (Parquet: record batches of at most
    ``chunksize`` rows, so a reader that keeps some rows of each never holds the whole file)."""
    path = existing_file(path)
    if path.suffix.lower() not in {".parquet", ".pq"}:
        yield from iter_csv(path, chunksize, dtype=dtype)
        return
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=chunksize)
        start = 1
        for batch in batches:
            chunk = batch.to_pandas()
            chunk.index = pd.RangeIndex(start, start + len(chunk))
            yield chunk
            start += len(chunk)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None


def check_columns(frame: pd.DataFrame, columns: list, where) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; the file has {list(frame.columns)}")


def check_complete(frame: pd.DataFrame, columns: list, where) -> None:
    """Every listed column has a value on every row (a short or blank line leaves gaps)."""
    gaps = frame[columns].isna().to_numpy()
    if gaps.any():
        row, col = np.argwhere(gaps)[0]
        raise DataError(f"{where}, line {frame.index[row]}: malformed line, no value for column {columns[col]!r}")


def to_numeric(frame: pd.DataFrame, columns: list, where, integer: bool = False) -> pd.DataFrame:
    """Columns converted to numbers; the first value that is not a number is reported with its line."""
    for column in columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) and not (integer and pd.api.types.is_float_dtype(values)):
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        bad = numeric.isna() & values.notna()
        if integer:
            bad |= numeric.notna() & (numeric % 1 != 0)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            kind = "an integer" if integer else "a number"
            raise DataError(f"{where}, line {frame.index[row]}: column {column!r} must be {kind}, "
                            f"got {shown(values.iloc[row])}")
        frame[column] = numeric.astype(np.int64) if integer and numeric.notna().all() else numeric
    return frame


def _first_non_utf8_line(path) -> int:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parser_detail(err: Exception) -> str:
    return str(err).replace("Error tokenizing data. C error: ", "").strip()
