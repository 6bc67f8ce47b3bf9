"""Inference latency per call, p50 and p99, and rows/s of concurrent callers: the released model, ours eager,
the Predictor, the whole-model .pt2 ExportedProgram, AOTInductor from Python and from C++.

    python benchmarks/bench_infer.py                       # batches 1 64 512 4096
    python benchmarks/bench_infer.py --calls 50 --batch 1 64
    python benchmarks/bench_infer.py --no-artifacts        # only the eager providers (no AOTInductor compile)

MovieLens MLP configuration (F=113: 7 fields x 16 + age, towers 256-128, hyper [64], k=35, D=3), all in eval
mode with settled BatchNorm statistics, inputs already on the device. Each call is timed alone (synchronised
on CUDA; the Python providers take turns call by call); the table gives the median (p50) and 99th percentile
(p99) in microseconds. The released model returns NaN at batch 1 (its DomainNorm takes the unbiased variance
of one row); its time is still what the released code spends.
Providers:
- "released eager": hamur_fast.compat.ReleasedMLP under torch.inference_mode (the released loop:
  every tower and the hyper-network once per domain on the whole batch);
- "ours eager": hf.models.HAMUR (paper mode, backend "auto") under torch.inference_mode;
- "Predictor": hamur_fast.inference.Predictor of the same model (folded; on CUDA one graph per
  batch bucket, the inputs padded to the next bucket);
- "pt2 program", "AOTI python", "AOTI C++": the whole CTR model of the same weights exported by
  hamur_fast.inference.export_serving (feature ids, raw dense values and domain in: these also gather the
  embeddings and scale the dense values, which the three above receive done; on the CPU the model inside is
  the domain-sorted form of hamur_fast/inference/domain_sorted.py, standard ops only); the .pt2 loaded with
  load_serving, the AOTInductor package with load_serving (Python) and with examples/serve_cpp's timing mode
  (C++: its own process, so its calls do not take turns with the others'; same rows, same thread count).
Concurrency: rows/s of 1, 2 and 4 threads sharing one Predictor / one AOTInductor package, each calling
with its own batch for --seconds; with N callers every caller's torch (OpenMP) threads are threads / N.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import hamur_fast as hf
from hamur_fast.compat import ReleasedMLP
from hamur_fast.data import FeatureMap
from hamur_fast.data.movielens import DOMAIN_BY_AGE, SCHEMA
from hamur_fast.features import CTRModel
from hamur_fast.inference.serving import encode_frame, export_serving, load_serving, serving_model
from timing import failure, take_turns

REPO = Path(__file__).resolve().parents[1]
INPUT_DIM, DOMAINS = 113, 3
SIZES = dict(dims=[256, 128], hyper_dims=[64], rank=35)
BATCHES = (1, 64, 512, 4096)
# MovieLens-1M's vocabulary sizes (users, movies, genders, occupations, zip codes, first genres).
VOCABULARY = {"user_id": 6040, "movie_id": 3706, "gender": 2, "occupation": 21, "zip": 3439, "cate_id": 18}


def settle(model):
    """Run a few training batches so BatchNorm running statistics are realistic, then eval."""
    torch.manual_seed(0)
    device = next(model.parameters()).device
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(512, INPUT_DIM, device=device), torch.randint(0, DOMAINS, (512,), device=device))
    return model.eval()


def movielens_feature_map() -> FeatureMap:
    text = {"gender", "zip", "cate_id"}
    vocabularies = {c: pd.Index([f"{c}{i}" if c in text else i + 1 for i in range(n)]) for c, n in VOCABULARY.items()}
    return FeatureMap(SCHEMA, vocabularies, {"age": (1.0, 56.0)}, {str(k): v for k, v in DOMAIN_BY_AGE.items()},
                      "movielens")


def raw_rows(feature_map: FeatureMap, rows: int, seed: int = 1) -> pd.DataFrame:
    """Rows in the MovieLens merged layout, 5% of each field's values unseen."""
    rng = np.random.default_rng(seed)
    frame = {}
    for column, vocabulary in feature_map.vocabularies.items():
        values = vocabulary.to_numpy()[rng.integers(0, len(vocabulary), rows)]
        unseen = rng.random(rows) < 0.05
        frame[column] = np.where(unseen, "unseen" if vocabulary.dtype.kind == "O" else -7, values)
    frame["genres"] = [f"{c}|Drama" for c in frame.pop("cate_id")]
    frame["age"] = rng.choice(list(DOMAIN_BY_AGE), rows)
    return pd.DataFrame(frame)


def eager(model):
    def run(e, domain, ids, dense):
        with torch.inference_mode():
            return model(e, domain)
    return run


