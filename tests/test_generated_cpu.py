"""Fusion level 2 of backend "cpu" (csrc/cpu/generated_cpu.cpp, hamur_fast/ops/backends/compiled_generated.py).

The C++ core generates I block by block: the cell's hand-written backward against finite differences (the core's
formula and the grouped products around it), the core's refusal of an out-of-range id, and a training step of a
model on the "cpu" backend that allocates no tensor of B*k*k elements. Against the float64 reference on odd sizes
at 1 and 2 threads, on poisoned memory, with out-of-range ids through the public op, and opcheck of the composed
op: tests/test_backends.py.
"""
import pytest
import torch

import hamur_fast as hf
from hamur_fast.ops import compose, generated
from hamur_fast.ops.contract import make_plan
from hamur_fast.ops.registry import get_backend
from helpers import GENERATED_NAMES, cell_inputs, fp32_bound, generated_inputs, rel_err
from test_generated import AllocationLog

pytestmark = pytest.mark.skipif("cpu" not in hf.available_backends() or
                                not hasattr(torch.ops.hamur_fast, "compiled_generated_core_forward"),
                                reason="the compiled extension is not built")


def core_args(per_domain, batch=70, rank=6, bottleneck=5, features=7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    lead = (3,) if per_domain else ()

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)
    return (randn(batch, rank), torch.relu(randn(batch, features)), randn(features), randn(rank * rank, features),
            randn(rank * rank), torch.randint(0, 3, (batch,), generator=gen), randn(*lead, rank, bottleneck),
            randn(*lead, bottleneck), randn(*lead, bottleneck, rank), per_domain)


def test_gradcheck():
    """The cell's hand-written backward (the core's formula and the grouped products around it, not just their
    composition) against finite differences, in float64, both modes."""
    for mode in ("paper", "released"):
        x, _rep, domain, params, _stats = cell_inputs(5, 4, 3, 2, 3, mode, seed=1)
        gen = torch.Generator().manual_seed(3)
        g = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        generator = [g, g.mean(0), torch.randn(9, 4, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen,
                                                                                                      dtype=torch.float64)]
        plan = make_plan(mode, True, False, 0.1, 1e-5)

        def cell(x, *rest):
            rep = generated.GeneratedRep(*rest[:4], 3)
            return compose.generated_cell(get_backend("cpu"), x, rep, domain, rest[4:], None, None, plan, "ieee")[0]
        leaves = [t.requires_grad_() for t in (x, *generator, *params)]
        assert torch.autograd.gradcheck(cell, leaves)

def test_all_towers_gradcheck():
    """Released mode's towers side by side (x (B, T*h), p and v (B, T*k), every tower's row on the same generated
    I_b, dZ summed over the towers) through the composed level-2 op against finite differences, in float64; and
    the composed op's opcheck with T towers (its fakes size p, v and the core's saved rows by T)."""
    towers, batch, width, rank = 3, 5, 4, 3
    x, _rep, _domain, params, _stats = cell_inputs(batch, width, rank, 2, 3, "released", seed=2)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
    generator = [g, g.mean(0), torch.randn(rank * rank, 4, generator=gen, dtype=torch.float64),
                 torch.randn(rank * rank, generator=gen, dtype=torch.float64)]
    towers_x = torch.randn(towers, batch, width, generator=gen, dtype=torch.float64)

    def cell(x, *rest):
        rep = generated.GeneratedRep(*rest[:4], rank)
        return get_backend("cpu").hyper_adapter_all_towers(x, rep, rest[4:], 1e-5)
    assert torch.autograd.gradcheck(cell, [t.requires_grad_() for t in (towers_x, *generator, *params)])
    side_by_side = towers_x.detach().transpose(0, 1).reshape(batch, towers * width)
    tiled = [*params[:6], params[6].repeat(towers), params[7].repeat(towers)]
    plan = make_plan("released", True, False, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.hamur_fast.generated_cell_forward.default,
                          ("cpu", side_by_side.requires_grad_(), generator, torch.zeros(batch, dtype=torch.long),
                           tiled, None, None, *plan.flags(), "ieee"))


def test_core_refuses_towers_with_per_domain_factors():
    args = list(core_args(True, rank=6))
    args[0] = torch.randn(args[0].shape[0], 12, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="several towers"):
        torch.ops.hamur_fast.compiled_generated_core_forward(*args)
    args[0] = torch.randn(args[0].shape[0], 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="T\\*k"):
        torch.ops.hamur_fast.compiled_generated_core_forward(*args)


