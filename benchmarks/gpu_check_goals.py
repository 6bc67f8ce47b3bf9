"""The issue's goals from the GPU check's logs: bench_layers (B=65536 tables) and bench_domains.

    python benchmarks/gpu_check_goals.py BENCH_LAYERS_LOG [BENCH_DOMAINS_LOG]

Performance goals are reported (met / NOT met); only a missing table fails (exit 1).
"""
import os
import re
import sys

rows, batch, generator, level2 = {}, None, False, None
for line in open(sys.argv[1]):
    head = re.match(r"B=(\d+):( generator)?", line)
    if head:
        batch, generator = int(head.group(1)), bool(head.group(2))
    row = re.match(r"(released|paper)\s+(.+?)\s+([\d.]+)\s+\S+\s+[\d.]+x\s+(\d+)\s+(\d+)%", line)
    if row and batch == 65536 and not generator:
        rows[(row.group(1), row.group(2))] = (float(row.group(3)), int(row.group(5)))
    row = re.match(r"level 2 triton\s+([\d.]+)\s+([\d.]+)x", line)
    if row and generator and batch == 65536:
        level2 = (float(row.group(1)), float(row.group(2)))
if not rows:
    sys.exit("goals: no B=65536 table in bench_layers.log")
print("goals at B=65536 (fwd+bwd; performance goals are reported, they do not fail the check)")
for mode in ("released", "paper"):
    triton = rows.get((mode, "triton"))
    if triton is None:
        sys.exit(f"goals: no triton row for mode {mode}")
    checks = [(">= 50% of copy bandwidth", triton[1] >= 50, f"{triton[1]}%")]
    compiled = rows.get((mode, "torch+compile"))
    if compiled:
        checks.append((">= 6x torch+compile", compiled[0] / triton[0] >= 6, f"{compiled[0] / triton[0]:.1f}x"))
    einsum = rows.get((mode, "released einsum"))
    if einsum:
        checks.append((">= 40x released einsum", einsum[0] / triton[0] >= 40, f"{einsum[0] / triton[0]:.1f}x"))
    for what, passed, value in checks:
        print(f"  {mode:8} triton {triton[0]:.3f} ms  {what:26} {value:>7}  {'met' if passed else 'NOT met'}")
if level2:
    print(f"  level 2 triton {level2[0]:.3f} ms  generator+cell >= 8x torch.compile {level2[1]:6.1f}x  "
          f"{'met' if level2[1] >= 8 else 'NOT met'}")
print("goals of bench_domains (training step at D=100 within 1.5x of D=3)")
model = None
domains_log = sys.argv[2] if len(sys.argv) > 2 else ""
for line in open(domains_log) if os.path.exists(domains_log) else []:
    head = re.match(r"(\w+), B=\d+:", line)
    if head:
        model = head.group(1)
    row = re.match(r"\s*100\s+(\S+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s", line)
    if row and row.group(2) != "stacked":
        ratio = float(row.group(4))
        print(f"  {model:10} adapter {row.group(1):7} {row.group(2):9} {ratio:5.2f}x  {'met' if ratio <= 1.5 else 'NOT met'}")
