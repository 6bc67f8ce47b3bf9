"""Small files in the real layouts of MovieLens-1M and Ali-CCP, generated for the tests.

The loaders are tested on these, so the suite needs no ../shared (whose real samples stay an optional extra
set). Each writer also returns the rows it wrote as a frame, the ground truth the tests compare against.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

AGE_CODES = [1, 18, 25, 35, 45, 50, 56]  # the GroupLens age groups
GENRES = ["Action", "Comedy", "Drama", "Children's", "Film-Noir", "Sci-Fi", "Thriller"]
MERGED_COLUMNS = ["user_id", "movie_id", "rating", "timestamp", "title", "genres", "gender", "age", "occupation",
                  "zip"]

# Ali-CCP as the released HAMUR examples process it (33 columns) and as the paddlerec rows come (20 columns).
ALICCP_IDS = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207"]
ALICCP_DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]
ALICCP_RELEASED = ["click", "purchase", *ALICCP_IDS, "210", "216", "508", "509", "702", "853", "301",
                   "109_14", "110_14", "127_14", "150_14", *ALICCP_DENSE]
ALICCP_PADDLEREC = ["click", "purchase", *ALICCP_IDS, "216", "508", "509", "702", "853", "301"]


def movielens_tables(users: int = 40, movies: int = 25, ratings: int = 500, seed: int = 0):
    """(ratings, users, movies) frames in the GroupLens columns; every age group and both labels occur."""
    rng = np.random.default_rng(seed)
    user = pd.DataFrame({
        "user_id": np.arange(1, users + 1),
        "gender": rng.choice(["F", "M"], users),
        "age": [AGE_CODES[u % len(AGE_CODES)] for u in range(users)],
        "occupation": rng.integers(0, 21, users),
        # zip codes are text: leading zeros and ZIP+4 forms must survive
        "zip": [("0" + str(rng.integers(1000, 9999))) if u % 3 == 0 else
                (f"{rng.integers(10000, 99999)}-{rng.integers(1000, 9999)}" if u % 3 == 1 else
                 str(rng.integers(10000, 99999))) for u in range(users)],
    })
    movie = pd.DataFrame({
        "movie_id": np.arange(1, movies + 1) * 10,
        "title": [("Café " if m % 4 == 0 else "Film ") + f"{m} ({1950 + m})" for m in range(movies)],
        "genres": ["|".join(rng.choice(GENRES, rng.integers(1, 4), replace=False)) for _ in range(movies)],
    })
    pairs = rng.choice(users * movies, ratings, replace=False)  # each (user, movie) rated once
    rating = pd.DataFrame({"user_id": pairs // movies + 1, "movie_id": (pairs % movies + 1) * 10,
                           "rating": rng.integers(1, 6, ratings),
                           "timestamp": rng.integers(956_703_932, 1_046_454_590, ratings)})
    return rating, user, movie


def write_ml1m(directory, **sizes) -> pd.DataFrame:
    """``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated, latin-1); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rating, user, movie = movielens_tables(**sizes)
    for name, frame in (("ratings.dat", rating), ("users.dat", user), ("movies.dat", movie)):
        lines = ["::".join(str(v) for v in row) for row in frame.itertuples(index=False)]
        (directory / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return directory


def merged(rating, user, movie) -> pd.DataFrame:
    return rating.merge(user, on="user_id").merge(movie, on="movie_id")[MERGED_COLUMNS]


def write_merged_csv(path, **sizes) -> pd.DataFrame:
    """The released example's merged CSV layout (UTF-8)."""
    frame = merged(*movielens_tables(**sizes))
    frame.to_csv(path, index=False)
    return frame


def aliccp_frame(rows: int, layout=ALICCP_RELEASED, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({column: rng.integers(0, 12, rows) for column in layout})
    frame["click"] = rng.integers(0, 2, rows)
    frame["purchase"] = frame["click"] * rng.integers(0, 2, rows)
    frame["301"] = rng.integers(1, 4, rows)
    for column in (c for c in ALICCP_DENSE if c in layout):
        frame[column] = np.round(rng.uniform(size=rows), 4)
    return frame


def write_aliccp(directory, rows=(120, 40, 40), layout=ALICCP_RELEASED, test_header: bool = True,
                 seed: int = 0) -> list:
    """train/val/test CSV files; ``test_header=False`` writes the test file without its header line (as the
    paddlerec test.csv comes). Returns the three paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, (name, count) in enumerate(zip(("train", "val", "test"), rows)):
        path = directory / f"{name}.csv"
        aliccp_frame(count, layout, seed + offset).to_csv(path, index=False, header=test_header or name != "test")
        paths.append(path)
    return paths
