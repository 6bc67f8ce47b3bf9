"""The backend contract (hamur_fast/ops/contract.py) and the registry's choice of backend."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hamur_fast as hf
from hamur_fast.ops import compose, contract, grouped_linear, registry
from hamur_fast.ops import eager as torch_backend
from hamur_fast.ops.contract import Backend, Capabilities, GroupStats, make_plan
from helpers import cell_inputs, fp32_bound, rel_err

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode, training, has_running, statistics, update", [
    ("paper", True, True, "batch", True),
    ("paper", False, True, "running", False),
    ("paper", True, False, "batch", False),
    ("paper", False, False, "batch", False),  # no running statistics kept: batch statistics in eval too
    ("released", True, False, "batch", False),
    ("released", False, False, "batch", False),
])
def test_plan_table(mode, training, has_running, statistics, update):
    plan = make_plan(mode, training, has_running, momentum=0.1, eps=1e-5)
    assert (plan.batch_statistics, plan.update_running) == (statistics == "batch", update)
    assert (plan.per_domain, plan.unbiased) == (mode == "paper", mode == "released")


def test_plan_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        make_plan("paperish", True, False, 0.1, 1e-5)


def test_running_update_follows_batchnorm_from_count_mean_m2():
    """Groups with >= 2 rows move like BatchNorm1d (unbiased variance); groups with 0 or 1 rows keep theirs."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 4, generator=g, dtype=torch.float64)
    mean, m2 = rows.mean(0), ((rows - rows.mean(0)) ** 2).sum(0)
    stats = GroupStats(torch.tensor([7.0, 1.0, 0.0], dtype=torch.float64),
                       torch.stack([mean, rows[0], torch.zeros(4, dtype=torch.float64)]),
                       torch.stack([m2, torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]))
    running_mean, running_var = torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
    contract.update_running_stats(running_mean, running_var, stats, momentum=0.1)
    bn = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    bn(rows)
    assert rel_err(running_mean[0], bn.running_mean) < 1e-12 and rel_err(running_var[0], bn.running_var) < 1e-12
    assert torch.equal(running_mean[1:], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(running_var[1:], torch.ones(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend", [b for b in hf.available_backends("cpu")])
@pytest.mark.parametrize("mode", ["paper", "released"])
def test_every_backend_returns_the_batch_statistics(backend, mode):
    """(count, mean, M2) per group, as the float64 reference computes them, for any backend on the CPU."""
    x, rep, domain, params, stats = cell_inputs(29, 13, 5, 7, 3, mode, dtype=torch.float32, seed=5)
    impl = registry.get_backend(backend)
    plan = make_plan(mode, True, stats[0] is not None, 0.1, 1e-5)
    _, got = compose.hyper_adapter(impl, x, rep, domain, params, *stats, plan)
    _, expected = registry.get_backend("reference").hyper_adapter(
        x.double(), rep.double(), domain, [p.double() for p in params], None, None, plan)
    groups = 3 if mode == "paper" else 1
    for name, a, e in zip(GroupStats._fields, got, expected):
        assert a.shape == e.shape == ((groups,) if name == "count" else (groups, 13)), name
        assert not a.requires_grad, name
        assert rel_err(a, e) <= 1e-5, name
    eval_plan = make_plan(mode, False, stats[0] is not None, 0.1, 1e-5)
    _, none = compose.hyper_adapter(impl, x, rep, domain, params, *stats, eval_plan)
    assert (none is None) == (mode == "paper")


# ----------------------------------------------------------------------------- the split passes
def pass_dtype(backend):
    return torch.float64 if torch.float64 in registry.get_backend(backend).capabilities.dtypes else torch.float32


@pytest.mark.parametrize("backend", [b for b in hf.available_backends("cpu")])
@pytest.mark.parametrize("mode", ["paper", "released", "batchnorm"])
def test_split_passes_compose_to_the_normalisation_and_its_gradients(backend, mode):
    """statistics -> normalise and grad_sums -> input_grad, as a data-parallel step runs them on one process
    (nothing in between), against the float64 reference's output and autograd gradients: paper mode (per
    domain, a domain absent and one with 1 row), released mode (one group, unbiased), BatchNorm (one group,
    biased). Odd sizes, fresh random inputs."""
    dtype = pass_dtype(backend)
    g = torch.Generator().manual_seed(11)
    batch, width, domains = 23, 13, 4
    o = torch.randn(batch, width, generator=g, dtype=torch.float64) * 3 + 5
    domain = torch.randint(0, 2, (batch,), generator=g)
    domain[7] = 3  # domain 3: one row; domain 2: none
    per_domain = mode == "paper"
    groups, num_groups = (domain, domains) if per_domain else (None, 1)
    weight = torch.randn(num_groups, width, generator=g, dtype=torch.float64)
    bias = torch.randn(num_groups, width, generator=g, dtype=torch.float64)
    dy = torch.randn(batch, width, generator=g, dtype=torch.float64)
    unbiased = mode == "released"
    passes = registry.get_backend(backend).passes
    eps = 1e-5

    # Expected: the float64 reference (released: the reference's own unbiased whole-batch op; BatchNorm: torch's);
    # the same in fp32 is what plain PyTorch reaches there.
    def reference(precision):
        o_ref, w_ref, b_ref = (t.to(precision, copy=True).requires_grad_() for t in (o, weight, bias))
        if mode == "batchnorm":
            y_ref = torch.nn.functional.batch_norm(o_ref, None, None, w_ref[0], b_ref[0], True, 0.0, eps)
        else:
            plan = make_plan("paper" if per_domain else "released", True, False, 0.1, eps)
            y_ref, _ = registry.get_backend("reference").domain_norm(
                o_ref, domain, w_ref if per_domain else w_ref[0], b_ref if per_domain else b_ref[0], None, None, plan)
        y_ref.backward(dy.to(precision))
        return y_ref.detach(), o_ref.grad, w_ref.grad, b_ref.grad

    exact = reference(torch.float64)

    cast = [t.to(dtype) for t in (o, weight, bias, dy)]
    o_c, w_c, b_c, dy_c = cast
    stats = passes.statistics(o_c, groups, num_groups)
    assert stats.count.shape == (num_groups,) and stats.mean.shape == stats.m2.shape == (num_groups, width)
    count = stats.count.unsqueeze(1)
    rstd = torch.rsqrt(stats.m2 / ((count - 1) if unbiased else count).clamp(min=1) + eps)
    y = passes.normalise(o_c, groups, w_c, b_c, stats.mean, rstd)
    sum_dy, sum_dy_xhat = passes.grad_sums(dy_c, o_c, groups, stats.mean, rstd, num_groups)
    grad_o = passes.input_grad(dy_c, o_c, groups, w_c, stats.mean, rstd, stats.count, sum_dy, sum_dy_xhat, unbiased)
    assert y.dtype == grad_o.dtype == dtype
    plain = reference(torch.float32) if dtype == torch.float32 else None
    for index, (what, got) in enumerate(zip(("y", "grad_o", "grad_weight", "grad_bias"),
                                            (y, grad_o, sum_dy_xhat, sum_dy))):
        tolerance = 1e-10 if plain is None else fp32_bound(rel_err(plain[index], exact[index]))
        assert rel_err(got, exact[index].reshape(got.shape)) <= tolerance, what
    if per_domain:
        assert stats.count.tolist() == [float((domain == d).sum()) for d in range(domains)]
        assert torch.equal(grad_o[7], torch.zeros(width, dtype=dtype))  # a one-row domain: xhat = 0, do = 0


# The cell's split passes against its fused form, through the one composition: tests/test_compose.py.


# ----------------------------------------------------------------------------- capabilities and "auto"
def test_capability_limit_names_the_limit():
    caps = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), max_width=64, max_rank=8)
    cpu = torch.device("cpu")
    assert caps.limit(cpu, torch.float32, 64, 8, 1000) is None
    assert caps.limit(cpu, torch.float32, 65, 8, 5) == "width h=65 (at most 64)"
    assert caps.limit(cpu, torch.float32, 13, 9, 5) == "rank k=9 (at most 8)"
    assert caps.limit(cpu, torch.float64, 13, 5, 5).startswith("dtype torch.float64")
    assert caps.limit(torch.device("meta"), torch.float32).startswith("device meta")


def fake_backend(name, rank, hyper_adapter=torch_backend.hyper_adapter, self_check=True, **limits):
    return Backend(name, hyper_adapter, torch_backend.domain_norm, Capabilities(
        devices=frozenset({"cpu"}), dtypes=contract.FLOAT_DTYPES, auto_rank={"cpu": rank}, self_check=self_check,
        **limits), passes=torch_backend.PASSES, grouped_linear=grouped_linear.torch_form)


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry's backends and self-check verdicts, restored after the test."""
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    monkeypatch.setattr(registry, "_SELF_CHECKS", {})
    return registry


def call_cell(width, rank, backend="auto", dtype=torch.float32):
    x, rep, domain, params, stats = cell_inputs(9, width, rank, 4, 3, "paper", dtype=dtype, seed=2)
    return hf.ops.hyper_adapter(x, rep, domain, *params, *stats, backend=backend)


def test_auto_takes_the_fastest_backend_that_covers_the_call(fresh_registry):
    fresh_registry.register_backend(fake_backend("small_fast", 1, self_check=False, max_width=16))
    fresh_registry.register_backend(fake_backend("large_slower", 2, self_check=False))
    cpu = torch.device("cpu")
    assert fresh_registry.resolve("auto", cpu, torch.float32, 16, 5, 4).name == "small_fast"
    assert fresh_registry.resolve("auto", cpu, torch.float32, 17, 5, 4).name == "large_slower"
    call_cell(17, 5)  # runs


def test_explicit_backend_outside_its_capabilities_raises(fresh_registry):
    fresh_registry.register_backend(fake_backend("small_fast", 1, self_check=False, max_width=16))
    with pytest.raises(ValueError, match=r"backend 'small_fast' does not cover this call: width h=17 \(at most 16\)"):
        call_cell(17, 5, backend="small_fast")


@pytest.mark.skipif("triton" not in hf.available_backends(), reason="triton is not installed")
def test_triton_refuses_float64_and_auto_keeps_float64():
    triton = registry.get_backend("triton")
    assert torch.float64 not in triton.capabilities.dtypes  # its kernels compute in fp32
    for device in sorted(triton.capabilities.devices):
        with pytest.raises(ValueError, match="does not cover this call: dtype torch.float64"):
            registry.resolve("triton", torch.device(device), torch.float64, 13, 5, 4)
    if torch.cuda.is_available():
        chosen = registry.resolve("auto", torch.device("cuda", 0), torch.float64, 13, 5, 4)
        assert torch.float64 in chosen.capabilities.dtypes


def test_auto_skips_a_kernel_backend_whose_self_check_fails_and_warns_once(fresh_registry):
    """A backend that is fast but wrong: its self-check catches it, "auto" falls back, one warning names it."""
    def off_by_a_little(*args):
        y, stats = torch_backend.hyper_adapter(*args)
        return y + 1e-2, stats

    fresh_registry.register_backend(fake_backend("fast_wrong", 1, hyper_adapter=off_by_a_little))
    fresh_registry.register_backend(fake_backend("fast_right", 2))
    with pytest.warns(RuntimeWarning, match=r"backend 'fast_wrong' failed its self-check on cpu .*relative error"):
        chosen = fresh_registry.resolve("auto", torch.device("cpu"), torch.float32, 13, 5, 4)
    assert chosen.name == "fast_right"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per backend, device and dtype: no second warning
        assert fresh_registry.resolve("auto", torch.device("cpu"), torch.float32, 13, 5, 4).name == "fast_right"
    with pytest.warns(RuntimeWarning, match="fast_wrong"):  # another dtype is checked on its own
        fresh_registry.resolve("auto", torch.device("cpu"), torch.float64, 13, 5, 4)


def test_a_kernel_error_in_the_self_check_is_named(fresh_registry, monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA error: too many resources requested for launch")

    fresh_registry.register_backend(fake_backend("broken", 1, hyper_adapter=broken))
    with pytest.warns(RuntimeWarning, match="'broken' failed its self-check.*RuntimeError: CUDA error: too many"):
        assert fresh_registry.resolve("auto", torch.device("cpu")).name != "broken"


@pytest.mark.skipif("cpu" not in hf.available_backends(), reason="the extension was not built")
def test_auto_falls_back_from_the_cpu_backend_when_its_self_check_fails(fresh_registry, monkeypatch):
    from hamur_fast.ops import selfcheck

    real = selfcheck.self_check

    def failing_for_cpu(backend, device, dtype, timing_repeats=0):
        if backend.name == "cpu":
            return selfcheck.CheckResult("cpu", str(device), dtype, False, float("nan"), "RuntimeError: injected", None)
        return real(backend, device, dtype, timing_repeats)

    monkeypatch.setattr(selfcheck, "self_check", failing_for_cpu)
    with pytest.warns(RuntimeWarning, match="backend 'cpu' failed its self-check.*injected"):
        y = call_cell(13, 5)
    assert torch.isfinite(y).all()
    assert fresh_registry.resolve("auto", torch.device("cpu")).name == "torch"


def test_layers_ask_capabilities_not_names():
    """No module outside hamur_fast/ops compares a backend's name with a string."""
    offenders = []
    for path in (ROOT / "hamur_fast").rglob("*.py"):
        if "ops" in path.relative_to(ROOT / "hamur_fast").parts[:1]:
            continue
        text = path.read_text()
        if ".name ==" in text or ".name in" in text or ".name !=" in text:
            offenders.append(str(path))
    assert offenders == []


# ----------------------------------------------------------------------------- a GPU machine's first run
def test_collection_without_the_interpreter_has_no_error():
    """What a first run on a CUDA machine sees: with TRITON_INTERPRET=0, every test module collects."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower().split("\n")[-2], done.stdout[-500:]
