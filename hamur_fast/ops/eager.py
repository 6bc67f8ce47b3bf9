"""backend="torch": the fastest adapter cell we know how to write in eager PyTorch.

Compared with the released einsum math it
- multiplies right-to-left through the rank-k space (O(hk + k^2 + ks) per row, never a (B, h, s) tensor),
- selects per-domain factors by the grouped per-domain GEMM of ops/grouped_linear.py (no per-row weight
  copies, cost independent of the number of domains),
- reduces per-domain statistics by scatter-add (no Python loop, no host-device sync, O(B) whatever D),
- updates running statistics with ``torch.where`` (no ``.item()``), so it is CUDA-graph capturable.
Gradients come from autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import grouped_linear


def project_per_domain(v: torch.Tensor, weight: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """Row b of the result is ``v[b] @ weight[d_b]``; ``weight`` is (in, out) shared or (D, in, out)."""
    if weight.dim() == 2:
        return v @ weight
    if weight.shape[0] == 1:
        return v @ weight[0]
    return grouped_linear.run(v, domain, weight)  # the grouped GEMM: cost ~ B, whatever D is


def _per_row(param: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    return param if param.dim() == 1 else param[domain]


def _through_rep(v: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
    """Row-wise ``v[b] @ rep[b]`` for v (B, k), rep (B, k, k)."""
    return torch.bmm(v.unsqueeze(1), rep).squeeze(1)


def domain_statistics(o: torch.Tensor, domain: torch.Tensor, num_domains: int):
    """Per-domain count, mean and biased variance of the rows of ``o`` (two-pass, stable).

    Sums by ``index_add`` (scatter-add): O(B h) work and memory whatever the number of domains.
    """
    count = o.new_zeros(num_domains).index_add(0, domain, o.new_ones(o.shape[0]))
    safe = count.clamp(min=1).unsqueeze(1)
    mean = o.new_zeros(num_domains, o.shape[1]).index_add(0, domain, o) / safe
    centred = o - mean[domain]
    var = o.new_zeros(num_domains, o.shape[1]).index_add(0, domain, centred * centred) / safe
    return count, mean, var, centred


def update_running_stats(running_mean, running_var, count, mean, var, momentum):
    """BatchNorm-style update, per domain, only where the domain had >= 2 rows; no host sync."""
    with torch.no_grad():
        seen = (count >= 2).unsqueeze(1)
        unbiased = var * (count / (count - 1).clamp(min=1)).unsqueeze(1)
        running_mean.copy_(torch.where(seen, torch.lerp(running_mean, mean.to(running_mean.dtype), momentum),
                                       running_mean))
        running_var.copy_(torch.where(seen, torch.lerp(running_var, unbiased.to(running_var.dtype), momentum),
                                      running_var))


def domain_norm(o, domain, weight, bias, running_mean, running_var, *, mode, training, momentum, eps):
    if mode == "released":
        mean = o.mean(dim=0)
        centred = o - mean
        var = (centred * centred).sum(dim=0) / max(o.shape[0] - 1, 1)
        return torch.addcmul(bias, centred * torch.rsqrt(var + eps), weight)

    num_domains = weight.shape[0]
    if training or running_mean is None:
        count, mean, var, centred = domain_statistics(o, domain, num_domains)
        if training and running_mean is not None:
            update_running_stats(running_mean, running_var, count, mean, var, momentum)
        scale = weight * torch.rsqrt(var + eps)
        return torch.addcmul(bias[domain], centred, scale[domain])
    # Eval: the running statistics fold into one per-domain affine map.
    scale = weight * torch.rsqrt(running_var + eps)
    shift = bias - running_mean * scale
    return torch.addcmul(shift[domain], o, scale[domain])


def adapter_projection(x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias):
    """The cell before normalisation: o = ((sigmoid(((x U) I) V + b) U') I) V' + b'."""
    def low_rank(v, left, right):  # ((v left) I) right, right-to-left through the rank-k space
        return project_per_domain(_through_rep(project_per_domain(v, left, domain), rep), right, domain)

    a = torch.sigmoid(low_rank(x, down_left, down_right) + _per_row(down_bias, domain))
    return low_rank(a, up_left, up_right) + _per_row(up_bias, domain)


def hyper_adapter(x, rep, domain, params, running_mean, running_var, *, mode, training, momentum, eps):
    *projection, norm_weight, norm_bias = params
    o = adapter_projection(x, rep, domain, *projection)
    normed = domain_norm(o, domain, norm_weight, norm_bias, running_mean, running_var,
                         mode=mode, training=training, momentum=momentum, eps=eps)
    return x + normed


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
