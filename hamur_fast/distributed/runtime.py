"""The process group of a data-parallel run: started from torchrun's environment, gloo on CPU, NCCL on GPU.

``hamur-fast train --nproc N`` re-executes itself under ``torch.distributed.run`` (torchrun) with N
processes on this machine; several machines use torchrun directly (README, "Scale out"). Each process
then finds RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in its environment.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size``, its device, and two process groups: ``group``
    for gradients and results, ``stats_group`` for the batch statistics of the normalisations (their own
    group, so their collectives never interleave with DDP's gradient buckets)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object = None
    stats_group: object = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def start(device: str | torch.device = "auto") -> DistributedContext:
    """Join the process group torchrun described (once per process) and return this rank's context; a plain
    single-process context when not launched by torchrun. ``device`` "auto" is ``cuda:LOCAL_RANK`` when CUDA
    is available, else the CPU."""
    if not launched_by_torchrun():
        resolved = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                ("cpu" if device == "auto" else device))
        return DistributedContext(device=resolved)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = torch.device(device) if device != "auto" else (
        torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu"))
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, dist.group.WORLD,
                              dist.new_group(backend=backend))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_with_torchrun(nproc: int, argv: list) -> int:
    """Run ``hamur-fast <argv>`` as ``nproc`` processes on this machine under torchrun; its exit status."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "hamur_fast.cli", *_without_nproc(argv)]
    launcher = subprocess.Popen(command)
    # SIGTERM (or SIGHUP) ending this command must end the run: torchrun passes it on to its workers and
    # stops them, then we return. (Ctrl-C reaches every process of the terminal's group by itself.)
    forwarded = (signal.SIGTERM, signal.SIGHUP)

    def forward(signum, _frame):
        launcher.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in forwarded}
    try:
        return launcher.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _without_nproc(argv: list) -> list:
    """The command line minus ``--nproc N`` (torchrun would read it as its own abbreviated option)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept
