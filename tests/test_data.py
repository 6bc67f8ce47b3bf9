"""Data loaders, the fitted feature map and batching: real samples (skipped without ../shared), malformed input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from hamur_fast.data import (DataError, FeatureMap, generate, load_aliccp, load_dataset, load_movielens, load_synthetic,
                             load_table, read_prediction_input)


pytestmark = pytest.mark.usefixtures("one_thread")


RATINGS = "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n3::30::1::978300275\n" \
          "2::20::2::978824291\n3::10::5::978302268\n1::30::4::978302039\n2::30::5::978300719\n" \
          "3::20::4::978300760\n1::10::2::978302109\n"
USERS = "1::F::1::10::48067\n2::M::25::16::70072\n3::M::45::15::55117\n"
MOVIES = "10::Caf\u00e9 (1995)::Comedy|Drama\n20::Heat (1995)::Action|Crime\n30::Casino (1995)::Drama\n"


def write_grouplens(directory, ratings=RATINGS, users=USERS, movies=MOVIES):
    directory.mkdir(exist_ok=True)
    for name, text in (("ratings.dat", ratings), ("users.dat", users), ("movies.dat", movies)):
        (directory / name).write_bytes(text.encode("latin-1"))
    return directory


# ------------------------------------------------------------------------------ MovieLens
def test_movielens_sample_domains_labels_and_fields(shared_dir):
    data = load_movielens(shared_dir / "data" / "ml-1m-sample")
    fm = data.feature_map
    splits = (data.train, data.val, data.test)
    assert sum(len(s) for s in splits) == 118_406
    per_domain = np.sum([s.domain_counts(3) for s in splits], axis=0)
    assert per_domain.tolist() == [24_991, 46_752, 46_663]  # the data README's counts
    assert [len(s) for s in splits] == [94_725, 11_840, 11_841]  # 8:1:1
    assert fm.sparse_fields == ["user_id", "movie_id", "gender", "occupation", "zip", "cate_id", "domain_indicator"]
    assert fm.num_dense == 1 and fm.domain_names() == ["1/18", "25", "35/45/50/56"]
    ratings = pd.read_csv(shared_dir / "data" / "ml-1m-sample" / "ratings.dat", sep="::", engine="python",
                          header=None)
    assert torch.cat([s.label for s in splits]).sum().item() == (ratings[2] > 3).sum()
    assert data.train.dense.min() == 0 and data.train.dense.max() == 1  # age, min-max on train
    # the domain indicator column is domain id + 1 (0 is the reserved unseen id)
    assert torch.equal(data.train.sparse[:, -1].long(), data.train.domain.long() + 1)


def test_movielens_merged_csv_layout(shared_dir):
    data = load_movielens(shared_dir / "data" / "ml-1m-sample" / "merged-sample.csv")
    assert sum(len(s) for s in (data.train, data.val, data.test)) == 500
    assert data.feature_map.sparse_fields[-2:] == ["cate_id", "domain_indicator"]


def test_movielens_feature_map_round_trip_encodes_identically(tmp_path):
    data = load_movielens(write_grouplens(tmp_path / "ml"), split=(0.6, 0.2, 0.2))
    restored = FeatureMap.from_dict(json.loads(json.dumps(data.feature_map.to_dict())))
    again = load_movielens(tmp_path / "ml", split=(0.6, 0.2, 0.2), feature_map=restored)
    for name in ("train", "val", "test"):
        a, b = getattr(data, name), getattr(again, name)
        assert torch.equal(a.sparse, b.sparse) and torch.equal(a.dense, b.dense) and torch.equal(a.label, b.label)
    assert "Caf\u00e9" not in json.dumps(data.feature_map.to_dict())  # titles are dropped
    assert set(data.feature_map.vocabularies["cate_id"]) <= {"Comedy", "Action", "Drama"}  # first genre only


def test_movielens_csv_input_keeps_zip_codes_as_text(tmp_path):
    """A model fitted on users.dat ("02138") scores a merged-CSV row with the same zip id, not as unseen."""
    data = load_movielens(write_grouplens(tmp_path / "ml", users=USERS.replace("48067", "02138")),
                          split=(0.6, 0.2, 0.2))
    fm = data.feature_map
    merged = tmp_path / "merged.csv"
    merged.write_text("user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip\n"
                      "1,10,5,978300760,Cafe (1995),Comedy|Drama,F,1,10,02138\n")
    _, split = read_prediction_input(merged, fm)
    zip_id = split.sparse[0, fm.sparse_fields.index("zip")].item()
    assert zip_id == fm.vocabularies["zip"].get_loc("02138") + 1


@pytest.mark.parametrize("line, message", [
    ("1::10::5::978300760::extra", "ratings.dat: malformed line (Expected 4 fields in line 3, saw 5)"),
    ("1::10::5", "ratings.dat, line 3: malformed line, no value for column 'timestamp'"),
    ("1::10::five::978300760", "ratings.dat, line 3: column 'rating' must be an integer, got 'five'"),
    ("", "ratings.dat, line 3: malformed line"),
    ("9::10::5::978300760", "ratings.dat, line 3: user_id 9 is not in users.dat"),
])
def test_movielens_malformed_line_names_file_and_line(tmp_path, line, message):
    lines = RATINGS.splitlines()
    lines[2] = line
    directory = write_grouplens(tmp_path / "ml", ratings="\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_movielens(directory)


def test_movielens_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ratings.dat"):
        load_movielens(tmp_path)
    directory = write_grouplens(tmp_path / "ml")
    (directory / "users.dat").unlink()
    with pytest.raises(FileNotFoundError, match="users.dat"):
        load_movielens(directory)


# ------------------------------------------------------------------------------ Ali-CCP
def test_aliccp_released_layout(shared_dir):
    root = shared_dir / "data" / "ali-ccp-sample"
    data = load_aliccp(*(root / f"ali_ccp_{s}_sample.csv" for s in ("train", "val", "test")))
    fm = data.feature_map
    assert [len(s) for s in (data.train, data.val, data.test)] == [100, 50, 50]
    assert fm.num_dense == 8 and fm.num_domains == 3 and "301" in fm.sparse_fields
    assert "click" not in fm.sparse_fields and "purchase" not in fm.sparse_fields
    assert len(fm.sparse_fields) == 33 - 2 - 8  # every other column is a sparse field, 301 included
    assert data.train.sparse.dtype == torch.int32 and data.train.dense.dtype == torch.float32
    assert data.train.domain_counts(3) == [100, 0, 0]  # field 301 is 1 everywhere in this sample


def test_aliccp_headerless_paddlerec_rows(shared_dir):
    root = shared_dir / "data" / "ali-ccp-sample" / "paddlerec-rows"
    data = load_aliccp(root / "train.csv", root / "test.csv", root / "test.csv", chunksize=7)
    assert len(data.train) == 48 and len(data.test) == 50  # no header row lost or parsed as data
    assert data.train.domain_counts(3) == [0, 31, 17] and data.test.domain_counts(3) == [24, 14, 12]
    # domain 0 (301 = 1) never occurs in train: its field-301 id is the reserved unseen id
    assert (data.test.sparse[data.test.domain == 0, -1] == 0).all()


def _aliccp_files(tmp_path, train_rows, val_rows=None):
    header = "click,purchase,101,205,301,D508"
    rows = val_rows or ["0,0,1,7,1,0.5", "1,0,2,8,2,0.1"]
    paths = []
    for name, body in (("train", train_rows), ("val", rows), ("test", rows)):
        path = tmp_path / f"{name}.csv"
        path.write_text(header + "\n" + "\n".join(body) + "\n")
        paths.append(path)
    return paths


GOOD_ALICCP = ["0,0,1,7,1,0.5", "1,0,2,8,2,0.25", "0,0,3,9,3,1.5", "1,1,1,7,3,0.0"]


@pytest.mark.parametrize("bad_row, message", [
    ("0,0,1,7,1,0.5,9", "train.csv: malformed line (Expected 6 fields in line 4, saw 7)"),
    ("0,0,1,x,1,0.5", "train.csv, line 4: column '205' must be an integer, got 'x'"),
    ("0,0,1,7,1,", "train.csv, line 4: malformed line, no value for column 'D508'"),
    ("2,0,1,7,1,0.5", "train.csv, line 4: label column 'click' must hold 0 or 1, got 2"),
    ("0,0,1,7,4,0.5", "train.csv, line 4: domain value 4 of column '301' is outside the mapping"),
])
def test_aliccp_bad_rows_name_file_and_line(tmp_path, bad_row, message):
    rows = list(GOOD_ALICCP)
    rows[2] = bad_row
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_aliccp(*_aliccp_files(tmp_path, rows), chunksize=2)  # the bad line is in the second chunk


def test_aliccp_chunk_size_does_not_change_the_encoding(tmp_path):
    rng = np.random.default_rng(0)
    rows = [f"{rng.integers(2)},0,{rng.integers(50)},{rng.integers(9)},{rng.integers(1, 4)},{rng.uniform():.3f}"
            for _ in range(200)]
    paths = _aliccp_files(tmp_path, rows, val_rows=rows[:30])
    whole, chunked = load_aliccp(*paths), load_aliccp(*paths, chunksize=7)
    assert whole.feature_map.to_dict() == chunked.feature_map.to_dict()
    for name in ("train", "val", "test"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert all(torch.equal(x, y) for x, y in zip((a.sparse, a.dense, a.domain, a.label),
                                                     (b.sparse, b.dense, b.domain, b.label)))


def test_aliccp_unseen_ids_and_train_only_scaling(tmp_path):
    data = load_aliccp(*_aliccp_files(tmp_path, GOOD_ALICCP, val_rows=["0,0,99,7,1,3.0"]))
    fields = data.feature_map.sparse_fields
    assert data.val.sparse[0, fields.index("101")] == 0  # 99 never seen in train
    assert data.val.sparse[0, fields.index("205")] == data.train.sparse[0, fields.index("205")]
    assert data.feature_map.dense_ranges == {"D508": (0.0, 1.5)}
    assert data.val.dense[0, 0].item() == pytest.approx(2.0)  # (3.0 - 0) / 1.5: train range, no refit
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        load_aliccp(tmp_path / "train.csv", tmp_path / "nowhere.csv", tmp_path / "test.csv")


# ------------------------------------------------------------------------------ bring your own
SCHEMA_YAML = """
label: {column: clicked, positive: "== yes"}
domain: {column: region, mapping: order}
sparse: [user, item]
dense: [price]
"""


def _table(rows=60, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user": rng.integers(0, 5, rows), "item": rng.choice(["a", "b", "c"], rows),
                         "price": rng.uniform(1, 9, rows), "region": rng.choice(["north", "south"], rows),
                         "clicked": rng.choice(["yes", "no"], rows)})


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_with_yaml_schema(tmp_path, suffix):
    frame = _table()
    path = tmp_path / f"data{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    (tmp_path / "schema.yaml").write_text(SCHEMA_YAML)
    data = load_dataset({"kind": "table", "path": str(path), "schema": str(tmp_path / "schema.yaml")})
    fm = data.feature_map
    assert fm.num_domains == 2 and set(fm.domain_mapping) == {"north", "south"}
    assert fm.sparse_fields == ["user", "item", "domain_indicator"]
    labels = torch.cat([data.train.label, data.val.label, data.test.label])
    assert labels.sum().item() == (frame["clicked"] == "yes").sum()
    raw, split = read_prediction_input(path, fm)
    assert len(raw) == len(split) == 60


def test_table_errors(tmp_path):
    frame = _table()
    path = tmp_path / "data.csv"
    frame.drop(columns=["price"]).to_csv(path, index=False)
    schema = {"label": {"column": "clicked", "positive": "== yes"}, "domain": "region", "sparse": ["user"],
              "dense": ["price"]}
    with pytest.raises(DataError, match=r"data.csv \(train split\): missing column\(s\) \['price'\]"):
        load_table(path, schema)
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match="the val split is empty"):
        load_table(path, schema, split=(1.0, 0.0, 0.0))
    with pytest.raises(DataError, match="label column 'clicked' must hold 0 or 1, got '(yes|no)'"):
        load_table(path, {**schema, "label": "clicked"})
    with pytest.raises(DataError, match="domain value 'south' of column 'region' is outside the mapping"):
        load_table(path, {**schema, "domain": {"column": "region", "mapping": {"north": 0}}})
    with pytest.raises(DataError, match="the schema must name the domain column"):
        load_table(path, {**schema, "domain": {"mapping": "order"}})
    with pytest.raises(DataError, match="must start with one of"):
        load_table(path, {**schema, "label": {"column": "clicked", "positive": "yes"}})


# ------------------------------------------------------------------------------ synthetic + batching
def test_synthetic_generator_is_seeded_unequal_and_domain_specific():
    a, b = generate(rows=20_000, seed=3), generate(rows=20_000, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert not generate(rows=20_000, seed=4).equals(a)
    shares = a["domain"].value_counts(normalize=True).sort_index().to_numpy()
    assert shares[2] < 0.12 and shares[0] > shares[1] > shares[2]  # one rare domain
    rates = a.groupby("domain")["click"].mean().to_numpy()
    assert np.ptp(rates) > 0.05  # different click rates
    # different click patterns: the dense slope differs in sign or size between domains
    slopes = [np.corrcoef(a.loc[a.domain == d, "x_gauss"], a.loc[a.domain == d, "click"])[0, 1] for d in range(3)]
    assert np.ptp(slopes) > 0.1
    users_per_domain = a.groupby("user_id")["domain"].nunique()
    assert (users_per_domain == 1).all()  # each user belongs to one domain


def test_batches_cover_every_row_once_with_a_seeded_shuffle():
    split = load_synthetic(rows=1_000).train
    rows = lambda epoch: torch.cat([b.dense[:, 1] for b in split.batches(64, shuffle=True, seed=5, epoch=epoch)])
    first = rows(0)
    assert torch.equal(first, rows(0)) and not torch.equal(first, rows(1))
    assert torch.equal(first.sort().values, split.dense[:, 1].sort().values)
    ordered = list(split.batches(300))
    assert [len(b.domain) for b in ordered] == [300, 300, 200]
    assert ordered[0].domain.dtype == torch.int64 and torch.equal(ordered[0].sparse, split.sparse[:300])
