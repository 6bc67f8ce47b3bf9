"""The one composition of the adapter cell and DomainNorm, wired into autograd once for every backend.

    forward:  project -> statistics -> [merge across ranks] -> normalise
    backward: grad sums -> [all_reduce across ranks] -> input gradients

A backend supplies its passes as a table (:class:`~hamur_fast.ops.contract.Passes`): plain functions over its
kernels. This module composes them in one of two forms:

- fused: one custom op per family (``hamur_fast::cell_forward``, ``norm_forward``, ``generated_cell_forward``,
  each with its ``_backward``), taking the backend's name as its first argument and running that backend's fused
  forms. One fake and one autograd formula per family, so torch.compile and torch.export see single ops whatever
  the backend. Used when the table has the fused form and no merge is needed.
- split: one ``autograd.Function`` over the split passes with the merge step between them: the collectives of
  :mod:`hamur_fast.ops.collectives` while a data-parallel step synchronises batch statistics (all_gather + Chan
  merge forward, all_reduce of the group sums backward), the identity in one process. The weight and bias gradients
  of the normalisation are this rank's own sums (DDP averages parameter gradients itself).

The :class:`~hamur_fast.ops.contract.Plan` reaches every pass and kernel as itself, or as its flags
(:meth:`~hamur_fast.ops.contract.Plan.flags`) in a custom op's schema. Eager backends (no fused form) keep their
own autograd over torch ops.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch._C import _functions as autograd_functions

from . import collectives
from .contract import GroupStats, Passes, Plan, update_running_stats, variance_divisor
from .eager import PASSES as EAGER_PASSES
from .eager import adapter_projection
from .registry import get_backend


def _table(backend: str) -> Passes:
    return get_backend(backend).passes


def _statistics_like(t, num_groups: int, dtype):
    """Empty (count (G,), mean, m2, rstd (G, h)) for the fakes."""
    table = t.new_empty((num_groups, t.shape[1]), dtype=dtype)
    return [t.new_empty((num_groups,), dtype=dtype), table, torch.empty_like(table), torch.empty_like(table)]


def _num_groups(weight, per_domain: bool) -> int:
    return weight.shape[0] if per_domain else 1


def _cast(tensors, dtype):
    """The tensors in the dtype a table's fused forms take (None: as they are); ``to`` only where it changes one (a
    no-op ``to`` still costs a call through the dispatcher)."""
    return [t if dtype is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def _stats(plan: Plan, count, mean, m2) -> GroupStats | None:
    return GroupStats(count, mean, m2) if plan.batch_statistics else None


# ----------------------------------------------------------------------------- the fused ops
# Registered with torch.library's Library (schema, one kernel for every device, fake, Autograd kernel) rather than
# torch.library.custom_op: custom_op wraps every call (pytree over the list arguments and outputs, an aliasing check,
# fill_defaults, a dynamo guard per kernel): ~200 us per cell step (forward and backward) at B=8, a third of the step
# (benchmarks/RESULTS.md, "Issue 22: the composed ops' fixed cost"). Each family's autograd is one
# autograd.Function over the forward op, given the differentiable tensors flat so that autograd sees those in lists.
_LIB = torch.library.Library("hamur_fast", "FRAGMENT")
_PLAN_ARGS = "bool per_domain, bool batch_statistics, bool unbiased, float eps"
_STATS = "Tensor count, Tensor mean, Tensor rstd"
_NUM_PARAMS, _NUM_GENERATOR = 8, 4  # contract: params (DL, DR, db, UL, UR, ub, nw, nb); generator (g, centre, W', c')
_plan = functools.cache(Plan.of_flags)  # the kernels rebuild the plan from its flags at every call
_below_autograd = torch._C._AutoDispatchBelowAutograd  # what an Autograd kernel runs its op under


def _define(schema: str, kernel: Callable, fake: Callable):
    """The op ``hamur_fast::<schema>`` with ``kernel`` for every device and its fake."""
    name = schema[:schema.index("(")]
    _LIB.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"hamur_fast::{name}", fake, lib=_LIB)
    return getattr(torch.ops.hamur_fast, name).default


def _first_order(backward_op, *args):
    """The gradients ``backward_op(*args)``; under create_graph=True behind a node that refuses to differentiate them
    again (the fused backward kernels have no derivative of their own), not silently without second-order terms."""
    with _below_autograd():
        grads = backward_op(*args)
    if not torch.is_grad_enabled():
        return grads
    refuse = autograd_functions.DelayedError(b"hamur_fast: the fused ops are differentiable once; backend='torch' "
                                             b"differentiates further", len(grads))
    return refuse(*(g.detach().requires_grad_() for g in grads))


def _forward_saved_like(saved_like, x, rank, params, per_domain, batch_statistics, unbiased, eps, stats_dtype):
    """[y, count, mean, m2, rstd, *saved] empty, for the fakes of the cells."""
    plan = _plan(per_domain, batch_statistics, unbiased, eps)
    return [torch.empty_like(x), *_statistics_like(x, _num_groups(params[6], per_domain), stats_dtype),
            *saved_like(x, rank, params, plan)]


# ----------------------------------------------------------------------------- the fused cell
def _cell_forward(backend, x, rep, domain, params, running_mean, running_var, *flags):
    """[y, count, mean, m2, rstd, *saved] of ``backend``'s fused cell."""
    return list(_table(backend).cell_forward(x, rep, domain, params, running_mean, running_var, _plan(*flags)))


