"""backend="torch": the fastest adapter cell we know how to write in eager PyTorch.

Compared with the released einsum math it
- multiplies right-to-left through the rank-k space (O(hk + k^2 + ks) per row, never a (B, h, s) tensor),
- selects per-domain factors by one stacked GEMM and a gather (no per-row weight copies),
- reduces per-domain statistics with a one-hot matmul (no Python loop, no host-device sync),
- returns the per-domain (count, mean, M2) without reading anything back, so it is CUDA-graph capturable.
Gradients come from autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import FLOAT_DTYPES, Backend, Capabilities, GroupStats
from ..registry import register_backend


def project_per_domain(v: torch.Tensor, weight: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """Row b of the result is ``v[b] @ weight[d_b]``; ``weight`` is (in, out) shared or (D, in, out)."""
    if weight.dim() == 2:
        return v @ weight
    if weight.shape[0] == 1:
        return v @ weight[0]
    if v.device.type == "cpu" and not torch.compiler.is_compiling():
        # On the CPU reading the domain ids back costs nothing, so 1/D of the work is worth it; on a
        # GPU that read is a sync (and CUDA-graph capture forbids it).
        return project_by_domain_segments(v, weight, domain)
    return project_stacked(v, weight, domain)


def project_stacked(v, weight, domain):
    """One GEMM against all D domains' factors side by side, then each row keeps its own block: D times
    the work of the rows' own products, but no host sync and static shapes."""
    num_domains, fan_in, fan_out = weight.shape
    stacked = v @ weight.permute(1, 0, 2).reshape(fan_in, num_domains * fan_out)
    stacked = stacked.view(v.shape[0], num_domains, fan_out)
    index = domain.view(-1, 1, 1).expand(-1, 1, fan_out)
    return stacked.gather(1, index).squeeze(1)


def project_by_domain_segments(v, weight, domain):
    """One GEMM per domain on that domain's rows (reads the domain ids on the host)."""
    out = None
    for d in range(weight.shape[0]):
        rows = (domain == d).nonzero().squeeze(1)
        if rows.numel():
            part = v[rows] @ weight[d]
            if out is None:  # in the product's dtype, which autocast may have lowered
                out = part.new_empty(v.shape[0], weight.shape[2])
            out = out.index_put((rows,), part)
    return out


def _per_row(param: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    return param if param.dim() == 1 else param[domain]


def _through_rep(v: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
    """Row-wise ``v[b] @ rep[b]`` for v (B, k), rep (B, k, k)."""
    return torch.bmm(v.unsqueeze(1), rep).squeeze(1)


def domain_statistics(o: torch.Tensor, domain: torch.Tensor, num_domains: int):
    """Per-domain count, mean and M2 of the rows of ``o`` (two-pass, stable), and the centred rows."""
    onehot = F.one_hot(domain, num_domains).to(o.dtype)  # (B, D)
    count = onehot.sum(dim=0)
    mean = (onehot.t() @ o) / count.clamp(min=1).unsqueeze(1)
    centred = o - mean[domain]
    m2 = onehot.t() @ (centred * centred)
    return count, mean, m2, centred


def domain_norm(o, domain, weight, bias, running_mean, running_var, plan):
    if not plan.per_domain:
        mean = o.mean(dim=0)
        centred = o - mean
        m2 = (centred * centred).sum(dim=0)
        stats = GroupStats(o.new_full((1,), o.shape[0]), mean.detach()[None], m2.detach()[None])
        return torch.addcmul(bias, centred * torch.rsqrt(m2 / max(o.shape[0] - 1, 1) + plan.eps), weight), stats

    if plan.batch_statistics:
        count, mean, m2, centred = domain_statistics(o, domain, weight.shape[0])
        scale = weight * torch.rsqrt(m2 / count.clamp(min=1).unsqueeze(1) + plan.eps)
        stats = GroupStats(count.detach(), mean.detach(), m2.detach())
        return torch.addcmul(bias[domain], centred, scale[domain]), stats
    # Running statistics: they fold into one per-domain affine map.
    scale = weight * torch.rsqrt(running_var + plan.eps)
    shift = bias - running_mean * scale
    return torch.addcmul(shift[domain], o, scale[domain]), None


def adapter_projection(x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias):
    """The cell before normalisation: o = ((sigmoid(((x U) I) V + b) U') I) V' + b'."""
    def low_rank(v, left, right):  # ((v left) I) right, right-to-left through the rank-k space
        return project_per_domain(_through_rep(project_per_domain(v, left, domain), rep), right, domain)

    a = torch.sigmoid(low_rank(x, down_left, down_right) + _per_row(down_bias, domain))
    return low_rank(a, up_left, up_right) + _per_row(up_bias, domain)


def hyper_adapter(x, rep, domain, params, running_mean, running_var, plan):
    *projection, norm_weight, norm_bias = params
    o = adapter_projection(x, rep, domain, *projection)
    normed, stats = domain_norm(o, domain, norm_weight, norm_bias, running_mean, running_var, plan)
    return x + normed, stats


def released_cell_all_towers(x, rep, params, eps):
    """The released-mode cell applied to every tower's output at once: x (T, B, h) -> (T, B, h).

    The released code runs its one (shared) cell on each tower's whole-batch output in turn; here
    the T applications are one set of batched products, with whole-batch statistics per tower.
    """
    down_left, down_right, down_bias, up_left, up_right, up_bias, weight, bias = params

    def through_rep(v):  # row b of every tower times rep[b]: (T, B, k) -> (T, B, k)
        return torch.bmm(v.transpose(0, 1), rep).transpose(0, 1)

    a = torch.sigmoid(through_rep(x @ down_left) @ down_right + down_bias)
    o = through_rep(a @ up_left) @ up_right + up_bias
    centred = o - o.mean(dim=1, keepdim=True)
    var = (centred * centred).sum(dim=1, keepdim=True) / max(o.shape[1] - 1, 1)
    return x + torch.addcmul(bias, centred * torch.rsqrt(var + eps), weight)


register_backend(Backend(
    "torch", hyper_adapter, domain_norm,
    Capabilities(devices=frozenset({"cpu", "cuda"}), dtypes=FLOAT_DTYPES, auto_rank={"cpu": 100, "cuda": 100}),
    hyper_adapter_all_towers=released_cell_all_towers))
