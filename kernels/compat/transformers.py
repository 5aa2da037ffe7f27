"""Run Hugging Face transformers' Mamba-2 family on refrag's kernels.

Each family's modeling module defines five module-level functions (torch fallbacks wrapped by
``use_kernel_func_from_hub_with_fallback``) that its mixer calls by global name:
``mamba2_chunk_scan``, ``mamba2_split_conv1d_scan_combined``, ``mamba2_selective_state_update``,
``causal_conv1d_fn`` and ``causal_conv1d_update``. ``enable_for_transformers()`` rebinds those
names to ``refrag_kernels.compat.mamba_ssm``; ``disable_for_transformers()`` puts the originals back.
Rebinding (not transformers' hub-kernel mapping) because that mapping needs Hugging Face's own
``kernels`` package and a hub repository, and because the fallback wrapper filters keyword
arguments by signature, dropping ``cu_seq_lens_q`` that packed batches carry.

Packed training: use ``DataCollatorWithFlattening(return_seq_idx=True)`` (or
``return_flash_attn_kwargs=True``) so the Mamba mixers receive the sequence boundaries; with
``position_ids`` alone transformers' Mamba mixers never see them (attention layers do).
"""
from __future__ import annotations

import importlib
from typing import Dict, Iterable, List, Optional

from refrag_kernels.compat import mamba_ssm

FAMILIES = ("mamba2", "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "zamba2")
# transformers' global name -> our function
_BINDINGS = {
    "mamba2_chunk_scan": mamba_ssm.mamba_chunk_scan_combined,
    "mamba2_split_conv1d_scan_combined": mamba_ssm.mamba_split_conv1d_scan_combined,
    "mamba2_selective_state_update": mamba_ssm.selective_state_update,
    "causal_conv1d_fn": mamba_ssm.causal_conv1d_fn,
    "causal_conv1d_update": mamba_ssm.causal_conv1d_update,
}
_saved: Dict[str, Dict[str, object]] = {}


def _module(family: str):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def enable_for_transformers(models: Optional[Iterable[str]] = None) -> List[str]:
    """Point the given families (default: all of FAMILIES that this transformers has) at our kernels.

    Idempotent; returns the families switched. Models built before or after the call both use the
    kernels (the mixers look the functions up at call time). Raises ImportError without transformers
    and ValueError for an unknown family or one whose module lacks the expected functions.
    """
    importlib.import_module("transformers")
    names = FAMILIES if models is None else tuple(models)
    unknown = [m for m in names if m not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown model family {unknown}; supported: {FAMILIES}")
    switched = []
    for family in names:
        try:
            module = _module(family)
        except ImportError:
            if models is None:
                continue  # an older transformers without this family
            raise
        missing = [name for name in _BINDINGS if not hasattr(module, name)]
        if missing:
            raise ValueError(f"transformers.models.{family} has no {missing}: this transformers version lays "
                             "its Mamba-2 mixer out differently")
        if family not in _saved:
            _saved[family] = {name: getattr(module, name) for name in _BINDINGS}
        for name, fn in _BINDINGS.items():
            setattr(module, name, fn)
        switched.append(family)
    return switched


def disable_for_transformers(models: Optional[Iterable[str]] = None) -> List[str]:
    """Restore transformers' own functions for the given families (default: all switched ones)."""
    names = list(_saved) if models is None else [m for m in models if m in _saved]
    for family in names:
        module = _module(family)
        for name, fn in _saved.pop(family).items():
            setattr(module, name, fn)
    return names


def enabled_models() -> List[str]:
    """Families currently running on refrag's kernels."""
    return sorted(_saved)
