"""The FlashAttention-2 Python API.

All six public functions normalise their arguments through :func:`_attention`, which hands one
call to the C core (``mtlflash._C.forward``). The core validates everything, chooses the tier
and runs native tiers; for the ``reference`` tier (MPS tensors that no Metal kernel serves, or
``MTLFLASH_KERNEL=reference``) this module runs :mod:`mtlflash.reference` on the same device.
"""
from __future__ import annotations

import operator

from . import _C, trace

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "metal_params",
]


_torch_types = set()  # types already seen to be torch tensors (a set lookup per call after that)


def _is_torch(x) -> bool:
    t = type(x)
    if t in _torch_types:
        return True
    if t.__module__.startswith("torch") and hasattr(x, "data_ptr"):
        _torch_types.add(t)
        return True
    return False


def _type_name(x) -> str:
    return type(x).__module__ + "." + type(x).__qualname__ if type(x).__module__ != "builtins" else type(x).__name__


def _check_dropout(fn, dropout_p, q=None):
    """dropout_p as a float in [0, 1] (any p > 0, even 1e-30, is dropout: the mask is drawn)."""
    if type(dropout_p) is float and dropout_p == 0.0:
        return 0.0
    p = _as_float(fn, "dropout_p", dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"[{fn}] dropout_p: expected a probability in [0, 1], got {p}")
    if p > 0.0 and q is not None and not _is_torch(q):
        raise NotImplementedError(f"[{fn}] dropout_p={p}: dropout needs torch tensors (its seed comes from "
                                  f"torch's default generator); NumPy inputs support dropout_p=0.0 only")
    return p


def _as_int(fn, name, x):
    if _is_torch(x):
        if x.numel() != 1 or x.is_floating_point() or x.is_complex():
            raise TypeError(f"[{fn}] {name}: expected an int or a 0-d integer tensor, got a tensor of shape "
                            f"{tuple(x.shape)} and dtype {x.dtype}")
        return int(x.item())
    if isinstance(x, bool):
        raise TypeError(f"[{fn}] {name}: expected an int, got bool")
    try:
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"[{fn}] {name}: expected an int, got {_type_name(x)}") from None
    if not -(2 ** 62) <= value < 2 ** 62:
        raise ValueError(f"[{fn}] {name}: {value} is out of range")
    return value


def _window(fn, window_size):
    ws = window_size
    if type(ws) is tuple and len(ws) == 2 and type(ws[0]) is int and type(ws[1]) is int and ws == (-1, -1):
        return ws
    if _is_torch(ws) or hasattr(ws, "tolist") and not isinstance(ws, (list, tuple)):
        ws = ws.tolist()
    if not isinstance(ws, (tuple, list)) or len(ws) != 2:
        raise TypeError(f"[{fn}] window_size: expected two ints (left, right), got {window_size!r}")
    try:
        left, right = (operator.index(w) for w in ws)
    except TypeError:
        raise TypeError(f"[{fn}] window_size: expected two ints (left, right), got {window_size!r}") from None
    if isinstance(ws[0], bool) or isinstance(ws[1], bool):
        raise TypeError(f"[{fn}] window_size: expected two ints (left, right), got {window_size!r}")
    # A bound beyond any sequence length is the same as no bound (lengths are below 2**30).
    return tuple(-1 if w < 0 or w > 2 ** 30 else w for w in (left, right))


def _as_float(fn, name, x):
    if type(x) is float:
        return x
    if isinstance(x, bool):
        raise TypeError(f"[{fn}] {name}: expected a float, got bool")
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"[{fn}] {name}: {x!r} is too large for a float") from None
    except (TypeError, ValueError):
        raise TypeError(f"[{fn}] {name}: expected a float, got {_type_name(x)}") from None


def _as_bool(fn, name, x):
    if x is False or x is True:
        return x
    if isinstance(x, bool) or type(x).__name__ == "bool_":  # bool or numpy.bool_
        return bool(x)
    if isinstance(x, int) or (_is_torch(x) and x.numel() == 1):
        return bool(x)
    raise TypeError(f"[{fn}] {name}: expected a bool, got {_type_name(x)}")


def _cpu_offsets(x):
    """cu_seqlens are read by the C core on the CPU; device tensors are copied (B+1 ints)."""
    if x is not None and _is_torch(x) and x.device.type != "cpu":
        return x.cpu()
    return x