def _cell_forward_fake(backend, x, rep, domain, params, running_mean, running_var, *flags):
    table = _table(backend)
    return _forward_saved_like(table.cell_saved_like, x, rep.shape[1], params, *flags, table.statistics_dtype(x.dtype))


def _cell_backward(backend, dy, x, rep, domain, params, saved, count, mean, rstd, *flags):
    """The gradients of x, rep and the eight params."""
    return list(_table(backend).cell_backward(dy, x, rep, domain, params, saved, count, mean, rstd, _plan(*flags)))


def _cell_backward_fake(backend, dy, x, rep, domain, params, *_rest):
    return [torch.empty_like(t) for t in (x, rep, *params)]


cell_forward = _define("cell_forward(str backend, Tensor x, Tensor rep, Tensor domain, Tensor[] params, "
                       f"Tensor? running_mean, Tensor? running_var, {_PLAN_ARGS}) -> Tensor[]",
                       _cell_forward, _cell_forward_fake)
cell_backward = _define("cell_backward(str backend, Tensor dy, Tensor x, Tensor rep, Tensor domain, Tensor[] params, "
                        f"Tensor[] saved, {_STATS}, {_PLAN_ARGS}) -> Tensor[]", _cell_backward, _cell_backward_fake)


class _CellAutograd(torch.autograd.Function):
    """cell_forward's autograd: y differentiable in x, rep and the params; the rest saved or non-differentiable."""

    @staticmethod
    def forward(ctx, backend, domain, running, flags, x, rep, *params):
        with _below_autograd():
            output = cell_forward(backend, x, rep, domain, list(params), *running, *flags)
        _y, count, mean, _m2, rstd, *saved = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, rep, domain, count, mean, rstd, *params, *saved)
        ctx.backend, ctx.flags = backend, flags
        return tuple(output)

    @staticmethod
    def backward(ctx, dy, *_unused_grads):
        x, rep, domain, count, mean, rstd, *rest = ctx.saved_tensors
        grads = _first_order(cell_backward, ctx.backend, dy, x, rep, domain, rest[:_NUM_PARAMS], rest[_NUM_PARAMS:],
                             count, mean, rstd, *ctx.flags)
        return None, None, None, None, *grads


def _cell_autograd(backend, x, rep, domain, params, running_mean, running_var, *flags):
    if _needs_grad(x, rep, *params):
        return list(_CellAutograd.apply(backend, domain, (running_mean, running_var), flags, x, rep, *params))
    with _below_autograd():
        return cell_forward(backend, x, rep, domain, params, running_mean, running_var, *flags)


_LIB.impl("cell_forward", _cell_autograd, "Autograd")


