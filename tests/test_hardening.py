"""User input out of range or malformed: one clear error naming the option, before any long work.

Every numeric option (train, model, data, command line) out of its range; a checkpoint recording an absurd
thread count; inputs that used to end in a traceback; YAML alias bombs; sweeps that cannot run; compare labels
that name no folder; more domains than int16 holds.
"""
from __future__ import annotations

import time

import pytest
import torch
import yaml

import hamur_fast as hf
from hamur_fast import _yaml
from hamur_fast.cli import main
from hamur_fast.data import DataError, load_dataset
from hamur_fast.train import CheckpointError, TrainConfig, load_trained
from hamur_fast.train import experiment as ex

from test_inference import train_checkpoint

# option -> (a value out of its range, what the error must say)
TRAIN_OUT_OF_RANGE = {
    "epochs": (0, "train.epochs must be >= 1"),
    "batch_size": (1, "train.batch_size must be >= 2"),
    "eval_batch_size": (0, "train.eval_batch_size must be >= 1"),
    "patience": (-1, "train.patience must be >= 1"),
    "lr": (-1e-3, "train.lr must be >= 0"),
    "weight_decay": (-0.1, "train.weight_decay must be >= 0"),
    "grad_clip": (-1.0, "train.grad_clip .* must be > 0"),
    "seed": (-5, "train.seed must be between 0 and 2\\*\\*63 - 1"),
    "threads": (0, "train.threads must be >= 1 and <= 1024"),
}


@pytest.mark.parametrize("option", list(TRAIN_OUT_OF_RANGE))
def test_every_numeric_train_option_out_of_range_is_refused(option):
    value, message = TRAIN_OUT_OF_RANGE[option]
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({option: value, "device": "cpu"})


@pytest.mark.parametrize("value", [100_000, 2**40])
def test_absurd_thread_counts_are_refused(value):
    with pytest.raises(ValueError, match="train.threads must be >= 1 and <= 1024"):
        TrainConfig(threads=value, device="cpu")
    assert TrainConfig(threads=1024, device="cpu").threads == 1024


# model keyword -> (a value out of its range, the models that take it)
MODEL_OUT_OF_RANGE = {
    "dropout": [2.0, -0.1, 1.0],
    "dims": [[0], [-4], [16, 0], "abc"],
    "rank": [0, -3, 2.5],
    "bottleneck": [0],
    "hyper_dims": [[0]],
    "domain_embed_dim": [0],
    "num_experts": [0],
    "expert_dims": [[-1]],
    "tower_dims": [[0]],
    "shared_experts": [-1],
    "target_sparsity": [1.5],
    "sparsity_weight": [-1.0, float("nan")],
    "eps": [0.0, -1e-5],
}


def models_taking(keyword: str) -> list:
    import inspect

    from hamur_fast.models import registry

    names = []
    for name in registry.available():
        constructor = registry._MODELS[name]
        parameters = inspect.signature(constructor).parameters
        hamur_size = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        if keyword in parameters or (hamur_size and keyword in hf.models.presets.SIZE_KEYS):
            names.append(name)
    return names


@pytest.mark.parametrize("keyword", list(MODEL_OUT_OF_RANGE))
def test_every_numeric_model_option_out_of_range_is_refused(keyword):
    names = models_taking(keyword)
    assert names, keyword
    for name in names:
        for value in MODEL_OUT_OF_RANGE[keyword]:
            with pytest.raises(ValueError, match=f"model.{keyword} must"):
                hf.models.build(name, 12, 3, **{keyword: value})


DATA_OUT_OF_RANGE = {
    "seed": ("abc", "data.seed must be a whole number >= 0"),
    "rows": (0, "data.rows must be a whole number >= 1"),
    "split_seed": (-1, "data.split_seed must be a whole number >= 0"),
    "domains": (0, "data.domains must be a whole number >= 1"),
    "specificity": (1.5, "data.specificity must be a number in \\[0, 1\\]"),
    "zipf": (-1.0, "data.zipf must be a number in \\[0, inf\\)"),
    "split": ([0.5, 0.5], "data.split must be three fractions"),
}


