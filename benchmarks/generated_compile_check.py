"""Launch every level-2 Triton kernel (kernels/adapter_generated.py) at the preset sizes, for the sm_90 compile table.

    python ../shared/tools/triton_sm90_compile.py benchmarks/generated_compile_check.py

That tool compiles each launch for sm_90a without a GPU and skips it (outputs are garbage, nothing is
checked here); this script prints which configuration each group of compiled specializations belongs to.
Configurations: h=128, s=32, D=3, B=8192; k = 30, 35, 45, 65 (the presets' ranks); p = 64, 128; both modes.
"""
from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from hamur_fast.kernels import adapter_generated as kernels  # noqa: E402
from hamur_fast.ops.contract import Plan  # noqa: E402


def launch_all(batch, width, bottleneck, num_domains, gen_width, rank, per_domain, precision):
    lead = (num_domains,) if per_domain else ()
    x, dy = torch.randn(batch, width), torch.randn(batch, width)
    g, centre = torch.rand(batch, gen_width), torch.zeros(gen_width)
    gen_weight, gen_bias = torch.randn(rank * rank, gen_width), torch.randn(rank * rank)
    domain = torch.randint(0, num_domains, (batch,))
    params = [torch.randn(*lead, width, rank), torch.randn(*lead, rank, bottleneck), torch.randn(*lead, bottleneck),
              torch.randn(*lead, bottleneck, rank), torch.randn(*lead, rank, width), torch.randn(*lead, width),
              torch.randn(*lead, width), torch.randn(*lead, width)]
    plan = Plan(per_domain, True, not per_domain, 1e-5)
    generator = (g, centre, gen_weight, gen_bias)
    y, count, mean, m2, rstd, *saved = kernels.generated_cell_forward(x, generator, domain, params, None, None, plan,
                                                                      precision)
    kernels.generated_cell_backward(dy, x, generator, domain, params, saved, count, mean, rstd, plan, precision)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--p", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--k", type=int, nargs="+", default=[30, 35, 45, 65])
    parser.add_argument("--modes", nargs="+", default=["paper", "released"])
    parser.add_argument("--precisions", nargs="+", default=["ieee"])
    args = parser.parse_args()
    compiled = JITFunction.run.__globals__.get("_rows", [])  # the compile tool's table, when run under it
    for gen_width in args.p:
        for rank in args.k:
            for mode in args.modes:
                for precision in args.precisions:
                    before = len(compiled)
                    launch_all(8192, 128, 32, 3, gen_width, rank, mode == "paper", precision)
                    rows = (f"rows {before + 1}-{len(compiled)} of the table" if len(compiled) > before
                            else "no new rows (the specializations above)")
                    print(f"p={gen_width} k={rank} {mode} {precision}: {rows}", flush=True)


if __name__ == "__main__":
    main()
