"""Whole training step (forward, BCE, backward, Adam): the released model vs ours, side by side.

    python benchmarks/bench_train.py                      # GPU: B = 4096 and 40960; CPU: B = 2048
    python benchmarks/bench_train.py --batch 2048 --repeats 5 --no-compile

MovieLens MLP configuration (F=113, towers 256-128, hyper [64], k=35, D=3, Adam lr 1e-3, weight
decay 1e-5). Every provider trains its own copy on the same batch in this one run; the table gives
the median step time (the providers take turns step by step, so a busy machine slows all alike),
samples per second, the peak memory (CUDA: the allocator's peak during the warm-up steps above what
the model held before them, so a CUDA graph's memory pool counts; CPU: bytes of live tensors one
step created) and the speed-up over the released code run eagerly. A provider that fails is listed
with its error, and the others still run.
Providers:
- "released eager": hamur_fast.compat.ReleasedMLP, the released model loop (hyper-network and
  tower d on the whole batch for each domain d, the einsum cell, then a per-row select), BCE on
  probabilities as released;
- "released compile": the same model under torch.compile(mode="reduce-overhead") (on CPU this is
  the default inductor compile: CUDA graphs exist on CUDA only);
- "ours <mode> eager": hf.models.HAMUR, backend "auto" (and each kernel backend that runs on the
  device), BCE on logits, fused Adam (as hamur_fast.train.Trainer makes it);
- "ours <mode> graph": the same under hamur_fast.train.captured_step.CapturedTrainStep (CUDA only:
  forward, backward and the capturable Adam step replayed as one CUDA graph).
On the CPU the ratios depend on the allocator: under glibc's defaults every step page-faults its fresh
multi-MiB tensors in again, which costs the released eager step far more than ours; --keep-freed-memory
measures without that (the header's "malloc:" says which).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import platform
import statistics

import torch
import torch.nn.functional as F

import hamur_fast as hf
from bench_layers import LiveTensorPeak
from timing import failure, sync, take_turns
from hamur_fast.compat import ReleasedMLP
from hamur_fast.ops.registry import auto_backends, resolve
from hamur_fast.train.captured_step import CapturedTrainStep, bce_step

INPUT_DIM, DOMAINS = 113, 3
SIZES = dict(dims=[256, 128], hyper_dims=[64], rank=35)
LR, WEIGHT_DECAY = 1e-3, 1e-5


# ----------------------------------------------------------------------------- providers
def released_step(device, compiled):
    torch.manual_seed(0)
    model = ReleasedMLP(INPUT_DIM, DOMAINS, SIZES["dims"], SIZES["hyper_dims"], SIZES["rank"]).to(device)
    forward = torch.compile(model, mode="reduce-overhead") if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(e, domain, label):
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy(forward(e, domain), label)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def ours_model(mode, backend, device):
    torch.manual_seed(0)
    return hf.models.HAMUR(INPUT_DIM, DOMAINS, backbone="mlp", mode=mode, backend=backend, **SIZES).to(device)


def ours_eager_step(mode, backend, device):
    model = ours_model(mode, backend, device)
    # fused, as hamur_fast.train.Trainer makes it (one kernel over every parameter; the for-loop Adam the
    # released code runs is 3x slower over this model's 26 small tensors on the CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    return lambda e, domain, label: bce_step(model, optimizer, e, domain, label)


def ours_graph_step(mode, device, batch):
    model = ours_model(mode, "auto", device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, capturable=True)
    return CapturedTrainStep(model, optimizer, batch, device).step


def eager_backends(device):
    """"auto"'s pick first, then every other backend "auto" may pick on ``device``, then "torch"."""
    auto = resolve("auto", device).name
    names = [auto] + [name for name in auto_backends(device) if name not in (auto, "torch")]
    return names + (["torch"] if auto != "torch" else [])


