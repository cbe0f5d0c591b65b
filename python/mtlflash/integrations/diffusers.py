"""diffusers integration: mtlflash as diffusers' ``"flash"`` attention backend.

diffusers routes the attention of its transformer models (Flux, Wan, QwenImage, ...) through
``diffusers.models.attention_dispatch``: a registry of backends keyed by the
``AttentionBackendName`` enum, chosen with ``model.set_attention_backend(name)`` or the
``attention_backend(name)`` context manager. Its ``"flash"`` backend (FlashAttention-2) is usable
only when the package metadata reports a flash-attn version, and the mtlflash import shim rightly
reports none, so with the shim alone that backend stays off. Instead::

    import mtlflash.integrations.diffusers as mfd
    mfd.register()                          # once per process; returns "flash"
    model.set_attention_backend("flash")    # or: with attention_backend("flash"): ...

:func:`register` puts :func:`attention` into diffusers' registry as the implementation of
``"flash"`` (the backend names are an enum, so a new name cannot be added; ``"flash"`` is the
FlashAttention-2 backend mtlflash implements) and marks that backend usable. :func:`unregister`
restores diffusers' own entry.

What runs on mtlflash: every call without an attention mask, dropout or inputs that need grad,
with FlashAttention-2's semantics (as diffusers' own ``"flash"`` backend: layout (batch, seq,
heads, head_dim), ``is_causal`` bottom-right aligned, GQA when the query heads are a multiple of
the key heads, ``return_lse``). Calls with a mask, dropout > 0 or grad go to diffusers' native
(SDPA) backend and are counted in mtlflash's trace under the entry ``diffusers`` with tier
``stock:<reason>``; context parallelism raises NotImplementedError.

Tested with diffusers 0.42.1 (the version pinned in the ``test`` extra). The registry is
diffusers' internal API; :func:`register` raises RuntimeError naming what it did not find if a
later diffusers changes it.
"""
from __future__ import annotations

from .. import trace

__all__ = ["register", "unregister", "attention", "BACKEND"]

BACKEND = "flash"

_saved = None  # diffusers' own registration of "flash", restored by unregister()


def _dispatch():
    try:
        from diffusers.models import attention_dispatch as ad
    except ImportError as e:
        raise ImportError("mtlflash.integrations.diffusers needs diffusers (pip install diffusers)") from e
    missing = [n for n in ("AttentionBackendName", "_AttentionBackendRegistry", "_CAN_USE_FLASH_ATTN")
               if not hasattr(ad, n)]
    reg = getattr(ad, "_AttentionBackendRegistry", None)
    missing += [f"_AttentionBackendRegistry.{n}" for n in ("register", "_backends", "_constraints",
                                                          "_supported_arg_names") if not hasattr(reg, n)]
    if missing:
        raise RuntimeError("mtlflash.integrations.diffusers: this diffusers has no " + ", ".join(missing)
                           + " in diffusers.models.attention_dispatch (tested with diffusers 0.42.1)")
    return ad


def register() -> str:
    """Make mtlflash diffusers' ``"flash"`` attention backend; returns ``"flash"``. Idempotent."""
    global _saved
    ad = _dispatch()
    reg = ad._AttentionBackendRegistry
    name = ad.AttentionBackendName.FLASH
    if _saved is None:
        _saved = (reg._backends.get(name), reg._constraints.get(name), reg._supported_arg_names.get(name),
                  ad._CAN_USE_FLASH_ATTN, name.value in getattr(reg, "_supports_context_parallel", set()))
    checks = [c for c in (getattr(ad, "_check_device", None),) if c is not None]
    reg.register(name, constraints=checks)(attention)
    getattr(reg, "_supports_context_parallel", set()).discard(name.value)
    ad._CAN_USE_FLASH_ATTN = True  # read by diffusers when "flash" is selected
    return name.value


def unregister() -> None:
    """Restore diffusers' own ``"flash"`` backend (usable again only with the real flash-attn)."""
    global _saved
    if _saved is None:
        return
    ad = _dispatch()
    reg = ad._AttentionBackendRegistry
    name = ad.AttentionBackendName.FLASH
    fn, constraints, arg_names, can_use, parallel = _saved
    for table, value in ((reg._backends, fn), (reg._constraints, constraints), (reg._supported_arg_names, arg_names)):
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value
    if parallel:
        reg._supports_context_parallel.add(name.value)
    ad._CAN_USE_FLASH_ATTN = can_use
    _saved = None


def _native(reason, query, key, value, **kwargs):
    ad = _dispatch()
    native = ad.AttentionBackendName.NATIVE
    fn = ad._AttentionBackendRegistry._backends[native]
    names = ad._AttentionBackendRegistry._supported_arg_names[native]
    if trace.ENABLED:
        trace.record("diffusers", str(query.dtype).replace("torch.", ""), query.shape[-1], query.shape[1],
                     key.shape[1], bool(kwargs.get("is_causal")), f"stock:{reason}")
    return fn(query=query, key=key, value=value, **{k: v for k, v in kwargs.items() if k in names})


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              window_size=(-1, -1), return_lse=False, _parallel_config=None):
    """diffusers' backend call: q (B, Sq, Hq, D), k/v (B, Sk, Hk, D[v]) -> out (B, Sq, Hq, Dv), or
    (out, lse (B, Hq, Sq)) with ``return_lse``. See the module docstring for what runs where."""
    if _parallel_config is not None:
        raise NotImplementedError("mtlflash's diffusers backend does not support context parallelism")
    import torch

    reason = None
    if attn_mask is not None:
        reason = "attn_mask"
    elif dropout_p and dropout_p > 0.0:
        reason = "dropout"
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        reason = "grad"
    if reason is not None:
        if window_size not in ((-1, -1), [-1, -1]):
            raise ValueError(f"mtlflash's diffusers backend: window_size with {reason} is not supported")
        return _native(reason, query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, enable_gqa=enable_gqa, return_lse=return_lse)
    from ..interface import flash_attn_func

    if return_lse:
        out, lse, _ = flash_attn_func(query, key, value, softmax_scale=scale, causal=is_causal,
                                      window_size=window_size, return_attn_probs=True)
        return out, lse
    return flash_attn_func(query, key, value, softmax_scale=scale, causal=is_causal, window_size=window_size)
