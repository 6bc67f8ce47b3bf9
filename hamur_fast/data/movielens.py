"""MovieLens-1M as in the released HAMUR examples (SPEC section 5).

Reads the GroupLens directory (``ratings.dat``, ``users.dat``, ``movies.dat``; ``::`` separated, latin-1) or
the merged CSV layout of the released example (user_id,movie_id,rating,timestamp,title,genres,gender,age,
occupation,zip). Works unchanged on the full 1,000,209-rating download and on a subset.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import DataError
from .readers import check_columns, check_unique, read_double_colon, read_table
from .schema import Schema
from .splits import encode_splits, frames_by_split, random_split

# Age codes -> domains: {1, 18} -> 0, {25} -> 1, {35, 45, 50, 56} -> 2.
DOMAIN_BY_AGE = {1: 0, 18: 0, 25: 1, 35: 2, 45: 2, 50: 2, 56: 2}

SCHEMA = Schema(label="rating", positive="> 3", domain="age", domain_mapping=DOMAIN_BY_AGE,
                sparse=["user_id", "movie_id", "gender", "occupation", "zip", "cate_id"], dense=["age"])

RAW_COLUMNS = ["user_id", "movie_id", "rating", "gender", "age", "occupation", "zip", "genres"]
# Zip codes are text in users.dat ("02138", "98107-4912"); a CSV must not turn them into numbers.
TEXT_COLUMNS = {"zip": str}


def read_movielens(path) -> pd.DataFrame:
    """One row per rating with the user and movie columns joined on; indexed by the rating's line number."""
    path = Path(path)
    if path.is_dir():
        if not (path / "ratings.dat").is_file():
            raise FileNotFoundError(f"{path} has no ratings.dat: expected the GroupLens ml-1m directory "
                                    "(ratings.dat, users.dat, movies.dat) or a merged CSV file")
        return _read_grouplens(path)
    frame = read_table(path, dtype=TEXT_COLUMNS)
    check_columns(frame, RAW_COLUMNS, path)
    return frame


def _read_grouplens(directory: Path) -> pd.DataFrame:
    ratings = read_double_colon(directory / "ratings.dat", ["user_id", "movie_id", "rating", "timestamp"],
                                numeric=["user_id", "movie_id", "rating", "timestamp"])
    users = read_double_colon(directory / "users.dat", ["user_id", "gender", "age", "occupation", "zip"],
                              numeric=["user_id", "age", "occupation"])
    movies = read_double_colon(directory / "movies.dat", ["movie_id", "title", "genres"], numeric=["movie_id"])
    check_unique(users, "user_id", directory / "users.dat")
    check_unique(movies, "movie_id", directory / "movies.dat")
    frame = ratings.join(users.set_index("user_id"), on="user_id").join(movies.set_index("movie_id"),
                                                                        on="movie_id")
    for column, source in (("gender", "users.dat"), ("genres", "movies.dat")):
        missing = frame[column].isna().to_numpy()
        if missing.any():
            row = missing.argmax()
            key = "user_id" if source == "users.dat" else "movie_id"
            raise DataError(f"{directory / 'ratings.dat'}, line {frame.index[row]}: {key} "
                            f"{frame[key].iloc[row]} is not in {source}")
    return frame


def add_derived_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``cate_id`` = the first listed genre (the released examples' movie category)."""
    if "genres" not in frame.columns:
        raise DataError(f"missing column 'genres' (needed for cate_id); the input has {list(frame.columns)}")
    return frame.assign(cate_id=frame["genres"].astype(str).str.split("|").str[0])


def load_movielens(path, split=(0.8, 0.1, 0.1), seed: int = 2022, feature_map=None, shard=None):
    """Encoded train/val/test splits (random 8:1:1, seed 2022 by default) with a feature map fitted on train
    (unless given); ``shard``: only those training rows (the random split needs the whole file read)."""
    frame = add_derived_columns(read_movielens(path))
    return encode_splits(frames_by_split(random_split(frame, split, seed), str(path), shard), SCHEMA, "movielens",
                         feature_map)