def providers(device, batch, compile_too):
    """(label, step factory) pairs; factories build a fresh model and optimizer when called."""
    rows = [("released eager", lambda: released_step(device, False))]
    if compile_too:
        rows.append(("released compile", lambda: released_step(device, True)))
    auto = resolve("auto", device).name
    for mode in ("released", "paper"):
        for name in eager_backends(device):
            rows.append((f"ours {mode} eager ({name})", lambda mode=mode, name=name: ours_eager_step(mode, name, device)))
        if device.type == "cuda":
            rows.append((f"ours {mode} graph ({auto})", lambda mode=mode: ours_graph_step(mode, device, batch)))
    return rows


# ----------------------------------------------------------------------------- measuring
def make_batch(batch, device):
    g = torch.Generator().manual_seed(1)
    e = torch.randn(batch, INPUT_DIM, generator=g)
    domain = torch.randint(0, DOMAINS, (batch,), generator=g)
    label = torch.randint(0, 2, (batch,), generator=g).float()
    return e.to(device), domain.to(device), label.to(device)


def time_released_step(batch, repeats, settings, switch, clock):
    """{setting: median ms by ``clock``} of ours' released training step on the CPU (backend "auto", ``batch``
    rows) under each of ``settings``: ``switch(setting)`` before each step, the settings taking turns step by step
    in this process (2 warm-up turns), so that load from other processes hits them alike."""
    device = torch.device("cpu")
    step = ours_eager_step("released", "auto", device)
    inputs = make_batch(batch, device)
    samples = {setting: [] for setting in settings}
    for turn in range(repeats + 2):
        for setting in settings:
            switch(setting)
            start = clock()
            step(*inputs)
            if turn >= 2:
                samples[setting].append(clock() - start)
    return {setting: 1e3 * statistics.median(times) for setting, times in samples.items()}


