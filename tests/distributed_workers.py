"""Checks run by N processes under torchrun for tests/test_distributed.py (process start-up is slow, so one
launch runs a whole suite and saves what each rank saw; the test compares it with one process).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_workers.py OUT SUITE...

Every case trains a small model for three steps on global batches of B rows (rank r takes rows
[r B/N, (r+1) B/N)); the rare domain has one row, in rank 0's half. Records after steps 1 and 3: the loss, every
gradient, every parameter and every buffer (running statistics included).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import sys
from pathlib import Path

import torch

from hamur_fast.data import Batch, TensorSplit, load_synthetic
from hamur_fast.features import build_ctr_model
from hamur_fast.train import TrainConfig, Trainer

GLOBAL_BATCH = 12
STEPS = 3
SMALL = dict(embed_dim=4, dims=[12, 8], hyper_dims=[6], rank=3, bottleneck=4, dropout=0.0)

# (model, mode, backend, dtype): the HAMUR MLP (tower DomainBatchNorm1d, hyper-network BatchNorm, adapter cells)
# on each backend, dtype and mode; the DCN backbone for the shared BatchNorm; STAR's partitioned norm.
CASES = [(model, mode, backend, dtype)
         for model in ("hamur_mlp",) for mode in ("paper", "released") for backend in ("torch", "cpu")
         for dtype in (torch.float64, torch.float32)]
CASES += [("hamur_mlp", mode, "triton", torch.float32) for mode in ("paper", "released")]  # interpreter on CPU
CASES += [("hamur_dcn", mode, "torch", torch.float64) for mode in ("paper", "released")]
CASES += [("star", "paper", None, torch.float64)]
CASES += [("hamur_mlp:tower_norm=whole", "paper", "torch", torch.float64)]  # first tower layer: whole-batch moments


def feature_map():
    return load_synthetic(rows=300, seed=0).feature_map


def global_batches(fmap, seed: int = 0) -> list:
    """STEPS batches of GLOBAL_BATCH rows; domain 2 has one row, always in the first half."""
    g = torch.Generator().manual_seed(seed)
    half = GLOBAL_BATCH // 2
    batches = []
    for _ in range(STEPS):
        sparse = torch.stack([torch.randint(0, size, (GLOBAL_BATCH,), generator=g) for size in fmap.vocab_sizes], 1)
        domain = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
        domain[torch.randint(0, half, (1,), generator=g)] = 2
        label = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g).float()
        batches.append(Batch(sparse.int(), torch.rand(GLOBAL_BATCH, fmap.num_dense, generator=g), domain, label))
    return batches


def eval_split(fmap, rows: int = 23) -> TensorSplit:
    g = torch.Generator().manual_seed(99)
    sparse = torch.stack([torch.randint(0, size, (rows,), generator=g) for size in fmap.vocab_sizes], 1).int()
    return TensorSplit(sparse, torch.rand(rows, fmap.num_dense, generator=g),
                       torch.randint(0, 3, (rows,), generator=g).short(), torch.randint(0, 2, (rows,), generator=g).float())


def build(fmap, case):
    name, mode, backend, dtype = case
    name, _, tower_norm = name.partition(":tower_norm=")  # e.g. "hamur_mlp:tower_norm=whole"
    torch.manual_seed(7)
    options = {"name": name, **SMALL}
    if name.startswith("hamur"):
        options.update(mode=mode, backend=backend, **({"tower_norm": tower_norm} if tower_norm else {}))
    else:
        options = {"name": name, "embed_dim": 4}
    return build_ctr_model(fmap, options).to(dtype)


def config() -> TrainConfig:
    # min_domain_rows=1: the 23 evaluation rows give every domain an AUC to compare across ranks.
    return TrainConfig(batch_size=GLOBAL_BATCH, eval_batch_size=7, progress=False, device="cpu", min_domain_rows=1)


def with_sgd(trainer):
    """SGD with momentum and weight decay: three steps depend on every earlier gradient. Not Adam: dividing by
    the gradient's size, Adam turns the rounding noise of a gradient that is zero in exact arithmetic (a bias
    before a normalisation) into a step of any size, in one process as in N, so no run matches another."""
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return trainer


def snapshot(trainer, loss: float) -> dict:
    model = trainer.model
    return {"loss": loss,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "state": {n: t.clone() for n, t in model.state_dict().items()}}


def train_steps(trainer, batches, part=None) -> list:
    """Snapshots after steps 1 and STEPS; ``part(batch)`` is this rank's share of a global batch."""
    records = []
    for step, batch in enumerate(batches, 1):
        loss, _ = trainer._step(cast(part(batch) if part else batch, trainer))
        if step in (1, STEPS):
            records.append(snapshot(trainer, loss))
    return records


def cast(batch: Batch, trainer) -> Batch:
    dtype = next(trainer.model.parameters()).dtype
    return Batch(batch.sparse, batch.dense.to(dtype), batch.domain, batch.label.to(dtype))


@functools.lru_cache(maxsize=None)
def one_process(case) -> dict:
    """The reference: one plain Trainer on the whole global batches."""
    fmap = feature_map()
    trainer = with_sgd(Trainer(build(fmap, case), config(), fmap))
    records = train_steps(trainer, global_batches(fmap))
    return {"steps": records, "predictions": trainer.predict(eval_split(fmap))}


# The split passes of a backend's table (contract: Passes), by family.
SPLIT_PASSES = {"norm": ("statistics", "normalise", "grad_sums", "input_grad"),
                "cell": ("cell_project", "cell_normalise", "cell_grad_sums", "cell_input_grads")}