def _unpack(fn, name, x, ndim, axis, count, layout):
    """Splits a packed qkv/kv tensor into views (no copies), checking what only it can show."""
    if not (_is_torch(x) or type(x).__module__ == "numpy"):
        raise TypeError(f"[{fn}] {name}: expected a torch.Tensor or numpy.ndarray, got {_type_name(x)}")
    if x.ndim != ndim or x.shape[axis] != count:
        raise ValueError(f"[{fn}] {name}: expected shape {layout}, got {tuple(x.shape)}")
    index = [slice(None)] * axis
    return tuple(x[tuple(index + [i])] for i in range(count))


def _empty_like(x):
    """The S_dmask placeholder FlashAttention-2 returns when dropout is off."""
    if _is_torch(x):
        import torch

        return torch.empty(0, dtype=x.dtype, device=x.device)
    import numpy as np

    return np.empty((0,), dtype=x.dtype)


_metal_built = None


def _prepare_mps(fn):
    """Before a call on MPS tensors that may reach the Metal bridge: refuse while torch captures a
    Metal graph, and in queue mode let torch's queued work finish first."""
    global _metal_built
    if _metal_built is None:
        _metal_built = not _C.build_info()["metal"].startswith("not built")
    if not _metal_built:
        return
    import os

    import torch

    capturing = getattr(torch.mps, "is_current_stream_capturing", None)
    if capturing is not None and capturing():
        raise RuntimeError(f"[{fn}] cannot run while torch is capturing a Metal graph")
    if os.environ.get("MTLFLASH_DISPATCH", "queue") != "stream":
        torch.mps.synchronize()


def _device_offsets(cu, q):
    """cu_seqlens as the Metal kernels read them: contiguous int32 on q's device (validated on the
    CPU copy; a wrong dtype is reported there)."""
    if cu is None or not _is_torch(cu):
        return cu
    import torch

    if cu.dtype == torch.int32:
        return cu.to(q.device).contiguous()
    return cu


def _run(fn, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window, softcap, alibi, want_lse,
         block_table=None, dropout=None):
    mps = _is_torch(q) and q.device.type == "mps"
    if mps:
        _prepare_mps(fn)
    args = (fn, q, k, v, _cpu_offsets(cu_q), _cpu_offsets(cu_k), max_q, max_k, softmax_scale, causal,
            window[0], window[1], softcap, alibi, want_lse)
    device_offsets = ({"cu_seqlens_q_device": _device_offsets(cu_q, q),
                       "cu_seqlens_k_device": _device_offsets(cu_k, q)} if mps
                      else {"cu_seqlens_q_device": None, "cu_seqlens_k_device": None})
    if block_table is not None:
        device_offsets["block_table"] = _cpu_offsets(block_table)
        device_offsets["block_table_device"] = _device_offsets(block_table, q) if mps else None
    if dropout is not None and dropout[0] > 0:  # (p, Philox seed, offset)
        device_offsets.update(dropout_p=dropout[0], seed=dropout[1] & (2 ** 64 - 1), offset=dropout[2] & (2 ** 64 - 1))
    try:
        out, lse, tier, stream_plan = _C.forward(*args, **device_offsets)
        if stream_plan is not None:
            from . import metal_stream

            metal_stream.run(stream_plan, {0: q, 1: k, 2: v, 3: out, 4: lse, 5: device_offsets["cu_seqlens_q_device"],
                                           6: device_offsets["cu_seqlens_k_device"], 7: alibi,
                                           10: device_offsets.get("block_table_device")})
    except RuntimeError as e:
        _metal_failed(mps, e, stacklevel=5)  # the warning points at the caller of the public function
        out, lse, tier, stream_plan = _C.forward(*args, **device_offsets)
    if tier == "reference":
        from . import reference

        drop = {}
        if dropout is not None and dropout[0] > 0:
            drop = {"dropout_p": dropout[0], "rng_state": (dropout[1], dropout[2])}
        ref_out, ref_lse = reference.attention(
            q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window, softcap=softcap,
            alibi_slopes=alibi, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_table=block_table, **drop,
        )
        out = ref_out.to(q.dtype)
        lse = ref_lse if want_lse else None
    return out, lse, tier


def _metal_failed(mps, e, stacklevel):
    """The Metal kernels await their first runs on many machines: under the automatic choice a
    failed Metal launch turns Metal off for the process (with a warning) and the caller runs the
    call again, which then lands on the reference tier. A forced tier (MTLFLASH_KERNEL) and any
    failure off MPS re-raise."""
    import os

    if not mps or os.environ.get("MTLFLASH_KERNEL", "auto") not in ("", "auto"):
        raise e
    import warnings

    warnings.warn(f"mtlflash: the Metal backend failed and is off for this process; MPS calls run on "
                  f"the reference tier. Please report this with `python -m mtlflash check`: {e}",
                  RuntimeWarning, stacklevel=stacklevel)
    _C.disable_metal(str(e))


