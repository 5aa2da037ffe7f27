"""doc_attention: interim module that calls the reference until its Triton kernel lands."""
from kernels.reference import doc_attention

__all__ = ["doc_attention"]
