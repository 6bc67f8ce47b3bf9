"""Out-of-range domain ids on every backend, with the Python-side id check off or skipped.

``hf.set_value_checks(False)`` (serving) and torch.compile (which skips the check while tracing) let an id
outside [0, D) reach the backend. Whatever the backend, that must give an error or NaN in that row only:
never a crash, an out-of-bounds read or write, or a wrong value in another row. Each backend runs in its
own subprocess (this file run as a script), so that a segfault or heap corruption fails its test instead of
killing the test session.

What is compared: the outputs of the other rows, every parameter gradient and the other rows' input
gradients (upstream gradient on the other rows only), and the running statistics, against the same backend
on the batch without the bad row (ids checked). In released mode the cell never reads the ids, so the whole
result must equal that of the batch with the bad id replaced by a valid one (or be an error).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

BAD_IDS = (-1, 3, 10**6)  # D = 3
BAD_ROW = 4
BATCH, WIDTH, RANK, BOTTLENECK, DOMAINS = 20, 13, 5, 7, 3


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cases():
    """(backend, device) for every backend that takes tensors on a device here (triton on the CPU: under
    the interpreter)."""
    import hamur_fast as hf

    return [(name, device) for device in DEVICES for name in hf.available_backends(device)]


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


def check_backend(backend: str, device: str) -> None:
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
                        print(f"{what}: error: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                        continue
                    if mode == "released":  # ids unused: the result of any valid id in that row
                        hf.set_value_checks(True)
                        domain[BAD_ROW] = 0
                        ref_y, ref_grads, ref_stats = _run_cell(backend, device, mode, training, inputs, domain, False)
                        _close(y, ref_y, what + " y")
                        for i, (g, r) in enumerate(zip(grads, ref_grads)):
                            _close(g, r, f"{what} grad {i}")
                        print(f"{what}: ids unused, result as with a valid id")
                        continue
                    assert torch.isnan(y[BAD_ROW]).all(), f"{what}: bad row {y[BAD_ROW]}"
                    _close(y[keep], ref_y, what + " y")
                    _close(grads[0][keep], ref_grads[0], what + " grad x")
                    _close(grads[1][keep], ref_grads[1], what + " grad rep")
                    for i, (g, r) in enumerate(zip(grads[2:], ref_grads[2:])):
                        _close(g, r, f"{what} grad param {i}")
                    for s, r in zip(stats, ref_stats):
                        _close(s, r, what + " running stats")
                    print(f"{what}: NaN row, other rows exact")
        if mode == "paper":
            check_domain_norm(backend, device)


def check_domain_norm(backend: str, device: str) -> None:
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
                print(f"{what}: error: {type(err).__name__}")
                continue
            assert torch.isnan(y[BAD_ROW]).all(), what
            _close(y[keep].cpu(), ref.cpu(), what)
            for s, r in zip(run_stats, ref_stats):
                _close(s.cpu(), r.cpu(), what + " running stats")
            print(f"{what}: NaN row, other rows exact")


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend, device", _cases())
def test_out_of_range_ids_are_confined_to_their_row(backend, device):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, backend, device], capture_output=True, text=True, env=env,
                          timeout=600)
    report = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, f"backend {backend!r} on {device} exited with status {done.returncode}:\n{report}"
    assert report.count("\n") >= 2 * 2 * 2 * len(BAD_IDS), report  # every case reported


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    check_backend(sys.argv[1], sys.argv[2])