@pytest.mark.parametrize("option", list(DATA_OUT_OF_RANGE))
def test_every_numeric_data_option_out_of_range_is_refused(option):
    value, message = DATA_OUT_OF_RANGE[option]
    with pytest.raises(DataError, match=message):
        load_dataset({"kind": "synthetic", "rows": 500, option: value})


COMMAND_LINES = {
    "nproc 0": (["train", "--nproc", "0"], "argument --nproc: expected a whole number >= 1"),
    "nproc -2": (["train", "--nproc", "-2"], "argument --nproc: expected a whole number >= 1"),
    "threads 0": (["train", "--threads", "0"], "argument --threads: expected a whole number >= 1"),
    "threads 100000": (["train", "--threads", "100000"], "train.threads must be >= 1 and <= 1024"),
    "epochs -1": (["train", "--epochs", "-1"], "train.epochs must be >= 1"),
    "grad_clip": (["train", "--set", "train.grad_clip=-1"], "train.grad_clip"),
    "dropout": (["train", "--set", "model.dropout=2.0"], "model.dropout must satisfy 0 <= dropout < 1"),
    "dims [0]": (["train", "--set", "model.dims=[0]"], "model.dims must be a list of layer widths >= 1"),
    "data.seed=abc": (["train", "--set", "data.seed=abc"], "data.seed must be a whole number"),
    "device mps": (["train", "--device", "mps"], "device 'mps'"),
    "demo seeds list": (["demo", "--seeds", "[1,2]"], "seeds are whole numbers >= 0 separated by commas"),
    "sweep repeated value": (["sweep", "--param", "k=5,5"], "--param k: each value once"),
    "sweep unknown section": (["sweep", "--param", "foo.bar=1,2"], "a sweep varies one model.<key> or train.<key>"),
    "sweep unknown key": (["sweep", "--param", "model.foo=1,2"], "takes no argument(s) ['foo']"),
    "doctor repeats": (["doctor", "--repeats", "-1"], "--repeats must be >= 0"),
}


@pytest.mark.parametrize("case", list(COMMAND_LINES))
def test_command_line_errors_are_one_line_with_status_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = COMMAND_LINES[case]
    tiny = ["--set", "data.kind=synthetic", "--set", "data.rows=300", "--set", "train.epochs=1", "--quiet"]
    tiny = tiny if argv[0] in ("train", "sweep") else []
    started = time.perf_counter()
    assert status_of(argv + tiny) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any("Traceback" in line for line in err), err
    assert time.perf_counter() - started < 30  # refused before any training


