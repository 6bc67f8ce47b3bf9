"""The benchmarks' own plumbing: gpu_check.sh's step limits fit each device call, and a failing provider is
reported as FAILED while the others are still measured."""
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_layers  # noqa: E402  (after the path)
import timing  # noqa: E402

DEVICE_CALL_BUDGET_S = 360  # ONE device call of at most 6 minutes: a rerun still fits a 15-minute lease


def main_body():
    text = (BENCHMARKS / "gpu_check.sh").read_text()
    return re.search(r"^main\(\) {\n(.*?)^}", text, re.S | re.M).group(1)


def test_gpu_check_is_one_call_whose_step_limits_fit_its_budget():
    body = main_body()
    budget = int(re.search(r"BUDGET_S=(\d+)", body).group(1))
    limits = {name: int(limit) for name, limit in re.findall(r"\bstep (\w+) (\d+) ", body)}
    assert budget <= DEVICE_CALL_BUDGET_S
    assert len(limits) >= 8 and sum(limits.values()) <= budget, (limits, sum(limits.values()), budget)
    for needed in ("extension", "correctness", "bench_layers", "bench_train", "bench_infer", "bench_domains", "goals"):
        assert needed in limits, f"gpu_check.sh has no {needed} step"


def test_gpu_check_correctness_step_keeps_outcomes_of_a_cut_run():
    body = main_body()
    assert "-rA" in body and "--junitxml" in body


def test_take_turns_drops_a_failing_function_and_times_the_others():
    calls = []

    def fine():
        calls.append("fine")

    def broken():
        raise RuntimeError("out of resources: shared memory\nsecond line")

    fine_times, error = timing.take_turns([fine, broken], (), torch.device("cpu"), 3)
    assert len(fine_times) == 3 and calls == ["fine"] * 3
    assert error == "RuntimeError: out of resources: shared memory"


def test_bench_layers_prints_a_failing_provider_and_measures_the_rest(monkeypatch, capsys):
    def broken(x, rep, domain, params, stats):
        raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")

    real = bench_layers.providers
    monkeypatch.setattr(bench_layers, "providers",
                        lambda mode, compile_too, device: real(mode, False, device) + [("broken", broken)])
    args = SimpleNamespace(width=13, rank=5, bottleneck=7, domains=3, repeats=2, no_compile=True)
    rows = bench_layers.bench(32, args, torch.device("cpu"))
    bench_layers.print_table(32, rows, args, copy_gbs=10.0)
    out = capsys.readouterr().out
    assert re.search(r"paper\s+broken\s+FAILED RuntimeError: triton.runtime.errors.OutOfResources", out)
    assert re.search(r"paper\s+torch\s+[\d.]+", out) and re.search(r"released\s+released einsum\s+[\d.]+", out)
