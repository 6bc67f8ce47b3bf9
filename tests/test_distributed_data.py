"""Data-parallel data loading: each rank reads and encodes only its shard of the training rows, and the data's
fingerprint does not depend on the number of processes.

The loaders' shard path runs in this process; ``load_sharded`` (feature map fitted on rank 0 and broadcast, or
given as on a resume) runs on 2 gloo processes, this file being their script:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/test_distributed_data.py OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import data_files

from hamur_fast.data import DataError, FeatureMap, RowShard, load_dataset
from hamur_fast.data.fingerprint import data_fingerprint, digest
from hamur_fast.data.tensors import TensorSplit

WORLD = 2


def data_configs(directory: Path) -> dict:
    """A config of every loader, with an odd number of training rows (so that trimming the shards matters)."""
    directory.mkdir(parents=True, exist_ok=True)
    aliccp = data_files.write_aliccp(directory / "aliccp", rows=(61, 20, 20))
    data_files.write_ml1m(directory / "ml-1m", ratings=301)
    table = pd.DataFrame({"user": np.arange(75) % 13, "item": (np.arange(75) * 7) % 11,
                          "region": np.where(np.arange(75) % 4 == 0, "north", "south"),
                          "price": np.linspace(1.0, 9.0, 75), "clicked": np.arange(75) % 3 == 0})
    files = {}
    for suffix in ("csv", "parquet"):
        for name, part in (("train", table[:51]), ("val", table[51:63]), ("test", table[63:])):
            path = directory / f"{name}.{suffix}"
            part.to_csv(path, index=False) if suffix == "csv" else part.to_parquet(path, row_group_size=8)
            files[(name, suffix)] = str(path)
    schema = {"label": "clicked", "domain": {"column": "region", "mapping": "order"}, "sparse": ["user", "item"],
              "dense": ["price"]}
    table_files = {suffix: {"kind": "table", "schema": schema, "path": files[("train", suffix)],
                            "val": files[("val", suffix)], "test": files[("test", suffix)]}
                   for suffix in ("csv", "parquet")}
    return {"synthetic": {"kind": "synthetic", "rows": 251},
            "movielens": {"kind": "movielens", "path": str(directory / "ml-1m")},
            "aliccp": {"kind": "aliccp", "train": str(aliccp[0]), "val": str(aliccp[1]), "test": str(aliccp[2]),
                       "chunksize": 7},
            "table_csv": table_files["csv"], "table_parquet": table_files["parquet"],
            "table_split": {"kind": "table", "schema": schema, "path": files[("train", "csv")]}}


def assert_same_split(actual: TensorSplit, expected: TensorSplit, what: str):
    for name in ("sparse", "dense", "domain", "label"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), f"{what}: {name}"


class EncodedRows:
    """Counts the rows handed to the feature map's encoder (``transform``) and fails on any fitting."""

    def __init__(self, monkeypatch):
        self.rows = 0
        transform = FeatureMap.transform

        def counting(fmap, frame, *args, **kwargs):
            self.rows += len(frame)
            return transform(fmap, frame, *args, **kwargs)

        def no_fitting(*args, **kwargs):
            raise AssertionError("a shard must not fit a feature map")

        monkeypatch.setattr(FeatureMap, "transform", counting)
        monkeypatch.setattr(FeatureMap, "fit_transform", no_fitting)


