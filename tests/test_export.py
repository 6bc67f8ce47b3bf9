"""export_model: torch.export round trip (.pt2), ONNX where the ops allow, clear errors otherwise."""
import importlib.util
import re

import pytest
import torch
from torch import nn

import hamur_fast as hf
from hamur_fast.inference import export_checkpoint, export_model, load_exported
from hamur_fast.inference.export import custom_ops, export_program

from helpers import rel_err
from test_inference import DOMAINS, INPUT_DIM, hamur, inputs, train_checkpoint

HAS_ONNX = all(importlib.util.find_spec(n) is not None for n in ("onnx", "onnxscript"))


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_pt2_round_trip_predicts_like_the_eval_model(tmp_path, mode):
    model = hamur(mode=mode)
    path = export_model(model, *inputs(5), tmp_path / "model.pt2")
    loaded = load_exported(path)
    # Batch sizes other than the example's: the batch dimension is exported as dynamic.
    for batch in ((1, 9) if mode == "paper" else (2, 9)):
        e, domain = inputs(batch, seed=batch)
        with torch.no_grad():
            assert rel_err(loaded(e, domain), model(e, domain)) <= 1e-5


def test_export_checkpoint_round_trip_through_the_cli(tmp_path, capsys):
    from hamur_fast.cli import main
    from hamur_fast.train import load_trained

    checkpoint, _ = train_checkpoint(tmp_path)
    core = load_trained(checkpoint, "cpu")[0].model.core.eval()
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "cli.pt2"),
                 "--inputs", "embedded"]) == 0
    assert "cli.pt2" in capsys.readouterr().out
    g = torch.Generator().manual_seed(0)
    e, domain = torch.randn(11, core.input_dim, generator=g), torch.randint(0, core.num_domains, (11,), generator=g)
    with torch.no_grad():
        expected = core(e, domain)
    assert rel_err(load_exported(tmp_path / "cli.pt2")(e, domain), expected) <= 1e-5
    assert rel_err(load_exported(export_checkpoint(checkpoint, tmp_path / "direct.pt2"))(e, domain), expected) <= 1e-5
    # A missing output is a clear error (exit code 2), not a traceback.
    assert main(["export", "--checkpoint", str(checkpoint)]) == 2
    assert "needs --output" in capsys.readouterr().err


def test_exported_graph_of_a_hamur_model_has_no_custom_ops_with_the_torch_backend():
    model = hamur(backend="torch")
    assert custom_ops(export_program(model, *inputs(4))) == []


