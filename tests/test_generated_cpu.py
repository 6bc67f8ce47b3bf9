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
from helpers import cell_inputs
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


@pytest.mark.parametrize("fused", [True, False], ids=["level2", "level1"])
def test_training_step_allocates_no_batch_times_k_squared(fused, one_thread):
    """A whole training step (forward, BCE, backward, Adam) of a model on the "cpu" backend: at level 2 no
    tensor, nor any allocation inside the C++ ops, comes within a factor 2 of B*k*k elements; the same step
    at level 1, logged the same way, has one (so the logs would see it)."""
    batch, rank = 256, 35  # B k^2 = 313,600: over 3x anything else this step holds (the generator (k^2, 9))
    torch.manual_seed(0)
    model = hf.models.HAMUR(23, 3, "mlp", "paper", backend="cpu", fused_generation=fused, dims=[16, 12],
                            hyper_dims=[9], rank=rank, bottleneck=7)
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
