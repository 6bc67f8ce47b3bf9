"""Compile every Triton kernel of backend="triton" for a GPU target without a GPU, and report registers and spills.

    python benchmarks/triton_compile_report.py            # sm_90a (H100/H200), the launchers' tile choices

Needs triton's bundled ptxas (no device, no driver). Unset TRITON_INTERPRET: this compiles real GPU code.
The numbers guided the warp counts in kernels/: a kernel that spills to local memory on the target is
a kernel to fix before any timing. Compiled with this machine's Triton, which may differ from the GPU's.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hamur_fast.kernels import adapter_cell as cell, domain_norm as norm, grouped_linear as grouped  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
INT_ARGS = {"batch", "width", "rank", "bottleneck", "num_domains", "num_groups", "num_parts", "parts_per_program",
            "in_features", "out_features", "stride_xb", "stride_xi", "stride_wd", "stride_wi", "stride_wo",
            "stride_bd", "stride_gb", "stride_go"}
FLOAT_ARGS = {"eps", "momentum"}
INDEX_ARGS = {"order", "domain_sorted", "group_ids", "offsets", "tile_first_row", "tile_end", "tile_count"}
INT32_INDEX_ARGS = {"tile_group"}


def compile_report(kernel, constexprs, num_warps, label):
    """Compile ``kernel`` (fp32 pointers, int64 indices) for sm_90a; returns a line with registers and spills."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT_ARGS:
            signature[name] = "i32"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "*i64" if name in INDEX_ARGS else "*i32" if name in INT32_INDEX_ARGS else "*fp32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
        ptx.write(compiled.asm["ptx"])
    info = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", ptx.name, "-o", os.devnull],
                          capture_output=True, text=True, check=True).stderr
    os.unlink(ptx.name)
    registers = re.search(r"Used (\d+) registers", info).group(1)
    spills = re.search(r"(\d+) bytes spill stores", info).group(1)
    return f"{label:56} warps={num_warps:<3} registers={registers:>4} spill stores={spills:>6} B"


def main():
    print(f"# triton {triton.__version__}, target sm_90a")
    for width, rank, bottleneck in [(128, 35, 32), (64, 65, 32), (13, 5, 7)]:
        meta = cell._tile_meta(width, rank, bottleneck)
        warps = meta.pop("num_warps")
        recompute = cell._without_rep_tiles(dict(meta, num_warps=warps))
        recompute_warps = recompute.pop("num_warps")
        for per_domain in (True, False):
            tag = f"h={width} k={rank} s={bottleneck} {'paper' if per_domain else 'released'}"
            for kernel, extra, tiles, n_warps in [
                (cell._cell_fwd_project_kernel, dict(COMPUTE_STATS=True), meta, warps),
                (cell._cell_fwd_normalize_kernel, {}, recompute, recompute_warps),
                (cell._cell_bwd_norm_sums_kernel, {}, recompute, recompute_warps),
                (cell._cell_bwd_main_kernel, dict(BATCH_STATS=True), meta, warps),
            ]:
                print(compile_report(kernel, dict(PER_DOMAIN=per_domain, **extra, **tiles), n_warps,
                                     f"{kernel.__name__} {tag}"))
    for bias in (True, False):  # the grouped per-domain linear op (towers, adapter factor gradients)
        for block_m in (16, 64):
            print(compile_report(grouped._grouped_forward_kernel,
                                 dict(HAS_BIAS=bias, IEEE=True, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32),
                                 8 if block_m == 64 else 4,
                                 f"_grouped_forward_kernel M={block_m} bias={bias}"))
        print(compile_report(grouped._weight_grad_partial_kernel,
                             dict(X_BY_ORDER=True, GRAD_BY_ORDER=bias, HAS_BIAS=bias, IEEE=True,
                                  ROWS_PER_TILE=grouped.WEIGHT_GRAD_ROWS, BLOCK_I=64, BLOCK_O=64, BLOCK_R=32), 4,
                             f"_weight_grad_partial_kernel 64x64 bias={bias}"))
    print(compile_report(grouped._sum_domain_tiles_kernel, dict(BLOCK=1024), 4, "_sum_domain_tiles_kernel"))
    print(compile_report(norm.merge_group_stats_kernel,
                         dict(UNBIASED=True, FINAL=True, BLOCK_P=norm.MERGE_PARTS_PER_STEP,
                              BLOCK_H=norm.MERGE_COLS), 4,
                         "merge_group_stats_kernel"))
    print(compile_report(norm._update_running_stats_kernel, dict(BLOCK_H=128), 4, "_update_running_stats_kernel"))
    rows = dict(PER_DOMAIN=True, BLOCK_B=norm.ROWS_PER_BLOCK, BLOCK_H=128)
    for kernel, extra in [(norm._partial_stats_kernel, {}), (norm._normalize_kernel, {}),
                          (norm._partial_grad_sums_kernel, {}), (norm._input_grad_kernel, dict(BATCH_STATS=True))]:
        print(compile_report(kernel, dict(rows, **extra), norm.TILE_WARPS, kernel.__name__))


if __name__ == "__main__":
    main()
