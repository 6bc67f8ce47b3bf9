"""Two revisions of hamur_fast timed against each other on this machine, process by process.

    python benchmarks/compare_revisions.py main                 # main against the working tree
    python benchmarks/compare_revisions.py main~3 main --cases step cell --threads 1 --repeats 9

Each revision is checked out into a temporary git worktree (the working tree: a snapshot of its tracked
files, ``git stash create``; untracked files are not part of it) and its extension ``hamur_fast._C`` is
built there (``python setup.py build_ext --inplace``, the environment passed on: a ccache on PATH caches the
builds; when ``CCACHE_BASEDIR`` is set the worktrees are made under it, so identical sources hit the cache
from any worktree). Then, for ``--repeats`` rounds, one fresh process per revision and thread count runs
every case (``--warmup`` untimed calls, then the median of ``--calls`` timed ones); the revisions take turns
process by process, so a machine whose load drifts slows both alike. Each child imports its own revision's
``hamur_fast``, ``hamur_fast.kernels`` and ``hamur_fast._C`` (checked: it fails rather than time the
installed package).

The table gives, per case and thread count, each revision's median over the rounds and its spread
(min-max), and the ratio new/old as the median of the per-round ratios (< 1: the new revision is faster),
with the CPU model and the load seen before and after.

Cases (the MovieLens MLP sizes of benchmarks/bench_train.py: F=113, towers 256-128, hyper [64], k=35,
s=32, D=3; ``--batch`` rows, paper mode unless ``--mode released``):
- ``step``: one HAMUR training step (forward, BCE, backward, Adam) with backend "auto";
- ``cell``: the adapter cell ``hf.ops.hyper_adapter`` forward and backward (h=128);
- ``norm``: ``hf.ops.domain_norm`` forward and backward on (B, 128);
- ``infer``: the model's forward in eval mode without autograd.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CASES = ("step", "cell", "norm", "infer")
INPUT_DIM, DOMAINS, WIDTH, RANK, BOTTLENECK = 113, 3, 128, 35, 32


# ----------------------------------------------------------------------------- the child: one revision, one process
class _KernelsFinder(importlib.abc.MetaPathFinder):
    """``hamur_fast.kernels`` from the tree's ``kernels/`` (setup.py installs it there): without this an editable
    install of another tree would answer the import."""

    def __init__(self, tree):
        self.package = os.path.join(tree, "kernels")

    def find_spec(self, name, path=None, target=None):
        if name != "hamur_fast.kernels":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(self.package, "__init__.py"),
                                                      submodule_search_locations=[self.package])


def import_tree(tree):
    """Import hamur_fast from ``tree`` and check that it, its kernels and its extension come from there."""
    sys.path.insert(0, tree)
    sys.meta_path.insert(0, _KernelsFinder(tree))
    root = os.path.realpath(tree) + os.sep
    spec = importlib.util.find_spec("hamur_fast")  # before running any of its code
    if spec is None or not os.path.realpath(spec.origin).startswith(root):
        raise RuntimeError(f"imported from outside {tree}: hamur_fast from {spec and spec.origin}")
    import hamur_fast
    modules = {"hamur_fast": hamur_fast}
    for name in ("hamur_fast.kernels", "hamur_fast._C"):
        with contextlib.suppress(ImportError):  # a revision without them is timed without them
            modules[name] = importlib.import_module(name)
    files = {name: os.path.realpath(module.__file__) for name, module in modules.items()}
    foreign = {name: path for name, path in files.items() if not path.startswith(root)}
    if foreign:
        raise RuntimeError(f"imported from outside {tree}: {foreign}")
    return hamur_fast, files


def build_case(hf, name, batch, mode):
    """A no-argument callable running one call of case ``name``."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    domain = torch.randint(0, DOMAINS, (batch,), generator=gen)
    if name in ("step", "infer"):
        torch.manual_seed(0)
        model = hf.models.HAMUR(INPUT_DIM, DOMAINS, backbone="mlp", mode=mode, dims=[256, 128], hyper_dims=[64],
                                rank=RANK)
        e = torch.randn(batch, INPUT_DIM, generator=gen)
        if name == "infer":
            model.eval()
            return lambda: _no_grad(model, e, domain)
        label = torch.randint(0, 2, (batch,), generator=gen).float()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.binary_cross_entropy(model(e, domain), label).backward()
            optimizer.step()
        return step
    lead = (DOMAINS,) if mode == "paper" else ()

    def param(*shape, scale=1.0):
        return (torch.randn(*lead, *shape, generator=gen) * scale).requires_grad_()
    x = torch.randn(batch, WIDTH, generator=gen, requires_grad=True)
    norm = [param(WIDTH, scale=0.1), param(WIDTH, scale=0.1)]
    if name == "norm":
        return lambda: hf.ops.domain_norm(x, domain, *norm, mode=mode, num_domains=DOMAINS).sum().backward()
    rep = torch.relu(torch.randn(batch, RANK, RANK, generator=gen)).requires_grad_()
    factors = [param(WIDTH, RANK, scale=WIDTH ** -0.5), param(RANK, BOTTLENECK, scale=RANK ** -0.5),
               param(BOTTLENECK, scale=0.0), param(BOTTLENECK, RANK, scale=BOTTLENECK ** -0.5),
               param(RANK, WIDTH, scale=RANK ** -0.5), param(WIDTH, scale=0.0)]
    return lambda: hf.ops.hyper_adapter(x, rep, domain, *factors, *norm, mode=mode,
                                        num_domains=DOMAINS).sum().backward()


