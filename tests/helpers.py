"""Shared test utilities: random adapter-cell inputs and error measures."""
from __future__ import annotations

import pytest
import torch


NAMES = ["x", "rep", "down_left", "down_right", "down_bias", "up_left", "up_right", "up_bias", "norm_weight",
         "norm_bias"]


GENERATED_NAMES = ["x", "g", "gen_weight", "gen_bias", "gen_norm_weight", "gen_norm_bias", "down_left",
                   "down_right", "down_bias", "up_left", "up_right", "up_bias", "norm_weight", "norm_bias"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the SPEC's per-tensor relative error)."""
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item()
    diff = (actual.to(torch.float64) - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


# fp32 is judged against a float64 run of the same computation: within FP32_FACTOR times plain PyTorch's fp32
# error there, plus FP32_FLOOR (16 units of fp32 rounding, for a plain run that happens to land almost exactly).
# The bound follows what fp32 reaches on the machine at hand (its BLAS, its summation order), where a fixed
# number passes on one machine and fails on another; a wrong result is off by far more.
FP32_FACTOR = 8
FP32_FLOOR = 16 * 2.0 ** -24


def fp32_bound(plain_error: float) -> float:
    """The largest fp32 error accepted where plain PyTorch's fp32 run of the computation errs by ``plain_error``."""
    return FP32_FACTOR * plain_error + FP32_FLOOR


def domains_with_edge_cases(batch: int, num_domains: int, generator: torch.Generator) -> torch.Tensor:
    """Random domain ids where, when the batch allows, domain 0 is absent and domain 1 has one row."""
    if num_domains < 3 or batch < 3:
        return torch.randint(0, num_domains, (batch,), generator=generator)
    domain = torch.randint(2, num_domains, (batch,), generator=generator)
    domain[torch.randint(0, batch, (1,), generator=generator)] = 1
    return domain


def cell_inputs(batch, width, rank, bottleneck, num_domains, mode, dtype=torch.float64, seed=0,
                edge_domains=True):
    """(x, rep, domain, params, running stats) for one adapter cell, parameters at a generic point."""
    g = torch.Generator().manual_seed(seed)
    lead = (num_domains,) if mode == "paper" else ()

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale)

    x = rand(batch, width)
    rep = torch.relu(rand(batch, rank, rank))
    domain = (domains_with_edge_cases(batch, num_domains, g) if edge_domains
              else torch.randint(0, num_domains, (batch,), generator=g))
    params = [
        rand(*lead, width, rank, scale=width ** -0.5), rand(*lead, rank, bottleneck, scale=rank ** -0.5),
        rand(*lead, bottleneck, scale=0.1), rand(*lead, bottleneck, rank, scale=bottleneck ** -0.5),
        rand(*lead, rank, width, scale=rank ** -0.5), rand(*lead, width, scale=0.1),
        1 + rand(*lead, width, scale=0.1), rand(*lead, width, scale=0.1),
    ]
    if mode == "paper":
        stats = [rand(num_domains, width, scale=0.1), 0.5 + torch.rand(num_domains, width, generator=g, dtype=dtype)]
    else:
        stats = [None, None]
    return x, rep, domain, params, stats


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
    import hamur_fast as hf

    x, g, domain, gen, gen_stats, params, stats = inputs
    leaves = [t.to(device=device, dtype=dtype).detach().requires_grad_() for t in (x, g, *gen, *params)]
    gen_stats = [s.to(device=device, dtype=dtype).clone() for s in gen_stats]
    stats = [s.to(device=device, dtype=dtype).clone() if s is not None else None for s in stats]
    y = hf.ops.hyper_adapter_generated(
        leaves[0], leaves[1], domain.to(device), *leaves[2:6], *gen_stats, *leaves[6:], *stats, mode=mode,
        training=training, gen_updates=updates, backend=backend, num_domains=3, precision=precision)
    y.backward(upstream.to(device=device, dtype=dtype))
    return y, leaves, gen_stats, [s for s in stats if s is not None]


def grouped_linear_inputs(batch, fan_in, fan_out, num_domains, ids, seed=0, dtype=torch.float64):
    """(x, domain, weight, bias, upstream) of the grouped per-domain linear op; ids "edge": domain 0 empty and
    domain 1 one row (when B, D >= 3), "sorted": random ids in domain order (the rows need no gather), else random
    ids in arbitrary order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, fan_in, generator=g, dtype=dtype)
    # stored (D, out, in) like nn.Linear and handed over transposed: the op must take any strides
    weight = torch.randn(num_domains, fan_out, fan_in, generator=g, dtype=dtype).transpose(1, 2) * fan_in ** -0.5
    bias = torch.randn(num_domains, fan_out, generator=g, dtype=dtype)
    if ids == "edge" and num_domains >= 3 and batch >= 3:
        domain = torch.randint(2, num_domains, (batch,), generator=g)
        domain[batch // 2] = 1
    else:
        domain = torch.randint(0, num_domains, (batch,), generator=g)
    if ids == "sorted":
        domain = domain.sort().values
    upstream = torch.randn(batch, fan_out, generator=g, dtype=dtype)
    return x, domain, weight, bias, upstream


def run_with_grads(backend, dtype, device, inputs, mode, upstream, training=True, num_domains=None):
    """One cell in ``dtype`` on ``device``, backpropagating ``upstream``; returns (y, leaves, running stats)."""
    import hamur_fast as hf

    x, rep, domain, params, stats = inputs
    leaves = [t.to(device=device, dtype=dtype).detach().requires_grad_() for t in (x, rep, *params)]
    stats = [s.to(device=device, dtype=dtype).clone() if s is not None else None for s in stats]
    y = hf.ops.hyper_adapter(leaves[0], leaves[1], domain.to(device), *leaves[2:], *stats, mode=mode,
                             training=training, backend=backend, num_domains=num_domains)
    y.backward(upstream.to(device=device, dtype=dtype))
    return y, leaves, stats


def fp32_exact(inputs):
    """The inputs rounded to fp32 and back, so that every path sees the same numbers."""
    x, rep, domain, params, stats = inputs
    rounded = [t.float().double() for t in (x, rep, *params)]
    return rounded[0], rounded[1], domain, rounded[2:], [s.float().double() if s is not None else None
                                                         for s in stats]


def grad_o_abs_sum(inputs, mode, upstream, training=True):
    """Per column, sum over rows of |d loss / d o| in float64 (o: the cell's output before normalisation).

    The gradient of up_bias is the column sum of d loss / d o, zero by construction under batch statistics:
    in finite precision it is a cancelling sum, whose residue scales with this sum of absolute terms.
    """
    import hamur_fast as hf
    from hamur_fast.ops.eager import adapter_projection

    x, rep, domain, params, stats = inputs
    o = adapter_projection(x, rep, domain, *params[:6], per_domain=mode == "paper").detach().requires_grad_()
    running = [s.clone() if s is not None else None for s in stats]
    y = hf.ops.domain_norm(o, domain, params[6], params[7], *running, mode=mode, training=training,
                           backend="reference", num_domains=None)
    (grad_o,) = torch.autograd.grad(y, o, upstream)
    return grad_o.abs().sum(dim=0)


def assert_matches_reference(backend, device, inputs, mode, training=True, dtype=torch.float32, seed=0):
    """One adapter cell on ``backend`` and ``device`` against the float64 reference: output, all ten gradients
    and the running statistics, within the tolerance of ``dtype`` (1e-5 fp32, 1e-12 fp64)."""
    import hamur_fast  # noqa: F401  (registers the backends)

    batch, width = inputs[0].shape
    upstream = torch.randn(batch, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref_y, ref_leaves, ref_stats = run_with_grads("reference", torch.float64, "cpu", inputs, mode, upstream, training)
    y, leaves, stats = run_with_grads(backend, dtype, device, inputs, mode, upstream, training)
    # What PyTorch's own paths reach at this precision (the plainest, and "torch"), where the problem is
    # ill-conditioned (groups of 2 or 3 rows amplify rounding by about var / eps).
    plain = [run_with_grads(b, dtype, "cpu", inputs, mode, upstream, training) for b in ("reference", "torch")]
    plain_runs = [leaves for _, leaves, _ in plain]
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    # The scale a cancelling sum's residue is held to: its terms' absolute sum, or the largest gradient.
    cancelling = max(grad_o_abs_sum(inputs, mode, upstream, training).max().item(),
                     max(leaf.grad.abs().max().item() for leaf in ref_leaves))

    assert y.dtype == dtype and y.device.type == device and torch.isfinite(y).all()
    # Output and running statistics: the fixed tolerance, or what plain PyTorch reaches at this precision.
    assert rel_err(y.cpu(), ref_y) <= max(tolerance, 4 * max(rel_err(p_y, ref_y) for p_y, _, _ in plain))
    # (plain_leaves, not plain: the running statistics below are judged by the plain runs themselves)
    for name, fast, slow, *plain_leaves in zip(NAMES, leaves, ref_leaves, *plain_runs):
        grad = fast.grad.cpu()
        assert grad.shape == slow.shape and torch.isfinite(grad).all(), name
        if slow.grad.abs().max() < 1e-12:  # zero by construction: up_bias feeds batch normalisation
            # A cancelling sum: held to the tolerance of its scale, or to PyTorch's residue.
            residue = max(p.grad.abs().max().item() for p in plain_leaves)
            assert grad.abs().max() <= max(tolerance * cancelling, 4 * residue), name
            continue
        plain_error = max(rel_err(p.grad, slow.grad) for p in plain_leaves)
        assert rel_err(grad, slow.grad) <= max(tolerance, 4 * plain_error), name
    for index, (fast, slow) in enumerate(zip(stats, ref_stats)):
        if slow is not None:
            plain_error = max(rel_err(p_stats[index], slow) for _, _, p_stats in plain)
            assert rel_err(fast.cpu(), slow) <= max(tolerance / 10, 4 * plain_error)


# The backends a run on a device type must test when they are built: the compiled one of that device type, and
# triton on a GPU.
EXPECTED_ON = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def with_unbuilt(names: list, device) -> list:
    """``names`` plus, as a test parameter that skips with the reason, each backend expected on ``device`` that is
    not built here (an extension without CUDA kernels on a GPU machine, say): a backend absent from a run shows in
    its skips, never as silently fewer tests."""
    from hamur_fast.ops import registry

    unbuilt = registry.unavailable_backends()
    return list(names) + [pytest.param(name, marks=pytest.mark.skip(reason=f"backend {name} is not built here: "
                                                                           f"{unbuilt[name]}"))
                          for name in EXPECTED_ON[torch.device(device).type] if name in unbuilt and name not in names]
