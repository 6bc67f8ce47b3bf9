"""M2M: multi-scenario multi-task meta learning (Zhang et al., WSDM 2022, "Leaving No One Behind")."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import grouped_linear
from .base import MultiDomainModel
from .blocks import MLP, mixture


class MetaLinear(nn.Module):
    """Meta unit: a linear layer whose parameters are generated from the scenario knowledge ``s_d``.

    ``W_d = reshape(G_W s_d + c_W)`` (in, out), ``b_d = G_b s_d + c_b``, output ``x W_d + b_d``. ``s_d``
    depends on the domain only, so the D weight sets are generated once per call and each row uses its
    own (stacked weights + gather), never a (B, in, out) tensor.
    """

    def __init__(self, in_features: int, out_features: int, knowledge_dim: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_generator = nn.Linear(knowledge_dim, in_features * out_features)
        self.bias_generator = nn.Linear(knowledge_dim, out_features)
        with torch.no_grad():
            # c_W holds a fan-in-scaled base weight; the scenario-dependent part starts smaller.
            self.weight_generator.bias.normal_(0.0, in_features ** -0.5)
            self.weight_generator.weight.normal_(0.0, (in_features * knowledge_dim) ** -0.5)

    def forward(self, x: torch.Tensor, knowledge: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """x (B, in), knowledge (D, knowledge_dim) for every domain, domain (B,) -> (B, out)."""
        weight = self.weight_generator(knowledge).view(-1, self.in_features, self.out_features)
        return grouped_linear.run(x, domain, weight, self.bias_generator(knowledge))


class M2M(MultiDomainModel):
    """M2M on the instance embedding, with one task (CTR) and the domains as scenarios.

    - Expert view representation: ``E_i = MLP_i(e)``, ``num_experts`` MLPs ``expert_dims``.
    - Scenario knowledge: ``s_d = ReLU(W_s emb(d) + b_s)`` from a learned domain embedding.
    - Meta attention: ``a_i = v^T ReLU(Meta([E_i ; t]))``, ``R = sum_i softmax(a)_i E_i`` with ``t`` the
      learned task embedding.
    - Meta tower: ``L_{j+1} = ReLU(Meta_j(L_j) + L_j)`` (residual meta units, ``tower_layers`` of them),
      then ``logit = w^T L + b``.
    """

    def __init__(self, input_dim: int, num_domains: int, num_experts: int = 4, expert_dims=(256, 128),
                 domain_embed_dim: int = 16, knowledge_dim: int = 16, task_embed_dim: int = 16,
                 attention_dim: int = 64, tower_layers: int = 2, dropout: float = 0.0):
        super().__init__(input_dim, num_domains)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.experts = nn.ModuleList(MLP(input_dim, list(expert_dims), dropout) for _ in range(num_experts))
        width = self.experts[0].output_dim
        self.domain_embedding = nn.Embedding(num_domains, domain_embed_dim)
        self.knowledge = nn.Sequential(nn.Linear(domain_embed_dim, knowledge_dim), nn.ReLU())
        self.task_embedding = nn.Parameter(torch.randn(task_embed_dim))
        self.attention_unit = MetaLinear(width + task_embed_dim, attention_dim, knowledge_dim)
        self.attention_vector = nn.Linear(attention_dim, 1, bias=False)
        self.tower = nn.ModuleList(MetaLinear(width, width, knowledge_dim) for _ in range(tower_layers))
        self.out = nn.Linear(width, 1)

    def compute_logits(self, e, domain):
        knowledge = self.knowledge(self.domain_embedding.weight)  # (D, knowledge_dim): every scenario's s_d
        experts = torch.stack([expert(e) for expert in self.experts], dim=1)  # (B, n, width)
        batch, num_experts, _ = experts.shape
        task = self.task_embedding.expand(batch, num_experts, -1)
        queries = torch.cat([experts, task], dim=2).flatten(0, 1)  # one attention input per (row, expert)
        hidden = torch.relu(self.attention_unit(queries, knowledge, domain.repeat_interleave(num_experts)))
        scores = self.attention_vector(hidden).view(batch, num_experts)
        h = mixture(torch.softmax(scores, dim=1), experts)
        for unit in self.tower:
            h = torch.relu(unit(h, knowledge, domain) + h)
        return self.out(h).squeeze(1)