def providers(device, ours, artifacts: dict | None):
    """(label, fn(e, domain, ids, dense) -> probabilities, or the error text when it could not be built)."""

    def released():
        torch.manual_seed(0)
        return eager(settle(ReleasedMLP(INPUT_DIM, DOMAINS, SIZES["dims"], SIZES["hyper_dims"],
                                        SIZES["rank"]).to(device)))

    def predictor():
        run = hf.inference.Predictor(ours, device, batch_buckets=(1, 8, 64, 512, 4096)).predict
        return lambda e, domain, ids, dense: run(e, domain)

    def served(kind):
        model = load_serving(artifacts[kind], runners=4)  # up to 4 concurrent calls (see concurrency())
        return lambda e, domain, ids, dense: model(ids, dense, domain)

    builders = [("released eager", released), ("ours eager", lambda: eager(ours)), ("Predictor", predictor)]
    if artifacts:
        builders += [("pt2 program", lambda: served("pt2")), ("AOTI python", lambda: served("aoti"))]
    rows = []
    for label, build in builders:
        try:  # one provider failing must not lose the others' rows
            rows.append((label, build()))
        except Exception as err:  # noqa: BLE001 - printed as a FAILED row with its reason
            rows.append((label, failure(err)))
    return rows


def whole_model(ours, feature_map):
    """The CTR model: embeddings of ``feature_map``'s sizes (N(0, 0.1^2)) in front of ``ours``."""
    torch.manual_seed(2)
    ctr = CTRModel(feature_map, ours, embed_dim=16).eval()
    for table in ctr.features.tables:
        torch.nn.init.normal_(table.weight, std=0.1)
    return ctr


def build_artifacts(ctr, feature_map, folder: Path) -> dict:
    """The whole model as .pt2 and as AOTInductor package under ``folder``."""
    start = time.perf_counter()
    paths = {kind: export_serving(ctr, feature_map, folder / f"model_{kind}.pt2", kind) for kind in ("pt2", "aoti")}
    print(f"# exported .pt2 and AOTInductor package in {time.perf_counter() - start:.0f} s")
    return paths


def cpp_runner(build: Path) -> Path | str:
    """examples/serve_cpp built under ``build`` (kept between runs), or why it could not be."""
    if shutil.which("cmake") is None:
        return "cmake not on PATH"
    steps = (["cmake", "-S", str(REPO / "examples" / "serve_cpp"), "-B", str(build),
              f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], ["cmake", "--build", str(build)])
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return f"{' '.join(command[:2])} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return build / "hamur_serve"