def _no_grad(model, e, domain):
    import torch
    with torch.no_grad():
        model(e, domain)


def child(args):
    """Time every case in this process; print one JSON line {case: median seconds, "files": ...}."""
    hf, files = import_tree(args.tree)
    import torch
    torch.set_num_threads(args.child_threads)
    if hasattr(hf, "set_value_checks"):
        hf.set_value_checks(False)  # as bench_train: no domain-id read-back inside a timed call
    result = {"files": files}
    for name in args.cases:
        fn = build_case(hf, name, args.batch, args.mode)
        for _ in range(args.warmup):
            fn()
        samples = []
        for _ in range(args.calls):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        result[name] = statistics.median(samples)
    print(json.dumps(result))


# ----------------------------------------------------------------------------- the parent: worktrees, builds, turns
def git(repo, *argv):
    return subprocess.run(["git", "-C", repo, *argv], check=True, capture_output=True, text=True).stdout.strip()


def resolve_revision(repo, rev):
    """(label, commit): ``None`` is the working tree (its tracked files: HEAD plus uncommitted changes)."""
    if rev is None:
        snapshot = git(repo, "stash", "create")
        return ("working tree", snapshot) if snapshot else ("working tree (HEAD)", git(repo, "rev-parse", "HEAD"))
    return rev, git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")


def checkout(repo, commit, parent):
    """A detached worktree of ``commit`` in a new folder under ``parent``; returns its path. (ccache rewrites
    the paths under CCACHE_BASEDIR relative to the build folder, so a tree directly under it, like the usual
    checkouts, shares their cache entries.)"""
    tree = tempfile.mkdtemp(prefix=f"compare-revisions-{commit[:12]}-", dir=parent)
    git(repo, "worktree", "add", "--detach", tree, commit)
    return tree


def build(tree, log):
    """The tree's extension, built in place."""
    print(f"building in {tree} ...", file=log, flush=True)
    start = time.perf_counter()
    # Python's CFLAGS carry -g, with which ccache hashes the build folder too: every worktree would miss.
    env = {"CCACHE_NOHASHDIR": "1", **os.environ}
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building in {tree} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  built in {time.perf_counter() - start:.0f} s", file=log, flush=True)


