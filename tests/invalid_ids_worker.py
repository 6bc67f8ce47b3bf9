"""Worker of tests/test_backends.py (test_out_of_range_ids_are_confined): out-of-range domain ids reaching one
backend with the Python-side id check off or skipped, for every op family.

``hf.set_value_checks(False)`` (serving) and torch.compile (which skips the check while tracing) let an id
outside [0, D) reach the backend. Whatever the backend, that must give an error or a defined result: never a
crash, an out-of-bounds read or write, or a wrong value in another row. Run as a script (``python
invalid_ids_worker.py BACKEND DEVICE``) it checks every family on that backend and prints one JSON line per
family, so that a segfault or heap corruption fails that backend's tests instead of killing the test session.

The defined results (D = 3):
- cell, norm: in paper mode the bad row is NaN; the other rows' outputs and input gradients (upstream gradient
  on the other rows only), every parameter gradient and the running statistics equal the same backend's on the
  batch without the bad row. In released mode the cell never reads the ids: the whole result equals that of the
  batch with the bad id replaced by a valid one.
- generated (level 2): the same, except that in paper-mode training the generator's batch statistics include the
  bad row's g, so the valid result is the batch with that row in a domain D of its own (one more domain's
  parameters): the other rows' outputs and input x gradients, domains 0..D-1's parameter gradients and running
  statistics, and the generator's running statistics.
- grouped linear: the bad row's output and input gradient are 0; the other rows and every weight and bias
  gradient equal the float64 product over the other rows.
"""
from __future__ import annotations

import os
import sys

import json
import traceback
import torch

BAD_IDS = (-1, 3, 10**6)  # D = 3
BAD_ROW = 4
BATCH, WIDTH, RANK, BOTTLENECK, DOMAINS = 20, 13, 5, 7, 3


# --------------------------------------------------------------------------------------------------- child
def _run_cell(backend, device, mode, training, inputs, domain, compiled, rows=None):
    """y, input and parameter gradients and running statistics of one cell call (rows: a subset), on the CPU."""
    import hamur_fast as hf

    x, rep, _, params, stats = inputs
    pick = (lambda t: t[rows]) if rows is not None else (lambda t: t)
    leaves = [t.to(device).detach().clone().requires_grad_() for t in (pick(x), pick(rep), *params)]
    stats = [s.to(device).clone() if s is not None else None for s in stats]

    def cell(x, rep, domain, *rest):
        return hf.ops.hyper_adapter(x, rep, domain, *rest, mode=mode, training=training, backend=backend,
                                    num_domains=DOMAINS)

    fn = torch.compile(cell, backend="inductor" if backend == "torch" else "aot_eager", dynamic=False) \
        if compiled else cell
    y = fn(leaves[0], leaves[1], pick(domain).to(device), *leaves[2:], *stats)
    upstream = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(7))
    upstream = upstream[rows] if rows is not None else upstream
    if rows is None and mode == "paper":
        upstream[BAD_ROW] = 0  # the bad row's output is NaN: only the other rows feed the loss
    y.backward(upstream.to(device))
    return y.detach().cpu(), [leaf.grad.cpu() for leaf in leaves], [s.cpu() if s is not None else None
                                                                      for s in stats]


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")


