"""Build and install hamur_fast.

``kernels/`` installs as ``hamur_fast.kernels`` (never as a top-level ``kernels`` module).
Installs offline with ``pip install --no-build-isolation -e .`` when torch is present.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["hamur_fast", "hamur_fast.*"]) + ["hamur_fast.kernels"]

setup(
    name="hamur_fast",
    version="0.1.0",
    description="Fast, trustworthy HAMUR (Hyper Adapter for Multi-Domain Recommendation) for PyTorch",
    packages=packages,
    package_dir={"hamur_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pandas",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest"], "parquet": ["pyarrow"]},
    entry_points={"console_scripts": ["hamur-fast=hamur_fast.cli:main"]},
)