# ----------------------------------------------------------------------------- the fused norm
def _norm_forward(backend, o, domain, weight, bias, running_mean, running_var, *flags):
    """(y, count, mean, m2, rstd) of ``backend``'s fused DomainNorm."""
    return tuple(_table(backend).norm_forward(o, domain, weight, bias, running_mean, running_var, _plan(*flags)))


def _norm_forward_fake(backend, o, domain, weight, bias, running_mean, running_var, per_domain, *_flags):
    return (torch.empty_like(o), *_statistics_like(o, _num_groups(weight, per_domain),
                                                   _table(backend).statistics_dtype(o.dtype)))


def _norm_backward(backend, dy, o, domain, weight, count, mean, rstd, *flags):
    """(grad o, grad weight, grad bias)."""
    return tuple(_table(backend).norm_backward(dy, o, domain, weight, count, mean, rstd, _plan(*flags)))


def _norm_backward_fake(backend, dy, o, domain, weight, *_rest):
    return torch.empty_like(o), torch.empty_like(weight), torch.empty_like(weight)


norm_forward = _define("norm_forward(str backend, Tensor o, Tensor domain, Tensor weight, Tensor bias, "
                       f"Tensor? running_mean, Tensor? running_var, {_PLAN_ARGS}) -> "
                       "(Tensor, Tensor, Tensor, Tensor, Tensor)", _norm_forward, _norm_forward_fake)
norm_backward = _define("norm_backward(str backend, Tensor dy, Tensor o, Tensor domain, Tensor weight, "
                        f"{_STATS}, {_PLAN_ARGS}) -> (Tensor, Tensor, Tensor)", _norm_backward, _norm_backward_fake)


class _NormAutograd(torch.autograd.Function):
    """norm_forward's autograd: y differentiable in o, weight and bias."""

    @staticmethod
    def forward(ctx, backend, domain, running, flags, o, weight, bias):
        with _below_autograd():
            output = norm_forward(backend, o, domain, weight, bias, *running, *flags)
        _y, count, mean, _m2, rstd = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(o, domain, weight, count, mean, rstd)
        ctx.backend, ctx.flags = backend, flags
        return output

    @staticmethod
    def backward(ctx, dy, *_unused_grads):
        return None, None, None, None, *_first_order(norm_backward, ctx.backend, dy, *ctx.saved_tensors, *ctx.flags)


def _norm_autograd(backend, o, domain, weight, bias, running_mean, running_var, *flags):
    if _needs_grad(o, weight, bias):
        return _NormAutograd.apply(backend, domain, (running_mean, running_var), flags, o, weight, bias)
    with _below_autograd():
        return norm_forward(backend, o, domain, weight, bias, running_mean, running_var, *flags)


_LIB.impl("norm_forward", _norm_autograd, "Autograd")


# ----------------------------------------------------------------------------- the fused generated cell (level 2)
def _generated_forward(backend, x, generator, domain, params, running_mean, running_var, *flags_precision):
    """[y, count, mean, m2, rstd, *saved] of ``backend``'s cell on I generated from generator = (g, centre, W', c')."""
    *flags, precision = flags_precision
    return list(_table(backend).generated_forward(x, generator, domain, params, running_mean, running_var,
                                                  _plan(*flags), precision))


def _generated_forward_fake(backend, x, generator, domain, params, running_mean, running_var, *flags_precision):
    table = _table(backend)
    return _forward_saved_like(table.generated_saved_like, x, params[0].shape[-1], params, *flags_precision[:-1],
                               table.statistics_dtype(x.dtype))


def _generated_backward(backend, dy, x, generator, domain, params, saved, count, mean, rstd, *flags_precision):
    """The gradients of x, the four generator tensors and the eight params."""
    *flags, precision = flags_precision
    return list(_table(backend).generated_backward(dy, x, generator, domain, params, saved, count, mean, rstd,
                                                   _plan(*flags), precision))


def _generated_backward_fake(backend, dy, x, generator, domain, params, *_rest):
    return [torch.empty_like(t) for t in (x, *generator, *params)]


