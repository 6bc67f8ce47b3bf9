"""The nn layers: HyperNetwork, HyperAdapter, DomainNorm: gradcheck, init, eval behaviour, backends."""
import pytest
import torch

import hamur_fast as hf
from helpers import rel_err, with_unbuilt


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_gradcheck_layers_float64(mode):
    torch.manual_seed(0)
    adapter = hf.HyperAdapter(6, 4, 3, bottleneck=5, mode=mode).double()
    norm = hf.DomainNorm(6, 3, mode=mode).double()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    rep = torch.rand(9, 4, 4, dtype=torch.float64, requires_grad=True)
    domain = torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda a, r: adapter(a, r, domain), (x, rep))
    assert torch.autograd.gradcheck(lambda a: norm(a, domain), (x,))


def test_gradcheck_hyper_network_float64():
    torch.manual_seed(0)
    net = hf.HyperNetwork(7, [5], rank=3).double()
    e = torch.randn(11, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(net, (e,))
    assert net(e).shape == (11, 3, 3)


def test_hyper_network_is_row_major_and_nonnegative():
    torch.manual_seed(0)
    net = hf.HyperNetwork(7, [5], rank=3)
    e = torch.randn(16, 7)
    rep = net(e)
    flat = net.net(e)
    assert torch.equal(rep[:, 1, 2], flat[:, 1 * 3 + 2])
    assert (rep >= 0).all()


def test_repeated_running_stat_updates_equal_repeated_batchnorm():
    torch.manual_seed(0)
    e = torch.randn(32, 7, dtype=torch.float64)
    repeated = hf.HyperNetwork(7, [5], rank=3, stat_updates_per_step=3).double()
    once = hf.HyperNetwork(7, [5], rank=3).double()
    once.load_state_dict(repeated.state_dict())
    out = repeated(e)
    for _ in range(3):
        expected = once(e)
    assert torch.equal(out, expected)
    for (name, a), (_, b) in zip(repeated.named_buffers(), once.named_buffers()):
        assert rel_err(a.double(), b.double()) < 1e-12, name


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_paper_init_lets_gradients_reach_every_factor(backend):
    torch.manual_seed(0)
    adapter = hf.HyperAdapter(16, 5, 3, bottleneck=8, backend=backend)
    x = torch.randn(64, 16)
    rep = torch.relu(torch.randn(64, 5, 5))
    domain = torch.arange(64) % 3
    y = adapter(x, rep, domain)
    assert rel_err(y, x) < 0.5  # starts near the identity
    y.pow(2).sum().backward()
    for name in ("down_left", "down_right", "up_left", "up_right", "down_bias", "norm_weight", "norm_bias"):
        grad = getattr(adapter, name).grad
        assert (grad.abs().sum(dim=tuple(range(1, grad.dim()))) > 0).all(), f"{name} has a zero-gradient domain"


def test_released_init_matches_released_code():
    adapter = hf.HyperAdapter(16, 5, 3, mode="released")
    assert all((getattr(adapter, n) == 1).all() for n in ("down_left", "down_right", "up_left", "up_right"))
    assert (adapter.norm_weight == 1).all() and (adapter.norm_bias == 0).all()
    assert adapter.down_left.shape == (16, 5) and adapter.running_mean is None


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_eval_rows_are_independent_and_single_row_works(backend):
    torch.manual_seed(0)
    adapter = hf.HyperAdapter(12, 4, 3, bottleneck=6, backend=backend)
    x, rep, domain = torch.randn(40, 12), torch.rand(40, 4, 4), torch.arange(40) % 3
    adapter.train()
    adapter(x, rep, domain)  # moves the running statistics away from their init
    adapter.eval()
    full = adapter(x, rep, domain)
    shuffled = torch.randperm(40)
    assert torch.allclose(adapter(x[shuffled], rep[shuffled], domain[shuffled]), full[shuffled], atol=1e-6)
    single = adapter(x[7:8], rep[7:8], domain[7:8])
    assert torch.allclose(single, full[7:8], atol=1e-6)


def test_backend_is_an_attribute_that_leaves_parameters_alone():
    adapter = hf.HyperAdapter(12, 4, 3, backend="reference")
    keys = list(adapter.state_dict())
    adapter.backend = "torch"
    assert adapter.backend == "torch" and list(adapter.state_dict()) == keys
    with pytest.raises(ValueError, match="backend 'cuda-ish' is not available"):
        adapter.backend = "cuda-ish"


def test_layers_reject_bad_input():
    adapter = hf.HyperAdapter(12, 4, 3)
    x, rep = torch.randn(5, 12), torch.rand(5, 4, 4)
    with pytest.raises(ValueError, match="domain id 3 is out of range for num_domains=3"):
        adapter(x, rep, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"rep must have shape \(B, k, k\)"):
        adapter(x, torch.rand(5, 4, 3), torch.zeros(5, dtype=torch.long))
    released = hf.HyperAdapter(12, 4, 3, mode="released")
    with pytest.raises(ValueError, match="domain id 5 is out of range"):
        released(x, rep, torch.tensor([0, 1, 2, 5, 0]))
    with pytest.raises(ValueError, match="e must have 7 features"):
        hf.HyperNetwork(7, [5], 3)(torch.randn(4, 8))
    with pytest.raises(ValueError, match="mode must be one of"):
        hf.DomainNorm(4, 2, mode="batch")


def test_released_cell_on_all_towers_equals_one_call_per_tower():
    torch.manual_seed(0)
    cell = hf.HyperAdapter(10, 4, 3, bottleneck=6, mode="released", backend="torch").double()
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_()
    towers = torch.randn(3, 23, 10, dtype=torch.float64, requires_grad=True)
    rep = torch.rand(23, 4, 4, dtype=torch.float64)
    domain = torch.randint(0, 3, (23,))
    batched = cell.forward_all_towers(towers, rep, domain)
    looped = torch.stack([cell(t, rep, domain) for t in towers])
    assert rel_err(batched, looped) < 1e-12
    grad_batched, = torch.autograd.grad(batched.square().sum(), towers)
    grad_looped, = torch.autograd.grad(looped.square().sum(), towers)
    assert rel_err(grad_batched, grad_looped) < 1e-12


@pytest.mark.parametrize("backend", with_unbuilt(hf.available_backends(),
                                                 "cuda" if torch.cuda.is_available() else "cpu"))
def test_a_nan_row_stays_in_its_domain(backend):
    """One NaN row poisons its own domain's statistics and outputs, never another domain's (every backend)."""
    device = "cpu" if backend in hf.available_backends("cpu") else "cuda"  # triton: cuda where a GPU is
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"backend {backend} runs on CUDA only, and no CUDA device is here")
    norm = hf.DomainNorm(16, num_domains=3, backend=backend).to(device)
    x = torch.randn(12, 16, device=device)
    domain = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], device=device)
    x[5, 3] = float("nan")  # a row of domain 1
    y = norm(x, domain)
    assert [bool(y[domain == d].isnan().any()) for d in range(3)] == [False, True, False]
    assert norm.running_mean.isnan().any(dim=1).tolist() == [False, True, False]


def test_int32_domain_ids_work_wherever_the_check_accepts_them():
    for name in hf.models.available():
        model = hf.models.build(name, 24, 3)
        e, domain = torch.randn(16, 24), torch.randint(0, 3, (16,), dtype=torch.int32)
        model.train()
        model(e, domain).sum().backward()  # training: the one-hot and scatter paths need int64 inside
        model.eval()
        assert torch.allclose(model(e, domain), model(e, domain.long()))