def check_cell(backend: str, device: str, report) -> None:
    import hamur_fast as hf
    from helpers import cell_inputs

    keep = torch.arange(BATCH) != BAD_ROW
    for mode in ("paper", "released"):
        inputs = cell_inputs(BATCH, WIDTH, RANK, BOTTLENECK, DOMAINS, mode, dtype=torch.float32, seed=5,
                             edge_domains=False)
        base_domain = inputs[2]
        for training in (True, False):
            if mode == "paper":  # the valid result: the same batch without the bad row
                hf.set_value_checks(True)
                ref_y, ref_grads, ref_stats = _run_cell(backend, device, mode, training, inputs, base_domain, False,
                                                        rows=keep)
            for compiled in ((False, True) if mode == "paper" else (False,)):  # released: ids never read
                for bad in BAD_IDS:
                    what = f"{backend} {mode} training={training} compiled={compiled} id={bad}"
                    domain = base_domain.clone()
                    domain[BAD_ROW] = bad
                    hf.set_value_checks(compiled)  # compiled: the check is skipped while tracing anyway
                    try:
                        y, grads, stats = _run_cell(backend, device, mode, training, inputs, domain, compiled)
                    except (ValueError, RuntimeError, IndexError) as err:
                        report(f"{what}: error: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                        continue
                    if mode == "released":  # ids unused: the result of any valid id in that row
                        hf.set_value_checks(True)
                        domain[BAD_ROW] = 0
                        ref_y, ref_grads, ref_stats = _run_cell(backend, device, mode, training, inputs, domain, False)
                        _close(y, ref_y, what + " y")
                        for i, (g, r) in enumerate(zip(grads, ref_grads)):
                            _close(g, r, f"{what} grad {i}")
                        report(f"{what}: ids unused, result as with a valid id")
                        continue
                    assert torch.isnan(y[BAD_ROW]).all(), f"{what}: bad row {y[BAD_ROW]}"
                    _close(y[keep], ref_y, what + " y")
                    _close(grads[0][keep], ref_grads[0], what + " grad x")
                    _close(grads[1][keep], ref_grads[1], what + " grad rep")
                    for i, (g, r) in enumerate(zip(grads[2:], ref_grads[2:])):
                        _close(g, r, f"{what} grad param {i}")
                    for s, r in zip(stats, ref_stats):
                        _close(s, r, what + " running stats")
                    report(f"{what}: NaN row, other rows exact")


def check_norm(backend: str, device: str, report) -> None:
    """DomainNorm alone (paper mode): the bad row NaN, the other rows and the statistics untouched."""
    import hamur_fast as hf

    g = torch.Generator().manual_seed(11)
    o = torch.randn(BATCH, WIDTH, generator=g).to(device)
    weight = (1 + 0.1 * torch.randn(DOMAINS, WIDTH, generator=g)).to(device)
    bias = (0.1 * torch.randn(DOMAINS, WIDTH, generator=g)).to(device)
    keep = (torch.arange(BATCH) != BAD_ROW).to(device)
    for training in (True, False):
        stats = [(0.1 * torch.randn(DOMAINS, WIDTH, generator=g)).to(device),
                 (0.5 + torch.rand(DOMAINS, WIDTH, generator=g)).to(device)]
        hf.set_value_checks(True)
        base = torch.randint(0, DOMAINS, (BATCH,), generator=g).to(device)
        ref_stats = [s.clone() for s in stats]
        ref = hf.ops.domain_norm(o[keep], base[keep], weight, bias, *ref_stats, training=training, backend=backend)
        for bad in BAD_IDS:
            domain = base.clone()
            domain[BAD_ROW] = bad
            run_stats = [s.clone() for s in stats]
            hf.set_value_checks(False)
            what = f"{backend} domain_norm training={training} id={bad}"
            try:
                y = hf.ops.domain_norm(o, domain, weight, bias, *run_stats, training=training, backend=backend)
            except (ValueError, RuntimeError, IndexError) as err:
                report(f"{what}: error: {type(err).__name__}")
                continue
            assert torch.isnan(y[BAD_ROW]).all(), what
            _close(y[keep].cpu(), ref.cpu(), what)
            for s, r in zip(run_stats, ref_stats):
                _close(s.cpu(), r.cpu(), what + " running stats")
            report(f"{what}: NaN row, other rows exact")



def _run_generated(backend, device, mode, training, inputs, domain, rows=None, own_domain=False):
    """Like _run_cell, for level 2: y, the gradients of (x, g, generator, cell params), the generator's and the
    cell's running statistics. own_domain: the cell gets one more domain (a copy of domain 0's parameters)."""
    import hamur_fast as hf

    x, g, _, gen, gen_stats, params, stats = inputs
    pick = (lambda t: t[rows]) if rows is not None else (lambda t: t)
    leaves = [t.to(device).float().detach().clone().requires_grad_() for t in (pick(x), pick(g), *gen, *params)]
    gen_stats = [s.to(device).float().clone() for s in gen_stats]
    stats = [s.to(device).float().clone() if s is not None else None for s in stats]
    cell_params = leaves[6:]
    if own_domain:
        cell_params = [torch.cat([p, p[:1].detach()]) for p in cell_params]
        stats = [torch.cat([s, s[:1]]) for s in stats]
    y = hf.ops.hyper_adapter_generated(leaves[0], leaves[1], pick(domain).to(device), *leaves[2:6], *gen_stats,
                                       *cell_params, *stats, mode=mode, training=training, backend=backend,
                                       num_domains=DOMAINS + own_domain)
    upstream = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(7))
    upstream = upstream[rows] if rows is not None else upstream
    if rows is None and mode == "paper":
        upstream[BAD_ROW] = 0  # the bad row's output is NaN: only the other rows feed the loss
    y.backward(upstream.to(device))
    stats = [s[:DOMAINS].cpu() for s in stats if s is not None]
    return y.detach().cpu(), [leaf.grad.cpu() for leaf in leaves], [s.cpu() for s in gen_stats] + stats