generated_cell_forward = _define(
    "generated_cell_forward(str backend, Tensor x, Tensor[] generator, Tensor domain, Tensor[] params, "
    f"Tensor? running_mean, Tensor? running_var, {_PLAN_ARGS}, str precision) -> Tensor[]",
    _generated_forward, _generated_forward_fake)
generated_cell_backward = _define(
    "generated_cell_backward(str backend, Tensor dy, Tensor x, Tensor[] generator, Tensor domain, Tensor[] params, "
    f"Tensor[] saved, {_STATS}, {_PLAN_ARGS}, str precision) -> Tensor[]", _generated_backward,
    _generated_backward_fake)


class _GeneratedAutograd(torch.autograd.Function):
    """generated_cell_forward's autograd: y differentiable in x, the generator tensors and the params."""

    @staticmethod
    def forward(ctx, backend, domain, running, flags_precision, x, *leaves):
        generator, params = list(leaves[:_NUM_GENERATOR]), list(leaves[_NUM_GENERATOR:])
        with _below_autograd():
            output = generated_cell_forward(backend, x, generator, domain, params, *running, *flags_precision)
        _y, count, mean, _m2, rstd, *saved = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, domain, count, mean, rstd, *leaves, *saved)
        ctx.backend, ctx.flags_precision = backend, flags_precision
        return tuple(output)

    @staticmethod
    def backward(ctx, dy, *_unused_grads):
        x, domain, count, mean, rstd, *rest = ctx.saved_tensors
        generator, params = rest[:_NUM_GENERATOR], rest[_NUM_GENERATOR:_NUM_GENERATOR + _NUM_PARAMS]
        grads = _first_order(generated_cell_backward, ctx.backend, dy, x, generator, domain, params,
                             rest[_NUM_GENERATOR + _NUM_PARAMS:], count, mean, rstd, *ctx.flags_precision)
        return None, None, None, None, *grads


def _generated_autograd(backend, x, generator, domain, params, running_mean, running_var, *flags_precision):
    if _needs_grad(x, *generator, *params):
        return list(_GeneratedAutograd.apply(backend, domain, (running_mean, running_var), flags_precision, x,
                                             *generator, *params))
    with _below_autograd():
        return generated_cell_forward(backend, x, generator, domain, params, running_mean, running_var,
                                      *flags_precision)


_LIB.impl("generated_cell_forward", _generated_autograd, "Autograd")


# ----------------------------------------------------------------------------- the split form
class _Seams(NamedTuple):
    """One family's split passes bound to a call's ids and plan; ``inputs`` are the differentiable tensors, the
    normalisation's weight and bias last."""

    project: Callable  # inputs -> (GroupStats of this process's rows, saved)
    normalise: Callable  # (inputs, saved, mean, rstd) -> y
    grad_sums: Callable  # (dy, inputs, saved, mean, rstd) -> (sum_dy, sum_dy_xhat)
    input_grads: Callable  # (dy, inputs, saved, count, mean, rstd, sum_dy, sum_dy_xhat) -> grads but weight, bias


def _norm_seams(passes: Passes, groups, num_groups: int, unbiased: bool) -> _Seams:
    def tables(weight, bias):
        return weight.reshape(num_groups, -1), bias.reshape(num_groups, -1)

    return _Seams(
        lambda inputs: (passes.statistics(inputs[0], groups, num_groups), ()),
        lambda inputs, saved, mean, rstd: passes.normalise(inputs[0], groups, *tables(*inputs[1:]), mean, rstd),
        lambda dy, inputs, saved, mean, rstd: passes.grad_sums(dy, inputs[0], groups, mean, rstd, num_groups),
        lambda dy, inputs, saved, count, mean, rstd, *sums: (passes.input_grad(
            dy, inputs[0], groups, tables(*inputs[1:])[0], mean, rstd, count, *sums, unbiased),))


