"""FlashAttention-2's private entry points (flash_attn 2.8.3), with its exact signatures.

Libraries that build their own autograd around flash_attn call these directly: diffusers'
attention dispatcher (``_wrapped_flash_attn_forward/_backward``), ring-flash-attn (which reads
``_flash_attn_forward``'s defaults with ``inspect.getfullargspec``), xformers. They are plain
Python functions (introspectable) that run mtlflash's core without autograd:

- ``_flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1,
  window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False)`` ->
  ``(out, softmax_lse, S_dmask, rng_state)``; S_dmask is empty (mtlflash never materialises the
  probabilities; ``return_softmax=True`` with dropout raises NotImplementedError); rng_state is
  int64 (2,) = (Philox seed, offset), zeros without dropout.
- ``_flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
  causal, window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
  rng_state=None)`` writes the gradients into ``dq``, ``dk``, ``dv`` (allocated when None) and
  returns ``softmax_d`` = rowsum(dout * out), fp32 of lse's shape (FA2 pads its last dimension
  to a multiple of 128; mtlflash does not).
- the varlen twins take ``cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k`` after the
  tensors (forward: after v; backward: after dv).
"""
from __future__ import annotations

from . import interface as _i

__all__ = [
    "_flash_attn_forward",
    "_flash_attn_varlen_forward",
    "_flash_attn_backward",
    "_flash_attn_varlen_backward",
    "_wrapped_flash_attn_forward",
    "_wrapped_flash_attn_varlen_forward",
    "_wrapped_flash_attn_backward",
    "_wrapped_flash_attn_varlen_backward",
]


def _forward(fn, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, wl, wr, softcap, alibi_slopes,
             return_softmax, block_table=None):
    import torch

    from . import autograd

    dropout_p = _i._check_dropout(fn, dropout_p, q)
    if _i._as_bool(fn, "return_softmax", return_softmax) and dropout_p > 0:
        raise NotImplementedError(f"[{fn}] return_softmax=True with dropout: mtlflash does not materialise the "
                                  f"attention probabilities (S_dmask)")
    window = _i._window(fn, (wl, wr))
    causal = _i._as_bool(fn, "causal", causal)
    softcap = _i._as_float(fn, "softcap", softcap)
    if softmax_scale is not None:
        softmax_scale = _i._as_float(fn, "softmax_scale", softmax_scale)
    varlen = cu_q is not None
    max_q = _i._as_int(fn, "max_seqlen_q", max_q) if varlen else 0
    max_k = _i._as_int(fn, "max_seqlen_k", max_k) if varlen else 0
    seed = autograd.draw_seed() if dropout_p > 0 else 0
    with torch.no_grad():
        out, lse, tier = _i._run(fn, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window, softcap,
                                 alibi_slopes, True, block_table, dropout=(dropout_p, seed, 0))
    s_dmask = torch.empty((0,), dtype=q.dtype, device=q.device)
    rng_state = torch.tensor([seed, 0], dtype=torch.int64, device=q.device)
    return out, lse, s_dmask, rng_state


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                        softcap=0.0, alibi_slopes=None, return_softmax=False):
    """FA2's private forward: q (B,Sq,Hq,D), k/v (B,Sk,Hk,D) -> (out, lse, S_dmask, rng_state)."""
    return _forward("_flash_attn_forward", q, k, v, None, None, None, None, dropout_p, softmax_scale, causal,
                    window_size_left, window_size_right, softcap, alibi_slopes, return_softmax)


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                               softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                               alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None, zero_tensors=False):
    """FA2's private varlen forward -> (out, lse (Hq, total_q), S_dmask, rng_state)."""
    if leftpad_k is not None or seqused_k is not None:
        raise NotImplementedError("[_flash_attn_varlen_forward] leftpad_k / seqused_k: not implemented in mtlflash "
                                  "(flash_attn_with_kvcache's cache_leftpad / cache_seqlens are)")
    return _forward("_flash_attn_varlen_forward", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
                    return_softmax, block_table)


def _backward(fn, dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale,
              causal, wl, wr, softcap, alibi_slopes, rng_state):
    import torch

    from . import autograd

    dropout_p = _i._check_dropout(fn, dropout_p, q)
    wl, wr = _i._window(fn, (wl, wr))
    causal = _i._as_bool(fn, "causal", causal)
    softcap = _i._as_float(fn, "softcap", softcap)
    if softmax_scale is not None:
        softmax_scale = _i._as_float(fn, "softmax_scale", softmax_scale)
    varlen = cu_q is not None
    max_q = _i._as_int(fn, "max_seqlen_q", max_q) if varlen else 0
    max_k = _i._as_int(fn, "max_seqlen_k", max_k) if varlen else 0
    if softmax_lse is None:
        raise ValueError(f"[{fn}] softmax_lse: the backward pass needs the forward's lse, got None")
    with torch.no_grad():
        _, _, _, softmax_d = autograd.backward_core(dout, q, k, v, out, softmax_lse, cu_q, cu_k, max_q, max_k,
                                                    dropout_p, softmax_scale, causal, wl, wr, softcap, alibi_slopes,
                                                    rng_state, dq=dq, dk=dk, dv=dv, fn=fn)
    return softmax_d


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                         deterministic=False, rng_state=None):
    """FA2's private backward: writes dq, dk, dv (when given) and returns softmax_d (B, Hq, Sq) fp32."""
    return _backward("_flash_attn_backward", dout, q, k, v, out, softmax_lse, dq, dk, dv, None, None, None, None,
                     dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
                     rng_state)


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left=-1,
                                window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False,
                                rng_state=None, zero_tensors=False):
    """FA2's private varlen backward: writes dq, dk, dv and returns softmax_d (Hq, total_q) fp32."""
    return _backward("_flash_attn_varlen_backward", dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                     cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left,
                     window_size_right, softcap, alibi_slopes, rng_state)


# FA2 >= 2.6 calls these through torch.library custom ops under these names (diffusers imports them)
_wrapped_flash_attn_forward = _flash_attn_forward
_wrapped_flash_attn_varlen_forward = _flash_attn_varlen_forward
_wrapped_flash_attn_backward = _flash_attn_backward
_wrapped_flash_attn_varlen_backward = _flash_attn_varlen_backward