def check_generated(backend: str, device: str, report) -> None:
    import hamur_fast as hf
    from helpers import GENERATED_NAMES, generated_inputs

    keep = torch.arange(BATCH) != BAD_ROW
    for mode in ("paper", "released"):
        inputs = generated_inputs(BATCH, WIDTH, RANK, BOTTLENECK, DOMAINS, 9, mode, seed=6)
        base = inputs[2]
        for training in (True, False):
            for bad in BAD_IDS:
                what = f"{backend} level 2 {mode} training={training} id={bad}"
                domain = base.clone()
                domain[BAD_ROW] = bad
                hf.set_value_checks(False)
                try:
                    y, grads, stats = _run_generated(backend, device, mode, training, inputs, domain)
                except (ValueError, RuntimeError, IndexError) as err:
                    report(f"{what}: error: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                    continue
                hf.set_value_checks(True)
                if mode == "released":  # ids unused: the result of any valid id in that row
                    domain[BAD_ROW] = 0
                    ref_y, ref_grads, ref_stats = _run_generated(backend, device, mode, training, inputs, domain)
                    compared = GENERATED_NAMES
                elif training:  # the generator's statistics see every row: the bad row in a domain of its own
                    domain[BAD_ROW] = DOMAINS
                    ref_y, ref_grads, ref_stats = _run_generated(backend, device, mode, training, inputs, domain,
                                                                 own_domain=True)
                    compared = ["x"] + GENERATED_NAMES[6:]
                else:  # eval: running statistics everywhere, each row on its own
                    ref_y, ref_grads, ref_stats = _run_generated(backend, device, mode, training, inputs, base,
                                                                 rows=keep)
                    compared = ["x", "g"] + GENERATED_NAMES[6:]
                rows = slice(None) if mode == "released" else keep
                if mode == "paper":
                    assert torch.isnan(y[BAD_ROW]).all(), f"{what}: bad row {y[BAD_ROW]}"
                _close(y[rows], ref_y[rows] if mode == "paper" and training else ref_y, what + " y")
                for name, got, want in zip(GENERATED_NAMES, grads, ref_grads):
                    if name in compared:
                        row_wise = name in ("x", "g") and mode == "paper"
                        _close(got[keep] if row_wise else got,
                               want[keep] if row_wise and training else want, f"{what} grad {name}")
                for i, (got, want) in enumerate(zip(stats, ref_stats)):
                    _close(got, want, f"{what} running statistic {i}")
                report(f"{what}: {'ids unused' if mode == 'released' else 'NaN row, other rows exact'}")


def check_grouped_linear(backend: str, device: str, report) -> None:
    import hamur_fast as hf
    from hamur_fast.ops import grouped_linear as gl
    from helpers import grouped_linear_inputs

    x, base, weight, bias, upstream = (t.float() for t in grouped_linear_inputs(BATCH, 8, 6, DOMAINS, "random",
                                                                               seed=4))
    base = base.long()
    keep = torch.arange(BATCH) != BAD_ROW
    for bad in BAD_IDS:
        what = f"{backend} grouped linear id={bad}"
        domain = base.clone()
        domain[BAD_ROW] = bad
        leaves = [t.to(device).clone().requires_grad_() for t in (x, weight, bias)]
        hf.set_value_checks(False)
        try:
            out = gl.grouped_linear(leaves[0], domain.to(device), leaves[1], leaves[2], backend=backend)
            out.backward(upstream.to(device))
        except (ValueError, RuntimeError, IndexError) as err:
            report(f"{what}: error: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
            continue
        out, (dx, dweight, dbias) = out.detach().cpu(), (leaf.grad.cpu() for leaf in leaves)
        assert out[BAD_ROW].abs().max() == 0 and dx[BAD_ROW].abs().max() == 0, what
        good = [x[keep].double(), base[keep], weight.double(), bias.double()]
        _close(out[keep], gl.reference(*good).float(), what + " out")
        _close(dx[keep], (upstream[keep, None].double() @ weight.double()[base[keep]].transpose(1, 2)).squeeze(1)
               .float(), what + " dx")
        own = [keep & (domain == d) for d in range(DOMAINS)]
        _close(dweight, torch.stack([x[rows].double().T @ upstream[rows].double() for rows in own]).float(),
               what + " dweight")
        _close(dbias, torch.stack([upstream[rows].double().sum(0) for rows in own]).float(), what + " dbias")
        report(f"{what}: zero row, other rows exact")


FAMILIES = {"cell": check_cell, "norm": check_norm, "generated": check_generated,
            "grouped_linear": check_grouped_linear}

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    for family, check in FAMILIES.items():
        cases, error = [], None
        try:
            check(sys.argv[1], sys.argv[2], cases.append)
        except Exception:  # noqa: BLE001  (reported to the test, which fails with it)
            error = traceback.format_exc()[-3000:]
        print(json.dumps({"family": family, "cases": cases, "error": error}), flush=True)
