"""Every op in torch.ops.hamur_fast checks its arguments before any kernel: fuzzed mismatches give a clean error.

tests/op_fuzz_worker.py calls each op (C++ CPU ops, Triton launchers under the interpreter, paper and released
mode) with valid arguments, then with one tensor argument broken at a time: one size changed, an axis added,
another dtype, a sparse layout, another device (with CUDA). It runs in a subprocess, so a crash is caught and
named. Required: a valid call runs; a changed size that another argument shares, an integer/bool dtype for a
float table or a non-int64 id tensor, a sparse tensor and another device raise (the compiled ops also refuse a
float dtype other than the main input's); nothing crashes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hamur_fast  # noqa: F401  (registers every op)
from hamur_fast.ops import registry

WORKER = Path(__file__).with_name("op_fuzz_worker.py")


def namespace_ops() -> set:
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("hamur_fast::")}


def run_worker(group: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parent), *sys.path]))
    done = subprocess.run([sys.executable, str(WORKER), group], capture_output=True, text=True, timeout=900, env=env)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines or not lines[-1].get("done"):
        last = next((line for line in reversed(lines) if line.get("started")), None)
        pytest.fail(f"the {group} op worker died (exit {done.returncode}) during {last}: {done.stderr[-2000:]}")
    return [line for line in lines if "raised" in line]


def must_raise(result: dict, exact_dtype: bool) -> bool:
    change = result["change"]
    if change.startswith("size"):
        return result["shared"]
    if change.startswith("dtype"):  # ids stay int64; a Triton op's float tables may differ in float dtype
        if change.startswith("dtype torch.int64") or not change.endswith(("float64", "float32")):
            return True
        return exact_dtype and result["shared"]
    return not change.startswith("extra axis")


@pytest.mark.parametrize("group", ["compiled", "triton"])
def test_every_op_refuses_broken_arguments_cleanly(group):
    if group == "triton" and "triton" not in registry.available_backends():
        pytest.skip("the triton backend is not available here")
    if group == "compiled" and "cpu" not in registry.available_backends():
        pytest.skip("the compiled extension is not built")
    results = run_worker(group)
    valid = [r for r in results if r["change"] is None]
    assert valid and all(r["raised"] is None for r in valid), [r for r in valid if r["raised"]]
    covered = {r["case"].split("[")[0] for r in valid}
    expected = {name for name in namespace_ops() if name.startswith(group)}
    if group == "triton":  # the composed ops, on the Triton backend's table (on "cpu" they run the C++ ops above)
        expected |= {name for name in namespace_ops() if not name.startswith(("compiled", "triton"))}
    assert covered == expected, "an op without a fuzz case"
    accepted = [r for r in results if r["change"] and r["raised"] is None and must_raise(r, group == "compiled")]
    assert not accepted, accepted[:10]
    broken = [r for r in results if r["change"]]
    assert len(broken) > 20 * len(valid)  # every tensor argument of every op was broken several ways