def status_of(argv) -> int:
    """main's exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_a_checkpoint_recording_an_absurd_thread_count_is_refused(tmp_path, capsys):
    checkpoint, _data = train_checkpoint(tmp_path)
    payload = torch.load(checkpoint, weights_only=True)
    payload["config"]["train"]["threads"] = 100_000
    torch.save(payload, tmp_path / "absurd.pt")
    with pytest.raises(CheckpointError, match="train.threads must be >= 1 and <= 1024"):
        load_trained(tmp_path / "absurd.pt", "cpu")
    assert main(["eval", "--checkpoint", str(tmp_path / "absurd.pt")]) == 2
    assert "train.threads must be >= 1 and <= 1024" in capsys.readouterr().err


BOMB = "\n".join([f"l0: &l0 [{', '.join(['lol'] * 9)}]"] +
                 [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)])


def test_a_yaml_alias_bomb_is_refused_fast_and_echoed_briefly(tmp_path, capsys):
    started = time.perf_counter()
    with pytest.raises(yaml.YAMLError, match="expand this document beyond 100,000 values"):
        _yaml.load(BOMB)
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):
        _yaml.load("lr: !!python/object/apply:os.system ['echo owned']")
    with pytest.raises(yaml.YAMLError, match="recursive alias"):
        _yaml.load("a: &a [*a]")
    with pytest.raises(yaml.YAMLError, match="nests too deeply"):
        _yaml.load("[" * 20_000 + "]" * 20_000)
    assert _yaml.load("base: &base {lr: 0.1}\nother: *base") == {"base": {"lr": 0.1}, "other": {"lr": 0.1}}
    (tmp_path / "bomb.yaml").write_text(BOMB.replace("l8:", "train:\n  lr:"))
    assert main(["train", "--config", str(tmp_path / "bomb.yaml")]) == 2
    # a small alias fan-out is accepted by YAML, refused by the option, and echoed in a bounded message
    fan = "[" + ", ".join(["&a [1, 2, 3, 4, 5, 6, 7, 8, 9]"] + ["*a"] * 20) + "]"
    assert main(["train", "--set", f"train.lr={fan}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "expand this document beyond" in err and "train.lr must be a number" in err and len(err) < 1000
    assert time.perf_counter() - started < 10


def test_a_compare_label_must_name_a_folder():
    for label in ("..", ".", "", ["a", "b"]):
        with pytest.raises(ValueError, match="a compare label is a name"):
            ex.model_section({"label": label, "name": "mlp"}, {})


def test_a_model_section_without_a_name_keeps_the_default_model():
    assert ex.model_section_of({"model": {"embed_dim": 4}}) == {"name": "hamur_mlp", "embed_dim": 4}
    assert ex.model_section_of({}) == ex.DEFAULT_MODEL


def test_more_domains_than_int16_holds_keep_their_ids():
    data = load_dataset({"kind": "synthetic", "rows": 90_000, "domains": 40_000, "users": 40_000, "zipf": 0.0})
    ids = torch.cat([data.train.domain, data.val.domain, data.test.domain]).long()
    assert int(ids.min()) >= 0 and int(ids.max()) > 32_767


@pytest.mark.parametrize("spec, message", [
    ({"label": "click", "domain": "click", "sparse": ["user_id"]}, "a column has two roles .*\\['click'\\]"),
    ({"label": "click", "domain": "domain", "sparse": ["user_id", "click"]}, "two roles .*\\['click'\\]"),
    ({"label": "click", "domain": "domain", "sparse": ["user_id", "user_id"]}, "two roles .*\\['user_id'\\]"),
    ({"label": "click", "domain": {"column": "domain", "mapping": [0, 1]}, "sparse": ["user_id"]},
     "the domain mapping must be a mapping of raw value to id"),
    ({"label": "click", "domain": "domain", "sparse": "user_id"}, "schema sparse must be a list of column names"),
])
def test_a_schema_refuses_a_column_in_two_roles_and_malformed_entries(spec, message):
    with pytest.raises(DataError, match=message):
        hf.data.Schema.from_dict(spec)


def test_the_label_as_domain_column_is_refused_from_the_command_line(tmp_path, capsys):
    hf.data.generate(rows=400, seed=1).to_csv(tmp_path / "clicks.csv", index=False)
    assert main(["train", "--set", "data.kind=table", "--set", f"data.path={tmp_path / 'clicks.csv'}",
                 "--set", "data.schema={label: click, domain: click, sparse: [user_id]}", "--quiet",
                 "--output", str(tmp_path / "run")]) == 2
    assert "a column has two roles" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("a,b,a\n1,2,3\n", "line 1: column name\\(s\\) \\['a'\\] appear more than once"),
    ("a,b\n1,2\n3,x\0y\n", "line 3: a NUL byte"),
])
def test_duplicate_csv_columns_and_nul_bytes_are_refused(tmp_path, text, message):
    (tmp_path / "table.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        hf.data.readers.read_table(tmp_path / "table.csv")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "1099511627776 bytes"),
                                   MemoryError()])
def test_out_of_memory_is_one_line_naming_the_remedy(error, monkeypatch, capsys):
    def runs_out(*args, **kwargs):
        raise error

    monkeypatch.setattr(ex, "train_run", runs_out)
    assert main(["train", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and "train.batch_size" in err[0], err
