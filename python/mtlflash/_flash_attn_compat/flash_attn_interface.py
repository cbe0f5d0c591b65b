"""``flash_attn.flash_attn_interface``, served by mtlflash.

The public functions are mtlflash's own (same signatures as FlashAttention-2). The private
``_flash_attn_forward`` / ``_wrapped_flash_attn_forward`` family that some libraries call
directly (diffusers' attention dispatcher, ring-attention code) is provided with
FlashAttention-2's argument order and return tuple ``(out, softmax_lse, S_dmask,
rng_state)``; the backward entry points raise NotImplementedError.
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

_NO_BACKWARD = (
    "mtlflash implements the flash-attention forward pass only; backward is not "
    "available yet (run the model under torch.no_grad() / inference_mode())"
)


def _side_outputs(q):
    import torch

    # FA2 returns an empty S_dmask when no attention probabilities are requested, and a
    # 2-element int64 philox state; without dropout neither carries information
    s_dmask = torch.empty((0,), dtype=q.dtype, device=q.device)
    rng_state = torch.zeros((2,), dtype=torch.int64, device=q.device)
    return s_dmask, rng_state


def _check_return_softmax(return_softmax, dropout_p):
    if return_softmax and dropout_p > 0:
        raise NotImplementedError(
            "mtlflash cannot return dropout attention probabilities (dropout is not implemented)"
        )


def _flash_attn_forward(
    q,
    k,
    v,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
):
    """FA2's private forward: q (B,Sq,Hq,D), k/v (B,Sk,Hk,D) -> (out, lse, S_dmask, rng_state)."""
    _check_return_softmax(return_softmax, dropout_p)
    out, lse, _ = _mf.flash_attn_func(
        q,
        k,
        v,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=(window_size_left, window_size_right),
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        return_attn_probs=True,
    )
    s_dmask, rng_state = _side_outputs(q)
    return out, lse, s_dmask, rng_state


def _flash_attn_varlen_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
    leftpad_k=None,
    seqused_k=None,
    zero_tensors=False,
):
    """FA2's private varlen forward -> (out, lse, S_dmask, rng_state)."""
    _check_return_softmax(return_softmax, dropout_p)
    if leftpad_k is not None or seqused_k is not None:
        raise NotImplementedError("mtlflash does not implement leftpad_k / seqused_k yet")
    kwargs = {}
    if block_table is not None:
        kwargs["block_table"] = block_table
    out, lse, _ = _mf.flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=(window_size_left, window_size_right),
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        return_attn_probs=True,
        **kwargs,
    )
    s_dmask, rng_state = _side_outputs(q)
    return out, lse, s_dmask, rng_state


def _flash_attn_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    rng_state=None,
):
    raise NotImplementedError(_NO_BACKWARD)


def _flash_attn_varlen_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    rng_state=None,
    zero_tensors=False,
):
    raise NotImplementedError(_NO_BACKWARD)


# FA2 >= 2.6 routes these through torch.library custom ops and calls them by these names
_wrapped_flash_attn_forward = _flash_attn_forward
_wrapped_flash_attn_varlen_forward = _flash_attn_varlen_forward
_wrapped_flash_attn_backward = _flash_attn_backward
_wrapped_flash_attn_varlen_backward = _flash_attn_varlen_backward


def __getattr__(name):
    if name == "flash_attn_with_kvcache":
        raise AttributeError(
            "flash_attn_with_kvcache is not available: this mtlflash version does not "
            "implement it yet (flash_attn is served by mtlflash)"
        )
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
