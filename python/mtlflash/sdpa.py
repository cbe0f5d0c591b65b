"""Opt-in patch of ``torch.nn.functional.scaled_dot_product_attention``.

``mtlflash.sdpa.install()`` replaces ``torch.nn.functional.scaled_dot_product_attention``
with a wrapper that sends a call to mtlflash only when the call is eligible AND one of the
gates says mtlflash helps; every other call goes to the original function unchanged.
``uninstall()`` restores it. Both are idempotent. ``MTLFLASH_SDPA=off`` in the environment
makes ``install()`` a no-op (kill switch), and turns an installed wrapper into a plain
pass-through when set later.

Eligible (all must hold, otherwise the original runs):

* query, key, value are plain ``torch.Tensor`` (no subclasses, fake or functorch-wrapped
  tensors), strided, 4-D ``(B, H, L, D)``, same device, same dtype in fp32/fp16/bf16,
  unit last-dim stride, equal batch sizes, D <= 256 and Dv <= 256;
* ``attn_mask is None`` (bool and float masks run on the original, exactly as before);
* ``dropout_p == 0``;
* ``is_causal`` is False, or Lq == Lk (torch's causal mask is top-left aligned,
  flash_attn's bottom-right; they agree only when Lq == Lk);
* key and value have the same number of heads; if Hq != Hk, ``enable_gqa=True`` and
  Hq % Hk == 0 (without enable_gqa the original raises its own error);
* inputs that require grad are eligible: the output joins autograd through mtlflash's backward
  (the cpu tier, or the reference backward in torch on MPS);
* not under ``torch.compile`` tracing, TorchScript tracing, or autocast for the device;
* Lq > 0 and Lk > 0.

Gates (parameters of :func:`install`; one must fire):

* the device type is in ``devices`` (default: ``("mps",)``) and either
  ``max(Lq, Lk) >= min_seqlen`` (default 4096: where stock MPS SDPA loses accuracy or
  runs out of memory), or ``Dv != D`` and ``route_dv_mismatch`` (default True).

A routed call that raises inside mtlflash is retried with the original function; the
failure is recorded by ``mtlflash.trace`` (tier ``fallback:<ExceptionType>``) and never
reaches the caller. Code that imported the function object itself before ``install()``
(``from torch.nn.functional import scaled_dot_product_attention``) keeps the original.
"""

from __future__ import annotations

import os
import threading
import warnings

from . import trace

__all__ = ["install", "uninstall", "is_installed", "config", "ENV"]

ENV = "MTLFLASH_SDPA"

_lock = threading.Lock()
_original = None  # torch's function, saved by install()
_wrapper = None  # the installed wrapper
_active = False  # False after uninstall(): a wrapper kept by someone else passes through

_DEFAULTS = {"devices": ("mps",), "min_seqlen": 4096, "route_dv_mismatch": True}
_config = dict(_DEFAULTS)

_OFF = ("off", "0", "false", "no")
_ON = ("", "on", "1", "true", "yes", "auto")


