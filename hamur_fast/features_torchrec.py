"""The feature stage on TorchRec (``pip install hamur_fast[torchrec]``): embedding tables too large for one device.

:class:`TorchRecFeatureEmbedding` computes what :class:`hamur_fast.features.FeatureEmbedding` computes (one table
per sparse field, every row one id per field, the dense features appended), as a TorchRec
``EmbeddingBagCollection``: :func:`shard` hands it to ``DistributedModelParallel``, which places the tables on the
ranks (table-wise: each table whole on one rank; row-wise: each table's rows split over the ranks) and exchanges
the looked-up rows with all-to-alls, while the dense part (the HAMUR core or any zoo model) is data-parallel
(DDP) with synchronised batch statistics.

Gradients: TorchRec divides the gradients its all-to-all sends back by the number of ranks (its default
"gradient division"), as DDP averages the dense ones, so both are gradients of the global batch's mean loss and a
step equals one process's step (tests/test_distributed.py checks it against ``nn.Embedding`` tables).
"""
from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingType

from .data import FeatureMap
from .features import CTRModel, embedding_width

SHARDING_TYPES = ("table_wise", "row_wise")


class TorchRecFeatureEmbedding(nn.Module):
    """One TorchRec table per sparse field (``table_<field>``, sum pooling of the row's one id), dense appended:
    ``forward(sparse (B, S) int, dense (B, Dn)) -> e (B, S * embed_dim + Dn)``, as ``FeatureEmbedding``.
    ``device="meta"`` builds the tables without memory, for ``DistributedModelParallel`` to materialise sharded."""

    def __init__(self, feature_map: FeatureMap, embed_dim: int = 16, device: torch.device | str | None = None):
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.fields = list(feature_map.sparse_fields)
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=table_name(field), embedding_dim=embed_dim, num_embeddings=size,
                               feature_names=[field], pooling=PoolingType.SUM)
            for field, size in zip(self.fields, feature_map.vocab_sizes)], device=torch.device(device or "cpu"))
        if torch.device(device or "cpu").type != "meta":
            for table in self.ebc.embedding_bags.values():
                nn.init.normal_(table.weight, std=1e-4)  # as FeatureEmbedding (the released examples)
        self.output_dim = embedding_width(feature_map, embed_dim)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        batch, num_fields = sparse.shape
        ids = KeyedJaggedTensor.from_lengths_sync(
            keys=self.fields, values=sparse.t().reshape(-1).long(),  # grouped by field, as TorchRec lays them out
            lengths=torch.ones(batch * num_fields, dtype=torch.int32, device=sparse.device))
        by_field = self.ebc(ids).to_dict()  # sharded, the pooled columns come in the shards' order
        pooled = torch.cat([by_field[field] for field in self.fields], dim=1)
        return torch.cat([pooled, dense.to(pooled.dtype)], dim=1)


def table_name(field: str) -> str:
    return f"table_{field}"


class TableSharder(EmbeddingBagCollectionSharder):
    """TorchRec's sharder, with row-wise sharding offered on CPU too. TorchRec 1.8 lists row-wise for CUDA only,
    but on CPU its row-wise path (fbgemm-gpu-cpu's fused table kernel, gloo's all-to-all and reduce-scatter)
    runs, and trains like ``nn.Embedding`` tables (tests/test_distributed.py checks it on 2 gloo processes)."""

    def sharding_types(self, compute_device_type: str) -> list:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def build_torchrec_ctr_model(feature_map: FeatureMap, core: nn.Module, embed_dim: int = 16,
                             device: torch.device | str | None = None) -> CTRModel:
    """A :class:`~hamur_fast.features.CTRModel` whose feature stage is :class:`TorchRecFeatureEmbedding`."""
    return CTRModel(feature_map, core, embed_dim, features=TorchRecFeatureEmbedding(feature_map, embed_dim, device))


def shard(module: nn.Module, context, sharding: str = "table_wise", embedding_optimizer=torch.optim.SGD,
          embedding_optimizer_options: dict | None = None):
    """``DistributedModelParallel`` of ``module`` (which holds a :class:`TorchRecFeatureEmbedding`) over the
    ranks of ``context`` (a :class:`hamur_fast.distributed.DistributedContext`).

    The tables are sharded ``sharding`` ("table_wise" or "row_wise", on CPU as on CUDA: see :class:`TableSharder`) with
    TorchRec's fused kernel, which applies ``embedding_optimizer(**embedding_optimizer_options)`` inside the
    backward (``lr`` 0.01 unless given; FBGEMM has fused SGD, Adagrad, Adam...): ``dmp.fused_optimizer``. The rest
    of the model is data-parallel (DDP, unused parameters allowed: paper-mode layers of a domain absent on a
    rank get no gradient there); train it with an optimizer over :func:`dense_parameters`."""
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    if sharding not in SHARDING_TYPES:
        raise ValueError(f"sharding must be one of {SHARDING_TYPES}, got {sharding!r}")
    sharders = [TableSharder()]
    offered = sharders[0].sharding_types(context.device.type)
    if sharding not in offered:
        raise ValueError(f"TorchRec does not offer {sharding} sharding on {context.device.type} (only {offered})")
    stages = [m for m in module.modules() if isinstance(m, TorchRecFeatureEmbedding)]
    if not stages:
        raise ValueError("shard() needs a module holding a TorchRecFeatureEmbedding")
    for stage in stages:
        apply_optimizer_in_backward(embedding_optimizer, stage.ebc.parameters(),
                                    {"lr": 0.01, **(embedding_optimizer_options or {})})
    constraints = {table_name(field): ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"])
                   for stage in stages for field in stage.fields}
    topology = Topology(world_size=context.world_size, compute_device=context.device.type)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints, debug=False).collective_plan(
        module, sharders, context.group)
    return DistributedModelParallel(
        module, env=ShardingEnv.from_process_group(context.group), device=context.device, plan=plan,
        sharders=sharders,
        data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False, find_unused_parameters=True))


def dense_parameters(sharded) -> dict:
    """Name -> parameter of everything but the tables (their optimizer runs inside the backward)."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return dict(in_backward_optimizer_filter(sharded.named_parameters()))


@torch.no_grad()
def load_tables(sharded, plain) -> None:
    """Copy the tables of a :class:`hamur_fast.features.FeatureEmbedding` (same feature map and width) into the
    shards this rank holds of a sharded :class:`TorchRecFeatureEmbedding` (``DistributedModelParallel``
    initialises its tables afresh), e.g. to start from a one-process model or checkpoint."""
    by_table = {table_name(field): table.weight for field, table in zip(plain.fields, plain.tables)}
    for name, value in sharded.state_dict().items():
        table = name.split(".")[-2]
        if table not in by_table or not hasattr(value, "local_shards"):
            continue
        for piece in value.local_shards():
            rows, columns = piece.metadata.shard_offsets
            height, width = piece.metadata.shard_sizes
            piece.tensor.copy_(by_table[table][rows:rows + height, columns:columns + width])
