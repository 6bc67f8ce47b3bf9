"""The ``hamur-fast`` command: demo, train, eval, predict, export, compare, sweep, doctor, download.

Every command reads a YAML config (sections data, model, train, output; see configs/) and takes
``--set section.key=value`` overrides; tables print as Markdown, files go under the output directory.
A user error (bad option, config, data file, checkpoint or output directory) prints one line naming the
file and exits with status 2, before any long work; a run that cannot train (it diverged) exits with 1.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from . import distributed
from .distributed import trainer as distributed_trainer
from .data import DataError, load_dataset, read_prediction_input
from .data.download import DATASETS, download
from .inference import export_checkpoint
from .inference.serving import export_checkpoint_serving, load_serving
from .train import CheckpointError
from .train import experiment as ex
from .train import report
from .train.diagnostics import checkpoint_report
from .train.files import atomic_path, write_json
from .train.trainer import TrainingError

DEMO_CONFIG = {
    "data": {"kind": "synthetic", "rows": 30_000, "seed": 0},
    "model": {"embed_dim": 16},
    "train": {"epochs": 6, "batch_size": 1024, "patience": 3},
}
DEMO_SEEDS = "1,2,3"
EXPORT_FORMATS = {".pt2": ("pt2", "aoti"), ".onnx": ("onnx",)}  # --output extension -> formats, default first
# These models are small: one intra-op thread is about as fast as two, and on busy shared cores far faster.
# Results depend on the thread count (not on the run): the checkpoint records it and a resume reuses it.
DEFAULT_THREADS = 1


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc relaunches under torchrun
    if distributed.runtime.is_main_process():  # rank 0 alone speaks for a data-parallel run
        report.console(quiet=getattr(args, "quiet", False))
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return args.run(args)
        except TrainingError as err:
            print(f"hamur-fast {args.command}: error: {err}", file=sys.stderr)
            return 1
        except (DataError, CheckpointError, ValueError, OSError) as err:  # OSError: missing, unwritable, full
            print(f"hamur-fast {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except (MemoryError, RuntimeError) as err:
            if not ex.out_of_memory(err):
                raise
            print(f"hamur-fast {args.command}: error: out of memory ({_one_line(err)[:200]}); lower "
                  "train.batch_size or train.eval_batch_size, or use a device with more memory", file=sys.stderr)
            return 1


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"hamur-fast: warning: {_one_line(message)}", file=sys.stderr)


# ---------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    config = _config(args, DEMO_CONFIG)
    output = Path(args.output or "runs/demo")
    domains = config["data"].get("domains")
    shape = f"{domains} domains, Zipf-like shares" if domains else "3 domains, domain 2 rare"
    print(f"HAMUR demo: synthetic multi-domain clicks ({shape}; see hamur_fast.data.synthetic),\n"
          "HAMUR-MLP against the same per-domain MLP towers without adapters.\n")
    seeds = ex.parse_seeds(args.seeds)
    result = ex.compare(config, ["hamur_mlp", "mlp"], seeds, output, progress=not args.quiet, log=report.log.info)
    print(f"\nTest AUC per domain, mean ± std over seeds {seeds} (best epoch by validation AUC):\n\n"
          f"{result['table']}\n")
    if (output / "compare_domains.md").is_file() and len(result["domains"]) > report.MANY_DOMAINS:
        print(f"Every domain's AUC: {output / 'compare_domains.md'}")
    print(f"Plots: {output / 'compare_domain_auc.png'}, learning curves under {output / 'runs'}/*/seed*/")
    return 0


def cmd_train(args) -> int:
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        # A user error is one line here, not one traceback per worker.
        if args.resume:
            ex.check_resume(args.resume, _flag_overrides(args, with_threads=bool(args.threads)))
        else:
            ex.check_run(_config(args))
        return distributed.launch_with_torchrun(args.nproc, args.argv)  # N processes run this same command
    runs = distributed_trainer if distributed.launched_by_torchrun() else ex
    if args.resume:
        if args.config:
            raise ValueError("--resume continues the run recorded in the checkpoint: drop --config")
        result = runs.resume_run(args.resume, overrides=_flag_overrides(args, with_threads=bool(args.threads)),
                                 run_dir=args.output, progress=not args.quiet)
    else:
        config = _config(args)
        output = Path(args.output or config.get("output", "runs/train"))
        result = runs.train_run(config, run_dir=output, progress=not args.quiet)
    if not distributed.runtime.is_main_process():
        return 0
    # The data summary, epochs, stopping decision and test table were logged (and kept in train.log).
    print(f"checkpoint: {result.run_dir / 'checkpoint.pt'}, log: {result.run_dir / report.LOG_NAME}")
    return 0


def cmd_eval(args) -> int:
    trainer, payload = ex.load_trained(args.checkpoint, args.device, args.threads)
    data_config = ex.apply_overrides({"data": ex.recorded_data(payload, args.checkpoint)}, args.set)["data"]
    data = load_dataset(data_config, feature_map=trainer.feature_map)
    metrics = trainer.evaluate(getattr(data, args.split))
    print("\n" + report.metrics_table(metrics, f"{args.split} metrics of {args.checkpoint}",
                                      trainer.config.min_domain_rows))
    if args.diagnostics:
        print("\n" + checkpoint_report(trainer, payload, getattr(data, args.split), args.split))
    if args.output:
        write_json(args.output, metrics)
    return 0


def cmd_predict(args) -> int:
    if not args.output:
        raise ValueError("predict needs --output FILE (.csv or .parquet)")
    if (args.checkpoint is None) == (args.model is None):
        raise ValueError("predict needs exactly one of --checkpoint CHECKPOINT and --model ARTIFACT")
    if args.model:  # a whole-model export (.pt2 or AOTInductor package): no checkpoint, no training stack
        torch.set_num_threads(args.threads or DEFAULT_THREADS)
        frame, domain, probability = load_serving(args.model).predict_file(args.input)
    else:
        trainer, _ = ex.load_trained(args.checkpoint, args.device, args.threads)
        frame, split = read_prediction_input(args.input, trainer.feature_map)
        domain, probability = split.domain, trainer.predict(split)
    out = frame.assign(domain_id=domain.numpy(), probability=probability.cpu().numpy())
    output = Path(args.output)
    with atomic_path(output) as temporary:
        if output.suffix.lower() in {".parquet", ".pq"}:
            out.to_parquet(temporary, index=False)
        else:
            out.to_csv(temporary, index=False)
    print(f"wrote {len(out):,} predictions to {output}")
    return 0


def cmd_export(args) -> int:
    if not args.output:
        raise ValueError("export needs --output FILE (.pt2 for --format pt2 and aoti, .onnx for --format onnx)")
    allowed = EXPORT_FORMATS.get(Path(args.output).suffix.lower())
    if allowed is None:
        raise ValueError(f"--output {args.output}: the extension names the format, .pt2 (torch.export or "
                         "AOTInductor package) or .onnx")
    if args.format not in (None, *allowed):
        raise ValueError(f"--format {args.format} does not match --output {args.output} (a {'/'.join(allowed)} "
                         "file): drop --format or change the extension")
    fmt = args.format or allowed[0]
    inputs = args.inputs or ("embedded" if fmt == "onnx" else "raw")
    if inputs == "embedded":
        path = export_checkpoint(args.checkpoint, args.output, fmt)
    elif fmt == "onnx":
        raise ValueError("ONNX export takes the embedded inputs (e, domain): drop --inputs raw")
    else:
        path = export_checkpoint_serving(args.checkpoint, args.output, fmt, args.device or "cpu")
    print(f"wrote the {fmt} export ({inputs} inputs) of {args.checkpoint} to {path}")
    return 0


def cmd_compare(args) -> int:
    config = _config(args)
    section = config.get("compare", {})
    models = ex.split_values(args.models) if args.models else section.get("models")
    if not models:
        raise ValueError("name the models: --models a,b,... or a compare: {models: [...]} section")
    seeds = _seeds(args, section, config)
    output = Path(args.output or config.get("output", "runs/compare"))
    result = ex.compare(config, [str(m) if not isinstance(m, dict) else m for m in models], seeds, output,
                        progress=not args.quiet, log=report.log.info)
    print(f"\nTest AUC, mean ± std over seeds {seeds}:\n\n{result['table']}\n\nwritten under {output}")
    return 0


def cmd_sweep(args) -> int:
    config = _config(args)
    section = config.get("sweep", {})
    if args.param:
        param, sep, raw = args.param.partition("=")
        if not sep:
            raise ValueError(f"--param must look like name=v1,v2,..., got {args.param!r}")
        values = ex.split_values(raw)
    else:
        param, values = section.get("param"), section.get("values")
    if not param or not values:
        raise ValueError("name the swept parameter: --param k=8,16,35,64 or a sweep: {param, values} section")
    seeds = _seeds(args, section, config)
    output = Path(args.output or config.get("output", "runs/sweep"))
    result = ex.sweep(config, param, values, seeds, output, progress=not args.quiet, log=report.log.info)
    print(f"\nTest AUC against {param}, mean ± std over seeds {seeds}:\n\n{result['table']}\n\nwritten under {output}")
    return 0


def cmd_download(args) -> int:
    target = download(args.dataset, args.to, progress=not args.quiet, url=args.url, source=args.source)
    print(f"{args.dataset} is ready in {target} (checked: {', '.join(DATASETS[args.dataset].files)} at their "
          "expected sizes)")
    return 0


# ---------------------------------------------------------------------------- helpers
def _config(args, default=None) -> dict:
    """The config with --set and the flags applied; the thread count defaults to DEFAULT_THREADS."""
    config = ex.load_config(args.config) if getattr(args, "config", None) else dict(default or {})
    config = ex.apply_overrides(config, _flag_overrides(args, with_threads=True))
    if not config.get("train", {}).get("threads"):
        config = ex.set_path(config, "train.threads", DEFAULT_THREADS)
    return config


def _flag_overrides(args, with_threads: bool) -> list:
    """--set assignments, then --epochs/--seed/--device (and --threads) as the train entries they stand for."""
    overrides = list(args.set)
    flags = [("epochs", "train.epochs"), ("seed", "train.seed"), ("device", "train.device")]
    for flag, key in flags + ([("threads", "train.threads")] if with_threads else []):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return overrides


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _seeds(args, section: dict, config: dict) -> list:
    if args.seeds:
        return ex.parse_seeds(args.seeds)
    return list(section.get("seeds") or [config.get("train", {}).get("seed", 2022)])


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hamur-fast", description="HAMUR multi-domain CTR: demo, train, eval, predict, export, "
                     "compare, sweep, download (tables in Markdown, files under --output)")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, handler, help_text, config=True):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(run=handler)
        if config:
            sub.add_argument("--config", help="YAML config (sections data, model, train, output)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config entry, e.g. --set train.epochs=3 (repeatable)")
        sub.add_argument("--output", help="output directory (or file, for eval/predict)")
        sub.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        sub.add_argument("--threads", type=_positive_int,
                         help=f"torch CPU threads (default {DEFAULT_THREADS}; a resume reuses the run's)")
        sub.add_argument("--quiet", action="store_true",
                         help="no progress bars or per-epoch lines: the final table only (train.log keeps all)")
        return sub

    demo = command("demo", cmd_demo, "train HAMUR-MLP and MLP on built-in synthetic data, compare per domain",
                   config=False)
    demo.add_argument("--epochs", type=int, help="override train.epochs")
    demo.add_argument("--seeds", default=DEMO_SEEDS, help=f"comma-separated seeds (default {DEMO_SEEDS})")
    train = command("train", cmd_train, "train one model from a config")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--seed", type=int, help="override train.seed")
    train.add_argument("--resume", metavar="CHECKPOINT",
                       help="continue the run that wrote this checkpoint from its last epoch (--epochs, --device, "
                            "--threads, --output and some --set keys may change; others are refused)")
    train.add_argument("--nproc", type=_positive_int, default=1,
                       help="data-parallel processes on this machine (torchrun; "
                       "gloo on CPU, NCCL on GPU); train.batch_size is the global batch")
    evaluate = command("eval", cmd_eval, "evaluate a checkpoint on its data's test (or val) split", config=False)
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--split", choices=["test", "val", "train"], default="test")
    evaluate.add_argument("--diagnostics", action="store_true",
                          help="also print the adapter diagnostics (contribution, gradient norms, factor shift)")
    predict = command("predict", cmd_predict, "click probabilities for a CSV/Parquet file in the raw layout",
                      config=False)
    predict.add_argument("--checkpoint", help="a training checkpoint (or give --model)")
    predict.add_argument("--model", help="a whole-model export of `hamur-fast export` (.pt2 or AOTInductor package)")
    predict.add_argument("--input", required=True)
    export = command("export", cmd_export, "export a checkpoint's model: torch.export (.pt2), AOTInductor package "
                     "or ONNX; by default the whole model (raw rows in, the feature map inside)", config=False)
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--format", choices=["pt2", "aoti", "onnx"],
                        help="optional: the --output extension decides (.pt2: pt2, or aoti for an AOTInductor "
                             "package; .onnx: onnx); a format the extension does not name is refused")
    export.add_argument("--inputs", choices=["raw", "embedded"],
                        help="raw (pt2 and aoti default): ids and dense values in, feature map inside; "
                             "embedded (onnx default): (e, domain) in")
    for name, handler, help_text in (("compare", cmd_compare, "several models x seeds: per-domain table and plot"),
                                     ("sweep", cmd_sweep, "one parameter over values x seeds: table and plot")):
        sub = command(name, handler, help_text)
        sub.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3")
        sub.add_argument("--epochs", type=int, help="override train.epochs")
        if name == "compare":
            sub.add_argument("--models", help="comma-separated, e.g. hamur_mlp,hamur_mlp:mode=released,mlp")
        else:
            sub.add_argument("--param", help="name=v1,v2,...; names: k, hyper_width, hyper, norm or section.key")
    fetch = commands.add_parser("download", help="fetch a public data set, check its checksum, unpack it",
                                description="Download a public data set's official archive (progress bar), "
                                "verify its size and SHA-256 and unpack it where the configs look for it; "
                                "a folder already there is verified (files and sizes).")
    fetch.set_defaults(run=cmd_download)
    fetch.add_argument("dataset", choices=sorted(DATASETS))
    fetch.add_argument("--to", default="data", help="parent directory (default: data, where configs/ look)")
    fetch.add_argument("--url", help="another address of the same archive (a mirror); the checksum still applies")
    fetch.add_argument("--from", dest="source", metavar="PATH",
                       help="the archive already on disk (an offline machine): checked and unpacked like a download")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    doctor = commands.add_parser("doctor", help="versions, devices, backends, and a self-check of every backend",
                                 description="versions, devices, backends built (or why not), and a self-check "
                                             "of every backend against the reference; exit status 1 on a failure")
    doctor.add_argument("--device", help="device to check (default: cuda when available, else cpu)")
    doctor.add_argument("--repeats", type=int, default=5, help="timed repetitions per check (median)")
    doctor.add_argument("--dtypes", help="comma-separated dtypes to check (default float32,float64,bfloat16)")
    doctor.set_defaults(run=cmd_doctor, threads=None)
    return parser


def cmd_doctor(args) -> int:
    from . import doctor

    return doctor.main([*(["--device", args.device] if args.device else []), "--repeats", str(args.repeats),
                        *(["--dtypes", args.dtypes] if args.dtypes else [])])


if __name__ == "__main__":
    sys.exit(main())
