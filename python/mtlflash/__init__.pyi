from typing import Any

from .info import backend_info as backend_info
from .interface import (
    flash_attn_func as flash_attn_func,
    flash_attn_kvpacked_func as flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func as flash_attn_qkvpacked_func,
    flash_attn_varlen_func as flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func as flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func as flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache as flash_attn_with_kvcache,
    metal_params as metal_params,
)

__version__: str
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
