"""mtlflash: FlashAttention-2 compatible attention for Apple Silicon, with a fast portable CPU backend.

    from mtlflash import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)     # q, k, v: (batch, seqlen, heads, head_dim)

Accepts torch tensors (CPU, MPS) and NumPy arrays (float16/float32; NumPy in gives NumPy out).
See README.md for the semantics, the tiers and the environment variables.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .interface import (  # noqa: E402
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    metal_params,
)
from .info import backend_info  # noqa: E402
from .fa2_private import (  # noqa: E402,F401  FlashAttention-2's private entry points
    _flash_attn_backward,
    _flash_attn_forward,
    _flash_attn_varlen_backward,
    _flash_attn_varlen_forward,
    _wrapped_flash_attn_backward,
    _wrapped_flash_attn_forward,
    _wrapped_flash_attn_varlen_backward,
    _wrapped_flash_attn_varlen_forward,
)

__all__ = [
    "__version__",
    "backend_info",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "metal_params",
]