@torch.library.custom_op("hamur_fast_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class ModelWithCustomOp(nn.Module):
    input_dim, num_domains = 24, DOMAINS

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(24, 1)

    def forward(self, e, domain):
        return torch.sigmoid(self.linear(torch.ops.hamur_fast_test.twice(e))).squeeze(1)


def test_custom_ops_are_found_and_kept_in_pt2(tmp_path):
    model = ModelWithCustomOp()
    e, domain = inputs(4)
    assert custom_ops(export_program(model, e, domain)) == ["hamur_fast_test::twice"]
    loaded = load_exported(export_model(model, e, domain, tmp_path / "custom.pt2"))
    assert rel_err(loaded(e, domain), model(e, domain)) <= 1e-6


@pytest.mark.skipif(not HAS_ONNX, reason="ONNX export needs the onnx and onnxscript packages (not installed)")
def test_onnx_export_refuses_custom_ops_naming_them(tmp_path):
    with pytest.raises(ValueError, match="hamur_fast_test::twice"):
        export_model(ModelWithCustomOp(), *inputs(4), tmp_path / "custom.onnx", format="onnx")


@pytest.mark.skipif(not HAS_ONNX, reason="ONNX export needs the onnx and onnxscript packages (not installed)")
def test_onnx_export_matches_the_eval_model(tmp_path):
    import onnx

    model = hamur()
    path = export_model(model, *inputs(5), tmp_path / "model.onnx", format="onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed: the ONNX file was checked but not run")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path))
    e, domain = inputs(7, seed=7)
    (prob,) = session.run(None, {"e": e.numpy(), "domain": domain.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(prob), model(e, domain)) <= 1e-5


def test_onnx_export_names_missing_packages(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    # onnx hidden here; onnxscript may be absent for real (the GPU image has none): then it is named too.
    expected = ["onnx"] + [name for name in ("onnxscript",) if real_find_spec(name) is None]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=re.escape(f"needs the package(s) {expected}")):
        export_model(hamur(), *inputs(4), tmp_path / "model.onnx", format="onnx")


def test_export_rejects_bad_arguments(tmp_path):
    model = hamur()
    with pytest.raises(ValueError, match="format"):
        export_model(model, *inputs(4), tmp_path / "m.bin", format="tflite")
    with pytest.raises(ValueError, match="at least 2 rows"):
        export_model(model, *inputs(1), tmp_path / "m.pt2")
    e, domain = inputs(4)
    with pytest.raises(ValueError, match="shape"):
        export_model(model, e[:, :-1], domain, tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="no exported model"):
        load_exported(tmp_path / "missing.pt2")


def test_hf_inference_is_exported_from_the_package():
    assert hf.inference.Predictor is not None and hf.inference.export_model is export_model


class _RunsCode:
    """A pickle payload that runs code when unpickled: it creates ``marker`` (harmless, and visible)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pt2_is_refused_before_anything_is_unpickled(tmp_path):
    import io
    import zipfile

    path = export_model(hamur(), *inputs(4), tmp_path / "new" / "dir" / "model.pt2")  # directories are created
    assert [p.name for p in path.parent.iterdir()] == ["model.pt2"]  # and no temporary file is left
    payload = io.BytesIO()
    torch.save(_RunsCode(tmp_path / "marker"), payload)
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(crafted, "w") as out:
        for item in source.infolist():
            data = source.read(item.filename)
            out.writestr(item, payload.getvalue() if "sample_inputs/" in item.filename else data)
    with pytest.raises(ValueError, match="crafted.pt2: refused: its sample inputs .* hold more than tensors"):
        load_exported(crafted)
    assert not (tmp_path / "marker").exists()
    # the same archive through torch.export.load does run the payload: the check above is what stops it
    with pytest.raises(Exception):
        torch.export.load(str(crafted))
    assert (tmp_path / "marker").exists()
    # members the loader cannot vouch for are refused too
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp_path / "extra.pt2", "w") as out:
        for item in source.infolist():
            out.writestr(item, source.read(item.filename))
        root = source.namelist()[0].split("/")[0]
        out.writestr(f"{root}/data/constants/opaque_obj_0", payload.getvalue())
    with pytest.raises(ValueError, match=r"refused: the archive holds \['data/constants/opaque_obj_0'\]"):
        load_exported(tmp_path / "extra.pt2")
    (tmp_path / "plain.pt2").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a .pt2 archive"):
        load_exported(tmp_path / "plain.pt2")


def test_cli_takes_the_format_from_the_extension_and_refuses_a_mismatch(tmp_path, monkeypatch, capsys):
    from hamur_fast import cli
    from hamur_fast.cli import main

    written = []
    monkeypatch.setattr(cli, "export_checkpoint", lambda checkpoint, path, fmt: written.append(fmt) or path)
    assert main(["export", "--checkpoint", "c.pt", "--output", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", "--checkpoint", "c.pt", "--output", str(tmp_path / "m.PT2"), "--format", "pt2",
                 "--inputs", "embedded"]) == 0
    assert written == ["onnx", "pt2"]
    assert main(["export", "--checkpoint", "c.pt", "--output", str(tmp_path / "m.onnx"), "--format", "pt2"]) == 2
    assert "--format pt2 does not match --output" in capsys.readouterr().err
    assert main(["export", "--checkpoint", "c.pt", "--output", str(tmp_path / "m.onnx"), "--format", "aoti"]) == 2
    assert "--format aoti does not match --output" in capsys.readouterr().err
    assert main(["export", "--checkpoint", "c.pt", "--output", str(tmp_path / "m.bin")]) == 2
    assert "the extension names the format, .pt2 (torch.export or AOTInductor package) or .onnx" in capsys.readouterr().err
    assert written == ["onnx", "pt2"]  # refused before any work
def _rewritten(source, target, replace):
    """A copy of the archive ``source`` with every member passed through ``replace(name, data) -> [(name, data)]``."""
    import zipfile

    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as out:
        for item in original.infolist():
            for name, data in replace(item.filename, original.read(item.filename)):
                out.writestr(name, data)
    return target


def test_an_archive_with_two_members_of_one_name_is_refused(tmp_path):
    import io
    import warnings

    path = export_model(hamur(), *inputs(4), tmp_path / "model.pt2")
    payload = io.BytesIO()
    torch.save(_RunsCode(tmp_path / "marker"), payload)

    def shadowed(name, data):  # the payload first, the genuine member after it under the same name
        return [(name, payload.getvalue()), (name, data)] if "sample_inputs/" in name else [(name, data)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        crafted = _rewritten(path, tmp_path / "twice.pt2", shadowed)
    with pytest.raises(ValueError, match=r"twice.pt2: refused: the archive holds \[.*sample_inputs/model.pt'\] "
                                         "more than once"):
        load_exported(crafted)
    assert not (tmp_path / "marker").exists()


def _edited_program(name, data, edit):
    import json

    if name.endswith("models/model.json"):
        program = json.loads(data)
        edit(program["graph_module"]["graph"])
        data = json.dumps(program).encode()
    return [(name, data)]


def _swap_cell_factors(graph):
    """The compiled cell's down_left and up_right arguments exchanged: every shape the kernel reads is wrong."""
    node = next(n for n in graph["nodes"] if "compiled_cell_infer" in n["target"])
    args = {a["name"]: a for a in node["inputs"]}
    args["down_left"]["arg"], args["up_right"]["arg"] = args["up_right"]["arg"], args["down_left"]["arg"]


def _drop_cell_domain(graph):
    """The compiled cell's domain ids replaced by its input x."""
    node = next(n for n in graph["nodes"] if "compiled_cell_infer" in n["target"])
    args = {a["name"]: a for a in node["inputs"]}
    args["domain"]["arg"] = args["x"]["arg"]


@pytest.mark.skipif("cpu" not in hf.ops.available_backends(), reason="the compiled extension is not built")
@pytest.mark.parametrize("edit", [_swap_cell_factors, _drop_cell_domain], ids=lambda f: f.__name__)
def test_an_edited_model_json_raises_instead_of_reading_past_buffers(tmp_path, edit):
    import subprocess
    import sys
    from pathlib import Path

    # Level 1 (fusion level 2 exports the generated core instead): the graph holds compiled_cell_infer.
    path = export_model(hamur(backend="cpu", fused_generation=False), *inputs(4), tmp_path / "model.pt2")
    crafted = _rewritten(path, tmp_path / "edited.pt2", lambda name, data: _edited_program(name, data, edit))
    script = (f"import torch, hamur_fast as hf\n"
              f"module = hf.inference.load_exported({str(crafted)!r})\n"
              f"e = torch.randn(4096, {INPUT_DIM}); domain = torch.arange(4096) % {DOMAINS}\n"
              "try:\n    module(e, domain)\nexcept Exception as err:\n    print('REFUSED', err)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-2000:]  # not killed by a signal (a segfault is -11)
    assert "REFUSED compiled_cell_infer:" in done.stdout, done.stdout


def test_a_failed_onnx_export_leaves_no_file(tmp_path, monkeypatch):
    def fails_half_way(program, args, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half an ONNX model")
        raise RuntimeError("the exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fails_half_way)
    monkeypatch.setattr(hf.inference.export, "_require_packages", lambda *names: None)
    with pytest.raises(RuntimeError, match="the exporter failed"):
        export_model(hamur(backend="torch"), *inputs(4), tmp_path / "model.onnx", format="onnx")
    assert list(tmp_path.iterdir()) == []
