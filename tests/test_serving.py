"""Whole-model serving: raw rows -> probabilities through predict --checkpoint, the .pt2 program, the
AOTInductor package (Python) and the C++ runner of examples/serve_cpp, all alike.

The model is a small HAMUR-MLP trained one epoch on MovieLens-layout rows (text and integer vocabularies,
the movielens prepare step, the age -> domain mapping); the 1,000 scored rows have unseen users, zip codes,
genders, genres and movies, every age group (so every domain), and a quoted title holding a comma. The
AOTInductor package and the C++ build are made once per session (both are minutes of CPU).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hamur_fast.cli import main
from hamur_fast.data.movielens import add_derived_columns
from hamur_fast.inference import export_serving, fold_for_inference, load_serving
from hamur_fast.inference.domain_sorted import DomainSortedHAMUR, domain_sorted
from hamur_fast.inference.serving import serving_model
from hamur_fast.train import load_trained, train_run

from data_files import write_aliccp, write_merged_csv
from helpers import rel_err
from test_inference import DOMAINS, hamur, inputs

REPO = Path(__file__).resolve().parents[1]
ROWS = 1000
TOLERANCE = 1e-6  # relative, every runner against predict --checkpoint


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(checkpoint path, raw rows CSV path) of a small MovieLens-layout model."""
    root = tmp_path_factory.mktemp("serving")
    write_merged_csv(root / "train.csv", users=40, movies=25, ratings=600, seed=0)
    model = {"name": "hamur_mlp", "embed_dim": 4, "dims": [16, 8], "hyper_dims": [8], "rank": 4, "bottleneck": 4}
    train_run({"data": {"kind": "movielens", "path": str(root / "train.csv")}, "model": model,
               "train": {"batch_size": 128, "epochs": 1, "seed": 3, "device": "cpu", "threads": 1}},
              run_dir=root / "run", progress=False, warn_replace=False)
    rows = write_merged_csv(root / "rows.csv", users=60, movies=30, ratings=ROWS, seed=7)
    # Values the training split never showed (id 0), and a title the CSV must quote.
    rows.loc[:4, "gender"] = "X"
    rows.loc[5:9, "genres"] = "Western|Drama"
    rows.loc[10:14, "movie_id"] = 99_999
    rows.loc[15, "title"] = 'Wizard of Oz, "The" (1939)'
    rows.to_csv(root / "rows.csv", index=False)
    return root / "run" / "checkpoint.pt", root / "rows.csv"


@pytest.fixture(scope="session")
def artifacts(trained):
    """{'pt2': path, 'aoti': path}: whole-model exports through the CLI, each made once."""
    checkpoint, _ = trained
    paths = {}
    for kind in ("pt2", "aoti"):
        paths[kind] = checkpoint.parent / f"model_{kind}.pt2"
        assert main(["export", "--checkpoint", str(checkpoint), "--format", kind, "--output", str(paths[kind])]) == 0
    return paths