def cpp_percentiles(runner, package, rows_csv, batch, calls, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([str(runner), str(package), str(rows_csv), "--time", str(calls), "--batch", str(batch)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        return f"exit {done.returncode}: {done.stderr.strip()[-200:]}"
    p50, p99 = (float(x) for x in done.stdout.split())
    return p50, p99


def percentiles_us(fns, inputs, device, calls, warmup):
    """(p50, p99) per function, or its error text; the functions take turns call by call, so load from other
    processes hits all of them alike."""
    ready = []
    for fn in fns:
        try:
            for _ in range(warmup):
                fn(*inputs)
            ready.append(fn)
        except Exception as err:  # noqa: BLE001
            ready.append(failure(err))
    timed = take_turns([fn for fn in ready if not isinstance(fn, str)], inputs, device, calls)
    results = []
    for fn in ready:
        samples = fn if isinstance(fn, str) else timed.pop(0)
        results.append(samples if isinstance(samples, str) else
                       (_percentile([t * 1e6 for t in samples], 0.5), _percentile([t * 1e6 for t in samples], 0.99)))
    return results


def _percentile(samples, q):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def calls_for(batch, args):
    """Fewer calls for big batches on the CPU, where one call takes a long time."""
    return max(5, args.calls // 10) if batch >= 4096 and args.device == "cpu" else args.calls


def rows_per_second(fn, inputs, callers: int, seconds: float) -> float:
    """Rows/s of ``callers`` threads calling ``fn`` on ``inputs`` (each its own copy) for ``seconds``."""
    done, stop = [0] * callers, threading.Event()
    threads_each = torch.get_num_threads()

    def caller(i, own):
        # OpenMP's thread count is per thread: a new thread would run its GEMMs on every core, whatever the main
        # thread set (on busy cores, 10x slower calls).
        torch.set_num_threads(threads_each)
        while not stop.is_set():
            fn(*own)
            done[i] += 1

    threads = [threading.Thread(target=caller, args=(i, tuple(t.clone() for t in inputs))) for i in range(callers)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(done) * inputs[0].shape[0] / seconds


def batch_inputs(eager_serving, frame, encode, batch, device):
    """(e, domain, ids, dense) of the first ``batch`` rows (repeated as needed)."""
    ids, dense, domain = encode
    index = torch.arange(batch) % ids.shape[0]
    ids, dense, domain = ids[index].to(device), dense[index].to(device), domain[index].to(device)
    with torch.inference_mode():
        e = eager_serving.embed(ids, dense, domain)
    return e.clone(), domain, ids, dense


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier numbers on busy cores)")
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--calls", type=int, default=200, help="timed calls per batch and provider")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-artifacts", action="store_true", help="skip the .pt2 / AOTInductor / C++ providers")
    parser.add_argument("--build", default=str(REPO / "build" / "serve_cpp"), help="where examples/serve_cpp builds")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 2, 4], help="concurrent callers")
    parser.add_argument("--concurrent-batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each concurrency run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    # The released DomainNorm at batch 1 warns (unbiased variance of one row); the timing is the point here.
    warnings.filterwarnings("ignore", message="var\\(\\): degrees of freedom")
    hf.set_value_checks(False)  # as on a serving path: no domain-id read-back (a host sync) inside a timed call
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_infer: {name}, torch {torch.__version__}, threads {threads}, "
          f"F={INPUT_DIM} towers {SIZES['dims']} hyper {SIZES['hyper_dims']} k={SIZES['rank']} D={DOMAINS}, "
          f"backends {hf.available_backends()}")
    feature_map = movielens_feature_map()
    folder = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    torch.manual_seed(0)
    ours = settle(hf.models.HAMUR(INPUT_DIM, DOMAINS, backbone="mlp", **SIZES).to(device))
    ctr = whole_model(ours, feature_map)
    eager_serving = serving_model(ctr, feature_map, device)
    artifacts = None if args.no_artifacts else build_artifacts(ctr, feature_map, folder)
    frame = raw_rows(feature_map, max(args.batch))
    frame.to_csv(folder / "rows.csv", index=False)
    encode = encode_frame(feature_map, frame)[:3]
    rows = providers(device, ours, artifacts)
    status = dict(rows)
    runner = "skipped (--no-artifacts)" if args.no_artifacts else cpp_runner(Path(args.build))
    if device.type == "cuda":
        runner = "the C++ runner times the package on the device it was compiled for: the CPU here"
    labels = [label for label, _ in rows] + ([] if args.no_artifacts else ["AOTI C++"])
    print("\nlatency per call, microseconds (p50 / p99); speed-up of p50 vs released eager")
    print(f"{'batch':>6} {'provider':16} {'p50 us':>10} {'p99 us':>10} {'speed-up':>9}")
    predictor_p99 = {}
    for batch in args.batch:
        inputs = batch_inputs(eager_serving, frame, encode, batch, device)
        built = [(label, fn) for label, fn in rows if not isinstance(fn, str)]
        results = dict(zip([label for label, _ in built],
                           percentiles_us([fn for _, fn in built], inputs, device, calls_for(batch, args), args.warmup)))
        if "AOTI C++" in labels:
            results["AOTI C++"] = (runner if isinstance(runner, str) else
                                   cpp_percentiles(runner, artifacts["aoti"], folder / "rows.csv", batch,
                                                   calls_for(batch, args), threads))
        base = results.get("released eager")
        base = base[0] if isinstance(base, tuple) else float("nan")
        for label in labels:
            result = status[label] if isinstance(status.get(label), str) else results[label]
            if isinstance(result, str):
                print(f"{batch:6d} {label:16} FAILED {result}")
                continue
            p50, p99 = result
            print(f"{batch:6d} {label:16} {p50:10.1f} {p99:10.1f} {base / p50:8.1f}x")
            if label == "Predictor":
                predictor_p99[batch] = p99
    concurrency(rows, eager_serving, frame, encode, device, args, threads)
    if device.type == "cuda":  # the serving goal (reported; it fails nothing)
        small = {b: p99 for b, p99 in predictor_p99.items() if b <= 512}
        worst = max(small.values(), default=float("nan"))
        print(f"\ngoal: Predictor p99 < 150 us for batches up to 512: worst {worst:.1f} us "
              f"({'met' if worst < 150 else 'NOT met'})")
    shutil.rmtree(folder, ignore_errors=True)


def concurrency(rows, eager_serving, frame, encode, device, args, threads):
    """Rows/s of 1, 2, 4 callers sharing one Predictor / one package (torch threads split among callers)."""
    shared = [(label, fn) for label, fn in rows if label in ("Predictor", "AOTI python") and not isinstance(fn, str)]
    if not shared:
        return
    inputs = batch_inputs(eager_serving, frame, encode, args.concurrent_batch, device)
    print(f"\nrows/s at batch {args.concurrent_batch}, concurrent callers sharing one model "
          f"({args.seconds:g} s each; torch threads {threads} split among the callers)")
    print(f"{'callers':>7} " + " ".join(f"{label:>14}" for label, _ in shared))
    for callers in args.callers:
        torch.set_num_threads(max(1, threads // callers))
        speeds = [rows_per_second(fn, inputs, callers, args.seconds) for _, fn in shared]
        print(f"{callers:7d} " + " ".join(f"{speed:14,.0f}" for speed in speeds))
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
