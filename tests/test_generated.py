"""Fusion level 2 (hamur_fast.ops.generated, kernels/adapter_generated.py): the cell on I generated from g.

Every backend is compared with the float64 reference, which materialises z = g W^T + c and normalises it
over the batch (the others use the moment identity of SPEC section 6): output, the gradients of x, g, W,
c, the generator's BN weight and bias and every cell parameter, and every running statistic.
"""
import os

import pytest
import torch

import hamur_fast as hf
from hamur_fast.ops import generated
from helpers import cell_inputs, rel_err

NAMES = ["x", "g", "gen_weight", "gen_bias", "gen_norm_weight", "gen_norm_bias", "down_left", "down_right",
         "down_bias", "up_left", "up_right", "up_bias", "norm_weight", "norm_bias"]
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def generated_inputs(batch, width, rank, bottleneck, num_domains, hidden, mode, seed=0):
    """(x, g, domain, generator tensors, cell params, cell running stats), float64; g >= 0 like a ReLU output."""
    x, _, domain, params, stats = cell_inputs(batch, width, rank, bottleneck, num_domains, mode, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.relu(torch.randn(batch, hidden, generator=gen, dtype=torch.float64) + 0.3)
    weight = torch.randn(rank * rank, hidden, generator=gen, dtype=torch.float64) * hidden ** -0.5
    bias = torch.randn(rank * rank, generator=gen, dtype=torch.float64) * 0.1
    norm_weight = 1 + 0.1 * torch.randn(rank * rank, generator=gen, dtype=torch.float64)
    norm_bias = 0.1 * torch.randn(rank * rank, generator=gen, dtype=torch.float64)
    running = [0.1 * torch.randn(rank * rank, generator=gen, dtype=torch.float64),
               0.5 + torch.rand(rank * rank, generator=gen, dtype=torch.float64)]
    return x, g, domain, [weight, bias, norm_weight, norm_bias], running, params, stats


def run_generated(backend, dtype, inputs, mode, upstream, training=True, updates=1, device="cpu",
                  precision="ieee"):
    """One level-2 call in ``dtype``, backpropagating ``upstream``: (y, leaves, generator stats, cell stats)."""
    x, g, domain, gen, gen_stats, params, stats = inputs
    leaves = [t.to(device=device, dtype=dtype).detach().requires_grad_() for t in (x, g, *gen, *params)]
    gen_stats = [s.to(device=device, dtype=dtype).clone() for s in gen_stats]
    stats = [s.to(device=device, dtype=dtype).clone() if s is not None else None for s in stats]
    y = hf.ops.hyper_adapter_generated(
        leaves[0], leaves[1], domain.to(device), *leaves[2:6], *gen_stats, *leaves[6:], *stats, mode=mode,
        training=training, gen_updates=updates, backend=backend, num_domains=3, precision=precision)
    y.backward(upstream.to(device=device, dtype=dtype))
    return y, leaves, gen_stats, [s for s in stats if s is not None]


def assert_matches_reference(backend, inputs, mode, training, updates=1, device="cpu", precision="ieee"):
    batch, width = inputs[0].shape
    upstream = torch.randn(batch, width, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = run_generated("reference", torch.float64, inputs, mode, upstream, training, updates)
    fast = run_generated(backend, torch.float32, inputs, mode, upstream, training, updates, device, precision)
    # What PyTorch's own fp32 reaches (the plain materialising code): ill-conditioned cases (a BN over 2-3
    # rows, a domain of 2 rows) amplify rounding beyond 1e-5 for every fp32 code.
    plain = run_generated("reference", torch.float32, inputs, mode, upstream, training, updates)

    def check(name, got, want, plain_value):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        bound = max(1e-5, 4 * rel_err(plain_value, want))
        if want.abs().max() < 1e-12:  # zero by construction (c and up_bias feed a batch normalisation)
            assert got.abs().max() <= max(1e-6, 4 * plain_value.abs().max().item()), name
        else:
            assert rel_err(got.cpu(), want) <= bound, (name, rel_err(got.cpu(), want), bound)

    check("y", fast[0].detach(), ref[0].detach(), plain[0].detach())
    for name, leaf, ref_leaf, plain_leaf in zip(NAMES, fast[1], ref[1], plain[1]):
        check(name, leaf.grad, ref_leaf.grad, plain_leaf.grad)
    for i, (got, want, plain_value) in enumerate(zip(fast[2] + fast[3], ref[2] + ref[3], plain[2] + plain[3])):
        check(f"running statistic {i}", got, want, plain_value)


SIZES = [  # (B, h, k, s, p): odd sizes, none a multiple of 16
    (1, 13, 5, 7, 9), (2, 13, 5, 7, 9), (3, 13, 5, 7, 9), (37, 20, 6, 5, 11), (1023, 13, 5, 7, 9)]


@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B%d" % s[0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_backend_matches_reference(size, mode, training):
    batch, width, rank, bottleneck, hidden = size
    inputs = generated_inputs(batch, width, rank, bottleneck, 3, hidden, mode, seed=batch)
    assert_matches_reference("torch", inputs, mode, training, updates=3 if mode == "released" else 1)


def test_reference_equals_level1_reference_on_materialised_rep():
    """The oracle itself: the level-1 reference cell on I = ReLU(BN(g W^T + c)) built by nn modules."""
    x, g, domain, (w, c, nw, nb), (rm, rv), params, stats = generated_inputs(37, 13, 5, 7, 3, 9, "paper")
    layer = torch.nn.Sequential(torch.nn.Linear(9, 25), hf.nn.hyper_network.RepeatedUpdateBatchNorm1d(25, 3),
                                torch.nn.ReLU()).double()
    with torch.no_grad():
        for target, value in zip((layer[0].weight, layer[0].bias, layer[1].weight, layer[1].bias,
                                  layer[1].running_mean, layer[1].running_var), (w, c, nw, nb, rm, rv)):
            target.copy_(value)
    gen_stats = [rm.clone(), rv.clone()]
    cell_stats = [s.clone() for s in stats]
    y = hf.ops.hyper_adapter_generated(x, g, domain, w, c, nw, nb, *gen_stats, *params, *cell_stats,
                                       gen_updates=3, backend="reference")
    y1 = hf.ops.hyper_adapter(x, layer(g).view(37, 5, 5), domain, *params, *[s.clone() for s in stats],
                              backend="reference")
    assert torch.allclose(y, y1, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gen_stats[0], layer[1].running_mean, rtol=1e-12, atol=1e-14)
    assert torch.allclose(gen_stats[1], layer[1].running_var, rtol=1e-12, atol=1e-14)


def test_reference_gradcheck():
    x, g, domain, gen, gen_stats, params, stats = generated_inputs(6, 5, 3, 4, 3, 4, "paper")
    leaves = [t.clone().requires_grad_() for t in (x, g, *gen, *params)]

    def fn(*tensors):
        return hf.ops.hyper_adapter_generated(tensors[0], tensors[1], domain, *tensors[2:6], None, None,
                                              *tensors[6:], None, None, backend="reference")
    assert torch.autograd.gradcheck(fn, leaves)


def test_moment_identity_statistics_are_exact():
    """mean and var of z = g W^T + c from the mean and covariance of g equal the direct ones (float64)."""
    _, g, _, (w, c, _, _), _, _, _ = generated_inputs(257, 13, 6, 7, 3, 17, "paper")
    _, mean_z, var_z = generated.generator_batch_stats(g, w, c)
    z = g @ w.t() + c
    assert torch.allclose(mean_z, z.mean(0), rtol=1e-12, atol=1e-13)
    assert torch.allclose(var_z, z.var(0, unbiased=False), rtol=1e-11, atol=1e-13)


def test_errors_name_the_argument():
    x, g, domain, gen, gen_stats, params, stats = generated_inputs(8, 13, 5, 7, 3, 9, "paper")
    args = lambda **over: dict(dict(zip(["gen_weight", "gen_bias", "gen_norm_weight", "gen_norm_bias"], gen)),
                               gen_running_mean=gen_stats[0], gen_running_var=gen_stats[1], **over)
    call = lambda g_, **over: hf.ops.hyper_adapter_generated(x, g_, domain, **args(**over), down_left=params[0],
                                                             down_right=params[1], down_bias=params[2],
                                                             up_left=params[3], up_right=params[4],
                                                             up_bias=params[5], norm_weight=params[6],
                                                             norm_bias=params[7], backend="torch")
    with pytest.raises(ValueError, match="g must have the batch"):
        call(g[:5])
    with pytest.raises(ValueError, match="gen_weight must have shape"):
        call(g, gen_weight=gen[0][:, :4])
    with pytest.raises(ValueError, match="gen_updates"):
        hf.ops.hyper_adapter_generated(x, g, domain, *gen, *gen_stats, *params, gen_updates=0, backend="torch")
    with pytest.raises(ValueError, match="precision"):
        hf.ops.hyper_adapter_generated(x, g, domain, *gen, *gen_stats, *params, precision="fp8", backend="torch")
    with pytest.raises(ValueError, match="domain id 3"):
        bad = domain.clone()
        bad[0] = 3
        hf.ops.hyper_adapter_generated(x, g, bad, *gen, *gen_stats, *params, backend="torch")


triton_only = pytest.mark.skipif(not TRITON, reason="no CUDA device and TRITON_INTERPRET is not 1")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_SIZES = [  # (B, h, k, s, p): odd sizes; B = 203 spans several row blocks and weight-gradient ranges
    (1, 13, 5, 7, 9), (2, 13, 5, 7, 9), (3, 13, 5, 7, 9), (37, 20, 6, 5, 11), (203, 13, 5, 7, 9)]


@triton_only
@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("size", TRITON_SIZES, ids=lambda s: "B%d" % s[0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_matches_reference(size, mode, training):
    batch, width, rank, bottleneck, hidden = size
    inputs = generated_inputs(batch, width, rank, bottleneck, 3, hidden, mode, seed=batch)
    assert_matches_reference("triton", inputs, mode, training, updates=3 if mode == "released" else 1,
                             device=TRITON_DEVICE)