@pytest.fixture(scope="session")
def cpp_runner(tmp_path_factory):
    """The examples/serve_cpp binary built against the installed torch, or a skip naming what is missing."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building examples/serve_cpp needs {missing} on PATH")
    prefix = torch.utils.cmake_prefix_path
    if not (Path(prefix) / "Torch" / "TorchConfig.cmake").is_file():
        pytest.skip(f"this torch has no CMake config under {prefix} (C++ headers and libraries not installed)")
    build = tmp_path_factory.mktemp("serve_cpp_build")
    for command in (["cmake", "-S", str(REPO / "examples" / "serve_cpp"), "-B", str(build),
                     f"-DCMAKE_PREFIX_PATH={prefix}"], ["cmake", "--build", str(build)]):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build / "hamur_serve"


def run_cpp(runner, *args) -> np.ndarray:
    done = subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return np.array([float(line) for line in done.stdout.split()])


def scored(args, output) -> pd.DataFrame:
    assert main(["predict", *args, "--output", str(output), "--quiet"]) == 0
    return pd.read_csv(output)


def assert_close(actual, expected, what):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    error = np.max(np.abs(actual - expected) / np.abs(expected))
    assert error <= TOLERANCE, f"{what}: relative error {error:.3g}"


def test_every_runner_scores_the_raw_rows_alike(trained, artifacts, cpp_runner, tmp_path):
    checkpoint, rows = trained
    trainer = load_trained(checkpoint, "cpu")[0]  # its artifacts hold the domain-sorted form: this test covers it
    assert isinstance(serving_model(trainer.model, trainer.feature_map).core, DomainSortedHAMUR)
    reference = scored(["--checkpoint", str(checkpoint), "--input", str(rows)], tmp_path / "checkpoint.csv")
    assert len(reference) == ROWS and set(reference["domain_id"]) == {0, 1, 2}
    expected = reference["probability"].to_numpy()
    for kind, path in artifacts.items():
        through = scored(["--model", str(path), "--input", str(rows)], tmp_path / f"{kind}.csv")
        # Everything but the probabilities is the input itself, as predict --checkpoint writes it.
        pd.testing.assert_frame_equal(through.drop(columns="probability"), reference.drop(columns="probability"))
        assert_close(through["probability"], expected, f"predict --model {kind}")
    assert_close(run_cpp(cpp_runner, artifacts["aoti"], rows), expected, "C++ runner, one batch")
    assert_close(run_cpp(cpp_runner, artifacts["aoti"], rows, "--batch", 1), expected, "C++ runner, batch of 1")
    aoti = load_serving(artifacts["aoti"])
    ids, dense, domain, _ = aoti.encode(pd.read_csv(rows, dtype={"zip": str}))
    one_by_one = [aoti(ids[i:i + 1], dense[i:i + 1], domain[i:i + 1]) for i in range(ROWS)]
    assert_close(torch.cat(one_by_one), expected, "AOTInductor in Python, batch of 1")
    program = load_serving(artifacts["pt2"])
    assert_close(program(ids[:1], dense[:1], domain[:1]), expected[:1], "ExportedProgram, batch of 1")


def test_the_artifact_carries_the_checkpoints_feature_map(trained, artifacts):
    checkpoint, _ = trained
    feature_map = load_trained(checkpoint, "cpu")[0].feature_map.to_dict()
    for path in artifacts.values():
        assert load_serving(path).feature_map.to_dict() == feature_map


def test_ids_outside_a_vocabulary_score_as_unseen(trained, artifacts):
    served = load_serving(artifacts["pt2"])
    fields = len(served.feature_map.schema.sparse)
    dense = torch.tensor([[25.0]] * 3)
    domain = torch.tensor([0, 1, 2])
    unseen = served(torch.zeros(3, fields, dtype=torch.int64), dense, domain)
    for bad in (-1, 10**9):
        assert torch.equal(served(torch.full((3, fields), bad), dense, domain), unseen)


def test_cpp_runner_refuses_a_domain_outside_the_mapping(trained, artifacts, cpp_runner, tmp_path):
    frame = pd.read_csv(trained[1], dtype={"zip": str}).head(3)
    frame.loc[1, "age"] = 99
    frame.to_csv(tmp_path / "bad.csv", index=False)
    done = subprocess.run([str(cpp_runner), str(artifacts["aoti"]), str(tmp_path / "bad.csv")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "line 3: domain value '99'" in done.stderr
    assert main(["predict", "--model", str(artifacts["pt2"]), "--input", str(tmp_path / "bad.csv"),
                 "--output", str(tmp_path / "out.csv")]) == 2  # and Python names it too


def test_released_mode_exports_as_pt2_and_is_refused_for_aoti(trained, tmp_path):
    from hamur_fast.features import build_ctr_model

    trainer, _ = load_trained(trained[0], "cpu")
    model = build_ctr_model(trainer.feature_map, {"name": "hamur_mlp", "embed_dim": 4, "dims": [16, 8],
                                                  "hyper_dims": [8], "rank": 4, "mode": "released"}).eval()
    with pytest.raises(ValueError, match="whole batch"):
        export_serving(model, trainer.feature_map, tmp_path / "released.pt2", "aoti")
    assert not (tmp_path / "released.pt2").exists()
    served = load_serving(export_serving(model, trainer.feature_map, tmp_path / "released.pt2", "pt2"))
    frame = pd.read_csv(trained[1], dtype={"zip": str}).head(90)
    ids, dense, domain, _ = served.encode(frame)
    scaled = trainer.feature_map.transform(add_derived_columns(frame), with_label=False)  # as training feeds it
    with torch.no_grad():
        unfolded = model(next(scaled.batches(90, device="cpu")))
        folded = serving_model(model, trainer.feature_map)(ids, dense, domain)
    assert_close(served(ids, dense, domain), folded, "released-mode pt2 against its eager graph")
    # Whole-batch standardisation amplifies the fp32 rounding of folding (paper mode stays near 1e-7).
    assert np.max(np.abs((folded - unfolded) / unfolded).numpy()) <= 1e-4


def test_serving_errors_are_clear(trained, tmp_path, capsys):
    checkpoint, rows = trained
    assert main(["export", "--checkpoint", str(checkpoint), "--inputs", "embedded",
                 "--output", str(tmp_path / "embedded.pt2")]) == 0
    with pytest.raises(ValueError, match="embedded-input export"):
        load_serving(tmp_path / "embedded.pt2")
    with pytest.raises(ValueError, match="no serving artifact"):
        load_serving(tmp_path / "absent.pt2")
    (tmp_path / "text.pt2").write_text("not an archive")
    with pytest.raises(ValueError, match="not a zip file"):
        load_serving(tmp_path / "text.pt2")
    with pytest.raises(ValueError, match="runners must be >= 1"):
        load_serving(tmp_path / "embedded.pt2", runners=0)
    capsys.readouterr()
    for args in ([], ["--checkpoint", str(checkpoint), "--model", str(tmp_path / "embedded.pt2")]):
        assert main(["predict", *args, "--input", str(rows), "--output", str(tmp_path / "x.csv")]) == 2
        assert "exactly one of --checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--inputs", "raw",
                 "--output", str(tmp_path / "m.onnx")]) == 2
    assert "ONNX export takes the embedded inputs" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["pt2", "aoti"])
def test_one_loaded_artifact_serves_concurrent_callers(trained, artifacts, kind):
    """Several threads calling one loaded artifact get each their own rows' probabilities."""
    from concurrent.futures import ThreadPoolExecutor

    served = load_serving(artifacts[kind], runners=2)  # a package runs two calls at once, the others wait
    ids, dense, domain, _ = served.encode(pd.read_csv(trained[1], dtype={"zip": str}))
    expected = served(ids, dense, domain)
    chunks = [slice(s, s + 37) for s in range(0, ROWS, 37)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: served(ids[c], dense[c], domain[c]), chunks * 3))
    assert_close(torch.cat(results[:len(chunks)]), expected.numpy(), "threads")
    assert all(torch.equal(a, b) for a, b in zip(results, results[:len(chunks)] * 3))


