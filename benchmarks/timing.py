"""Timing shared by the benchmarks: device sync, providers that take turns call by call, and isolation of a
provider that fails (it is reported with its error; the others go on).

Benchmarks switch the domain-id value checks off (``hf.set_value_checks(False)``, as a serving path would), so a
timed call contains no host sync of its own: the only syncs are the clock's, around each call.
"""
from __future__ import annotations

import os
import platform
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def failure(err: BaseException) -> str:
    """One line naming what went wrong, for a FAILED row."""
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0] if message else ''}"


def take_turns(fns, inputs, device, calls) -> list:
    """Seconds of each call of each function; the functions take turns call by call, so load from
    other processes hits all of them alike. Returns, per function, its ``calls`` samples, or the error
    text (a str) of the call that raised: that function then leaves the turns, the others go on."""
    results = [[] for _ in fns]
    for _ in range(calls):
        for i, fn in enumerate(fns):
            if isinstance(results[i], str):
                continue
            try:
                sync(device)
                start = time.perf_counter()
                fn(*inputs)
                sync(device)
            except Exception as err:  # noqa: BLE001 - one provider failing must not lose the others' table
                results[i] = failure(err)
                continue
            results[i].append(time.perf_counter() - start)
    return results


def machine(threads: int) -> str:
    """A table's header: the CPU, torch, the thread count and the load when it was measured."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu_model()}, torch {torch.__version__}, threads {threads}, load {load}"


def cpu_model() -> str:
    """The CPU's model name (the machine a table was measured on)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
