"""``flash_attn``, served by mtlflash (see ``mtlflash.shim``).

When no real flash_attn is installed and the shim is active, ``import flash_attn`` loads
this package under the name ``flash_attn``: the FlashAttention-2 functions run on mtlflash
(Metal on an Apple GPU, the C backend on the CPU), forward and backward, with dropout. Everything here imports mtlflash by absolute name and
its own submodules by relative name, so it works under either package name.
"""

__version__ = "2.8.3"

# mtlflash serves this package; real flash_attn never sets this attribute
__mtlflash_shim__ = True

from .flash_attn_interface import (  # noqa: E402
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from . import flash_attn_interface as _interface  # noqa: E402

__all__ = [
    "__version__",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]

if hasattr(_interface, "flash_attn_with_kvcache"):
    from .flash_attn_interface import flash_attn_with_kvcache  # noqa: E402,F401

    __all__.append("flash_attn_with_kvcache")


def __getattr__(name):
    if name == "flash_attn_with_kvcache":
        raise AttributeError(
            "flash_attn_with_kvcache is not available: this mtlflash version does not "
            "implement it yet (flash_attn is served by mtlflash)"
        )
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
