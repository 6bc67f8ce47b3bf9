"""backend="torch" against backend="reference" (the float64 oracle), gradcheck, and bad input."""
import pytest
import torch

import hamur_fast as hf
from helpers import cell_inputs, fp32_exact, rel_err, run_with_grads

SIZES = [  # (B, h, k, s, D): odd sizes, B = 1, 2, 3, 1023
    (1, 13, 5, 7, 3), (2, 13, 5, 7, 3), (3, 17, 6, 9, 3), (37, 40, 12, 32, 4), (1023, 33, 11, 19, 3),
]


def run_cell(backend, x, rep, domain, params, stats, mode, training=True):
    return hf.ops.hyper_adapter(x, rep, domain, *params, *stats, mode=mode, training=training,
                                backend=backend)


def with_grad(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-h{}-k{}-s{}-D{}".format(*s))
def test_torch_matches_reference_fp32(mode, size):
    batch, width, rank, bottleneck, num_domains = size
    # Both paths see the same fp32-representable inputs, so the comparison measures arithmetic only.
    inputs = fp32_exact(cell_inputs(batch, width, rank, bottleneck, num_domains, mode, seed=batch))
    domain = inputs[2]
    if mode == "paper" and batch >= 3:
        assert (domain == 0).sum() == 0 and (domain == 1).sum() == 1  # the edge cases are really there

    upstream = torch.randn(batch, width, dtype=torch.float64)
    ref_out, ref_leaves, ref_stats = run_with_grads("reference", torch.float64, "cpu", inputs, mode, upstream)
    out, fast_leaves, fast_stats = run_with_grads("torch", torch.float32, "cpu", inputs, mode, upstream)
    # The plainest fp32 computation, to size what fp32 itself can reach on ill-conditioned cases.
    _, plain_leaves, _ = run_with_grads("reference", torch.float32, "cpu", inputs, mode, upstream)

    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, ref_out) <= 1e-5
    names = ["x", "rep", "down_left", "down_right", "down_bias", "up_left", "up_right", "up_bias",
             "norm_weight", "norm_bias"]
    for name, fast, plain, slow in zip(names, fast_leaves, plain_leaves, ref_leaves):
        assert torch.isfinite(fast.grad).all(), name
        if slow.grad.abs().max() < 1e-12:  # zero by construction (e.g. up_bias feeds the normalisation)
            # A sum of B fp32 terms that cancel: bounded like the plain fp32 computation's residue.
            assert fast.grad.abs().max() <= max(2e-7 * batch, 2 * plain.grad.abs().max()), name
            continue
        # Normalising groups of two rows is ill-conditioned: there even the plain fp32 computation
        # misses 1e-5, so the bound is 1e-5 or twice what plain fp32 reaches, whichever is larger.
        bound = max(1e-5, 2 * rel_err(plain.grad, slow.grad))
        assert rel_err(fast.grad, slow.grad) <= bound, name
    for fast, slow in zip(fast_stats, ref_stats):
        if slow is not None:
            assert rel_err(fast, slow) <= 1e-6


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_running_stats_follow_batchnorm_rule(backend):
    """Domains with >= 2 rows update like BatchNorm1d; domains with 0 or 1 rows keep their statistics."""
    width = 6
    o = torch.randn(9, width, dtype=torch.float64)
    domain = torch.tensor([0, 0, 0, 0, 2, 0, 0, 0, 0])  # domain 1 absent, domain 2 has one row
    weight, bias = torch.ones(3, width, dtype=torch.float64), torch.zeros(3, width, dtype=torch.float64)
    mean, var = torch.zeros(3, width, dtype=torch.float64), torch.ones(3, width, dtype=torch.float64)
    out = hf.ops.domain_norm(o, domain, weight, bias, mean, var, backend=backend)

    bn = torch.nn.BatchNorm1d(width, dtype=torch.float64)
    expected = bn(o[domain == 0])
    assert rel_err(out[domain == 0], expected) < 1e-12
    assert torch.equal(out[domain == 2], bias[2:3])  # one row normalises to the bias, no NaN
    assert rel_err(mean[0], bn.running_mean) < 1e-12 and rel_err(var[0], bn.running_var) < 1e-12
    assert torch.equal(mean[1:], torch.zeros(2, width, dtype=torch.float64))
    assert torch.equal(var[1:], torch.ones(2, width, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_eval_mode_matches_reference(mode):
    x, rep, domain, params, stats = cell_inputs(29, 21, 7, 10, 3, mode, seed=3)
    ref = run_cell("reference", x, rep, domain, params, stats, mode, training=False)
    out = run_cell("torch", x, rep, domain, params, stats, mode, training=False)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("mode", ["paper", "released"])
def test_gradcheck_hyper_adapter(backend, mode):
    x, rep, domain, params, stats = cell_inputs(7, 6, 4, 5, 3, mode, seed=11)
    leaves = with_grad([x, rep, *params])

    def cell(*tensors):
        # Fresh copies of the running stats: gradcheck calls the function many times.
        fresh = [s.clone() if s is not None else None for s in stats]
        return run_cell(backend, tensors[0], tensors[1], domain, tensors[2:], fresh, mode)

    assert torch.autograd.gradcheck(cell, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_no_nan_for_single_row_batch(mode):
    x, rep, domain, params, stats = cell_inputs(1, 9, 4, 5, 3, mode, seed=5, dtype=torch.float32)
    leaves = with_grad([x, rep, *params])
    out = run_cell("torch", leaves[0], leaves[1], domain, leaves[2:], stats, mode)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_auto_picks_a_fast_backend_never_the_reference():
    chosen = hf.ops.registry.resolve("auto", torch.device("cpu")).name
    assert chosen != "reference" and chosen in hf.available_backends()


# ----------------------------------------------------------------------------- bad input
def good_args(mode="paper"):
    x, rep, domain, params, stats = cell_inputs(5, 8, 3, 4, 3, mode, dtype=torch.float32)
    return [x, rep, domain, *params, *stats]


def call(args, **kw):
    return hf.ops.hyper_adapter(*args, **kw)


@pytest.mark.parametrize("bad_domain, message", [
    (torch.tensor([0, 1, 3, 0, 1]), "domain id 3 is out of range for num_domains=3"),
    (torch.tensor([0, -1, 2, 0, 1]), "domain ids must be >= 0, got -1"),
    (torch.tensor([0.0, 1, 2, 0, 1]), "domain must be an int64"),
    (torch.tensor([0, 1, 2]), r"domain must have shape \(5,\)"),
])
def test_bad_domain_is_named(bad_domain, message):
    args = good_args()
    args[2] = bad_domain
    with pytest.raises(ValueError, match=message):
        call(args)


@pytest.mark.parametrize("index, bad, message", [
    (0, torch.randn(5, 9), r"norm_weight must have shape \(3, 9\), got \(3, 8\)"),
    (0, torch.randint(0, 3, (5, 8)), "x must be a floating-point tensor"),
    (1, torch.randn(5, 3, 4), r"rep must have shape \(B, k, k\)"),
    (1, torch.randn(4, 3, 3), r"rep must have shape \(B, k, k\) with B=5"),
    (1, torch.randn(5, 9), "rep must be 3-D"),
    (3, torch.randn(2, 8, 3), r"norm_weight|down_left must have shape \(3, 8, 3\)"),
    (4, torch.randn(3, 3, 4, dtype=torch.float64), "must share one dtype"),
])
def test_bad_shapes_and_dtypes_are_named(index, bad, message):
    args = good_args()
    args[index] = bad
    with pytest.raises(ValueError, match=message):
        call(args)


def test_released_mode_bounds_domains_when_told():
    args = good_args("released")
    args[2] = torch.tensor([0, 1, 2, 7, 0])
    with pytest.raises(ValueError, match="domain id 7 is out of range for num_domains=3"):
        call(args, mode="released", num_domains=3)


def test_unknown_backend_and_mode():
    with pytest.raises(ValueError, match="backend 'nope' is not available"):
        call(good_args(), backend="nope")
    with pytest.raises(ValueError, match="mode must be one of"):
        call(good_args(), mode="paperish")


def test_bad_input_raises_before_any_state_changes():
    args = good_args()
    mean_before = args[-2].clone()
    args[2] = torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(ValueError):
        call(args)
    assert torch.equal(args[-2], mean_before)