def _cell_seams(passes: Passes, domain, plan: Plan) -> _Seams:
    return _Seams(
        lambda inputs: passes.cell_project(inputs[0], inputs[1], domain, inputs[2:], plan),
        lambda inputs, saved, mean, rstd: passes.cell_normalise(inputs[0], domain, inputs[2:], saved, mean, rstd,
                                                                plan),
        lambda dy, inputs, saved, mean, rstd: passes.cell_grad_sums(dy, domain, inputs[2:], saved, mean, rstd, plan),
        lambda dy, inputs, saved, count, mean, rstd, *sums: passes.cell_input_grads(
            dy, inputs[0], inputs[1], domain, inputs[2:], saved, count, mean, rstd, *sums, plan))


class _Split(torch.autograd.Function):
    """y = normalise(project(inputs)) with the statistics merged between the passes (``group``: over its ranks;
    None: this process's own), and its backward with the group sums all-reduced between grad_sums and
    input_grads. The merged GroupStats come out as non-differentiable outputs (for the running statistics)."""

    @staticmethod
    def forward(ctx, seams, group, unbiased, eps, *inputs):
        local, saved = seams.project(inputs)
        stats = local if group is None else collectives.all_gather_stats(local, group)
        rstd = torch.rsqrt(stats.m2 / variance_divisor(stats.count.unsqueeze(1), unbiased) + eps)
        y = seams.normalise(inputs, saved, stats.mean, rstd)
        ctx.save_for_backward(stats.count, stats.mean, rstd, *inputs, *saved)
        ctx.seams, ctx.group, ctx.num_inputs = seams, group, len(inputs)
        ctx.mark_non_differentiable(*stats)
        return (y, *stats)

    @staticmethod
    def backward(ctx, dy, *_unused_grads):
        count, mean, rstd, *rest = ctx.saved_tensors
        inputs, saved = rest[:ctx.num_inputs], tuple(rest[ctx.num_inputs:])
        sum_dy, sum_dy_xhat = ctx.seams.grad_sums(dy, inputs, saved, mean, rstd)  # this rank's: the weight's and bias'
        every_rank = (sum_dy, sum_dy_xhat) if ctx.group is None else collectives.all_reduce_sums(sum_dy, sum_dy_xhat,
                                                                                                 ctx.group)
        grads = ctx.seams.input_grads(dy, inputs, saved, count, mean, rstd, *every_rank)
        weight = inputs[-2]
        norm_grads = (sum_dy_xhat.reshape(weight.shape).to(weight.dtype), sum_dy.reshape(weight.shape).to(weight.dtype))
        return (None, None, None, None, *grads, *norm_grads)


def split_norm(o, groups, num_groups, weight, bias, unbiased: bool, eps: float, passes: Passes = EAGER_PASSES,
               group=None):
    """Normalise o (B, h) by the split passes with the statistics of every rank's rows of each group (``groups``
    None: one group of all rows); weight/bias (G, h), or (h,) for one group. Returns (y, merged GroupStats)."""
    y, *stats = _Split.apply(_norm_seams(passes, groups, num_groups, unbiased), group, unbiased, eps, o, weight, bias)
    return y, GroupStats(*stats)


def split_domain_norm(impl, o, domain, weight, bias, running_mean, running_var, plan: Plan, group=None):
    """DomainNorm of a batch-statistics ``plan`` by ``impl``'s split passes: paper mode per domain (D, h), released
    mode one group with the (h,) affine."""
    groups, num_groups = (domain, weight.shape[0]) if plan.per_domain else (None, 1)
    return split_norm(o, groups, num_groups, weight, bias, plan.unbiased, plan.eps, impl.passes, group)


def split_hyper_adapter(impl, x, rep, domain, params, running_mean, running_var, plan: Plan, group=None):
    """The adapter cell of a batch-statistics ``plan`` by ``impl``'s cell passes, else the projection by autograd
    over torch ops and its norm passes."""
    if impl.passes.cell_project is None:
        o = adapter_projection(x, rep, domain, *params[:6], per_domain=plan.per_domain)
        normed, stats = split_domain_norm(impl, o, domain, params[6], params[7], running_mean, running_var, plan,
                                          group)
        return x + normed, stats
    y, *stats = _Split.apply(_cell_seams(impl.passes, domain, plan), group, plan.unbiased, plan.eps, x, rep, *params)
    return y, GroupStats(*stats)


