"""Packages: the repository's `kernels/` folder installs under the import name `refrag_kernels`
(the PyPI package `kernels`, Hugging Face's kernel hub client, owns the name `kernels`), `refrag/`
as `refrag`. Everything else about the project is in pyproject.toml; only this mapping of
discovered folders to import names needs code."""
from setuptools import find_packages, setup

KERNELS = [p.replace("kernels", "refrag_kernels", 1) for p in find_packages(include=["kernels", "kernels.*"])]

setup(packages=KERNELS + find_packages(include=["refrag", "refrag.*"]),
      package_dir={"refrag_kernels": "kernels"})