def run_child(tree, threads, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", tree, "--child-threads", str(threads),
           "--cases", *args.cases, "--batch", str(args.batch), "--mode", args.mode, "--warmup", str(args.warmup),
           "--calls", str(args.calls)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model():
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average():
    return "%.2f %.2f %.2f" % os.getloadavg()


def compare(args):
    log = sys.stdout
    repo = git(os.getcwd(), "rev-parse", "--show-toplevel")
    revisions = [resolve_revision(repo, args.old), resolve_revision(repo, args.new)]
    parent = args.workdir or os.environ.get("CCACHE_BASEDIR") or None
    trees = []
    try:
        for _, commit in revisions:
            trees.append(checkout(repo, commit, parent))  # listed before the build: removed if it fails
            build(trees[-1], log)
        load_before = load_average()
        samples = {(rev, threads): [] for rev in range(2) for threads in args.threads}
        files = [None, None]
        for round_ in range(args.repeats):
            for threads in args.threads:
                for rev in (0, 1) if round_ % 2 == 0 else (1, 0):  # alternate which goes first
                    result = run_child(trees[rev], threads, args)
                    files[rev] = result.pop("files")
                    samples[rev, threads].append(result)
            print(f"round {round_ + 1}/{args.repeats} done, load {load_average()}", file=log, flush=True)
        print_table(args, revisions, files, samples, load_before, load_average(), log)
    finally:
        if not args.keep:
            for tree in trees:
                subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", tree], capture_output=True)
                shutil.rmtree(tree, ignore_errors=True)
            subprocess.run(["git", "-C", repo, "worktree", "prune"], capture_output=True)


def print_table(args, revisions, files, samples, load_before, load_after, out):
    print(f"\n# compare_revisions: {cpu_model()}, {os.cpu_count()} cores, load before {load_before}, "
          f"after {load_after}", file=out)
    print(f"# B={args.batch}, mode {args.mode}, {args.repeats} rounds x {args.calls} calls "
          f"(+{args.warmup} warm-up) per process", file=out)
    for i, (label, commit) in enumerate(revisions):
        print(f"# {'old' if i == 0 else 'new'}: {label} = {commit[:12]}, {files[i]['hamur_fast']}", file=out)
    print(f"{'case':8} {'thr':>3} {'old ms':>9} {'(min-max)':>17} {'new ms':>9} {'(min-max)':>17} "
          f"{'new/old':>8}", file=out)
    for case in args.cases:
        for threads in args.threads:
            old = [s[case] * 1e3 for s in samples[0, threads]]
            new = [s[case] * 1e3 for s in samples[1, threads]]
            ratio = statistics.median(n / o for n, o in zip(new, old))
            print(f"{case:8} {threads:3d} {statistics.median(old):9.2f} {min(old):8.2f}-{max(old):<8.2f} "
                  f"{statistics.median(new):9.2f} {min(new):8.2f}-{max(new):<8.2f} {ratio:8.3f}", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", nargs="?", help="the revision to compare against (any git revision)")
    parser.add_argument("new", nargs="?", help="the revision under test (default: the working tree)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, each in turn")
    parser.add_argument("--repeats", type=int, default=5, help="rounds: processes per revision and thread count")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per process (their median is a sample)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per process and case first")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--mode", choices=("paper", "released"), default="paper")
    parser.add_argument("--workdir", help="where the temporary worktrees go (default: $CCACHE_BASEDIR, else the "
                                          "system's temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the worktrees and their builds")
    parser.add_argument("--child", metavar="TREE", dest="tree", help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tree:
        return child(args)
    if args.old is None:
        parser.error("give the revision to compare against, e.g. main")
    for name in ("repeats", "calls", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0 or min(args.threads) < 1:
        parser.error("--warmup must be >= 0 and every --threads >= 1")
    compare(args)


if __name__ == "__main__":
    main()