# ----------------------------------------------------------------------------- the ops, as the checked entry points run them
def _running(plan: Plan, running_mean, running_var, dtype):
    return (None, None) if plan.batch_statistics else tuple(_cast((running_mean, running_var), dtype))


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def hyper_adapter(impl, x, rep, domain, params, running_mean, running_var, plan: Plan, group=None):
    """(y, stats) of the adapter cell on backend ``impl``: split with the statistics merged over ``group`` while a
    data-parallel step synchronises them, else the fused op, else the backend's eager cell."""
    if group is not None and plan.batch_statistics:
        return split_hyper_adapter(impl, x, rep, domain, params, running_mean, running_var, plan, group)
    passes = impl.passes
    if passes.cell_forward is None:
        return impl.hyper_adapter(x, rep, domain, params, running_mean, running_var, plan)
    dtype = passes.compute_dtype(x.dtype)
    x_c, rep_c, *params_c = _cast((x, rep, *params), dtype)
    running = _running(plan, running_mean, running_var, dtype)
    if passes.cell_infer is not None and not plan.batch_statistics and not _needs_grad(x_c, rep_c, *params_c):
        return passes.cell_infer(x_c, rep_c, domain, params_c, *running, plan.eps).to(x.dtype), None
    y, count, mean, m2, *_ = cell_forward(impl.name, x_c, rep_c, domain, params_c, *running, *plan.flags())
    return y.to(x.dtype), _stats(plan, count, mean, m2)


def domain_norm(impl, o, domain, weight, bias, running_mean, running_var, plan: Plan, group=None):
    """(y, stats) of DomainNorm on backend ``impl``, in the forms of :func:`hyper_adapter`."""
    if group is not None and plan.batch_statistics:
        return split_domain_norm(impl, o, domain, weight, bias, running_mean, running_var, plan, group)
    passes = impl.passes
    if passes.norm_forward is None:
        return impl.domain_norm(o, domain, weight, bias, running_mean, running_var, plan)
    dtype = passes.compute_dtype(o.dtype)
    o_c, weight_c, bias_c = _cast((o, weight, bias), dtype)
    y, count, mean, m2, _rstd = norm_forward(impl.name, o_c, domain, weight_c, bias_c,
                                             *_running(plan, running_mean, running_var, dtype), *plan.flags())
    return y.to(o.dtype), _stats(plan, count, mean, m2)


def generated_cell(impl, x, rep, domain, params, running_mean, running_var, plan: Plan, precision: str):
    """(y, stats) of the cell on ``rep`` (a GeneratedRep) on backend ``impl``: its fused level 2 when the table has
    one, else I materialised and its level-1 cell."""
    passes = impl.passes
    if passes.generated_forward is None:
        return hyper_adapter(impl, x, rep.materialise(), domain, params, running_mean, running_var, plan)
    dtype = passes.compute_dtype(x.dtype)
    x_c, *params_c = _cast((x, *params), dtype)
    generator = _cast((rep.g, rep.centre, rep.weight, rep.bias), dtype)
    y, count, mean, m2, *_ = generated_cell_forward(impl.name, x_c, generator, domain, params_c,
                                                    *_running(plan, running_mean, running_var, dtype),
                                                    *plan.flags(), precision)
    return y.to(x.dtype), _stats(plan, count, mean, m2)


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``F.batch_norm`` on (B, C), with the global batch's statistics while
    :func:`~hamur_fast.ops.collectives.synchronised` is active (the torch backend's passes: biased variance, one
    group)."""
    group = collectives.active_group()
    if group is None or not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if weight is None:  # affine=False: the identity affine map, whose gradients nobody reads
        weight, bias = x.new_ones(x.shape[1]), x.new_zeros(x.shape[1])
    y, stats = split_norm(x, None, 1, weight, bias, False, eps, EAGER_PASSES, group)
    if running_mean is not None:  # one group: the running statistics seen as (1, C)
        update_running_stats(running_mean.view(1, -1), running_var.view(1, -1), stats, momentum)
    return y
