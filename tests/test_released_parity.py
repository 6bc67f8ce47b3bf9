"""mode="released" reproduces the authors' released code: outputs, loss, gradients, running statistics."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hamur_fast as hf
from golden import BUFFER_WORDS, load, our_tensor, released_keys, released_model, released_state_dict
from helpers import rel_err

GOLDEN_FILES = ["official_mlp2.npz", "official_mlp7.npz"]


@pytest.fixture(params=GOLDEN_FILES)
def golden(request, shared_dir):
    return load(shared_dir / "golden" / request.param)


def compare(ours, expected, what, bound):
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float64))
    if expected.abs().max() < 1e-12:  # zero by construction (e.g. up_bias): absolute bound
        assert ours.abs().max() < 1e-12, what
    else:
        assert rel_err(ours.double(), expected) <= bound, what


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_released_parity_float64(golden, backend):
    model = released_model(golden)
    model.backend = backend
    model.train()
    e = torch.from_numpy(golden["input_e"]).requires_grad_()
    domain = torch.from_numpy(golden["input_domain"])
    prob = model(e, domain)
    loss = F.binary_cross_entropy(prob, torch.from_numpy(golden["input_label"]))
    loss.backward()

    compare(prob.detach(), golden["output_prob"], "output_prob", 1e-9)
    compare(loss.detach(), golden["output_loss"], "output_loss", 1e-9)
    compare(e.grad, golden["grad_input_e"], "grad_input_e", 1e-9)
    names = released_keys(golden)
    buffers = [n for n in names if n.endswith(BUFFER_WORDS)]
    grads = [n for n in names if n not in buffers]
    for name in grads:
        compare(our_tensor(model, golden, name, "grad"), golden[f"grad/{name}"], f"grad/{name}", 1e-9)
    for name in buffers:
        compare(our_tensor(model, golden, name, "after"), golden[f"after/{name}"], f"after/{name}", 1e-9)


def test_loader_rejects_mismatched_checkpoints(golden):
    state = released_state_dict(golden)
    model = released_model(golden)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    missing = dict(state)
    missing.pop("u.0")
    with pytest.raises(ValueError, match=r"missing \['u.0'\]"):
        hf.compat.load_released_state_dict(model, missing)
    extra = {**state, "w_extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \['w_extra'\]"):
        hf.compat.load_released_state_dict(model, extra)
    wrong = {**state, "v.0": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"v.0: shape \(3, 3\) does not fit backbone.adapters.0.down_right"):
        hf.compat.load_released_state_dict(model, wrong)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    with pytest.raises(ValueError, match="released checkpoints exist for the MLP models only"):
        hf.compat.load_released_state_dict(hf.models.HAMUR(10, 3), state)


def test_released_cell_math_equals_released_mode_op(golden):
    """The benchmark baseline (compat.released_cell) is the same function as our released-mode op."""
    torch.manual_seed(0)
    h, k = 40, 12
    x, rep = torch.randn(64, h, dtype=torch.float64), torch.rand(64, k, k, dtype=torch.float64)
    params = [torch.randn(h, k), torch.randn(k, 32), torch.randn(32), torch.randn(32, k), torch.randn(k, h),
              torch.randn(h), torch.randn(h), torch.randn(h)]
    params = [p.double() / 4 for p in params]
    ours = hf.ops.hyper_adapter(x, rep, torch.zeros(64, dtype=torch.long), *params, mode="released")
    assert rel_err(ours, hf.compat.released_cell(x, rep, *params)) < 1e-12