def _env_off() -> bool:
    raw = os.environ.get(ENV, "")
    value = raw.strip().lower()
    if value in _OFF:
        return True
    if value not in _ON:
        warnings.warn(
            "%s=%r is not understood (use off to disable the SDPA patch); ignoring it"
            % (ENV, raw),
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def config() -> dict:
    """The routing gates in force (a copy)."""
    return dict(_config)


def is_installed() -> bool:
    """True if the wrapper is what ``torch.nn.functional.scaled_dot_product_attention`` is now."""
    import torch.nn.functional as F

    return _wrapper is not None and F.scaled_dot_product_attention is _wrapper and _active


def install(devices=None, min_seqlen=None, route_dv_mismatch=None) -> bool:
    """Patch ``torch.nn.functional.scaled_dot_product_attention`` (idempotent).

    devices: device types mtlflash may serve, e.g. ``("mps",)`` (default) or
        ``("mps", "cpu")``.
    min_seqlen: route when ``max(Lq, Lk) >= min_seqlen`` (default 4096).
    route_dv_mismatch: route calls whose value head dim differs from the query head dim
        (default True).

    Calling install() again updates the gates that are given and keeps the others.
    Returns True if the patch is active, False if ``MTLFLASH_SDPA=off`` prevented it.
    """
    global _original, _wrapper, _active
    if _env_off():
        return False
    import torch.nn.functional as F

    with _lock:
        if devices is not None:
            if isinstance(devices, str):
                devices = (devices,)
            _config["devices"] = tuple(str(d) for d in devices)
        if min_seqlen is not None:
            _config["min_seqlen"] = int(min_seqlen)
        if route_dv_mismatch is not None:
            _config["route_dv_mismatch"] = bool(route_dv_mismatch)
        current = F.scaled_dot_product_attention
        if _wrapper is not None and current is _wrapper:
            _active = True
            return True
        _original = current
        _wrapper = _make_wrapper(current)
        F.scaled_dot_product_attention = _wrapper
        _active = True
        return True


def uninstall() -> bool:
    """Restore the original function (idempotent). Resets the gates to their defaults.

    If something else has wrapped the function after us, it is left in place and our
    wrapper (still inside that chain) becomes a pure pass-through. Returns True if the
    patch was active.
    """
    global _active
    import torch.nn.functional as F

    with _lock:
        was_active = _active
        _active = False
        if _wrapper is not None and F.scaled_dot_product_attention is _wrapper:
            F.scaled_dot_product_attention = _original
        _config.clear()
        _config.update(_DEFAULTS)
        return was_active


_FLOAT_DTYPES = None


def _float_dtypes():
    global _FLOAT_DTYPES
    if _FLOAT_DTYPES is None:
        import torch

        _FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    return _FLOAT_DTYPES


def _is_functorch_wrapped(t) -> bool:
    import torch

    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    try:
        return bool(check(t)) if check is not None else False
    except Exception:
        return True


def _compiling() -> bool:
    import torch

    try:
        if torch.compiler.is_compiling():
            return True
    except Exception:
        pass
    try:
        return bool(torch.jit.is_tracing())
    except Exception:
        return False


def _route_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """None if the call goes to mtlflash, else a short reason for the trace."""
    import torch

    if _compiling():
        return "compiling"
    T = torch.Tensor
    if type(query) is not T or type(key) is not T or type(value) is not T:
        return "subclass"
    if attn_mask is not None:
        return "mask"
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        return "dropout"
    if not isinstance(is_causal, bool):
        return "is_causal"
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "rank"
    dev = query.device
    if dev.type not in _config["devices"]:
        return "device"
    if key.device != dev or value.device != dev:
        return "device"
    dtype = query.dtype
    if dtype not in _float_dtypes() or key.dtype != dtype or value.dtype != dtype:
        return "dtype"
    if query.layout != torch.strided or key.layout != torch.strided or value.layout != torch.strided:
        return "layout"
    if query.is_nested or key.is_nested or value.is_nested:
        return "nested"
    B, Hq, Lq, D = query.shape
    Bk, Hk, Lk, Dk = key.shape
    Bv, Hv, Lv, Dv = value.shape
    if Bk != B or Bv != B or Dk != D or Lv != Lk or Hv != Hk:
        return "shape"
    if Hq != Hk and (not enable_gqa or Hk == 0 or Hq % Hk != 0):
        return "gqa"
    if B == 0 or Hq == 0 or Lq == 0 or Lk == 0 or D == 0 or Dv == 0:
        return "empty"
    if D > 256 or Dv > 256:
        return "head_dim"
    if is_causal and Lq != Lk:
        return "causal_lq_ne_lk"
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        return "stride"
    try:
        if torch.is_autocast_enabled(dev.type):
            return "autocast"
    except Exception:
        if torch.is_autocast_enabled():
            return "autocast"
    if _is_functorch_wrapped(query) or _is_functorch_wrapped(key) or _is_functorch_wrapped(value):
        return "functorch"
    if max(Lq, Lk) >= _config["min_seqlen"]:
        return None
    if Dv != D and _config["route_dv_mismatch"]:
        return None
    return "gate"


def _run_mtlflash(query, key, value, is_causal, scale):
    """(B,H,L,D) in, (B,H,Lq,Dv) contiguous out, like stock SDPA."""
    import mtlflash

    out = mtlflash.flash_attn_func(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        softmax_scale=None if scale is None else float(scale),
        causal=bool(is_causal),
    )
    return out.transpose(1, 2).contiguous()


def _record(query, key, is_causal, tier):
    try:
        trace.record(
            "sdpa",
            str(query.dtype).replace("torch.", ""),
            query.shape[-1],
            query.shape[-2] if query.dim() >= 2 else 0,
            key.shape[-2] if key.dim() >= 2 else 0,
            bool(is_causal) if isinstance(is_causal, bool) else False,
            tier,
        )
    except Exception:
        pass


def _bind(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _make_wrapper(original):
    def scaled_dot_product_attention(*args, **kwargs):
        # the original always receives exactly the caller's arguments, so its own argument
        # errors, defaults and keyword names are what the caller sees
        if not _active:
            return original(*args, **kwargs)
        try:
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = _bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        try:
            reason = _route_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        except Exception:
            reason = "check_error"
        if reason is None and _env_off_quiet():
            reason = "env_off"
        if reason is None:
            try:
                return _run_mtlflash(query, key, value, is_causal, scale)
            except Exception as exc:  # never fail a call stock would serve
                if trace.ENABLED:
                    _record(query, key, is_causal, "fallback:" + type(exc).__name__)
        elif trace.ENABLED:
            _record(query, key, is_causal, "stock:" + reason)
        return original(*args, **kwargs)

    scaled_dot_product_attention.__doc__ = (
        "mtlflash-patched torch.nn.functional.scaled_dot_product_attention "
        "(see mtlflash.sdpa; mtlflash.sdpa.uninstall() restores the original).\n\n"
        + (getattr(original, "__doc__", None) or "")
    )
    scaled_dot_product_attention.__wrapped__ = original
    scaled_dot_product_attention._mtlflash_sdpa = True
    return scaled_dot_product_attention


def _env_off_quiet() -> bool:
    return os.environ.get(ENV, "").strip().lower() in _OFF
