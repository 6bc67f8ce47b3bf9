"""The checked entry points' bad-input errors, and what is specific to backend="torch".

Every backend's accuracy against the float64 reference: test_backends.py.
"""
import pytest
import torch

import hamur_fast as hf
from helpers import cell_inputs, rel_err


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


def test_both_per_domain_projection_strategies_agree():
    """The CPU path (a GEMM per domain) and the GPU path (stacked GEMM + gather) are the same function."""
    from hamur_fast.ops.backends import torch as eager

    g = torch.Generator().manual_seed(4)
    v = torch.randn(41, 9, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(4, 9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    domain = torch.randint(1, 4, (41,), generator=g)  # domain 0 absent
    upstream = torch.randn(41, 6, dtype=torch.float64, generator=g)
    results = []
    for project in (eager.project_stacked, eager.project_by_domain_segments):
        out = project(v, weight, domain)
        results.append((out, *torch.autograd.grad(out, (v, weight), upstream)))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-12
    assert rel_err(results[0][0][5], v[5] @ weight[domain[5]]) < 1e-12
