"""The one composition (hamur_fast/ops/compose.py): every backend's table drives both of its forms.

- (The composed custom ops' ``torch.library.opcheck``, for every backend and every plan: the backend suite,
  tests/test_backends.py ``test_opcheck_registered_ops``.)
- The fused form and the split form (the merge step the identity, as in one process) agree on the output, the
  merged statistics and every gradient, for every backend on this machine: the split passes are what a
  data-parallel step runs, so this is what keeps one process and N ranks on the same model.
"""
from __future__ import annotations

import pytest
import torch

from hamur_fast.ops import compose, generated, registry
from hamur_fast.ops.contract import make_plan
from helpers import cell_inputs, fp32_bound, rel_err

SIZES = dict(batch=23, width=13, rank=5, bottleneck=7, num_domains=3)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _placements(has=None):
    """(backend, device) for every backend on every device here, with the table entry ``has`` when given."""
    return [(name, device) for device in DEVICES for name in registry.available_backends(device)
            if has is None or getattr(registry.get_backend(name).passes, has) is not None]


def _dtype(name):
    """float64 where the backend computes in it (the forms then differ by rounding only), else float32."""
    return torch.float64 if torch.float64 in registry.get_backend(name).capabilities.dtypes else torch.float32


def _inputs(mode, dtype, device="cpu", seed=5):
    x, rep, domain, params, stats = cell_inputs(*SIZES.values(), mode, dtype=torch.float64, seed=seed)
    cast = [t.to(device=device, dtype=dtype) for t in (x, rep, *params)]
    return (cast[0], cast[1], domain.to(device), cast[2:],
            [s.to(device=device, dtype=dtype) if s is not None else None for s in stats])


def _generator(batch, device, hidden=11):
    """A folded generator (g, centre, W', c') for I (B, k, k)."""
    gen, rank = torch.Generator().manual_seed(2), SIZES["rank"]
    g = torch.randn(batch, hidden, generator=gen)
    return [t.to(device) for t in (g, g.mean(0), torch.randn(rank * rank, hidden, generator=gen) * hidden ** -0.5,
                                   torch.randn(rank * rank, generator=gen) * 0.1)]


# ----------------------------------------------------------------------------- fused and split forms agree
def _run(form, impl, mode, dtype, device="cpu"):
    """(y, the merged statistics, every gradient) of one form of the cell on ``impl`` (batch statistics)."""
    x, rep, domain, params, stats = _inputs(mode, dtype, device)
    leaves = [t.requires_grad_() for t in (x, rep, *params)]
    plan = make_plan(mode, True, stats[0] is not None, 0.1, 1e-5)
    y, got = form(impl, leaves[0], leaves[1], domain, tuple(leaves[2:]), *stats, plan)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(y)
    return [y, *got, *torch.autograd.grad(y, leaves, upstream)]


def _run_norm(form, impl, mode, dtype, device="cpu"):
    x, _rep, domain, params, stats = _inputs(mode, dtype, device)
    leaves = [t.requires_grad_() for t in (x * 3 + 1, params[6], params[7])]
    plan = make_plan(mode, True, stats[0] is not None, 0.1, 1e-5)
    y, got = form(impl, leaves[0], domain, leaves[1], leaves[2], *stats, plan)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(y)
    return [y, *got, *torch.autograd.grad(y, leaves, upstream)]


def _errors(got, want):
    """Per tensor, max |got - want| / max |want|; a tensor zero by construction (up_bias's gradient under batch
    statistics) is measured against 1e-3 of the run's largest tensor instead of its own rounding noise."""
    floor = 1e-3 * max(w.abs().max().item() for w in want)
    return [(g.double() - w.double()).abs().max().item() / max(w.abs().max().item(), floor) for g, w in zip(got, want)]


def _bounds(run, form, mode, dtype):
    """Per tensor, how far the two forms may differ: float64 rounding, or in float32 the fp32 bound of plain
    PyTorch's error on the same computation (the torch backend against its float64 run)."""
    if dtype == torch.float64:
        return None
    eager = registry.get_backend("torch")
    plain, exact = (run(form, eager, mode, d) for d in (torch.float32, torch.float64))
    return [fp32_bound(error) for error in _errors(plain, exact)]


@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("backend, device", _placements())
@pytest.mark.parametrize("family", ["cell", "norm"])
def test_fused_and_split_forms_agree_in_one_process(backend, device, mode, family):
    impl, dtype = registry.get_backend(backend), _dtype(backend)
    run = _run if family == "cell" else _run_norm
    fused, split = ((compose.hyper_adapter, compose.split_hyper_adapter) if family == "cell" else
                    (compose.domain_norm, compose.split_domain_norm))
    got_fused, got_split = run(fused, impl, mode, dtype, device), run(split, impl, mode, dtype, device)
    bounds = _bounds(run, fused, mode, dtype) or [1e-9] * len(got_fused)
    assert [a.shape for a in got_fused] == [b.shape for b in got_split]
    errors = _errors(got_split, got_fused)
    assert all(error <= bound for error, bound in zip(errors, bounds)), list(zip(errors, bounds))


@pytest.mark.parametrize("backend, device", _placements("generated_forward"))
def test_fused_generated_cell_matches_the_materialised_one(backend, device):
    """The table's level 2 against float64 on I materialised (compose's fallback, as every other backend runs it)."""
    impl = registry.get_backend(backend)
    x, _rep, domain, params, stats = _inputs("paper", torch.float32, device)
    rep = generated.GeneratedRep(*_generator(x.shape[0], device), SIZES["rank"])
    plan = make_plan("paper", True, True, 0.1, 1e-5)
    eager = registry.get_backend("torch")
    fused, _ = compose.generated_cell(impl, x, rep, domain, params, *stats, plan, "ieee")
    plain, _ = compose.generated_cell(eager, x, rep, domain, params, *stats, plan, "ieee")  # I materialised
    exact, _ = compose.hyper_adapter(eager, x.double(), rep.materialise().double(), domain,
                                     [p.double() for p in params], *[s.double() for s in stats], plan)
    assert rel_err(fused, exact) <= fp32_bound(rel_err(plain, exact))


@pytest.mark.parametrize("family, has", [("cell", "cell_forward"), ("norm", "norm_forward"),
                                         ("generated", "generated_forward")])
def test_fused_ops_refuse_a_second_differentiation(family, has):
    """create_graph=True gives the first-order gradients, and differentiating them again is refused by name (the
    fused backward kernels have no derivative), never silently without their second-order terms."""
    placements = _placements(has)
    if not placements:
        pytest.skip(f"no backend here has {has}")
    backend, device = placements[0]
    impl, plan = registry.get_backend(backend), make_plan("paper", True, False, 0.1, 1e-5)
    x, rep, domain, params, _stats = _inputs("paper", torch.float32, device)
    x.requires_grad_()
    call = {"cell": lambda: compose.hyper_adapter(impl, x, rep, domain, params, None, None, plan),
            "norm": lambda: compose.domain_norm(impl, x, domain, params[6], params[7], None, None, plan),
            "generated": lambda: compose.generated_cell(impl, x, generated.GeneratedRep(
                *_generator(x.shape[0], device), SIZES["rank"]), domain, params, None, None, plan, "ieee")}[family]
    (once,) = torch.autograd.grad(call()[0].square().sum(), x)
    (with_graph,) = torch.autograd.grad(call()[0].square().sum(), x, create_graph=True)
    assert torch.equal(once, with_graph.detach())
    with pytest.raises(RuntimeError, match="differentiable once"):
        with_graph.sum().backward()