def warm_up(step, inputs, device, warmup):
    """Run the untimed first steps (compilation, CUDA-graph warm-up and capture happen here).

    Returns, on CUDA, the peak MiB allocated above what was allocated before them: activations,
    gradients, optimizer state and, for a CUDA graph, its private memory pool (a replay allocates
    nothing, so a single replayed step would hide it). None on the CPU.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(warmup):
        step(*inputs)
    if device.type != "cuda":
        return None
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def time_all_ms(steps, inputs, device, repeats):
    """Median ms of each step (or its error text); the steps take turns, so load from other processes hits
    all alike."""
    return [samples if isinstance(samples, str) else statistics.median(samples) * 1e3
            for samples in take_turns(steps, inputs, device, repeats)]


def cpu_peak_mib(step, inputs, compiled):
    """Peak bytes of live tensors one step creates (CPU stand-in for the allocator's peak)."""
    if compiled:
        return float("nan")  # a dispatch mode cannot see inside a compiled graph on the CPU
    with LiveTensorPeak() as tracker:
        step(*inputs)
    return tracker.peak / 2**20


def bench(batch, args, device):
    """Table rows (label, ms, samples/s, peak MiB) and the providers that failed (label, error)."""
    inputs = make_batch(batch, device)
    ready, failed = [], []
    for label, factory in providers(device, batch, not args.no_compile):
        try:  # one provider failing (e.g. a kernel that cannot be captured) must not hide the others
            step = factory()
            ready.append((label, step, warm_up(step, inputs, device, args.warmup)))
        except Exception as err:  # noqa: BLE001 - reported in the table, with its type and message
            failed.append((label, failure(err)))
    times = time_all_ms([step for _, step, _ in ready], inputs, device, args.repeats)
    rows = []
    for (label, step, cuda_peak), ms in zip(ready, times):
        if isinstance(ms, str):
            failed.append((label, ms))
            continue
        try:
            peak = cuda_peak if cuda_peak is not None else cpu_peak_mib(step, inputs, "compile" in label)
        except Exception as err:  # noqa: BLE001
            failed.append((label, failure(err)))
            continue
        rows.append((label, ms, batch / ms * 1e3, peak))
    return rows, failed


def print_table(batch, rows, failed):
    base = next((ms for label, ms, _, _ in rows if label == "released eager"), float("nan"))
    print(f"\nB={batch}: one training step, median ms; speed-up vs released eager")
    print(f"{'provider':32} {'ms':>10} {'samples/s':>12} {'peak MiB':>10} {'speed-up':>9}")
    for label, ms, rate, mib in rows:
        print(f"{label:32} {ms:10.2f} {rate:12.0f} {mib:10.1f} {base / ms:8.1f}x")
    for label, error in failed:
        print(f"{label:32} FAILED {error}")


def report_goals(tables, device):
    """The issue's goals, checked on the tables of this run (reported; they fail nothing)."""
    print("\ngoals (best row of each mode of ours; one card or this CPU, one run)")
    for batch, rows in tables.items():
        by_label = {label: (ms, mib) for label, ms, _, mib in rows}
        eager, compiled = by_label.get("released eager"), by_label.get("released compile")
        for mode in ("paper", "released"):
            ours = [(ms, mib, label) for label, (ms, mib) in by_label.items() if label.startswith(f"ours {mode}")]
            if not ours or eager is None:
                continue
            ms, mib, label = min(ours)
            checks = []
            if device.type == "cpu" and batch == 2048:
                checks.append(("step >= 20x faster than released eager", eager[0] / ms, 20))
            if device.type == "cuda" and batch == 4096:
                checks.append(("step >= 15x faster than released eager", eager[0] / ms, 15))
                if compiled is not None:
                    checks.append(("step >= 4x faster than released compile", compiled[0] / ms, 4))
            if device.type == "cuda" and batch == 40960:
                checks.append(("peak memory <= 1/5 of released eager", eager[1] / mib, 5))
            for what, ratio, target in checks:
                print(f"  B={batch} {label:30} {what:42} {ratio:6.1f}x  {'met' if ratio >= target else 'NOT met'}")


def keep_freed_memory() -> str:
    """Stop glibc returning freed memory to the kernel (whose pages then fault again on the next step).

    Under glibc's defaults a freed buffer of a few MiB is unmapped or trimmed, so the next step's tensor of that
    size page-faults in again; on a VM each fault is costly, and the released eager step spends a good part of
    its time there (benchmarks/RESULTS.md). The same settings as MALLOC_MMAP_THRESHOLD_=67108864
    MALLOC_TRIM_THRESHOLD_=268435456 in the environment."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not (libc.mallopt(m_mmap_threshold, 64 << 20) and libc.mallopt(m_trim_threshold, 256 << 20)):
        raise SystemExit("--keep-freed-memory: mallopt refused (not glibc?)")
    return "freed memory kept (mallopt: mmap threshold 64 MiB, trim threshold 256 MiB)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier numbers on busy cores)")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="batch sizes (default: 4096 40960 on CUDA, 2048 on CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 4: graph capture)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc keeps freed buffers instead of handing them back to the kernel (as "
                             "tcmalloc or jemalloc do): no page faults on every fresh multi-MiB tensor")
    args = parser.parse_args()
    malloc = keep_freed_memory() if args.keep_freed_memory else "glibc defaults"
    if args.threads:
        torch.set_num_threads(args.threads)
    hf.set_value_checks(False)  # as on a serving path: no domain-id read-back (a host sync) inside a timed step
    device = torch.device(args.device)
    if args.warmup < 4 and device.type == "cuda":
        parser.error("--warmup must be >= 4 on CUDA: CapturedTrainStep captures on its 4th step")
    batches = args.batch or ([4096, 40960] if device.type == "cuda" else [2048])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_train: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"F={INPUT_DIM} towers {SIZES['dims']} hyper {SIZES['hyper_dims']} k={SIZES['rank']} D={DOMAINS}, "
          f"backends {hf.available_backends()}, malloc: {malloc}")
    tables = {}
    for batch in batches:
        rows, failed = bench(batch, args, device)
        print_table(batch, rows, failed)
        tables[batch] = rows
    report_goals(tables, device)


if __name__ == "__main__":
    main()
