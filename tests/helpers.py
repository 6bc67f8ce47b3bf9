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
