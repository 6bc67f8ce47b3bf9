"""Data loaders, the fitted feature map and batching, on files in the real layouts that the tests write
(tests/data_files.py); malformed input. The real samples of ../shared are an optional extra set."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from hamur_fast.data import (DataError, FeatureMap, generate, load_aliccp, load_dataset, load_movielens, load_synthetic,
                             load_table, read_prediction_input)

from data_files import (ALICCP_DENSE, ALICCP_PADDLEREC, ALICCP_RELEASED, aliccp_frame, merged, movielens_tables, write_aliccp,
                        write_merged_csv, write_ml1m)


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
DOMAIN_OF_AGE = {1: 0, 18: 0, 25: 1, 35: 2, 45: 2, 50: 2, 56: 2}


def test_movielens_grouplens_layout_domains_labels_and_fields(tmp_path):
    truth = merged(*movielens_tables())
    data = load_movielens(write_ml1m(tmp_path / "ml-1m"))
    fm, splits = data.feature_map, (data.train, data.val, data.test)
    assert [len(s) for s in splits] == [400, 50, 50]  # 8:1:1 of 500 ratings
    per_domain = np.sum([s.domain_counts(3) for s in splits], axis=0)
    assert per_domain.tolist() == np.bincount(truth["age"].map(DOMAIN_OF_AGE), minlength=3).tolist()
    assert torch.cat([s.label for s in splits]).sum().item() == (truth["rating"] > 3).sum()
    assert fm.sparse_fields == ["user_id", "movie_id", "gender", "occupation", "zip", "cate_id", "domain_indicator"]
    assert fm.num_dense == 1 and fm.domain_names() == ["1/18", "25", "35/45/50/56"]
    assert data.train.dense.min() == 0 and data.train.dense.max() == 1  # age, min-max on train
    assert torch.equal(data.train.sparse[:, -1].long(), data.train.domain.long() + 1)
    assert all(isinstance(z, str) for z in fm.vocabularies["zip"])  # "02138", "98107-4912" stay text
    assert set(fm.vocabularies["cate_id"]) <= {g.split("|")[0] for g in truth["genres"]}  # first genre only


def test_movielens_merged_csv_layout_encodes_like_the_grouplens_files(tmp_path):
    write_ml1m(tmp_path / "ml-1m")
    write_merged_csv(tmp_path / "merged.csv")
    a, b = load_movielens(tmp_path / "ml-1m"), load_movielens(tmp_path / "merged.csv")
    assert a.feature_map.sparse_fields == b.feature_map.sparse_fields
    assert sorted(map(str, a.feature_map.vocabularies["zip"])) == sorted(map(str, b.feature_map.vocabularies["zip"]))
    assert torch.cat([a.train.label, a.val.label, a.test.label]).sum() == torch.cat(
        [b.train.label, b.val.label, b.test.label]).sum()


def test_movielens_duplicate_user_or_movie_is_an_error(tmp_path):
    directory = tmp_path / "ml-1m"
    write_ml1m(directory)
    users = (directory / "users.dat").read_text(encoding="latin-1").splitlines()
    (directory / "users.dat").write_text("\n".join(users + [users[4].replace("::F::", "::M::")]) + "\n")
    with pytest.raises(DataError, match=f"users.dat, line {len(users) + 1}: user_id 5 is listed a second time "
                                        "\\(first on line 5\\)"):
        load_movielens(directory)
    write_ml1m(directory)
    movies = (directory / "movies.dat").read_bytes().splitlines()
    (directory / "movies.dat").write_bytes(b"\n".join([movies[0], *movies]) + b"\n")
    with pytest.raises(DataError, match="movies.dat, line 2: movie_id 10 is listed a second time"):
        load_movielens(directory)


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
def test_aliccp_released_and_paddlerec_layouts(tmp_path):
    data = load_aliccp(*write_aliccp(tmp_path / "released"), chunksize=50)
    fm = data.feature_map
    assert [len(s) for s in (data.train, data.val, data.test)] == [120, 40, 40]
    assert fm.num_dense == 8 and fm.num_domains == 3 and "301" in fm.sparse_fields
    assert len(fm.sparse_fields) == 33 - 2 - 8  # every column but click, purchase and the dense ones, 301 included
    assert data.train.sparse.dtype == torch.int32 and data.train.dense.dtype == torch.float32
    truth = aliccp_frame(120)
    assert data.train.domain_counts(3) == np.bincount(truth["301"] - 1, minlength=3).tolist()
    # the paddlerec rows: 20 columns, no dense fields, a test file without its header line
    paddle = load_aliccp(*write_aliccp(tmp_path / "paddle", layout=ALICCP_PADDLEREC, test_header=False), chunksize=7)
    assert len(paddle.test) == 40 and paddle.feature_map.num_dense == 0  # no header row lost or read as data
    assert len(paddle.feature_map.sparse_fields) == 20 - 2


@pytest.mark.parametrize("layout, change, message", [
    (ALICCP_RELEASED, lambda f: f.drop(columns=["D702"]), r"also has the column\(s\) \['D702'\]"),
    (ALICCP_RELEASED, lambda f: f.drop(columns=["205", "109_14"]), r"also has the column\(s\) \['205', '109_14'\]"),
    (ALICCP_PADDLEREC, lambda f: f.assign(extra=1), r"has no column\(s\) \['extra'\]"),
])
def test_aliccp_missing_or_unexpected_column_is_an_error(tmp_path, layout, change, message):
    paths = write_aliccp(tmp_path, layout=layout)
    change(pd.read_csv(paths[0])).to_csv(paths[0], index=False)
    with pytest.raises(DataError, match="train.csv: not an Ali-CCP file: closest is the .* layout, which " + message):
        load_aliccp(*paths)


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
    """Files in the released layout whose data lines are given as {column: value} changes of a valid row."""
    base = aliccp_frame(1).iloc[0].to_dict()
    paths = []
    for name, body in (("train", train_rows), ("val", val_rows or train_rows[:2]), ("test", val_rows or train_rows[:2])):
        lines = [",".join(str(row.get(c, base[c])) for c in ALICCP_RELEASED) + row.get("_extra", "") for row in body]
        path = tmp_path / f"{name}.csv"
        path.write_text(",".join(ALICCP_RELEASED) + "\n" + "\n".join(lines) + "\n")
        paths.append(path)
    return paths


GOOD_ALICCP = [{"click": 0, "101": 1, "205": 7, "301": 1, "D508": 0.5}, {"click": 1, "101": 2, "205": 8, "301": 2},
               {"click": 0, "101": 3, "205": 9, "301": 3, "D508": 1.5}, {"click": 1, "purchase": 1, "301": 3}]


@pytest.mark.parametrize("bad_row, message", [
    ({"_extra": ",9"}, "train.csv: malformed line (Expected 33 fields in line 4, saw 34)"),
    ({"205": "x"}, "train.csv, line 4: column '205' must be an integer, got 'x'"),
    ({"D508": ""}, "train.csv, line 4: malformed line, no value for column 'D508'"),
    ({"301": ""}, "train.csv, line 4: malformed line, no value for column '301'"),
    ({"click": 2}, "train.csv, line 4: label column 'click' must hold 0 or 1, got 2"),
    ({"301": 4}, "train.csv, line 4: domain value 4 of column '301' is outside the mapping"),
])
def test_aliccp_bad_rows_name_file_and_line(tmp_path, bad_row, message):
    rows = list(GOOD_ALICCP)
    rows[2] = {**rows[2], **bad_row}
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_aliccp(*_aliccp_files(tmp_path, rows), chunksize=2)  # the bad line is in the second chunk


def test_aliccp_chunk_size_does_not_change_the_encoding(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"click": rng.integers(2), "101": rng.integers(50), "205": rng.integers(9), "301": rng.integers(1, 4),
             "D508": f"{rng.uniform():.3f}"} for _ in range(200)]
    paths = _aliccp_files(tmp_path, rows, val_rows=rows[:30])
    whole, chunked = load_aliccp(*paths), load_aliccp(*paths, chunksize=7)
    assert whole.feature_map.to_dict() == chunked.feature_map.to_dict()
    for name in ("train", "val", "test"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert all(torch.equal(x, y) for x, y in zip((a.sparse, a.dense, a.domain, a.label),
                                                     (b.sparse, b.dense, b.domain, b.label)))


def test_aliccp_unseen_ids_and_train_only_scaling(tmp_path):
    rows = [{**row, "D508": row.get("D508", 0.0)} for row in GOOD_ALICCP]
    data = load_aliccp(*_aliccp_files(tmp_path, rows, val_rows=[{"101": 99, "205": 7, "301": 1, "D508": 3.0}]))
    fields, d508 = data.feature_map.sparse_fields, ALICCP_DENSE.index("D508")
    assert data.val.sparse[0, fields.index("101")] == 0  # 99 never seen in train
    assert data.val.sparse[0, fields.index("205")] == data.train.sparse[0, fields.index("205")]
    assert data.feature_map.dense_ranges["D508"] == (0.0, 1.5)
    assert data.val.dense[0, d508].item() == pytest.approx(2.0)  # (3.0 - 0) / 1.5: train range, no refit
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


def _integer_table(path):
    frame = pd.DataFrame({"user": range(40), "price": np.linspace(1, 9, 40), "region": [0, 1] * 20,
                          "clicked": [0, 0, 1, 1] * 10})
    frame.to_csv(path, index=False)
    return path, {"label": "clicked", "domain": {"column": "region", "mapping": {0: 0, 1: 1}}, "sparse": ["user"],
                  "dense": ["price"]}


@pytest.mark.parametrize("line", [6, 38])  # a row that lands in the train split, and one that lands in val/test
def test_empty_cell_in_an_integer_column_names_its_line(tmp_path, line):
    path, schema = _integer_table(tmp_path / "data.csv")
    for column in ("region", "user"):
        lines = path.read_text().splitlines()
        cells = lines[line - 1].split(",")
        cells[["user", "price", "region", "clicked"].index(column)] = ""
        (tmp_path / "gap.csv").write_text("\n".join(lines[:line - 1] + [",".join(cells)] + lines[line:]) + "\n")
        with pytest.raises(DataError, match=rf"gap.csv \((train|val|test) split\), line {line}: malformed line, "
                                            rf"no value for column '{column}'"):
            load_table(tmp_path / "gap.csv", schema, seed=1)
        if column == "user":
            break


@pytest.mark.parametrize("content, message", [
    (b"", "empty.csv: the file is empty"),
    (b"user,price,region,clicked\n", "empty.csv: the file has a header but no rows"),
    (b"user,price,region,clicked\n1,2.0,0,1\n2,caf\xe9,1,0\n", r"empty.csv, line 3: not UTF-8 text"),
])
def test_unreadable_files_are_named(tmp_path, content, message):
    _, schema = _integer_table(tmp_path / "data.csv")
    (tmp_path / "empty.csv").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_table(tmp_path / "empty.csv", schema)
    directory = write_ml1m(tmp_path / "ml-1m")
    (directory / "ratings.dat").write_bytes(b"")
    with pytest.raises(DataError, match="ratings.dat: the file is empty"):
        load_movielens(directory)
    path, schema = _integer_table(tmp_path / "data.csv")
    with pytest.raises(DataError, match=r"data.csv: the test split is empty \(40 rows in all\)"):
        load_table(path, schema, split=(0.5, 0.5, 0.0))


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
