"""``flash_attn.flash_attn_interface``, served by mtlflash.

The public functions are mtlflash's own (same signatures as FlashAttention-2). The private
``_flash_attn_forward`` / ``_wrapped_flash_attn_forward`` family that some libraries call
directly (diffusers' attention dispatcher, ring-flash-attn) is provided with
FlashAttention-2's argument order and return tuple ``(out, softmax_lse, S_dmask,
rng_state)``, and so are ``_flash_attn_backward`` / ``_flash_attn_varlen_backward``, which write
dq, dk, dv in place and return softmax_d (see mtlflash.fa2_private).
"""

import mtlflash as _mf

flash_attn_func = _mf.flash_attn_func
flash_attn_qkvpacked_func = _mf.flash_attn_qkvpacked_func
flash_attn_kvpacked_func = _mf.flash_attn_kvpacked_func
flash_attn_varlen_func = _mf.flash_attn_varlen_func
flash_attn_varlen_qkvpacked_func = _mf.flash_attn_varlen_qkvpacked_func
flash_attn_varlen_kvpacked_func = _mf.flash_attn_varlen_kvpacked_func

if callable(getattr(_mf, "flash_attn_with_kvcache", None)):
    flash_attn_with_kvcache = _mf.flash_attn_with_kvcache

# FA2's private forward/backward entry points (exact 2.8.3 signatures) and their _wrapped_* aliases
from mtlflash.fa2_private import (  # noqa: E402
    _flash_attn_backward,
    _flash_attn_forward,
    _flash_attn_varlen_backward,
    _flash_attn_varlen_forward,
    _wrapped_flash_attn_backward,
    _wrapped_flash_attn_forward,
    _wrapped_flash_attn_varlen_backward,
    _wrapped_flash_attn_varlen_forward,
)


def __getattr__(name):
    if name == "flash_attn_with_kvcache":
        raise AttributeError(
            "flash_attn_with_kvcache is not available: this mtlflash version does not "
            "implement it yet (flash_attn is served by mtlflash)"
        )
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