def _attention(fn, q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
               dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
               block_table=None):
    """The one normalising path behind every public function."""
    dropout_p = _check_dropout(fn, dropout_p, q)
    window = _window(fn, window_size)
    causal = _as_bool(fn, "causal", causal)
    softcap = _as_float(fn, "softcap", softcap)
    return_attn_probs = _as_bool(fn, "return_attn_probs", return_attn_probs)
    if softmax_scale is not None:
        softmax_scale = _as_float(fn, "softmax_scale", softmax_scale)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            missing = "cu_seqlens_q" if cu_seqlens_q is None else "cu_seqlens_k"
            raise TypeError(f"[{fn}] {missing}: expected an int32 tensor, got None")
        max_q = _as_int(fn, "max_seqlen_q", max_seqlen_q)
        max_k = _as_int(fn, "max_seqlen_k", max_seqlen_k)
    else:
        max_q = max_k = 0

    if block_table is not None and not varlen:
        raise TypeError(f"[{fn}] block_table: paged K/V needs cu_seqlens_k (the key length of each sequence)")
    if _is_torch(q) and (_needs_autograd(q, k, v) or _compiling()):
        # differentiable and compilable: the mtlflash:: custom ops (mtlflash.autograd)
        from . import autograd

        out, lse, _ = autograd.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, dropout_p, softmax_scale,
                                         causal, window, softcap, alibi_slopes, block_table)
        tier = autograd.last_tier[0]
    else:
        dropout = None
        if dropout_p > 0:
            from . import autograd

            dropout = (dropout_p, autograd.draw_seed(), 0)
        out, lse, tier = _run(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, softmax_scale, causal, window,
                              softcap, alibi_slopes, return_attn_probs, block_table, dropout=dropout)

    if trace.ENABLED and not _compiling():
        d = q.shape[-1]
        lq, lk = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
        trace.record(fn, str(q.dtype).replace("torch.", ""), d, lq, lk, causal, tier)
    if return_attn_probs:
        return out, lse, _empty_like(q)
    return out


def _needs_autograd(q, k, v):
    if not (q.requires_grad or getattr(k, "requires_grad", False) or getattr(v, "requires_grad", False)):
        return False
    import torch

    return torch.is_grad_enabled()


