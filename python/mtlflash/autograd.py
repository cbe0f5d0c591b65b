"""Autograd and torch.compile for every attention entry point.

Two custom ops in the ``mtlflash::`` namespace carry every differentiable call of the six
FlashAttention-2 functions (the packed variants split their input into views first, so their
gradients come back packed, as FA2's do):

- ``mtlflash::attention_forward`` -> (out, lse, rng_state): the C core's forward (or the
  ``reference`` tier on MPS tensors); with dropout it draws the Philox seed from torch's default
  generator, so ``torch.manual_seed`` makes runs repeatable, and returns it as rng_state (int64 (2,):
  seed, offset) for the backward to regenerate the same mask.
- ``mtlflash::attention_backward`` -> (dq, dk, dv): ``mtlflash._C.backward`` (the CPU tier), or
  the chunked reference backward in torch on the same device (MPS tensors).

Both have fake implementations (exact shapes and dtypes) and the forward's autograd formula is
registered with ``torch.library.register_autograd``, so ``torch.compile(fullgraph=True)`` traces a
model that calls mtlflash with no graph break, forward and backward. The last tier used (eager) is
kept for tracing (``mtlflash.trace``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _C

__all__ = ["attention", "backward_core", "draw_seed"]

last_tier = ["cpu"]


def draw_seed() -> int:
    """A Philox seed from torch's default CPU generator (so torch.manual_seed fixes it)."""
    return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())


def _lse_shape(q: Tensor, cu_seqlens_q: Optional[Tensor]) -> List[int]:
    if cu_seqlens_q is not None:
        return [q.shape[1], q.shape[0]]
    return [q.shape[0], q.shape[2], q.shape[1]]


@torch.library.custom_op("mtlflash::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                      max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: Optional[float],
                      causal: bool, window_left: int, window_right: int, softcap: float,
                      alibi_slopes: Optional[Tensor], block_table: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    from .interface import _run

    seed = draw_seed() if dropout_p > 0 else 0
    out, lse, tier = _run("mtlflash::attention_forward", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, softmax_scale, causal, (window_left, window_right), softcap, alibi_slopes,
                          True, block_table, dropout=(dropout_p, seed, 0))
    last_tier[0] = tier
    rng_state = torch.tensor([seed, 0], dtype=torch.int64, device=q.device)
    return out, lse, rng_state


@attention_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, block_table):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)
    rng_state = q.new_empty((2,), dtype=torch.int64)
    return out, lse, rng_state


def backward_core(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                  softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, rng_state,
                  dq=None, dk=None, dv=None, fn="backward"):
    """One backward call: (dq, dk, dv, softmax_d). Gradients are written into dq/dk/dv when given."""
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    seed, offset = (0, 0) if rng_state is None or not dropout_p else (int(x) for x in rng_state.tolist())
    cu_q = cu_seqlens_q.cpu() if cu_seqlens_q is not None and cu_seqlens_q.device.type != "cpu" else cu_seqlens_q
    cu_k = cu_seqlens_k.cpu() if cu_seqlens_k is not None and cu_seqlens_k.device.type != "cpu" else cu_seqlens_k
    if dropout_p and rng_state is None:
        raise ValueError(f"[{fn}] rng_state: dropout_p={dropout_p} needs the forward's rng_state, got None")
    gq, gk, gv, delta, tier = _C.backward(fn, dout, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                          softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                                          float(dropout_p), seed & (2 ** 64 - 1), offset & (2 ** 64 - 1), dq, dk, dv)
    if tier == "reference":
        from . import reference

        rq, rk, rv, delta = reference.attention_backward(
            dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
            window_size=(window_left, 0 if causal else window_right), softcap=softcap, alibi_slopes=alibi_slopes,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p,
            rng_state=rng_state if dropout_p else None)
        gq, gk, gv = [], [], []
        for given, r, sink in ((dq, rq, gq), (dk, rk, gk), (dv, rv, gv)):
            if given is not None:
                given.copy_(r)
                sink.append(given)
            else:
                sink.append(r.to(q.dtype))
        gq, gk, gv = gq[0], gk[0], gv[0]
    last_tier[0] = tier
    return gq, gk, gv, delta


@torch.library.custom_op("mtlflash::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                       max_seqlen_k: int, dropout_p: float, softmax_scale: Optional[float], causal: bool,
                       window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                       rng_state: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv, _ = backward_core(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                                  rng_state, fn="mtlflash::attention_backward")
    return dq, dk, dv


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
      causal, window_left, window_right, softcap, alibi_slopes, rng_state):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, wl, wr, softcap, alibi, block_table) = inputs
    out, lse, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, rng_state, cu_q, cu_k, alibi)
    ctx.params = (max_q, max_k, dropout_p, scale, causal, wl, wr, softcap)
    ctx.paged = block_table is not None
    ctx.mark_non_differentiable(lse, rng_state)


def _backward(ctx, dout, dlse, drng):
    q, k, v, out, lse, rng_state, cu_q, cu_k, alibi = ctx.saved_tensors
    max_q, max_k, dropout_p, scale, causal, wl, wr, softcap = ctx.params
    if ctx.paged:
        raise NotImplementedError("mtlflash: no backward pass through a paged (block_table) K/V "
                                  "(FlashAttention-2 has none either)")
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.mtlflash.attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p,
                                                       scale, causal, wl, wr, softcap, alibi, rng_state)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("mtlflash::attention_forward", _backward, setup_context=_setup_context)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
              window, softcap, alibi_slopes, block_table=None):
    """The differentiable (and compilable) call: (out, lse, rng_state)."""
    return torch.ops.mtlflash.attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                dropout_p, softmax_scale, causal, window[0], window[1], softcap,
                                                alibi_slopes, block_table)
