"""Shared test utilities: random adapter-cell inputs and error measures."""
from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the SPEC's per-tensor relative error)."""
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item()
    diff = (actual.to(torch.float64) - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


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
