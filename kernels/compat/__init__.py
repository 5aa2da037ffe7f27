"""Compatibility layers: other libraries' kernel APIs on refrag's ops.

- ``refrag_kernels.compat.mamba_ssm``: mamba-ssm / causal-conv1d functions (signatures and semantics).
- ``refrag_kernels.compat.transformers``: ``enable_for_transformers()`` makes Hugging Face's Mamba-2
  family (Mamba2, Bamba, FalconH1, GraniteMoeHybrid, NemotronH, Zamba2) run on them, packed
  sequences included, without mamba-ssm or causal-conv1d installed.
"""
from refrag_kernels.compat.transformers import disable_for_transformers, enable_for_transformers, enabled_models

__all__ = ["enable_for_transformers", "disable_for_transformers", "enabled_models"]
