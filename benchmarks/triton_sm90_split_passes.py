"""Launch every split pass of the Triton backend (the split passes of its table, contract: Passes; what a data-parallel step runs
with its collectives between them) for ../shared/tools/triton_sm90_compile.py: DomainNorm's passes per domain, one
group unbiased (released) and one group biased (BatchNorm); the cell's passes in paper and released mode; at the
declared limits h=1024, k=128, s=128 and at h=256, k=5, s=7; fp32 and bf16. Outputs are not checked (the compile
tool skips the launches); tests/test_contract.py checks the passes' values under the interpreter.

    python ../shared/tools/triton_sm90_compile.py benchmarks/triton_sm90_split_passes.py
"""
import torch
from hamur_fast.kernels import domain_norm as dn, adapter_cell as cell
from hamur_fast.ops.contract import Plan
B, D = 64, 3
for dtype in (torch.float32, torch.bfloat16):
    for width, rank, bottleneck in ((1024, 128, 128), (256, 5, 7)):
        o = torch.zeros(B, width, dtype=dtype)
        dom = torch.randint(0, D, (B,))
        for groups, G, unbiased in ((dom, D, False), (None, 1, True), (None, 1, False)):
            w = torch.ones(G, width, dtype=dtype); b = torch.zeros(G, width, dtype=dtype)
            count, mean, m2, _rstd = dn.group_statistics(o, groups, G)
            rstd = torch.ones_like(mean)
            dn.normalise(o, groups, w, b, mean, rstd)
            s1, s2 = dn.grad_sums(o, o, groups, mean, rstd, G)
            dn.input_grad(o, o, groups, w, mean, rstd, count, s1, s2, unbiased)
        for per_domain in (True, False):
            lead = (D,) if per_domain else ()
            shapes = [(width, rank), (rank, bottleneck), (bottleneck,), (bottleneck, rank), (rank, width), (width,), (width,), (width,)]
            params = tuple(torch.zeros(*lead, *s, dtype=dtype) for s in shapes)
            x = torch.zeros(B, width, dtype=dtype); rep = torch.zeros(B, rank, rank, dtype=dtype)
            plan = Plan(per_domain, True, not per_domain, 1e-5)
            (count, mean, m2, _rstd), saved = cell.cell_statistics(x, rep, dom, params, plan)
            rstd = torch.ones_like(mean)
            cell.cell_normalise(x, dom, params, saved, mean, rstd, plan)
            s1, s2 = cell.cell_grad_sums(x, dom, params, saved, mean, rstd, plan)
            cell.cell_input_grads(x, x, rep, dom, params, saved, count, mean, rstd, s1, s2, plan)
