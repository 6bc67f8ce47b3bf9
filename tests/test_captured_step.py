"""CapturedTrainStep equals a plain eager step; torch.compile traces the whole HAMUR model; ReleasedMLP parity."""
import copy

import pytest
import torch

import hamur_fast as hf
from hamur_fast.train.captured_step import CapturedTrainStep, bce_step

from helpers import rel_err

INPUT_DIM, DOMAINS, BATCH = 24, 3, 48
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device; none here")


def small_hamur(mode="paper", **kwargs):
    torch.manual_seed(0)
    return hf.models.HAMUR(INPUT_DIM, DOMAINS, mode=mode, dims=[32, 16], rank=5, hyper_dims=[12], bottleneck=6,
                           **kwargs)


def batches(count, batch=BATCH, device="cpu"):
    g = torch.Generator().manual_seed(1)
    for _ in range(count):
        yield (torch.randn(batch, INPUT_DIM, generator=g).to(device),
               torch.randint(0, DOMAINS, (batch,), generator=g).to(device),
               torch.randint(0, 2, (batch,), generator=g).float().to(device))


def adam(model, capturable=False):
    return torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-5, capturable=capturable)


def assert_same_training(model, device, steps, capturable):
    eager_model, captured_model = copy.deepcopy(model).to(device), copy.deepcopy(model).to(device)
    eager_opt, captured_opt = adam(eager_model, capturable), adam(captured_model, capturable)
    step = CapturedTrainStep(captured_model, captured_opt, BATCH, device, warmup_steps=2)
    for e, domain, label in batches(steps, device=device):
        expected = bce_step(eager_model, eager_opt, e, domain, label)
        assert rel_err(step(e, domain, label), expected) <= 1e-5
    for (name, a), b in zip(eager_model.state_dict().items(), captured_model.state_dict().values()):
        if a.is_floating_point():
            assert rel_err(b, a) <= 1e-4, name
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_captured_step_equals_eager_step_on_cpu(mode):
    assert_same_training(small_hamur(mode), "cpu", steps=4, capturable=False)


def test_captured_step_loss_is_bce_of_the_model_logits():
    model = small_hamur()
    step = CapturedTrainStep(copy.deepcopy(model), adam(model), BATCH, "cpu")
    e, domain, label = next(batches(1))
    expected = torch.nn.functional.binary_cross_entropy(model(e, domain), label)
    assert rel_err(step(e, domain, label), expected) <= 1e-5


def test_captured_step_rejects_bad_batches():
    model = small_hamur()
    step = CapturedTrainStep(model, adam(model), BATCH, "cpu")
    e, domain, label = next(batches(1))
    with pytest.raises(ValueError, match="batch_size=48"):
        step(e[:-1], domain[:-1], label[:-1])
    with pytest.raises(ValueError, match="out of range"):
        step(e, domain + DOMAINS, label)
    with pytest.raises(ValueError, match="label"):
        step(e, domain, label[:, None])
    with pytest.raises(ValueError, match="batch_size"):
        CapturedTrainStep(model, adam(model), 0, "cpu")


def backends_on_cpu():
    """"torch" and every kernel backend that "auto" may pick on the CPU (their custom ops get compiled)."""
    return ["torch"] + [name for name in hf.ops.registry.auto_backends("cpu") if name != "torch"]


@pytest.mark.parametrize("backend, mode", [(b, "paper") for b in backends_on_cpu()] + [("torch", "released")])
def test_torch_compile_traces_the_whole_model_with_gradients(backend, mode):
    model = small_hamur(mode, backend=backend)
    twin = copy.deepcopy(model)
    e, domain, label = next(batches(1))

    def loss_of(m):
        return torch.nn.functional.binary_cross_entropy_with_logits(m.logits(e, domain), label)

    expected = loss_of(model)
    # fullgraph=True: any graph break (a host sync, an untraceable call) fails the test.
    compiled_loss = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(twin)
    assert rel_err(compiled_loss, expected) <= 1e-5
    expected.backward()
    compiled_loss.backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        # Biases in front of a BatchNorm get ~1e-9 gradients (pure rounding): hence the absolute floor.
        assert (b.grad - a.grad).abs().max() <= 1e-4 * a.grad.abs().max() + 1e-7, name


@pytest.mark.parametrize("name", ["official_mlp2.npz", "official_mlp7.npz"])
def test_released_mlp_reproduces_the_golden_vectors(shared_dir, name):
    import golden

    data = golden.load(shared_dir / "golden" / name)
    dims = [int(v) for v in data["config_fcn_dims"]]
    model = hf.compat.ReleasedMLP(data["input_e"].shape[1], int(data["config_domains"]), dims,
                                  [int(v) for v in data["config_hyper_dims"]], int(data["config_k"]),
                                  int(data["config_bottleneck"]), None if len(dims) == 2 else [5, 6]).double()
    model.load_state_dict(golden.released_state_dict(data))
    prob = model(torch.from_numpy(data["input_e"]), torch.from_numpy(data["input_domain"]))
    assert rel_err(prob, torch.from_numpy(data["output_prob"])) <= 1e-9
    # Its state_dict is the released layout: it loads into our released-mode model, which agrees.
    ours = golden.released_model(data)
    hf.compat.load_released_state_dict(ours, model.state_dict())


@CUDA
@pytest.mark.parametrize("mode", ["paper", "released"])
def test_captured_step_equals_eager_step_on_cuda(mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_same_training(small_hamur(mode), "cuda", steps=6, capturable=True)


@CUDA
def test_cuda_captured_step_needs_a_capturable_optimizer():
    model = small_hamur().cuda()
    with pytest.raises(ValueError, match="capturable=True"):
        CapturedTrainStep(model, adam(model, capturable=False), BATCH, "cuda")


def test_bad_domain_ids_held_on_the_cpu_are_caught_before_the_step():
    model = small_hamur()
    step = CapturedTrainStep(model, adam(model), BATCH, "cpu")
    e, domain, label = next(batches(1))
    domain[7] = DOMAINS
    with pytest.raises(ValueError, match=f"domain id {DOMAINS} is out of range"):
        step(e, domain, label)


@CUDA
def test_captured_steps_do_not_sync_with_the_host():
    """After warm-up and capture, a step with inputs already on the GPU never waits for the device."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = small_hamur().cuda()
    step = CapturedTrainStep(model, adam(model, capturable=True), BATCH, "cuda", warmup_steps=2)
    data = list(batches(6, device="cuda"))
    for e, domain, label in data[:3]:  # warm-up and capture
        step(e, domain, label)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(e, domain, label) for e, domain, label in data[3:]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)
