"""The grouped per-domain linear op (hamur_fast/ops/grouped_linear.py, kernels/grouped_linear.py).

The torch backends' forms (the segment loop, the sync-free forms) against a float64 loop on fresh random inputs,
forward and every gradient; the checks, autocast, the Triton kernels' tile map, compile, export and the absence of
host reads. The Triton kernels run under the interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1). Every
backend through the public op (odd sizes, poisoned memory, out-of-range ids with the checks off, opcheck of the
custom ops): tests/test_backends.py.
"""
import os

import pytest
import torch
import torch.utils.flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from hamur_fast.ops import grouped_linear as gl
from hamur_fast.ops.registry import available_backends, get_backend, resolve
from helpers import grouped_linear_inputs as inputs, rel_err

TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMS = {"segments": gl.segments, "sync_free": gl.sync_free, "stacked": gl.stacked}  # inside the torch backends

CASES = [  # (B, in, out, D, ids): odd widths; "edge": domain 0 empty and domain 1 one row; "sorted": in domain order
    (1, 5, 7, 3, "random"), (3, 8, 4, 3, "edge"), (3, 16, 8, 300, "random"),  # 297+ empty domains
    (1023, 12, 20, 7, "edge"), (200, 33, 1, 300, "random"), (64, 16, 16, 1, "random"), (1023, 12, 20, 7, "sorted"),
]


def forward(provider, x, domain, weight, bias):
    """A form by its name, or the public op under the backend of that name."""
    if provider in FORMS:
        return FORMS[provider](x, domain, weight, bias)
    return gl.grouped_linear(x, domain, weight, bias, backend=provider)


def run(provider, x, domain, weight, bias, upstream, dtype, device="cpu"):
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() if t is not None else None
              for t in (x, weight, bias)]
    out = forward(provider, leaves[0], domain.to(device), leaves[1], leaves[2])
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, upstream.to(device=device, dtype=dtype))
    return [out.detach().cpu()] + [g.cpu() for g in grads]


@pytest.mark.parametrize("provider", list(FORMS))
@pytest.mark.parametrize("batch, fan_in, fan_out, num_domains, ids", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_every_gradient_match_float64(provider, batch, fan_in, fan_out, num_domains, ids, with_bias):
    case = (batch, fan_in, fan_out, num_domains, ids)
    x, domain, weight, bias, upstream = inputs(*case)
    bias = bias if with_bias else None
    expected = run("reference", x, domain, weight, bias, upstream, torch.float64)
    actual = run(provider, x, domain, weight, bias, upstream, torch.float32)
    names = ["out", "dx", "dweight"] + (["dbias"] if with_bias else [])
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape and a.dtype == torch.float32, name
        assert rel_err(a, e) < 1e-5, (name, rel_err(a, e))
    empty = sorted(set(range(case[3])) - set(domain.tolist()))
    if empty:  # domains without rows get exact zero gradients
        assert actual[2][empty].abs().max() == 0 and (not with_bias or actual[3][empty].abs().max() == 0)


def test_reference_is_the_plain_per_row_product():
    x, domain, weight, bias, _ = inputs(37, 6, 5, 4, "edge")
    out = gl.grouped_linear(x, domain, weight, bias, backend="reference")
    for b in (0, 17, 36):
        assert torch.allclose(out[b], x[b] @ weight[domain[b]] + bias[domain[b]], rtol=0, atol=1e-12)


def test_float64_and_autocast_and_torch_grouped_mm_form():
    x, domain, weight, bias, upstream = inputs(50, 16, 8, 5, "edge")
    expected = run("reference", x, domain, weight, bias, upstream, torch.float64)
    for provider in ("segments", "sync_free", "stacked", "torch"):  # float64: sync_free falls back to stacked
        actual = run(provider, x, domain, weight, bias, upstream, torch.float64)
        assert all(rel_err(a, e) < 1e-12 for a, e in zip(actual, expected)), provider
    # CPU float32 (odd widths padded) takes the grouped form: its FLOPs are the rows' own products only
    assert gl.grouped_mm_supported(x.float(), weight.float()) and not gl.grouped_mm_supported(x, weight)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as flops:
        gl.sync_free(x.float()[:, :13], domain, weight.float()[:, :13, :7], None)
    assert flops.get_total_flops() == 2 * 50 * 16 * 8  # padded to 16 and 8 columns, never x D
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gl.grouped_linear(x.float(), domain, weight.float(), bias.float())
    assert out.dtype == torch.bfloat16 and rel_err(out, expected[0]) < 2e-2


def test_checks_name_the_bad_argument():
    x, domain, weight, bias, _ = inputs(10, 4, 3, 3, "random")
    bad = [
        (dict(weight=weight[:, :3]), "weight must have shape"),
        (dict(bias=bias[:2]), "bias must have shape"),
        (dict(domain=domain.clone().fill_(3)), "out of range"),
        (dict(domain=domain.clone().fill_(-1)), ">= 0"),
        (dict(domain=domain.float()), "int64"),
        (dict(x=x[:0]), "empty batch"),
        (dict(weight=weight.float()), "one dtype"),
    ]
    for change, message in bad:
        args = dict(x=x, domain=domain, weight=weight, bias=bias) | change
        with pytest.raises(ValueError, match=message):
            gl.grouped_linear(**args)
    with pytest.raises(ValueError, match="backend"):
        gl.grouped_linear(x, domain, weight, bias, backend="fastest")


# --------------------------------------------------------------------------------------------------
# The kernels' static grid
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not TRITON, reason="no CUDA device and TRITON_INTERPRET is not 1")
def test_static_grid_covers_every_tile():
    """The slot count cdiv(B, M) + D + 1 depends on shapes only and covers the worst split of rows."""
    kernels = pytest.importorskip("hamur_fast.kernels.grouped_linear")
    for batch, num_domains in ((1, 1), (17, 3), (64, 5), (1000, 1000)):
        for ids in (torch.zeros(batch, dtype=torch.long), torch.arange(batch) % num_domains,
                    torch.randint(0, num_domains, (batch,))):
            _, offsets = gl.domain_segments(ids, num_domains)
            block = kernels.rows_per_tile(batch, num_domains)
            group, first, _, _ = kernels.tile_map(offsets, batch, block)
            real = group <= num_domains
            covered = torch.zeros(batch, dtype=torch.long)
            for g, f in zip(group[real].tolist(), first[real].tolist()):
                covered[f:min(f + block, offsets[g + 1].item())] += 1
            assert covered.eq(1).all() and (group[~real] == num_domains + 1).all()


