"""The released towers' fused BatchNorm1d + ReLU (hamur_fast.ops.tower_norm_relu, csrc/cpu/tower_norm_relu_cpu.cpp)
against F.batch_norm + relu on the (B, D*C) permutation of z: forward, every gradient, the running statistics, train
and eval, both z layouts the towers make, odd sizes; opcheck; the layer's choice of path."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hamur_fast.nn.domain_layers import DomainBatchNorm1d
from hamur_fast.ops import tower_norm_relu as fused
from helpers import fp32_bound, rel_err

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="hamur_fast._C not built with the fused tower op")

SIZES = [(3, 37, 19), (1, 2, 5), (4, 129, 33), (2, 300, 1), (3, 64, 256)]
MOMENTUM, EPS = 0.1, 1e-5


def make_inputs(towers, batch, width, dtype, seed, side_by_side):
    """z (D, B, C), either a (D, B, C) tensor (a deeper layer's baddbmm) or a view of a (B, D*C) one (the first
    layer's addmm); weight, bias, running statistics (D, C) at a generic point."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    shift = rand(towers, 1, width) * 2
    z = rand(towers, batch, width) * (1 + rand(towers, 1, width).abs()) + shift
    if side_by_side:
        z = z.transpose(0, 1).contiguous().transpose(0, 1)
    weight, bias = rand(towers, width), rand(towers, width) * 0.5
    running_mean, running_var = rand(towers, width), rand(towers, width).abs() + 0.5
    return z, weight, bias, running_mean, running_var


def reference(z, weight, bias, running_mean, running_var, training):
    """The released layer's ATen form: relu(BatchNorm1d) over the (B, D*C) permutation of z."""
    towers, batch, width = z.shape
    flat = z.permute(1, 0, 2).reshape(batch, towers * width)
    out = F.batch_norm(flat, running_mean.view(-1), running_var.view(-1), weight.reshape(-1), bias.reshape(-1),
                       training, MOMENTUM, EPS)
    return torch.relu(out).view(batch, towers, width).permute(1, 0, 2)


def run(fn, inputs, grad_y, training):
    """(y, grad z, grad weight, grad bias, running mean, running var) of fn on copies of inputs."""
    z, weight, bias, running_mean, running_var = (t.clone() for t in inputs)
    leaves = [t.requires_grad_() for t in (z, weight, bias)]
    y = fn(*leaves, running_mean, running_var, training)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return (y.detach(), *grads, running_mean, running_var)


def ours(z, weight, bias, running_mean, running_var, training):
    return fused.tower_norm_relu(z, weight, bias, running_mean, running_var, training, MOMENTUM, EPS)


NAMES = ("y", "grad_z", "grad_weight", "grad_bias", "running_mean", "running_var")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("side_by_side", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_matches_batch_norm_relu_in_float64(size, side_by_side, training):
    inputs = make_inputs(*size, torch.float64, seed=sum(size), side_by_side=side_by_side)
    grad_y = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = run(ours, inputs, grad_y, training)
    expected = run(reference, inputs, grad_y, training)
    for name, a, b in zip(NAMES, got, expected):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-12, (name, rel_err(a, b))
    assert got[1].stride() == inputs[0].stride()  # grad z in z's layout: the linear layer's backward reads it as is
    assert got[0].permute(1, 0, 2).is_contiguous()  # y side by side: the released cell's (B, D*C) without a copy


@pytest.mark.parametrize("threads", [2, 3])
def test_row_chunks_merge_exactly(threads):
    """Several row chunks (the statistics merged by Chan's rule, the column sums in chunk order) give the one-chunk
    results, and the same on every run."""
    size = (3, 301, 70)
    inputs = make_inputs(*size, torch.float64, seed=5, side_by_side=True)
    grad_y = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        runs = [run(ours, inputs, grad_y, True) for _ in range(2)]
    finally:
        torch.set_num_threads(before)
    expected = run(reference, inputs, grad_y, True)
    for name, a, b, c in zip(NAMES, *runs, expected):
        assert torch.equal(a, b), name
        assert rel_err(a, c) < 1e-12, (name, rel_err(a, c))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("size", [(3, 37, 19), (4, 129, 33), (3, 512, 256)])
def test_float32_within_plain_pytorch_error(size, training):
    """Each output within fp32_bound of plain PyTorch's fp32 error, both against the float64 run."""
    inputs = make_inputs(*size, torch.float64, seed=3, side_by_side=True)
    grad_y = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    exact = run(reference, inputs, grad_y, training)
    inputs32 = [t.float() for t in inputs]
    got = run(ours, inputs32, grad_y.float(), training)
    plain = run(reference, inputs32, grad_y.float(), training)
    for name, a, p, e in zip(NAMES, got, plain, exact):
        assert a.dtype == torch.float32
        assert rel_err(a, e) <= fp32_bound(rel_err(p, e)), (name, rel_err(a, e), rel_err(p, e))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, training):
    z, weight, bias, running_mean, running_var = make_inputs(3, 21, 7, dtype, seed=1, side_by_side=True)
    torch.library.opcheck(torch.ops.hamur_fast.compiled_tower_norm_relu_forward,
                          (z.requires_grad_(), weight.requires_grad_(), bias, running_mean, running_var, training,
                           MOMENTUM, EPS))
    y, mean, rstd = torch.ops.hamur_fast.compiled_tower_norm_relu_forward(z.detach(), weight.detach(), bias,
                                                                         running_mean, running_var, training,
                                                                         MOMENTUM, EPS)
    torch.library.opcheck(torch.ops.hamur_fast.compiled_tower_norm_relu_backward,
                          (torch.randn_like(y), z.detach(), weight.detach(), bias, mean, rstd, training))


@pytest.mark.parametrize("training", [True, False])
def test_nan_propagates_as_in_aten(training):
    """A NaN in z gives NaN where BatchNorm + relu gives NaN (never a silent 0), and the same gradients."""
    inputs = list(make_inputs(3, 20, 6, torch.float64, seed=6, side_by_side=False))
    inputs[0][1, 4, 2] = float("nan")
    grad_y = torch.randn(3, 20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got, expected = run(ours, inputs, grad_y, training), run(reference, inputs, grad_y, training)
    assert got[0].isnan().any()
    for name, a, b in zip(NAMES, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)


def test_second_derivative_refused():
    z, weight, bias, running_mean, running_var = make_inputs(2, 9, 4, torch.float64, seed=2, side_by_side=False)
    z.requires_grad_()
    y = ours(z, weight, bias, running_mean, running_var, True)
    (grad_z,) = torch.autograd.grad(y.sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad_z.sum().backward()


@pytest.mark.parametrize("bad, match", [
    (lambda t: t[:2], "weight must have shape"),
    (lambda t: t.double(), "weight must be Float"),
    (lambda t: t.t().contiguous().t(), "weight must be contiguous"),
])
def test_kernel_rejects_bad_tables(bad, match):
    z, weight, bias, running_mean, running_var = make_inputs(3, 8, 5, torch.float32, seed=4, side_by_side=False)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.hamur_fast.compiled_tower_norm_relu_forward(z, bad(weight), bias, running_mean, running_var, True,
                                                             MOMENTUM, EPS)


def test_kernel_rejects_one_row_in_training():
    z, weight, bias, running_mean, running_var = make_inputs(3, 1, 5, torch.float32, seed=4, side_by_side=False)
    with pytest.raises(RuntimeError, match="at least 2 rows"):
        torch.ops.hamur_fast.compiled_tower_norm_relu_forward(z, weight, bias, running_mean, running_var, True,
                                                             MOMENTUM, EPS)


def tables(layer):
    return layer.weight, layer.bias, layer.running_mean, layer.running_var


def test_layer_fused_and_aten_paths_agree():
    """DomainBatchNorm1d.all_domains_relu: the fused op where it applies, and the same results (outputs, gradients,
    running statistics, batches tracked) as relu(all_domains) over three training steps and in eval."""
    torch.manual_seed(0)
    layers = [DomainBatchNorm1d(13, 3).double() for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    for step in range(4):
        training = step < 3
        z = make_inputs(3, 50, 13, torch.float64, seed=step, side_by_side=step % 2 == 0)[0]
        outs = []
        for layer, fn in zip(layers, (lambda l, t: l.all_domains_relu(t), lambda l, t: torch.relu(l.all_domains(t)))):
            layer.train(training)
            leaf = z.clone().requires_grad_()
            y = fn(layer, leaf)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), leaf.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
        assert fused.applies(z, tables(layers[0]), training, layers[0].momentum)
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for name, buffer in layers[0].named_buffers():
        torch.testing.assert_close(buffer, dict(layers[1].named_buffers())[name], rtol=1e-12, atol=1e-12)


def test_layer_keeps_the_aten_form_where_the_op_does_not_apply():
    layer = DomainBatchNorm1d(6, 2)
    z = torch.randn(2, 1, 6)
    assert not fused.applies(z, tables(layer), True, layer.momentum)  # BatchNorm's own error
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer.all_domains_relu(z)
    z = torch.randn(2, 10, 6, dtype=torch.float16)
    assert not fused.applies(z, tables(layer), True, layer.momentum)
    strided = torch.randn(2, 6, 10).transpose(1, 2)
    assert not fused.applies(strided, tables(layer), True, layer.momentum)
    torch.testing.assert_close(layer.all_domains_relu(strided), torch.relu(layer.all_domains(strided)))


def test_benchmark_prints_both_layers(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_tower_norm_relu

    before = torch.get_num_threads()
    try:
        bench_tower_norm_relu.main(["--batch", "16", "--repeats", "1", "--dims", "12", "5"])
    finally:
        torch.set_num_threads(before)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("C=")]
    assert [row.split()[0] for row in rows] == ["C=12", "C=5"]
    assert all(float(row.split()[-1]) > 0 for row in rows)
