"""What is specific to the compiled core hamur_fast._C (csrc/), backends "cpu" and "cuda": its inference op,
its registration, the package without it, and float64 golden parity through it.

Their accuracy against the float64 reference, their buffers on poisoned memory, out-of-range ids and opcheck of
their registered ops are tested with every backend's in test_backends.py. The CPU
kernels are tested everywhere the extension was built; the CUDA cases run where the extension has CUDA kernels
and a GPU is present, and are skipped otherwise.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hamur_fast as hf
from golden import BUFFER_WORDS, load, our_tensor, released_keys, released_model
from helpers import cell_inputs, rel_err

compiled = pytest.importorskip("hamur_fast.ops.backends.compiled", reason="the extension hamur_fast._C was not built")
ops = torch.ops.hamur_fast


def cuda_case():
    """The CUDA cases of a GPU machine: skipped with the reason where the extension has no CUDA kernels."""
    if compiled.has_kernel("CUDA"):
        return "cuda"
    reason = hf.ops.registry.unavailable_backends().get("cuda", "no CUDA kernels registered")
    return pytest.param("cuda", marks=pytest.mark.skip(reason=f"backend cuda is not built here: {reason}"))


DEVICES = ["cpu"] + ([cuda_case()] if torch.cuda.is_available() else [])
BACKEND = {"cpu": "cpu", "cuda": "cuda"}


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 2, 37, 300])
def test_inference_kernel_matches_reference(batch, device):
    """Eval without autograd takes the fused inference op (DomainNorm folded from running statistics)."""
    x, rep, domain, params, stats = cell_inputs(batch, 40, 35, 32, 3, "paper", seed=batch, edge_domains=False)
    expected = hf.ops.hyper_adapter(x, rep, domain, *params, *stats, training=False, backend="reference")
    args = [t.float().to(device) for t in (x, rep, *params, *stats)]
    with torch.no_grad():
        got = hf.ops.hyper_adapter(args[0], args[1], domain.to(device), *args[2:], training=False,
                                   backend=BACKEND[device])
        direct = ops.compiled_cell_infer(args[0], args[1], domain.to(device), *args[2:], 1e-5)
    assert torch.equal(got, direct)
    assert rel_err(got.cpu(), expected) <= 1e-5


def test_backend_registration():
    assert "cpu" in hf.available_backends()
    assert ("cuda" in hf.available_backends()) == compiled.has_kernel("CUDA")
    cpu = hf.ops.registry.resolve("cpu", torch.device("cpu"))
    assert cpu.capabilities.auto_rank == {"cpu": compiled.CPU_AUTO_RANK}
    assert hf.ops.registry.resolve("auto", torch.device("cpu")).name == "cpu"
    with pytest.raises(ValueError, match="does not cover this call: device cuda"):
        hf.ops.registry.resolve("cpu", torch.device("cuda", 0))


def test_package_works_without_the_extension():
    """HAMUR_FAST_NO_EXT=1 builds no hamur_fast._C: the package imports and runs on its Python backends."""
    code = ("import sys\n"
            "class NotBuilt:  # the import system as it is where no hamur_fast._C file exists\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'hamur_fast._C':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NotBuilt())\n"
            "import torch, hamur_fast as hf\n"
            "assert 'cpu' not in hf.available_backends() and 'cuda' not in hf.available_backends()\n"
            "x = torch.randn(5, 8); rep = torch.rand(5, 3, 3); d = torch.tensor([0, 1, 1, 0, 1])\n"
            "cell = hf.HyperAdapter(8, 3, 2, bottleneck=4)\n"
            "assert torch.isfinite(cell(x, rep, d)).all()\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- released golden files
@pytest.fixture(params=["official_mlp2.npz", "official_mlp7.npz"])
def golden(request, shared_dir):
    return load(shared_dir / "golden" / request.param)


def test_released_golden_parity_fp64_through_cpu_backend(golden):
    """The released model, loaded from the released checkpoint layout, with its cells on backend="cpu" in
    float64 reproduces the golden vectors: outputs, loss, every gradient and every running statistic."""
    e = torch.from_numpy(golden["input_e"]).requires_grad_()
    domain = torch.from_numpy(golden["input_domain"])
    label = torch.from_numpy(golden["input_label"]).double()
    model = released_model(golden, dtype=torch.float64)
    model.backend = "cpu"
    assert all(cell.backend == "cpu" for cell in model.backbone.adapters)
    model.train()
    prob = model(e, domain)
    loss = F.binary_cross_entropy(prob, label)
    loss.backward()
    assert rel_err(prob.detach(), torch.from_numpy(golden["output_prob"])) <= 1e-9
    assert abs(loss.item() - float(golden["output_loss"])) <= 1e-9 * abs(float(golden["output_loss"]))
    assert rel_err(e.grad, torch.from_numpy(golden["grad_input_e"])) <= 1e-9
    for name in released_keys(golden):
        if name.endswith(BUFFER_WORDS):
            expected = torch.from_numpy(np.asarray(golden[f"after/{name}"]))
            ours = our_tensor(model, golden, name, "after")
            assert rel_err(ours.double(), expected.double()) <= 1e-9, name
            continue
        expected = torch.from_numpy(np.asarray(golden[f"grad/{name}"]))
        ours = our_tensor(model, golden, name, "grad")
        if expected.abs().max() < 1e-12:  # zero by construction (adapter up_bias feeds the normalisation)
            assert ours.abs().max() <= 1e-12, name
        else:
            assert rel_err(ours, expected) <= 1e-9, name