def count_split_passes() -> collections.Counter:
    """Wrap every registered backend's split passes so that each call is counted as (backend, "norm.<pass>" or
    "cell.<pass>", module of the function that ran); returns the counter."""
    from hamur_fast.ops import registry

    calls = collections.Counter()

    def counted(backend, name, function):
        def run(*args, **kwargs):
            calls[(backend, name, function.__module__)] += 1
            return function(*args, **kwargs)
        return run

    for name in registry.available_backends():
        backend = registry.get_backend(name)
        wrapped = {field: counted(name, f"{kind}.{field.removeprefix('cell_')}", getattr(backend.passes, field))
                   for kind, fields in SPLIT_PASSES.items() for field in fields
                   if getattr(backend.passes, field) is not None}
        registry.register_backend(dataclasses.replace(backend, passes=backend.passes._replace(**wrapped)))
    return calls


def suite_equivalence(context) -> dict:
    from hamur_fast.distributed.trainer import DistributedTrainer

    fmap = feature_map()
    results = {}
    share = GLOBAL_BATCH // context.world_size
    calls = count_split_passes()
    for case in CASES:
        calls.clear()
        trainer = with_sgd(DistributedTrainer(build(fmap, case), config(), fmap, context=context))

        def part(batch):
            rows = slice(context.rank * share, (context.rank + 1) * share)
            return Batch(*(t[rows] for t in batch))

        records = train_steps(trainer, global_batches(fmap), part)
        passes = dict(calls)  # the training steps' (evaluation normalises locally)
        split = eval_split(fmap)
        results[case_key(case)] = {"steps": records, "predictions": trainer.predict(split),
                                   "metrics": trainer.evaluate(split), "passes": passes}
    return results


# The TorchRec feature stage (tables sharded table-wise or row-wise, fused SGD in the backward) against nn.Embedding tables
# trained by plain SGD; TorchRec's tables are float32.
TORCHREC_CASES = [("hamur_mlp", mode, "torch", torch.float32) for mode in ("paper", "released")]
TORCHREC_SHARDINGS = ("table_wise", "row_wise")
EMBEDDING_LR = 0.5  # large enough for the table updates to matter within three steps


def embedding_sgd(trainer):
    """The reference optimizer: plain SGD on the tables (what the fused kernel runs), with_sgd's on the rest."""
    tables = list(trainer.model.features.parameters())
    dense = [p for n, p in trainer.model.named_parameters() if not n.startswith("features.")]
    trainer.optimizer = torch.optim.SGD([{"params": tables, "lr": EMBEDDING_LR},
                                         {"params": dense, "momentum": 0.9, "weight_decay": 1e-3}], lr=0.05)
    return trainer


@functools.lru_cache(maxsize=None)
def one_process_embedding(case) -> list:
    fmap = feature_map()
    return train_steps(embedding_sgd(Trainer(build(fmap, case), config(), fmap)), global_batches(fmap))


def suite_torchrec(context) -> dict:
    import torch.nn.functional as F
    from hamur_fast.nn.sync_batch_norm import convert_batch_norms
    from hamur_fast.ops.collectives import synchronised
    from hamur_fast.distributed.trainer import LogitsModule
    from hamur_fast.features_torchrec import build_torchrec_ctr_model, dense_parameters, load_tables, shard

    fmap = feature_map()
    share = GLOBAL_BATCH // context.world_size
    results = {}
    for sharding, case in ((s, c) for s in TORCHREC_SHARDINGS for c in TORCHREC_CASES):
        plain = build(fmap, case)
        model = build_torchrec_ctr_model(fmap, plain.core, SMALL["embed_dim"])
        convert_batch_norms(model)
        sharded = shard(LogitsModule(model), context, sharding, torch.optim.SGD, {"lr": EMBEDDING_LR})
        load_tables(sharded, plain.features)
        dense = dense_parameters(sharded)
        optimizer = torch.optim.SGD(dense.values(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        records = []
        for step, batch in enumerate(global_batches(fmap), 1):
            mine = Batch(*(t[context.rank * share:(context.rank + 1) * share] for t in batch))
            optimizer.zero_grad(set_to_none=True)
            with synchronised(context.stats_group):
                logits = sharded(mine.sparse, mine.dense, mine.domain)
            loss = F.binary_cross_entropy_with_logits(logits, mine.label)
            loss.backward()
            optimizer.step()
            if step in (1, STEPS):
                records.append({"loss": loss.item(), "grads": {unwrapped(n): p.grad.clone() for n, p in dense.items()
                                                               if p.grad is not None},
                                "state": sharded_state(sharded)})
        results[f"{sharding}-{case_key(case)}"] = records
    return results


def unwrapped(name: str) -> str:
    """A name inside DistributedModelParallel(LogitsModule(model)) -> the same name inside model."""
    return name.split("model.", 1)[1]


def sharded_state(sharded) -> dict:
    """Every dense state entry, and each table shard this rank holds as (name, row offset) -> rows."""
    state = {}
    for name, value in sharded.state_dict().items():
        if hasattr(value, "local_shards"):
            for piece in value.local_shards():
                state[(unwrapped(name), piece.metadata.shard_offsets[0])] = piece.tensor.clone()
        else:
            state[unwrapped(name)] = value.clone()
    return state


def case_key(case) -> str:
    name, mode, backend, dtype = case
    return f"{name}-{mode}-{backend}-{str(dtype).removeprefix('torch.')}"


SUITES = {"equivalence": suite_equivalence, "torchrec": suite_torchrec}


def main(out: str, *suites: str) -> None:
    from hamur_fast.distributed import runtime

    torch.set_num_threads(1)
    context = runtime.start("cpu")
    try:
        results = {name: SUITES[name](context) for name in suites}
        torch.save(results, Path(out) / f"rank{context.rank}.pt")
    finally:
        runtime.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
