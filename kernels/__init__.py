"""Triton kernels of hamur_fast, installed as the subpackage ``hamur_fast.kernels``.

One file per op: its Triton kernels and host launchers. The custom ops over them, with their fake and
autograd registrations, are backend="triton": hamur_fast/ops/backends/triton.py.
"""
