"""Timing shared by the benchmarks: device sync, and providers that take turns call by call."""
from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def take_turns(fns, inputs, device, calls) -> list:
    """Seconds of each call of each function; the functions take turns call by call, so load from
    other processes hits all of them alike. Returns one list of ``calls`` samples per function."""
    samples = [[] for _ in fns]
    for _ in range(calls):
        for fn, times in zip(fns, samples):
            sync(device)
            start = time.perf_counter()
            fn(*inputs)
            sync(device)
            times.append(time.perf_counter() - start)
    return samples
