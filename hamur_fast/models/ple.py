"""PLE: Progressive Layered Extraction (Tang et al., RecSys 2020), domains as tasks."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import DomainLinear
from .backbones import DomainTowers
from .base import MultiDomainModel
from .blocks import mixture


class ExtractionLayer(nn.Module):
    """One CGC (Customized Gate Control) extraction layer for all D tasks at once.

    Task k: ``g^k = w^k(x^k) S^k(x)`` with ``S^k`` = [task k's experts; shared experts] and
    ``w^k = softmax(W_g^k x^k)``. Shared: ``g^s`` gates over all experts of all tasks plus the shared
    ones (not needed after the last layer). Experts are ``Linear -> ReLU`` of width ``width``; task
    experts and gates are stacked per domain and run as one batched matmul.
    """

    def __init__(self, input_dim: int, width: int, num_domains: int, specific: int, shared: int, last: bool):
        super().__init__()
        self.width, self.specific, self.shared = width, specific, shared
        self.task_experts = DomainLinear(input_dim, specific * width, num_domains)
        self.task_gates = DomainLinear(input_dim, specific + shared, num_domains)
        self.shared_experts = nn.Linear(input_dim, shared * width)
        self.shared_gate = None if last else nn.Linear(input_dim, num_domains * specific + shared)

    def forward(self, task_inputs: torch.Tensor | None, shared_input: torch.Tensor):
        """task_inputs (D, B, in), or None where every task reads the shared input (depth 1); shared_input (B, in).

        Returns (task outputs (D, B, width), shared output (B, width) or None after the last layer).
        """
        num_domains, batch = self.task_experts.num_domains, shared_input.shape[0]

        def per_task(layer):
            return layer.every_domain(shared_input) if task_inputs is None else layer.all_domains(task_inputs)
        task_experts = torch.relu(per_task(self.task_experts))
        task_experts = task_experts.view(num_domains, batch, self.specific, self.width)
        shared_experts = torch.relu(self.shared_experts(shared_input)).view(batch, self.shared, self.width)
        candidates = torch.cat([task_experts, shared_experts.expand(num_domains, -1, -1, -1)], dim=2)
        task_out = mixture(torch.softmax(per_task(self.task_gates), dim=-1), candidates)
        if self.shared_gate is None:
            return task_out, None
        every_expert = torch.cat([task_experts.permute(1, 0, 2, 3).reshape(batch, -1, self.width),
                                  shared_experts], dim=1)
        shared_out = mixture(torch.softmax(self.shared_gate(shared_input), dim=-1), every_expert)
        return task_out, shared_out

    def routed(self, task_input: torch.Tensor, shared_input: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """The last layer's task output for each row's own domain only: task_input (B, in) is row b's
        g^{d_b} (or the shared input at depth 1); grouped per-domain products, cost ~ B whatever D is."""
        batch = shared_input.shape[0]
        task_experts = torch.relu(self.task_experts.routed(task_input, domain)).view(batch, self.specific, self.width)
        shared_experts = torch.relu(self.shared_experts(shared_input)).view(batch, self.shared, self.width)
        candidates = torch.cat([task_experts, shared_experts], dim=1)
        return mixture(torch.softmax(self.task_gates.routed(task_input, domain), dim=-1), candidates)


class PLE(MultiDomainModel):
    """Progressive layered extraction: ``g^{k,j} = w^{k,j}(g^{k,j-1}) S^{k,j}(g^{k,j-1}, g^{s,j-1})``
    over N stacked CGC layers, then domain d's tower ``y_d = t^d(g^{d,N})`` (``tower_dims -> 1``).

    ``level_dims`` gives the expert width of each extraction layer; ``specific_experts`` per domain
    and ``shared_experts`` per layer. Every domain's path of a non-final layer runs on every row (its
    shared gate mixes all domains' experts: D times the work by the model's definition); the last
    layer, without a shared gate, runs each row's own domain only.
    """

    def __init__(self, input_dim: int, num_domains: int, level_dims=(256, 128), specific_experts: int = 1,
                 shared_experts: int = 2, tower_dims=(64,)):
        super().__init__(input_dim, num_domains)
        if len(level_dims) < 1 or min(specific_experts, shared_experts) < 1:
            raise ValueError(f"PLE needs >= 1 level and >= 1 expert of each kind, got level_dims={level_dims}, "
                             f"specific_experts={specific_experts}, shared_experts={shared_experts}")
        widths = [input_dim, *level_dims]
        self.levels = nn.ModuleList(
            ExtractionLayer(i, o, num_domains, specific_experts, shared_experts, last=j == len(level_dims) - 1)
            for j, (i, o) in enumerate(zip(widths, widths[1:]))
        )
        self.towers = DomainTowers.plain(widths[-1], num_domains, tower_dims)

    def compute_logits(self, e, domain):
        task, shared = None, e  # depth 1: every task reads e
        for level in self.levels[:-1]:
            task, shared = level(task, shared)
        # row b keeps g^{d_b}
        task = e if task is None else task[domain, torch.arange(e.shape[0], device=e.device)]
        # The last layer has no shared gate, so each row needs its own domain's experts only.
        return self.towers(self.levels[-1].routed(task, shared, domain), domain, None)