# --------------------------------------------------------------------------------------------------
# torch.library and torch.compile; no host sync
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["torch"] + (["triton"] if TRITON else []))
def test_torch_compile_fullgraph(provider):
    x, domain, weight, bias, upstream = inputs(45, 16, 8, 6, "edge", dtype=torch.float32)
    device = DEVICE if provider == "triton" else "cpu"
    x, domain, weight, bias, upstream = (t.to(device) for t in (x, domain, weight, bias, upstream))

    def layer(x, domain, weight, bias):
        return gl.grouped_linear(x, domain, weight, bias, backend=provider)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, layer):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        out = fn(leaves[0], domain, leaves[1], leaves[2])
        results.append([out, *torch.autograd.grad(out, leaves, upstream)])
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(*results))


class NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a device value back to the host or has a data-dependent shape: what
    CUDA-graph capture forbids (and what synchronises a GPU)."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero", "equal", "item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.rstrip("_") in self.FORBIDDEN:
            raise AssertionError(f"host read inside the op: aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("provider", ["sync_free", "stacked"] + (["triton-launchers"] if TRITON else []))
def test_no_host_read_inside_the_op(provider):
    x, domain, weight, bias, upstream = inputs(70, 13, 7, 5, "edge", dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    with NoHostReads():
        if provider == "triton-launchers":  # inside the custom op: the sort, the tile map and the kernels
            kernels = pytest.importorskip("hamur_fast.kernels.grouped_linear")
            order, offsets = gl.domain_segments(domain, 5)
            kernels.grouped_forward(x.detach(), order, offsets, weight.detach(), bias.detach())
            kernels.grouped_backward(upstream, x.detach(), order, offsets, weight.detach(), True)
        else:
            out = FORMS[provider](leaves[0], domain, leaves[1], leaves[2])
            torch.autograd.grad(out, leaves, upstream)
    if provider != "triton-launchers":  # meta tensors hold no values: even .tolist() fails there
        for dtype in (torch.float32, torch.bfloat16):  # bfloat16: torch._grouped_mm's form on meta
            meta = [t.detach().to("meta", dtype).requires_grad_() for t in (x, weight, bias)]
            out = FORMS[provider](meta[0], domain.to("meta"), meta[1], meta[2])
            torch.autograd.grad(out, meta, upstream.to("meta", dtype))


def test_the_host_read_check_can_fail():
    """The CPU segment loop reads the segment sizes back: running on meta catches exactly that."""
    x, domain, weight, bias, _ = inputs(20, 4, 3, 3, "random", dtype=torch.float32)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the implementation itself, past its capabilities
        gl.segments(x.to("meta"), domain.to("meta"), weight.to("meta"), bias.to("meta"))
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        gl.domain_segments(domain, 3)[1].nonzero()


def test_backend_means_the_same_as_for_the_cell():
    """One registry: each backend runs its own form, and "auto" resolves by the cell's ranks."""
    assert get_backend("torch").grouped_linear is gl.torch_form  # never the Triton kernel, on any device
    assert get_backend("reference").grouped_linear is gl.reference
    if "triton" in available_backends():
        assert get_backend("triton").grouped_linear is gl.grouped_linear_kernel
    assert resolve("auto", torch.device("cpu")).grouped_linear is gl.torch_form  # "cpu" or "torch"
    # meta stands in for the GPU: "auto" there is what it is on CUDA (shape-only), the torch backend without triton
    assert resolve("auto", torch.device("meta")).name == ("triton" if "triton" in available_backends() else "torch")
    x, domain, weight, bias, _ = inputs(5, 4, 3, 2, "random")
    with pytest.raises(ValueError, match="does not cover this call: device meta"):
        gl.grouped_linear(x.to("meta"), domain.to("meta"), weight.to("meta"), bias.to("meta"), backend="reference")


@pytest.mark.skipif(not TRITON, reason="no CUDA device and TRITON_INTERPRET is not 1")
def test_export_keeps_the_custom_op():
    from hamur_fast.nn import DomainLinear

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = DomainLinear(16, 8, 5)

        def forward(self, x, domain):
            return gl.run(x, domain, self.layer.weight.transpose(1, 2), self.layer.bias, backend="triton")

    tower = Tower().to(DEVICE)
    x, domain = torch.randn(20, 16, device=DEVICE), torch.randint(0, 5, (20,), device=DEVICE)
    program = torch.export.export(tower, (x, domain))
    assert "hamur_fast.triton_grouped_linear_forward" in str(program.graph)
    assert rel_err(program.module()(x, domain), tower.layer.routed(x, domain)) < 1e-6