def test_a_domain_column_that_is_also_a_sparse_field(tmp_path):
    """Ali-CCP layout: the domain field 301 is itself embedded (no domain-indicator field is appended)."""
    train, val, test = write_aliccp(tmp_path / "aliccp", rows=(300, 100, 100))
    model = {"name": "hamur_mlp", "embed_dim": 4, "dims": [16, 8], "hyper_dims": [8], "rank": 4, "bottleneck": 4}
    train_run({"data": {"kind": "aliccp", "train": str(train), "val": str(val), "test": str(test)}, "model": model,
               "train": {"batch_size": 128, "epochs": 1, "seed": 3, "device": "cpu", "threads": 1}},
              run_dir=tmp_path / "run", progress=False, warn_replace=False)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert load_trained(checkpoint, "cpu")[0].feature_map.schema.domain_is_sparse
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.pt2")]) == 0
    expected = scored(["--checkpoint", str(checkpoint), "--input", str(test)], tmp_path / "checkpoint.csv")
    through = scored(["--model", str(tmp_path / "m.pt2"), "--input", str(test)], tmp_path / "model.csv")
    assert_close(through["probability"], expected["probability"], "Ali-CCP layout, .pt2")


# ----------------------------------------------------------------------------- the domain-sorted CPU form
def domain_mixes(e, domain):
    """(e, domain) pairs whose segments differ: all domains, one row, one domain only, a domain missing."""
    yield e, domain
    yield e[:1], domain[:1]
    yield e[:9], torch.full((9,), DOMAINS - 1)
    yield e, torch.where(domain == 1, 0, domain)


@pytest.mark.parametrize("config", [{}, {"hyper": "static"}, {"use_adapter": False}, {"tower_norm": "none"},
                                    {"adapter_after": [0, 1]}], ids=str)
def test_the_domain_sorted_form_scores_each_row_as_the_folded_model(config):
    """float64: the sorted form re-orders exact arithmetic only (rank 5: the generator's 25 columns are padded)."""
    folded = fold_for_inference(hamur(backend="torch", **config).double())
    sorted_form = domain_sorted(folded)
    assert isinstance(sorted_form, DomainSortedHAMUR)
    e, domain = inputs(40, seed=2)
    with torch.no_grad():
        for e_mix, domain_mix in domain_mixes(e.double(), domain):
            assert rel_err(sorted_form(e_mix, domain_mix), folded(e_mix, domain_mix)) <= 1e-12


def test_the_exported_domain_sorted_form_holds_for_any_mix_of_domains():
    """The segment sizes are data-dependent in the graph: one export serves every mix; an unknown id scores NaN."""
    folded = fold_for_inference(hamur(backend="torch"))
    sorted_form = domain_sorted(folded)
    e, domain = inputs(40, seed=3)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(sorted_form, (e[:8], domain[:8]), dynamic_shapes=({0: batch}, {0: batch})).module()
    with torch.no_grad():
        for e_mix, domain_mix in domain_mixes(e, domain):
            assert rel_err(program(e_mix, domain_mix), folded(e_mix, domain_mix)) <= 1e-6
        unknown = domain.clone()
        unknown[[0, 5]] = torch.tensor([-1, DOMAINS])
        scored = program(e, unknown)
    assert scored[[0, 5]].isnan().all() and rel_err(scored[1:5], folded(e[1:5], domain[1:5])) <= 1e-6


@pytest.mark.parametrize("config", [{"mode": "released"}, {"tower_norm": "layer"}, {"norm": "layer"},
                                    {"backbone": "dcn"}], ids=str)
def test_models_outside_the_domain_sorted_form_export_as_they_are(config):
    assert domain_sorted(fold_for_inference(hamur(backend="torch", **config))) is None
