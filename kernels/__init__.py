"""Triton kernels of hamur_fast, installed as the subpackage ``hamur_fast.kernels``.

One file per op: its Triton kernels, host launchers and autograd/custom-op registration.
"""
