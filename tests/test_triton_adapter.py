"""What is specific to backend="triton" (kernels/adapter_cell.py, kernels/domain_norm.py and their custom ops in
hamur_fast/ops/backends/triton.py): the statistics merge, long batches, int64 offsets, its registration.

Its accuracy against the float64 reference, its buffers on poisoned memory, out-of-range ids and opcheck of its
registered ops are tested with every backend's in test_backends.py. On a machine
without a GPU the kernels run on CPU tensors under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1);
where CUDA is present the same tests run on the GPU.
"""
import os

import pytest
import torch

import hamur_fast as hf
from helpers import assert_matches_reference, cell_inputs, fp32_exact, rel_err

pytest.importorskip("hamur_fast.kernels.adapter_cell")
from hamur_fast.kernels import domain_norm as triton_norm  # noqa: E402  (after the importorskip)

DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + \
    (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="no CUDA device and TRITON_INTERPRET is not 1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["paper", "released"])
def test_long_batch_merges_statistics_over_several_chunks(mode, device):
    """B = 1100 spans more than 64 row blocks: the statistics merge runs over several chunks of partials.
    (Every other size, mode and dtype: the suite over all backends, test_backends.py.)"""
    inputs = fp32_exact(cell_inputs(1100, 13, 5, 7, 3, mode, seed=1200, edge_domains=False))
    assert_matches_reference("triton", device, inputs, mode, seed=1100)


def nan_empty(*shape, **kw):
    """An allocator whose buffers hold NaN (int buffers: a large sentinel) until a kernel writes them."""
    tensor = torch.empty(*shape, **kw)
    return tensor.fill_(float("nan") if tensor.is_floating_point() else 2 ** 40)


def compact_partials(domain_sorted, values, num_groups, rows_per_part):
    """Per-part partials in the layout store_group_partial_stats writes (kernels/domain_norm.py, GroupSegments),
    built here in float64 part by part: the j-th group present in a part (by id) at slot j of the part's
    min(rows_per_part, G) slots. Returns each slot's group (-1: unused), count, mean and M2; unused slots hold
    NaN, so a merge that read one would show it. Ids outside [0, G) join no partial."""
    parts = -(-len(domain_sorted) // rows_per_part)
    slots = min(rows_per_part, num_groups)
    group, count = torch.full((parts * slots,), -1), torch.zeros(parts * slots, dtype=torch.float64)
    mean, m2 = (torch.full((parts * slots, values.shape[1]), float("nan"), dtype=torch.float64) for _ in range(2))
    for p in range(parts):
        part = slice(p * rows_per_part, (p + 1) * rows_per_part)
        ids, rows = domain_sorted[part], values[part]
        for j, g in enumerate(sorted({int(i) for i in ids if 0 <= i < num_groups})):
            v = rows[ids == g]
            group[p * slots + j], count[p * slots + j], mean[p * slots + j] = g, len(v), v.mean(0)
            m2[p * slots + j] = ((v - v.mean(0)) ** 2).sum(0)
    return group, count, mean, m2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_groups", [1, 2, 7])
def test_statistics_merge_is_exact_and_stable(num_groups, device):
    """Merging the partials of 300 parts of 4 sorted rows (more than MERGE_PARTS_PER_PROGRAM: two passes, the
    first into the slots of ranges of parts; NaN-poisoned buffers), with a run of one group over many parts,
    an empty group and out-of-range ids, of values with |mean| >> std, gives the exact count, mean and M2 of
    those partials; E[x^2] - E[x]^2 in fp32 loses the variance here. The backward's plain sums likewise."""
    g = torch.Generator().manual_seed(2)
    rows_per_part, width = 4, 5
    if num_groups == 1:  # released mode: one group, rows in their own order
        domain = torch.zeros(1197, dtype=torch.int64)
    else:  # a long run of group 0, group 1 empty, short runs of the rest, ids outside [0, G) at both ends
        domain = torch.cat([torch.full((3,), -1), torch.zeros(700, dtype=torch.int64),
                            torch.randint(2, max(num_groups, 3), (491,), generator=g) % num_groups,
                            torch.full((3,), num_groups)])
        domain = domain[torch.randperm(len(domain), generator=g)]
    assert -(-len(domain) // rows_per_part) > triton_norm.MERGE_PARTS_PER_PROGRAM
    segments = triton_norm.sort_groups(domain.to(device), num_groups, per_domain=num_groups > 1)
    values = 1000 + torch.randn(len(domain), width, generator=g, dtype=torch.float64)
    group, n, mu, sq = compact_partials(domain.sort(stable=True).values, values, num_groups, rows_per_part)
    parts = mu.float().to(device), sq.float().to(device)  # what the kernels see (NaN in unused slots)
    got_count, got_mean, got_m2, got_rstd = triton_norm.merge_group_stats(*parts, segments, rows_per_part, 1e-5,
                                                                           unbiased=False, empty=nan_empty)
    # The exact merge, in float64, of the same fp32-rounded partials the kernel saw.
    member = (group[:, None] == torch.arange(num_groups)).double()  # (slots, G)
    mu, sq = (t.cpu().double().nan_to_num() for t in parts)
    total = member.T @ n
    exact_mean = (member.T @ (n[:, None] * mu)) / total.clamp(min=1)[:, None]
    exact_m2 = member.T @ (sq + n[:, None] * (mu - exact_mean[group.clamp(min=0)]) ** 2)
    assert torch.equal(got_count.cpu().double(), total)
    assert rel_err(got_mean.cpu(), exact_mean) <= 5e-7
    assert rel_err(got_m2.cpu(), exact_m2) <= 1e-5
    assert rel_err(got_rstd.cpu(), (exact_m2 / total.clamp(min=1)[:, None] + 1e-5) ** -0.5) <= 1e-5
    big = total.argmax()  # E[x^2] - E[x]^2 in fp32 on the largest group, for contrast
    naive_var = ((member[:, big, None] * n[:, None] * (sq / n.clamp(min=1)[:, None] + mu ** 2)).float().sum(0)
                 / total[big].float() - exact_mean[big].float() ** 2)
    assert rel_err(naive_var.double(), exact_m2[big] / total[big]) > 1e-2
    sum_mu, sum_sq = triton_norm.merge_group_sums(*parts, segments, rows_per_part, empty=nan_empty)
    assert rel_err(sum_mu.cpu(), member.T @ mu) <= 1e-6 and rel_err(sum_sq.cpu(), member.T @ sq) <= 1e-6


def test_backend_registration():
    backend = hf.ops.registry.resolve("triton", torch.device("cpu") if "cpu" in DEVICES else torch.device("cuda"))
    assert backend.name == "triton" and "triton" in hf.available_backends()
    assert "cpu" not in backend.capabilities.auto_rank  # never picked by "auto" under the interpreter
    if torch.cuda.is_available():
        assert hf.ops.registry.resolve("auto", torch.device("cuda", 0)).name == "triton"
    else:
        assert hf.ops.registry.resolve("auto", torch.device("cpu")).name != "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: B * k * k above 2**31 elements")
def test_int64_offsets_on_a_batch_past_int32():
    """rep holds more than 2**31 elements: row offsets must not wrap around (forward and backward)."""
    batch, width, rank = (2 ** 31) // (35 * 35) + 64, 16, 35
    torch.manual_seed(0)
    cell = hf.HyperAdapter(width, rank, 3, bottleneck=16, backend="triton").cuda().eval()
    x = torch.randn(batch, width, device="cuda", requires_grad=True)
    rep = torch.rand(batch, rank, rank, device="cuda", requires_grad=True)
    domain = torch.randint(0, 3, (batch,), device="cuda")
    dy = torch.randn(batch, width, device="cuda")
    y = cell(x, rep, domain)  # eval: running statistics, so each row depends on itself only
    y.backward(dy)
    tail = slice(batch - 64, batch)
    cell.backend = "torch"
    x_tail, rep_tail = x[tail].detach().requires_grad_(), rep[tail].detach().requires_grad_()
    expected = cell(x_tail, rep_tail, domain[tail])
    expected.backward(dy[tail])
    assert rel_err(y[tail].detach().cpu(), expected.detach().cpu().double()) <= 1e-5
    assert rel_err(x.grad[tail].cpu(), x_tail.grad.cpu().double()) <= 1e-5
    assert rel_err(rep.grad[tail].cpu(), rep_tail.grad.cpu().double()) <= 1e-5
    with torch.no_grad():
        cell.train()
        cell.backend = "triton"
        assert torch.isfinite(cell(x, rep, domain)).all()
