"""refrag kernels: standalone torch + Triton ops for packed, document-aware Mamba and attention.

Importable by any trainer; nothing here depends on `refrag`. See docs/architecture.md for semantics.
"""
from kernels.common.dispatch import current_backend, set_backend, use_backend
from kernels.layout import DocLayout
from kernels.ssd import ssd_scan
from kernels.selective_scan import selective_scan
from kernels.conv1d import causal_conv1d
from kernels.doc_attention import doc_attention
from kernels.state_update import ssd_state_update, causal_conv1d_update
from kernels.cross_entropy import IGNORE_INDEX, fused_linear_cross_entropy
from kernels.gated_rms_norm import gated_rms_norm

__all__ = [
    "IGNORE_INDEX",
    "use_backend",
    "set_backend",
    "current_backend",
    "DocLayout",
    "ssd_scan",
    "selective_scan",
    "causal_conv1d",
    "doc_attention",
    "ssd_state_update",
    "causal_conv1d_update",
    "fused_linear_cross_entropy",
    "gated_rms_norm",
]
