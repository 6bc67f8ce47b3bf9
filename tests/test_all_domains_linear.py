"""Every domain's linear layer on its own slice (hamur_fast.ops.all_domains_linear): the CPU per-domain GEMM loop
against a float64 loop over domains with F.linear, forward and every gradient, odd sizes, both input layouts the
towers make, a logit layer (one output column); fp32 within plain PyTorch's error; the forms each call takes."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hamur_fast.nn.domain_layers import DomainLinear
from hamur_fast.ops import all_domains_linear as op
from helpers import fp32_bound, rel_err

SIZES = [(3, 37, 19, 5), (1, 2, 5, 1), (4, 129, 33, 64), (2, 300, 128, 1), (3, 65, 256, 128)]  # (D, B, in, out)


def make_inputs(domains, batch, fan_in, fan_out, dtype, seed, side_by_side):
    """x (D, B, in), either its own tensor or a view of a (B, D*in) one (the layout the fused tower norm writes);
    weight (D, in, out), bias (D, out)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(domains, batch, fan_in, generator=g, dtype=dtype)
    if side_by_side:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    weight = torch.randn(domains, fan_in, fan_out, generator=g, dtype=dtype) * fan_in ** -0.5
    return x, weight, torch.randn(domains, fan_out, generator=g, dtype=dtype)


def reference(x, weight, bias):
    """Slice d through F.linear with layer d, one domain at a time."""
    return torch.stack([F.linear(x[d], weight[d].t(), bias[d]) for d in range(x.shape[0])])


def run(fn, inputs, grad_out):
    """(out, grad x, grad weight, grad bias) of fn on copies of inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if inputs[0].permute(1, 0, 2).is_contiguous():  # keep the side-by-side layout through the clone
        leaves[0] = inputs[0].detach().permute(1, 0, 2).clone().permute(1, 0, 2).requires_grad_()
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


NAMES = ("out", "grad_x", "grad_weight", "grad_bias")


@pytest.mark.parametrize("side_by_side", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_matches_per_domain_linear_in_float64(size, side_by_side):
    inputs = make_inputs(*size, torch.float64, seed=sum(size), side_by_side=side_by_side)
    assert op.applies(inputs[0])
    grad_out = torch.randn(size[0], size[1], size[3], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = run(op.all_domains_linear, inputs, grad_out)
    expected = run(reference, inputs, grad_out)
    for name, a, b in zip(NAMES, got, expected):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-12, (name, rel_err(a, b))


@pytest.mark.parametrize("size", [(3, 37, 19, 5), (3, 513, 256, 128), (3, 200, 128, 1)])
def test_float32_within_plain_pytorch_error(size):
    """Each output within fp32_bound of the batched form's fp32 error, both against the float64 run."""
    inputs = make_inputs(*size, torch.float64, seed=4, side_by_side=True)
    grad_out = torch.randn(size[0], size[1], size[3], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact = run(reference, inputs, grad_out)
    inputs32 = [t.float() for t in inputs]
    got = run(op.all_domains_linear, inputs32, grad_out.float())
    plain = run(op.batched_form, inputs32, grad_out.float())
    for name, a, p, e in zip(NAMES, got, plain, exact):
        assert a.dtype == torch.float32
        assert rel_err(a, e) <= fp32_bound(rel_err(p, e)), (name, rel_err(a, e), rel_err(p, e))


def test_only_the_gradients_asked_for():
    x, weight, bias = make_inputs(3, 17, 9, 4, torch.float64, seed=6, side_by_side=False)
    weight.requires_grad_()
    out = op.all_domains_linear(x, weight, bias)
    (grad_weight,) = torch.autograd.grad(out.sum(), [weight])
    expected = torch.autograd.grad(reference(x, weight, bias).sum(), [weight])[0]
    assert rel_err(grad_weight, expected) < 1e-12


def test_forms_taken():
    """The GEMM loop on the CPU in eager mode; the batched form under autocast (which lowers it to bfloat16)."""
    x, weight, bias = make_inputs(3, 8, 4, 2, torch.float32, seed=0, side_by_side=False)
    assert op.applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not op.applies(x)
        assert op.all_domains_linear(x, weight, bias).dtype == torch.bfloat16


def test_layer_and_its_compiled_form_agree():
    """DomainLinear.all_domains in eager (the loop) and under torch.compile (the batched form) give one result."""
    torch.manual_seed(0)
    layer = DomainLinear(13, 6, 3).double()
    x = torch.randn(3, 29, 13, dtype=torch.float64)
    eager = layer.all_domains(x)
    compiled = torch.compile(layer.all_domains, backend="eager", fullgraph=True)(x)
    assert rel_err(compiled, eager) < 1e-12
    assert rel_err(eager, reference(x, layer.weight.transpose(1, 2), layer.bias)) < 1e-12


def test_benchmark_prints_both_layers_and_the_step(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_all_domains_linear

    before = torch.get_num_threads()
    try:
        bench_all_domains_linear.main(["--batch", "16", "--repeats", "1", "--threads", "1", "--no-compile", "--step"])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if "->" in line]
    assert [row[:3] for row in rows] == [["256", "->", "128"], ["128", "->", "1"]]
    assert all(float(value) > 0 for row in rows for value in row[3:])
    assert any(line.startswith("released training step: baddbmm") for line in out)
    assert op.applies.__name__ == "applies"  # the switch put back (not the benchmark's lambda)


@pytest.mark.parametrize("side_by_side", [False, True])
def test_second_derivatives(side_by_side):
    """create_graph through the op: the gradient of a function of the first gradients matches the reference's."""
    inputs = make_inputs(3, 11, 6, 4, torch.float64, seed=8, side_by_side=side_by_side)
    grad_out = torch.randn(3, 11, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def second(fn):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        first = torch.autograd.grad(fn(*leaves), leaves, grad_out, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in first) + fn(*leaves).square().sum(), leaves)

    for name, a, b in zip(("x", "weight", "bias"), second(op.all_domains_linear), second(reference)):
        assert rel_err(a, b) < 1e-12, (name, rel_err(a, b))


def test_parameter_gradients_keep_the_parameters_layout():
    """DomainLinear passes weight (D, out, in) transposed: its gradient lands contiguous, as the optimizer's."""
    layer = DomainLinear(9, 5, 3)
    layer.all_domains(torch.randn(3, 7, 9)).sum().backward()
    assert layer.weight.grad.is_contiguous() and layer.bias.grad.is_contiguous()


def test_sorted_segments_refuse_sizes_that_miss_rows():
    """The grouped op's sorted form writes only the rows its segments cover: sizes must cover x exactly."""
    from hamur_fast.ops import grouped_linear

    x, weight = torch.randn(5, 4), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"sum to 4, but x has 5 rows"):
        grouped_linear.sorted_segments(x, [3, 1], weight, None)
    out = grouped_linear.sorted_segments(x, [0, 5], weight, None)  # an empty segment is fine
    assert torch.equal(out, x @ weight[1])