KINDS = ["synthetic", "movielens", "aliccp", "table_csv", "table_parquet", "table_split"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict:
    return data_configs(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_rank_encodes_only_its_training_rows(configs, kind, monkeypatch):
    """With a shard, the loader hands the encoder rows 1, 3, 5, ... of the training split and nothing else of
    it; the result is those rows of the one-process encoding, and the whole validation and test splits."""
    whole = load_dataset(configs[kind])
    encoder = EncodedRows(monkeypatch)
    mine = load_dataset(configs[kind], feature_map=whole.feature_map, shard=RowShard(1, WORLD))
    expected = whole.train.take(slice(1, None, WORLD))
    assert len(whole.train) % 2 == 1 and len(mine.train) == len(whole.train) // 2
    assert encoder.rows == len(mine.train) + len(whole.val) + len(whole.test)
    assert_same_split(mine.train, expected, f"{kind} train")
    assert_same_split(mine.val, whole.val, f"{kind} val")
    assert_same_split(mine.test, whole.test, f"{kind} test")


def test_a_shard_keeps_its_positions_across_chunks_of_any_size():
    whole = pd.DataFrame({"x": np.arange(23)}, index=pd.RangeIndex(2, 25))  # indexed by line number
    sizes = [3, 1, 0, 5, 2, 7, 5]
    chunks = [whole.iloc[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    for rank in range(3):
        kept = pd.concat(list(RowShard(rank, 3).frames(chunks)))
        pd.testing.assert_frame_equal(kept, whole.iloc[rank::3])  # line numbers kept too
    with pytest.raises(ValueError, match="rank"):
        RowShard(2, 2)


def test_parquet_is_read_in_record_batches_numbered_like_the_whole_file(configs):
    from hamur_fast.data.readers import iter_table, read_table

    path = configs["table_parquet"]["path"]
    chunks = list(iter_table(path, chunksize=5))
    whole = pd.read_parquet(path)
    assert [len(c) for c in chunks] == [5] * (len(whole) // 5) + [len(whole) % 5] * (len(whole) % 5 > 0)
    whole.index = pd.RangeIndex(1, len(whole) + 1)
    pd.testing.assert_frame_equal(pd.concat(chunks), whole)
    pd.testing.assert_frame_equal(read_table(path), whole)


def test_a_shard_needs_the_feature_map_fitted_on_every_row(configs):
    with pytest.raises(ValueError, match="feature_map"):
        load_dataset(configs["synthetic"], shard=RowShard(0, WORLD))


def test_a_bad_value_in_a_sharded_row_names_its_file_and_line(tmp_path):
    paths = data_files.write_aliccp(tmp_path, rows=(30, 10, 10))
    config = {"kind": "aliccp", "train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "chunksize": 4}
    fmap = load_dataset(config).feature_map
    lines = paths[0].read_text().splitlines()
    fields = lines[12].split(",")  # line 13 of the file: training row 11, in rank 1's shard
    fields[3] = "x7"
    lines[12] = ",".join(fields)
    paths[0].write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{paths[0]}, line 13: column '{data_files.ALICCP_RELEASED[3]}'"):
        load_dataset(config, feature_map=fmap, shard=RowShard(1, WORLD))


def test_the_fingerprint_adds_up_over_shards_and_sees_any_change():
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randint(0, 50, (41, 3), generator=g, dtype=torch.int32), torch.rand(41, 2, generator=g),
                        torch.randint(0, 3, (41,), generator=g).short(), torch.randint(0, 2, (41,), generator=g).float())
    whole = digest(split)
    for world in (2, 3, 5):
        parts = [digest(split.take(slice(rank, None, world)), rank, world) for rank in range(world)]
        assert sum(parts[1:], parts[0]) == whole
    swapped = split.take(torch.tensor([1, 0, *range(2, 41)]))
    changed = split.take(slice(None))
    changed.dense[7, 1] += 1e-6
    for other in (swapped, changed, split.take(slice(0, 40))):
        assert digest(other) != whole
    with pytest.raises(ValueError, match="different columns"):
        _ = whole + digest(TensorSplit(split.sparse, split.dense, split.domain))


# ---------------------------------------------------------------------------- 2 processes
def test_load_sharded_on_two_ranks_gives_each_its_shard_and_the_one_process_fingerprint(configs, tmp_path):
    """``load_sharded`` on 2 gloo processes, fitting the feature map (rank 0) and with a given one (a resume):
    each rank's training rows are :func:`shard` of the one-process split, validation and test are whole, the
    fingerprint is the one-process fingerprint; rank 1 encodes only its rows."""
    from test_distributed import torchrun

    from hamur_fast.distributed.trainer import shard

    torchrun([__file__, str(tmp_path)])
    for kind in SHARDED_KINDS:
        whole = load_dataset(configs[kind])
        for rank in range(WORLD):
            for how, (data, fingerprint, encoded) in torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)[kind].items():
                what = f"{kind} rank {rank} ({how} feature map)"
                assert fingerprint == data_fingerprint(whole), what
                assert data.feature_map.to_dict() == whole.feature_map.to_dict(), what
                assert_same_split(data.train, shard(whole.train, rank, WORLD), what)
                assert_same_split(data.val, whole.val, what)
                assert_same_split(data.test, whole.test, what)
                if encoded is not None:  # all but rank 0 fitting: the rows handed to the encoder
                    assert encoded == len(range(rank, len(whole.train), WORLD)) + len(whole.val) + len(whole.test), what


SHARDED_KINDS = ("synthetic", "aliccp", "table_parquet")


def main(out: str) -> None:
    from hamur_fast.distributed import runtime
    from hamur_fast.distributed.trainer import load_sharded

    torch.set_num_threads(1)
    context = runtime.start("cpu")
    try:
        configs = data_configs(Path(out) / f"files{context.rank}")
        results = {}
        for kind in SHARDED_KINDS:
            results[kind], feature_map = {}, None
            for how in ("fitted", "given"):
                with pytest.MonkeyPatch.context() as monkeypatch:
                    encoder = None if how == "fitted" and context.is_main else EncodedRows(monkeypatch)
                    data, fingerprint = load_sharded(configs[kind], context, feature_map)
                feature_map = FeatureMap.from_dict(data.feature_map.to_dict())  # as a checkpoint holds it
                results[kind][how] = (data, fingerprint, encoder and encoder.rows)
        torch.save(results, Path(out) / f"rank{context.rank}.pt")
    finally:
        runtime.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
