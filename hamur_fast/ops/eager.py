"""backend="torch": the fastest adapter cell we know how to write in eager PyTorch.

Compared with the released einsum math it
- multiplies right-to-left through the rank-k space (O(hk + k^2 + ks) per row, never a (B, h, s) tensor),
- selects per-domain factors by one stacked GEMM and a gather (no per-row weight copies),
- reduces per-domain statistics with a one-hot matmul (no Python loop, no host-device sync),
- updates running statistics with ``torch.where`` (no ``.item()``), so it is CUDA-graph capturable.
Gradients come from autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def ids_in_range(domain: torch.Tensor, num_domains: int):
    """(ids safe to index with, which rows had a valid id), without a host sync. With value checks off or
    under torch.compile an id may be out of range: its row computes with domain 0's factors, is left out of
    every statistic, and comes out NaN (domain_norm)."""
    valid = (domain >= 0) & (domain < num_domains)
    return torch.where(valid, domain, 0), valid


def domain_statistics(o: torch.Tensor, domain: torch.Tensor, num_domains: int, valid: torch.Tensor):
    """Per-domain count, mean and biased variance of the valid rows of ``o`` (two-pass, stable)."""
    onehot = F.one_hot(domain, num_domains).to(o.dtype) * valid.unsqueeze(1)  # (B, D)
    count = onehot.sum(dim=0)
    safe = count.clamp(min=1).unsqueeze(1)
    mean = (onehot.t() @ o) / safe
    centred = o - mean[domain]
    var = (onehot.t() @ (centred * centred)) / safe
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
    domain, valid = ids_in_range(domain, num_domains)
    if training or running_mean is None:
        count, mean, var, centred = domain_statistics(o, domain, num_domains, valid)
        if training and running_mean is not None:
            update_running_stats(running_mean, running_var, count, mean, var, momentum)
        scale = weight * torch.rsqrt(var + eps)
        out = torch.addcmul(bias[domain], centred, scale[domain])
    else:  # eval: the running statistics fold into one per-domain affine map
        scale = weight * torch.rsqrt(running_var + eps)
        shift = bias - running_mean * scale
        out = torch.addcmul(shift[domain], o, scale[domain])
    return torch.where(valid.unsqueeze(1), out, float("nan"))


def adapter_projection(x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias):
    """The cell before normalisation: o = ((sigmoid(((x U) I) V + b) U') I) V' + b'."""
    def low_rank(v, left, right):  # ((v left) I) right, right-to-left through the rank-k space
        return project_per_domain(_through_rep(project_per_domain(v, left, domain), rep), right, domain)

    a = torch.sigmoid(low_rank(x, down_left, down_right) + _per_row(down_bias, domain))
    return low_rank(a, up_left, up_right) + _per_row(up_bias, domain)


def hyper_adapter(x, rep, domain, params, running_mean, running_var, *, mode, training, momentum, eps):
    *projection, norm_weight, norm_bias = params
    safe_domain = ids_in_range(domain, norm_weight.shape[0])[0] if mode == "paper" else domain
    o = adapter_projection(x, rep, safe_domain, *projection)
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
