"""Adapter cell forward+backward: the released einsum math vs our backends, side by side.

    python benchmarks/bench_layers.py                       # h=128, k=35, s=32, D=3, B in 4096 and 65536
    python benchmarks/bench_layers.py --batch 4096 --no-compile

Every provider runs the same cell (SPEC sections 2-3) on the same inputs in this one run; the table
gives the median time of forward+backward, the peak memory of one step (bytes of live tensors the
step allocated; CUDA: the allocator's peak) and the speed-up over the released code's eager math.
Providers: "released" = the authors' einsum formulation (hamur_fast.compat.released_cell);
backend names ("torch", and any kernel backend that is available) run hf.ops.hyper_adapter in
released mode (same math as the released code) and paper mode; "+compile" = torch.compile of it.
"triton" joins on CUDA, and on the CPU only with --interpret (the Triton interpreter: slow, for
checking the script, not for timing). "GB/s" = SPEC section 6's ideal bytes of fwd+bwd per row,
4 * (5h + 3k^2), over the measured time, printed next to the device's measured copy bandwidth.

The second table (skip it with --no-generator) times the hyper-network's last layer (Linear(p, k*k) ->
BatchNorm1d -> ReLU, training mode) together with the cell, paper mode: "level 1 X" = the generator layer
in eager PyTorch, then backend X's cell on the (B, k, k) matrix it wrote; "level 2 X" =
hf.ops.hyper_adapter_generated on backend X (triton: I formed in registers; cpu: I generated in 64-row
blocks inside the C++ core; torch: I materialised by one GEMM, then its level-1 cell); "eager gen+cell+compile" = torch.compile of the eager generator and
the "torch" cell, the baseline of the GPU goal. Beside each time: the level's ideal bytes per step
(level 1: 4 * (5h + 6k^2 + 3p) per row, I written, read and its gradient written and read; level 2:
4 * (5h + 4p), g read twice, dg written) and the FLOPs the level computes (level 2 counts the kernels'
recomputation of I: 7 GEMMs of 2pk^2 per row against 3 at level 1).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import weakref

if "--interpret" in sys.argv:  # must be decided before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode

import hamur_fast as hf
from hamur_fast.compat import released_cell
from timing import failure, take_turns


# ----------------------------------------------------------------------------- inputs
def make_inputs(batch, width, rank, bottleneck, num_domains, mode, device, dtype=torch.float32):
    """Random inputs and parameters for one cell, all requiring grad (what a training step sees)."""
    torch.manual_seed(0)
    lead = (num_domains,) if mode == "paper" else ()

    def param(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    x = param(batch, width)
    rep = torch.relu(torch.randn(batch, rank, rank, device=device, dtype=dtype)).requires_grad_()
    domain = torch.randint(0, num_domains, (batch,), device=device)
    params = [
        param(*lead, width, rank, scale=width ** -0.5), param(*lead, rank, bottleneck, scale=rank ** -0.5),
        param(*lead, bottleneck), param(*lead, bottleneck, rank, scale=bottleneck ** -0.5),
        param(*lead, rank, width, scale=rank ** -0.5), param(*lead, width),
        param(*lead, width, scale=0.1), param(*lead, width),
    ]
    stats = ([torch.zeros(num_domains, width, device=device, dtype=dtype),
              torch.ones(num_domains, width, device=device, dtype=dtype)] if mode == "paper" else [None, None])
    return x, rep, domain, params, stats


# ----------------------------------------------------------------------------- providers
def released_step(x, rep, domain, params, stats):
    return released_cell(x, rep, *params)


def backend_step(name, mode):
    def step(x, rep, domain, params, stats):
        return hf.ops.hyper_adapter(x, rep, domain, *params, *stats, mode=mode, backend=name,
                                    num_domains=3)
    return step


def runs_on(name, device):
    try:
        hf.ops.registry.resolve(name, device)
    except ValueError:
        return False
    return True


def providers(mode, compile_too, device):
    """(label, step function) pairs for one mode; kernel backends join when they run on ``device``."""
    rows = [("released einsum", released_step)] if mode == "released" else []
    for name in hf.available_backends():
        if name == "reference" or not runs_on(name, device):
            continue
        rows.append((f"{name}", backend_step(name, mode)))
    if compile_too:
        rows += [(f"{label}+compile", torch.compile(fn, dynamic=False)) for label, fn in list(rows)
                 if label in ("released einsum", "torch")]
    return rows


# ----------------------------------------------------------------------------- measuring
class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensors created inside the block and still alive (CPU stand-in for max_memory_allocated)."""

    def __enter__(self):
        self.live = self.peak = 0
        self.seen = set()
        return super().__enter__()

    def _track(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


def run_step(fn, inputs):
    x, rep, domain, params, stats = inputs
    for t in (x, rep, *params):
        t.grad = None
    fn(x, rep, domain, params, stats).square().mean().backward()


def time_ms(fn, inputs, device, repeats):
    for _ in range(2):  # warm-up (and compilation)
        run_step(fn, inputs)
    samples, = take_turns([run_step], (fn, inputs), device, repeats)
    if isinstance(samples, str):
        raise RuntimeError(samples)
    return statistics.median(samples) * 1e3


def peak_mib(fn, inputs, device, compiled):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_step(fn, inputs)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if compiled:
        return float("nan")  # a dispatch mode cannot see inside a compiled graph on the CPU
    with LiveTensorPeak() as tracker:
        run_step(fn, inputs)
    return tracker.peak / 2**20


def bench(batch, args, device):
    """Rows (mode, provider, ms, peak MiB, error): a provider that raises gets its error and no numbers."""
    rows = []
    for mode in ("released", "paper"):
        inputs = make_inputs(batch, args.width, args.rank, args.bottleneck, args.domains, mode, device)
        for label, fn in providers(mode, not args.no_compile, device):
            try:  # one provider failing (a kernel out of resources, say) must not lose the others' rows
                ms = time_ms(fn, inputs, device, args.repeats)
                rows.append((mode, label, ms, peak_mib(fn, inputs, device, "compile" in label), None))
            except Exception as err:  # noqa: BLE001 - printed as a FAILED row with its reason
                rows.append((mode, label, None, None, failure(err)))
    return rows


def ideal_bytes(batch, width, rank):
    """SPEC section 6, fp32, forward 4 * (2h + k^2) plus backward 4 * (3h + 2k^2) bytes per row."""
    return batch * 4 * ((2 * width + rank ** 2) + (3 * width + 2 * rank ** 2))


def copy_bandwidth_gbs(device, repeats=20):
    """Measured device-to-device copy bandwidth, bytes read plus written, median of ``repeats``."""
    src = torch.empty(2**28 if device.type == "cuda" else 2**25, device=device)  # 1 GiB / 128 MiB fp32
    dst = torch.empty_like(src)
    times, = take_turns([dst.copy_], (src,), device, repeats + 2)
    if isinstance(times, str):
        raise RuntimeError(times)
    return 2 * src.numel() * src.element_size() / statistics.median(times[2:]) / 1e9


def print_table(batch, rows, args, copy_gbs):
    base = next((ms for _, label, ms, _, _ in rows if label == "released einsum" and ms), float("nan"))
    ideal = ideal_bytes(batch, args.width, args.rank)
    print(f"\nB={batch}: fwd+bwd, median ms; speed-up vs released einsum eager; ideal {ideal / 2**20:.0f} MiB "
          f"moved at the copy bandwidth {copy_gbs:.0f} GB/s = {ideal / copy_gbs / 1e6:.3f} ms")
    print(f"{'mode':9} {'provider':22} {'ms':>10} {'peak MiB':>10} {'speed-up':>9} {'GB/s':>7} {'of copy':>8}")
    for mode, label, ms, mib, error in rows:
        if error is not None:
            print(f"{mode:9} {label:22} FAILED {error}")
            continue
        gbs = ideal / (ms * 1e6)
        print(f"{mode:9} {label:22} {ms:10.3f} {mib:10.1f} {base / ms:8.1f}x {gbs:7.0f} {gbs / copy_gbs:7.0%}")


# ----------------------------------------------------------------------------- generator + cell
def make_generator_inputs(batch, args, device):
    """Cell inputs (paper mode), the last hidden layer g (B, p) and the generator layer (a Linear + BN)."""
    x, _, domain, params, stats = make_inputs(batch, args.width, args.rank, args.bottleneck, args.domains,
                                              "paper", device)
    g = torch.relu(torch.randn(batch, args.hidden, device=device)).requires_grad_()
    layer = torch.nn.Sequential(torch.nn.Linear(args.hidden, args.rank ** 2),
                                torch.nn.BatchNorm1d(args.rank ** 2)).to(device)
    return x, g, domain, params, stats, layer


def level1_step(name):
    def step(x, g, domain, params, stats, layer):
        rep = torch.relu(layer(g)).view(g.shape[0], *(2 * [int(round(layer[0].out_features ** 0.5))]))
        return hf.ops.hyper_adapter(x, rep, domain, *params, *stats, backend=name)
    return step


def level2_step(name):
    def step(x, g, domain, params, stats, layer):
        linear, norm = layer
        return hf.ops.hyper_adapter_generated(x, g, domain, linear.weight, linear.bias, norm.weight, norm.bias,
                                              norm.running_mean, norm.running_var, *params, *stats, backend=name)
    return step


def generator_providers(compile_too, device):
    from hamur_fast.ops import generated

    rows = []
    for name in hf.available_backends():
        if name == "reference" or not runs_on(name, device):
            continue
        rows.append((f"level 1 {name}", level1_step(name), 1))
        # Costed as level 2 only where I stays out of memory; elsewhere level 2 materialises I (level-1 costs).
        rows.append((f"level 2 {name}", level2_step(name), 2 if generated.supports_fused_generation(name, device)
                     else 1))
    if compile_too:
        rows.append(("eager gen+cell+compile", torch.compile(level1_step("torch"), dynamic=False), 1))
    return rows


def run_generator_step(fn, inputs):
    x, g, domain, params, stats, layer = inputs
    for t in (x, g, *params, *layer.parameters()):
        t.grad = None
    fn(*inputs).square().mean().backward()


def generator_level_costs(batch, args):
    """{level: (ideal bytes, FLOPs)} of one fwd+bwd step (see the module docstring)."""
    h, k, s, p = args.width, args.rank, args.bottleneck, args.hidden
    cell_flops = 12 * (h * k + k * s + k * k)
    return {1: (batch * 4 * (5 * h + 6 * k * k + 3 * p), batch * (cell_flops + 3 * 2 * p * k * k)),
            2: (batch * 4 * (5 * h + 4 * p), batch * (cell_flops + 7 * 2 * p * k * k))}


def bench_generator(batch, args, device):
    inputs = make_generator_inputs(batch, args, device)
    rows = []
    for label, fn, level in generator_providers(not args.no_compile, device):
        for _ in range(2):  # warm-up (and compilation)
            run_generator_step(fn, inputs)
        samples, = take_turns([run_generator_step], (fn, inputs), device, args.repeats)
        rows.append((label, level, statistics.median(samples) * 1e3))
    return rows


def print_generator_table(batch, rows, args):
    costs = generator_level_costs(batch, args)
    base = next((ms for label, _, ms in rows if label == "eager gen+cell+compile"), None)
    print(f"\nB={batch}: generator layer (p={args.hidden}) + cell, paper mode, fwd+bwd, median ms; "
          f"speed-up vs torch.compile of the eager generator+cell")
    print(f"{'provider':24} {'ms':>10} {'speed-up':>9} {'level':>5} {'ideal MiB':>10} {'GB/s':>7} {'GFLOP':>7} "
          f"{'GFLOP/s':>8}")
    for label, level, ms in rows:
        nbytes, flops = costs[level]
        speed = f"{base / ms:8.2f}x" if base else f"{'-':>9}"
        print(f"{label:24} {ms:10.3f} {speed} {level:>5} {nbytes / 2**20:10.1f} {nbytes / (ms * 1e6):7.1f} "
              f"{flops / 1e9:7.2f} {flops / (ms * 1e6):8.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rank", type=int, default=35)
    parser.add_argument("--bottleneck", type=int, default=32)
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64, help="p: width of the hyper-network's last hidden layer")
    parser.add_argument("--no-generator", action="store_true", help="skip the generator+cell table")
    parser.add_argument("--no-cell", action="store_true", help="skip the cell-only table")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interpret", action="store_true",
                        help="run the triton provider on the CPU under the Triton interpreter (checking only)")
    args = parser.parse_args()
    hf.set_value_checks(False)  # as on a serving path: no domain-id read-back (a host sync) inside a timed call
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_layers: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"h={args.width} k={args.rank} s={args.bottleneck} D={args.domains}, backends {hf.available_backends()}")
    copy_gbs = copy_bandwidth_gbs(device)
    for batch in args.batch:
        if not args.no_cell:
            print_table(batch, bench(batch, args, device), args, copy_gbs)
        if not args.no_generator:
            print_generator_table(batch, bench_generator(batch, args, device), args)


if __name__ == "__main__":
    main()