def all_towers_inputs(towers, batch, width, rank, bottleneck, hidden, seed):
    """Float64 (x (T, B, h), domain, g, generator tensors, generator running stats, released cell params)."""
    x, g, domain, gen, gen_stats, params, _stats = generated_inputs(batch, width, rank, bottleneck, 3, hidden,
                                                                    "released", seed=seed)
    towers_x = torch.randn(towers, batch, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    params = [t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
              for i, t in enumerate(params)]  # away from the released all-ones init: distinct factor entries
    return towers_x, domain, g, gen, gen_stats, params


def run_all_towers(level2, dtype, inputs, upstream):
    """The released cell on every tower, forward and backward in ``dtype``: with ``level2`` backend "cpu"'s
    all-towers op on I generated inside; else the float64-able oracle: z = g W^T + c materialised and batch
    normalised by F.batch_norm, then the "reference" backend's cell once per tower. (y, leaves, running stats)."""
    x, domain, g, gen, gen_stats, params = inputs
    leaves = [t.to(dtype).detach().requires_grad_() for t in (x, g, *gen, *params)]
    x_l, g_l, weight, bias, norm_weight, norm_bias, *cell = leaves
    running = [s.to(dtype).clone() for s in gen_stats]
    rank = cell[0].shape[1]
    if level2:
        rep = generated.fold_generator(g_l, generated.Generator(weight, bias, norm_weight, norm_bias, *running),
                                       training=True)
        y = get_backend("cpu").hyper_adapter_all_towers(x_l, rep, cell, 1e-5)
    else:
        z = torch.nn.functional.batch_norm(g_l @ weight.t() + bias, *running, norm_weight, norm_bias, True, 0.1, 1e-5)
        rep = torch.relu(z).view(-1, rank, rank)
        y = torch.stack([hf.ops.hyper_adapter(t, rep, domain, *cell, mode="released", backend="reference",
                                              num_domains=3) for t in x_l])
    y.backward(upstream.to(dtype))
    return y, leaves, running


@pytest.mark.parametrize("size", [(3, 5, 3, 2, 4), (130, 21, 7, 3, 10), (257, 33, 9, 11, 5)],
                         ids=lambda s: "B%d" % s[0])
@pytest.mark.parametrize("threads", [1, 2])
def test_all_towers_level2_matches_reference(size, threads):
    """Backend "cpu"'s all-towers cell on a generated I (the released MLP's cells) against the float64 oracle: y,
    the gradient of x, g, the generator's four tensors and the eight cell parameters, and the generator's running
    statistics; fp32 bounds from the oracle's own fp32 run."""
    inputs = all_towers_inputs(3, *size, seed=size[0])
    upstream = torch.randn(3, size[0], size[1], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = run_all_towers(False, torch.float64, inputs, upstream)
        plain = run_all_towers(False, torch.float32, inputs, upstream)
        fast = run_all_towers(True, torch.float32, inputs, upstream)
    finally:
        torch.set_num_threads(previous)
    names = ["y", *GENERATED_NAMES, "running mean", "running var"]  # the leaves' order, gradients after y
    values = [(r[0].detach(), p[0].detach(), f[0].detach()) for r, p, f in [(ref, plain, fast)]]
    values += [(r.grad, p.grad, f.grad) for r, p, f in zip(ref[1], plain[1], fast[1])]
    values += list(zip(ref[2], plain[2], fast[2]))
    assert len(names) == len(values)
    for name, (want, plain_value, got) in zip(names, values):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        if want.abs().max() < 1e-12:  # c and up_bias feed a batch normalisation: exactly 0 in float64
            assert got.abs().max() <= max(1e-6, 4 * plain_value.abs().max().item()), name
            continue
        bound = fp32_bound(rel_err(plain_value, want))
        assert rel_err(got, want) <= bound, (name, rel_err(got, want), bound)


def reference_core(p, g, centre, gen_weight, gen_bias, domain, down_right, down_bias, up_left, per_domain):
    """The core op's (v, saved) in plain PyTorch: I materialised (B, k, k), the T towers of a row batched on it."""
    batch, rank = p.shape[0], down_right.shape[-2]
    towers = p.shape[1] // rank
    rep = torch.relu((g - centre) @ gen_weight.t() + gen_bias).view(batch, rank, rank)
    dr, db, ul = (t[domain] for t in (down_right, down_bias, up_left)) if per_domain else \
        (down_right.expand(batch, *down_right.shape), down_bias.expand(batch, *down_bias.shape),
         up_left.expand(batch, *up_left.shape))
    q = p.view(batch, towers, rank) @ rep
    a = torch.sigmoid(q @ dr + db.unsqueeze(1))
    u = a @ ul
    v = u @ rep
    return v.reshape(batch, -1), torch.cat([q, a, u], dim=2).reshape(batch, -1)


CORE_CASES = [  # (per_domain, towers, batch, k, s): batches off the 64-row block, towers beyond one group of 4
    (False, 3, 130, 35, 32), (False, 1, 65, 6, 5), (False, 5, 1, 7, 3), (False, 4, 257, 17, 20),
    (True, 1, 130, 35, 32), (True, 1, 63, 9, 4), (True, 1, 2, 5, 7)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CORE_CASES, ids=lambda c: "{}-T{}-B{}-k{}-s{}".format(
    "paper" if c[0] else "released", *c[1:]))
def test_core_matches_reference(case, threads):
    """The core op alone, forward (v and every saved vector) and backward (all eight gradients), against
    reference_core under autograd: float64 to 1e-10, float32 within the bound of the reference's own fp32 run.
    Covers several towers per row, per-domain factors with an empty domain (3 domains, ids in {1, 2}), batches
    that are not a multiple of the generated block, and a split over two threads."""
    per_domain, towers, batch, rank, bottleneck = case
    args = list(core_args(per_domain, batch, rank, bottleneck, features=11))
    args[0] = torch.randn(batch, towers * rank, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    args[3], args[4] = args[3] * 0.5, args[4] * 0.5 + 0.3  # I with a mix of zeros and positive entries
    args[5] = torch.randint(1, 3, (batch,), generator=torch.Generator().manual_seed(4))
    grad_v = torch.randn(batch, towers * rank, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    differentiable = [0, 1, 2, 3, 4, 6, 7, 8]  # p, g, centre, gen_weight, gen_bias, DR, db, UL

    def reference(dtype):
        inputs = [t.to(dtype).requires_grad_() if i in differentiable else t for i, t in enumerate(args)]
        v, saved = reference_core(*inputs)
        grads = torch.autograd.grad(v, [inputs[i] for i in differentiable], grad_v.to(dtype))
        return [v, saved, *grads]

    def fast(dtype):
        inputs = [t.to(dtype) if t.is_floating_point() else t for t in args[:-1]] + [per_domain]
        v, saved = torch.ops.hamur_fast.compiled_generated_core_forward(*inputs)
        grads = torch.ops.hamur_fast.compiled_generated_core_backward(grad_v.to(dtype), inputs[0], saved,
                                                                        *inputs[1:7], inputs[8], per_domain)
        return [v, saved, *grads]

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want, plain = reference(torch.float64), reference(torch.float32)
        got64, got32 = fast(torch.float64), fast(torch.float32)
    finally:
        torch.set_num_threads(previous)
    names = ["v", "saved", "grad p", "grad g", "grad centre", "grad gen_weight", "grad gen_bias", "grad down_right",
             "grad down_bias", "grad up_left"]
    for name, w, p32, f64, f32 in zip(names, want, plain, got64, got32):
        w = w.detach()
        assert f64.shape == w.shape and f32.shape == w.shape, name
        assert rel_err(f64, w) <= 1e-10, (name, rel_err(f64, w))
        assert rel_err(f32, w) <= fp32_bound(rel_err(p32.detach(), w)), (name, rel_err(f32, w))


def test_out_of_range_domain_is_refused():
    args = list(core_args(True))
    args[5] = args[5].clone()
    args[5][4] = 3
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.hamur_fast.compiled_generated_core_forward(*args)


def largest_allocations(step):
    """(largest tensor any op returned, largest CPU allocation inside any op), in elements of 4 bytes."""
    with AllocationLog() as log, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                        profile_memory=True) as prof:
        step()
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    return max(size for size, _ in log.sizes), max(allocations) // 4


@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("fused", [True, False], ids=["level2", "level1"])
def test_training_step_allocates_no_batch_times_k_squared(fused, mode, one_thread):
    """A whole training step (forward, BCE, backward, Adam) of a model on the "cpu" backend: at level 2 no
    tensor, nor any allocation inside the C++ ops, comes within a factor 2 of B*k*k elements; the same step
    at level 1, logged the same way, has one (so the logs would see it). Released mode: its towers' cells run
    as one all-towers op ("auto" picks level 2 there too)."""
    batch, rank = 256, 35  # B k^2 = 313,600: over 3x anything else this step holds (the generator (k^2, 9))
    torch.manual_seed(0)
    model = hf.models.HAMUR(23, 3, "mlp", mode, backend="cpu", fused_generation="auto" if fused else False,
                            dims=[16, 12], hyper_dims=[9], rank=rank, bottleneck=7)
    assert model.uses_fused_generation(torch.device("cpu")) == fused
    gen = torch.Generator().manual_seed(1)
    e, domain = torch.randn(batch, 23, generator=gen), torch.randint(0, 3, (batch,), generator=gen)
    label = torch.randint(0, 2, (batch,), generator=gen).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy(model(e, domain), label).backward()
        optimizer.step()
    step()  # Adam's state exists before the logged step
    returned, inside = largest_allocations(step)
    limit = batch * rank * rank
    assert (returned * 2 <= limit and inside * 2 <= limit) == fused, (returned, inside, limit)