def _compiling():
    """Inside torch.compile's tracing (the custom ops then stand for the call)."""
    import sys

    torch = sys.modules.get("torch")
    compiler = getattr(torch, "compiler", None) if torch is not None else None
    return compiler is not None and compiler.is_compiling()


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FlashAttention-2's ``flash_attn_func``: softmax(q k^T * scale) v per head, without ever
    materialising the scores.

    Shapes (FlashAttention-2's layout, sequence before heads):
        q (B, Sq, Hq, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv) -> out (B, Sq, Hq, Dv).
        Coming from ``torch.nn.functional.scaled_dot_product_attention``, whose layout is
        (B, H, L, D): pass ``q.transpose(1, 2)`` (a view, no copy) and transpose the output back.
        A tensor in the wrong layout whose sizes happen to fit is NOT detected and silently gives
        wrong results (as in FlashAttention-2).
    Dtypes: torch.float16, torch.bfloat16, torch.float32 tensors (CPU or MPS), or NumPy float16 /
        float32 arrays; q, k, v share one dtype; the output has it too (fp32 accumulation).
        NumPy in gives NumPy out (lse as float32 arrays). Any strides with a unit stride in the
        last dimension. Head dims 1..576 (q/k) and 1..512 (v), Dv may differ from D.
    softmax_scale: None means ``D ** -0.5``.
    causal: bottom-right aligned, as in FlashAttention-2: query i sees key j iff
        ``j <= i + Sk - Sq``; with Sq > Sk the first Sq - Sk rows see no key. SDPA's
        ``is_causal`` is top-left aligned (``j <= i``): the two agree only when Sq == Sk.
    window_size: (left, right), -1 = unbounded; query i sees keys
        ``i + Sk - Sq - left .. i + Sk - Sq + right`` (inclusive). ``causal=True`` is (left, 0).
        Tuples, lists or 2-element integer tensors.
    softcap: > 0 applies ``softcap * tanh(s / softcap)`` to the scaled scores before masking.
    alibi_slopes: fp32 (Hq,) or (B, Hq); adds ``-slope * |i + Sk - Sq - j|`` to the scaled score.
    GQA/MQA: Hk must divide Hq; query head h uses kv head ``h // (Hq // Hk)``.
    A query row that sees no key gets output 0 and lse +inf (never NaN).
    dropout_p: > 0 drops probabilities (each kept with probability 1 - p, scaled by 1 / (1 - p))
        with a counter-based Philox mask seeded from torch's default generator.
    ``deterministic`` is accepted and ignored: forward and backward are always deterministic
        (bitwise identical for any thread count).
    Differentiable (``mtlflash.autograd``): gradients flow to q, k and v, also with
    ``return_attn_probs=True`` (lse is not differentiable).

    Returns out; with ``return_attn_probs=True``, ``(out, softmax_lse, S_dmask)`` where lse is the
    fp32 natural-log logsumexp (B, Hq, Sq) of each row of scaled (soft-capped, biased) scores and
    S_dmask an empty tensor/array.

    Raises:
        TypeError: an argument of the wrong type (message "[flash_attn_func] <argument>: ...").
        ValueError: wrong shapes, strides, devices or values, an unknown MTLFLASH_* setting; CUDA
            tensors (use the flash-attn package there).
        NotImplementedError: dropout_p > 0 on NumPy arrays (the dropout seed comes from torch's
            generator).
        RuntimeError: a tier forced with MTLFLASH_KERNEL that cannot run the call, or a failed
            Metal launch under a forced tier.
    """
    return _attention("flash_attn_func", q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                      causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                      return_attn_probs=return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func`` over a packed qkv (B, S, 3, H, D) -> out (B, S, H, D) (views into qkv,
    no copy; q, k and v share the heads, so no GQA). Layout (B, S, 3, H, D), not SDPA's
    (B, H, S, D): a wrong layout with fitting sizes silently gives wrong results. Dtypes, causal
    alignment, windows, the returns (``return_attn_probs``: lse (B, H, S)) and the exceptions are
    those of :func:`flash_attn_func`; NumPy in gives NumPy out."""
    fn = "flash_attn_qkvpacked_func"
    q, k, v = _unpack(fn, "qkv", qkv, 5, 2, 3, "(batch, seqlen, 3, heads, head_dim)")
    return _attention(fn, q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                      return_attn_probs=return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func`` over q (B, Sq, Hq, D) and a packed kv (B, Sk, 2, Hk, D) -> out
    (B, Sq, Hq, D). GQA: Hk divides Hq. Layout (batch, seq, heads, dim), not SDPA's (B, H, L, D).
    Dtypes, bottom-right causal alignment, windows, the returns and the exceptions are those of
    :func:`flash_attn_func`; NumPy in gives NumPy out."""
    fn = "flash_attn_kvpacked_func"
    k, v = _unpack(fn, "kv", kv, 5, 2, 2, "(batch, seqlen_k, 2, heads_k, head_dim)")
    return _attention(fn, q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                      return_attn_probs=return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """Attention over variable-length sequences packed along the first dimension.

    q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv) -> out (total_q, Hq, Dv).
    Sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:
    cu_seqlens_k[b+1]`` of k and v; cu_seqlens are int32 (B + 1,), start at 0, never decrease
    (empty sequences are fine). ``max_seqlen_q/k`` (int or 0-d tensor) must be at least every
    sequence's length. Rows of q past ``cu_seqlens_q[-1]`` get output 0 and lse +inf.
    Causal and window alignment are per sequence (bottom-right: ``j <= i + Sk_b - Sq_b``; SDPA's
    ``is_causal`` is top-left). GQA rule, dtypes (torch fp16/bf16/fp32, NumPy float16/float32;
    NumPy in gives NumPy out), softcap, ALiBi and the exceptions are those of
    :func:`flash_attn_func`. With ``return_attn_probs=True`` returns ``(out, softmax_lse
    (Hq, total_q) fp32, S_dmask)``.

    Paged K/V (as FlashAttention-2): with ``block_table`` int32 (B, max_blocks), k and v are
    paged caches (num_blocks, page_size, Hk, D) / (num_blocks, page_size, Hk, Dv), any
    page_size >= 1; sequence b's keys are its first ``cu_seqlens_k[b+1] - cu_seqlens_k[b]``
    positions, position j in block ``block_table[b, j // page_size]`` at slot ``j % page_size``.
    Blocks are read in place. ValueError when a used block-table entry lies outside
    [0, num_blocks) or a sequence is longer than its row of blocks.
    """
    return _attention("flash_attn_varlen_func", q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
                      softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                      alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs, block_table=block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                     deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` over a packed qkv (total, 3, H, D) -> out (total, H, D),
    one ``cu_seqlens`` (int32 (B + 1,)) and ``max_seqlen`` for q and k. Semantics, dtypes (NumPy
    in gives NumPy out), the returns (lse (H, total)) and the exceptions as
    :func:`flash_attn_varlen_func`."""
    fn = "flash_attn_varlen_qkvpacked_func"
    q, k, v = _unpack(fn, "qkv", qkv, 4, 1, 3, "(total, 3, heads, head_dim)")
    return _attention(fn, q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                      max_seqlen_k=max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                      return_attn_probs=return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` over q (total_q, Hq, D) and a packed kv (total_k, 2, Hk, D)
    -> out (total_q, Hq, D). GQA: Hk divides Hq. Semantics, dtypes (NumPy in gives NumPy out),
    the returns and the exceptions as :func:`flash_attn_varlen_func`."""
    fn = "flash_attn_varlen_kvpacked_func"
    k, v = _unpack(fn, "kv", kv, 4, 1, 2, "(total_k, 2, heads_k, head_dim)")
    return _attention(fn, q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
                      softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                      alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs)


def metal_params(q, k, v, out, lse=None, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                 max_seqlen_k=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                 alibi_slopes=None, num_splits=1) -> bytes:
    """The ``mf_params`` block (bytes) the Metal kernels receive for this call and these output
    buffers, validated and packed by the C core exactly as for a real call (used by the emulator
    tests and the Metal bridge)."""
    fn = "metal_params"
    window = _window(fn, window_size)
    varlen = cu_seqlens_q is not None
    max_q = _as_int(fn, "max_seqlen_q", max_seqlen_q) if varlen else 0
    max_k = _as_int(fn, "max_seqlen_k", max_seqlen_k) if varlen else 0
    return _C.metal_params(fn, q, k, v, _cpu_offsets(cu_seqlens_q), _cpu_offsets(cu_seqlens_k), max_q, max_k,
                           softmax_scale, bool(causal), window[0], window[1], float(softcap), alibi_slopes,
                           lse is not None, out, lse, int(num_splits))


def _index_arg(fn, name, x, batch, like):
    """An index argument of flash_attn_with_kvcache as the C core reads it: None, or an int32
    (batch,) on the CPU. A Python int becomes a (batch,) array (cache_seqlens may be an int)."""
    if x is None:
        return None
    if isinstance(x, bool):
        raise TypeError(f"[{fn}] {name}: expected an int32 tensor or an int, got bool")
    if isinstance(x, int):
        if _is_torch(like):
            import torch

            return torch.full((batch,), x, dtype=torch.int32)
        import numpy as np

        return np.full((batch,), x, dtype=np.int32)
    return _cpu_offsets(x)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q over a kv cache, after appending new k/v to it in place (FlashAttention-2's
    ``flash_attn_with_kvcache``, same names, defaults, shapes and returns).

    Shapes (torch tensors or NumPy arrays; fp16, bf16 or fp32, all of q's dtype):
      q (B, Sq, Hq, D); k_cache (B_cache, S_cache, Hk, D), v_cache (B_cache, S_cache, Hk, Dv), or
      paged (num_blocks, page_size, Hk, D/Dv) with ``block_table`` int32 (B, max_blocks), any
      page_size >= 1 (position p of sequence b lives in block ``block_table[b, p // page_size]``,
      slot ``p % page_size``); k (B, S_new, Hk, D) and v (B, S_new, Hk, Dv): new rows, written
      into the caches at ``cache_seqlens[b] + t`` before attention (k rotated there when
      rotary_cos/sin are given); ``cache_seqlens`` int or int32 (B,): rows already in the cache
      (None: the whole cache is attended); ``cache_batch_idx`` int32 (B,): the dense cache row of
      each sequence; ``cache_leftpad`` int32 (B,): first valid key of each sequence;
      ``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2), q's dtype, rotary_dim <= D:
      GPT-J pairs when ``rotary_interleaved`` else GPT-NeoX halves; q is rotated at
      ``cache_seqlens + i`` when causal or local, else every row at ``cache_seqlens``.
      Head dims up to 576 (q/k) and 512 (v): DeepSeek-style MLA decode (576/512, one kv head).
    Attention: keys ``[cache_leftpad[b], cache_seqlens[b] + S_new)``; causal and window aligned
    bottom-right against ``cache_seqlens[b] + S_new``; softcap, ALiBi (Hq,) or (B, Hq) fp32,
    GQA/MQA as in :func:`flash_attn_func`. ``num_splits``: 0 chooses, 1 never splits the keys,
    n uses n key splits (speed only; results are the same for any thread count).

    Returns out (B, Sq, Hq, Dv), or (out, softmax_lse (B, Hq, Sq) fp32 natural log) with
    ``return_softmax_lse=True``.

    Raises TypeError/ValueError naming the argument, before anything is written (a refused call
    leaves the caches bitwise unchanged): lengths past the capacity (S_cache, or max_blocks x
    page_size), block-table or cache_batch_idx entries out of range, negative lengths,
    cache_leftpad > cache_seqlens, index tensors that are not int32 (FlashAttention-2 requires
    int32), paged caches with cache_batch_idx, k without v or without cache_seqlens, rotary
    tensors of the wrong shape or dtype or without k, caches of another dtype than q, a read-only
    cache that new rows would be written to.
    """
    fn = "flash_attn_with_kvcache"
    window = _window(fn, window_size)
    causal = _as_bool(fn, "causal", causal)
    softcap = _as_float(fn, "softcap", softcap)
    rotary_interleaved = _as_bool(fn, "rotary_interleaved", rotary_interleaved)
    return_softmax_lse = _as_bool(fn, "return_softmax_lse", return_softmax_lse)
    num_splits = _as_int(fn, "num_splits", num_splits)
    if softmax_scale is not None:
        softmax_scale = _as_float(fn, "softmax_scale", softmax_scale)
    if not (_is_torch(q) or type(q).__module__ == "numpy"):
        raise TypeError(f"[{fn}] q: expected a torch.Tensor or numpy.ndarray, got {_type_name(q)}")
    if q.ndim != 4:
        raise ValueError(f"[{fn}] q: expected 4 dimensions (batch, seqlen_q, heads, head_dim), got {q.ndim}")
    batch = q.shape[0]
    seqlens = _index_arg(fn, "cache_seqlens", cache_seqlens, batch, q)
    batch_idx = _index_arg(fn, "cache_batch_idx", cache_batch_idx, batch, q)
    leftpad = _index_arg(fn, "cache_leftpad", cache_leftpad, batch, q)
    table = _index_arg(fn, "block_table", block_table, batch, q)
    mps = _is_torch(q) and q.device.type == "mps"
    if mps:
        _prepare_mps(fn)
    device = {}
    if mps:
        kv_index = block_table if block_table is not None else cache_batch_idx
        device = {"kv_index_device": _device_offsets(kv_index, q),
                  "cache_seqlens_device": _device_offsets(seqlens, q),
                  "cache_leftpad_device": _device_offsets(cache_leftpad, q)}
    args = (fn, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, batch_idx, leftpad, table,
            softmax_scale, causal, window[0], window[1], softcap, rotary_interleaved, alibi_slopes, num_splits,
            return_softmax_lse)
    try:
        out, lse, tier, stream_plan = _C.kvcache(*args, **device)
        if stream_plan is not None:
            from . import metal_stream

            metal_stream.run_kvcache(stream_plan, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, out, lse,
                                     alibi_slopes, device)
    except RuntimeError as e:
        # as in _run; running again is safe: the append writes the same rows to the same places
        _metal_failed(mps, e, stacklevel=3)
        out, lse, tier, stream_plan = _C.kvcache(*args, **device)
    if tier == "reference":
        from . import reference

        ref_out, ref_lse, _, _ = reference.kvcache_attention(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
            cache_leftpad=leftpad, block_table=table, softmax_scale=softmax_scale, causal=causal,
            window_size=window, softcap=softcap, rotary_interleaved=rotary_interleaved, alibi_slopes=alibi_slopes,
        )
        out = ref_out.to(q.dtype)
        lse = ref_lse if return_softmax_lse else None
    if trace.ENABLED:
        lk = k_cache.shape[1] * (table.shape[1] if table is not None else 1)
        trace.record(fn, str(q.dtype).replace("torch.", ""), q.shape[-1], q.shape[1], lk, causal, tier)
    return (out, lse) if return_softmax_lse else out
