"""refrag kernels: standalone torch + Triton ops for packed, document-aware Mamba and attention.

Importable by any trainer; nothing here depends on `refrag`. See docs/architecture.md for semantics.
"""
from refrag_kernels.common.dispatch import current_backend, set_backend, use_backend
from refrag_kernels.layout import DocLayout
from refrag_kernels.ssd import ssd_scan
from refrag_kernels.selective_scan import selective_scan
from refrag_kernels.conv1d import causal_conv1d
from refrag_kernels.doc_attention import doc_attention
from refrag_kernels.state_update import ssd_state_update, causal_conv1d_update
from refrag_kernels.cross_entropy import IGNORE_INDEX, fused_linear_cross_entropy
from refrag_kernels.gated_rms_norm import gated_rms_norm

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
