"""Problems for the kernel tests: one Case description, the tensors it makes (in contiguous,
transposed, sliced or qkv-packed layouts, outputs pre-filled with NaN), and the buffer view the
bridge binds. Shared by every kernel's emulator test and by host.py."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def buffer_of(t):
    """A NumPy array sharing memory with t's storage from t's first element to the storage end,
    i.e. what the bridge binds (buffer + byte offset); the strides travel in mf_params."""
    n = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    flat = torch.as_strided(t, (n,), (1,), t.storage_offset())
    if t.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


@dataclass(frozen=True)
class Case:
    """One attention problem; kernel tests may subclass it with launch knobs."""
    name: str
    b: int = 1
    sq: int = 17
    sk: int = 17
    hq: int = 2
    hk: int = 2
    d: int = 64
    dv: int = None
    dtype: torch.dtype = torch.float32
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str = None  # None | "H" | "BH"
    varlen: tuple = None  # ((sq_0, sk_0), (sq_1, sk_1), ...)
    layout: str = "contiguous"  # | "transposed" | "sliced"
    lse: bool = True
    scale: float = None  # softmax_scale, None = D ** -0.5
    q_gain: float = 1.0  # multiplies q: large values make peaked rows (online-max stress)


def seqlens(case):
    if case.varlen is None:
        return None, None
    cq = torch.tensor([0] + list(np.cumsum([s[0] for s in case.varlen])), dtype=torch.int32)
    ck = torch.tensor([0] + list(np.cumsum([s[1] for s in case.varlen])), dtype=torch.int32)
    return cq, ck


def tensor(shape, dtype, layout, gen, nan=False):
    """A tensor of `shape` (tokens, heads, dim last) in the requested memory layout; with
    nan=True its whole buffer (view and padding) is NaN."""
    base_shape = list(shape)
    if layout == "transposed":
        # heads outside tokens in memory: (.., H, S, D) storage viewed as (.., S, H, D)
        base_shape[-3], base_shape[-2] = base_shape[-2], base_shape[-3]
    elif layout == "sliced":
        # a window into a larger buffer: extra heads and dims around it, non-zero offset
        base_shape[-2] += 2
        base_shape[-1] += 5
    if nan:
        base = torch.full(base_shape, float("nan"), dtype=dtype)
    else:
        base = torch.randn(base_shape, generator=gen).to(dtype)
    if layout == "transposed":
        return base.transpose(-3, -2)
    if layout == "sliced":
        return base[..., 1:1 + shape[-2], 3:3 + shape[-1]]
    return base


def make_problem(case, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dv = case.dv or case.d
    cq, ck = seqlens(case)
    if cq is None:
        qs, ks, vs = (case.b, case.sq, case.hq, case.d), (case.b, case.sk, case.hk, case.d), \
            (case.b, case.sk, case.hk, dv)
        os_, lses = (case.b, case.sq, case.hq, dv), (case.b, case.hq, case.sq)
        nb = case.b
    else:
        tq, tk = int(cq[-1]), int(ck[-1])
        qs, ks, vs = (tq, case.hq, case.d), (tk, case.hk, case.d), (tk, case.hk, dv)
        os_, lses = (tq, case.hq, dv), (case.hq, tq)
        nb = len(case.varlen)
    if case.layout == "qkvpacked":
        # one (.., S, 3, H, D) buffer, as flash_attn_qkvpacked_func gets it
        assert qs == ks == vs
        packed = torch.randn(qs[:-2] + (3,) + qs[-2:], generator=gen).to(case.dtype)
        q, k, v = packed.unbind(-3)
        out = tensor(os_, case.dtype, "contiguous", gen, nan=True)
    else:
        q = tensor(qs, case.dtype, case.layout, gen)
        k = tensor(ks, case.dtype, case.layout, gen)
        v = tensor(vs, case.dtype, case.layout, gen)
        out = tensor(os_, case.dtype, case.layout, gen, nan=True)
    if case.q_gain != 1.0:
        q.mul_(case.q_gain)
    lse = None
    if case.lse:
        # sliced layout: lse rows padded in memory (lse_stride_h > tokens)
        pad = 3 if case.layout == "sliced" else 0
        lse = torch.full(lses[:-1] + (lses[-1] + pad,), float("nan"))[..., :lses[-1]]
    options = dict(causal=case.causal, window_size=case.window, softcap=case.softcap,
                   softmax_scale=case.scale)
    if case.alibi == "H":
        options["alibi_slopes"] = torch.rand(case.hq, generator=gen) * 0.5 + 0.05
    elif case.alibi == "BH":
        options["alibi_slopes"] = torch.rand(nb, case.hq, generator=gen) * 0.5 + 0.05
    if cq is not None:
        options.update(cu_seqlens_q=cq, cu_seqlens_k=ck,
                       max_seqlen_q=max(s[0] for s in case.varlen),
                       max_seqlen_k=max(s[1] for s in case.varlen))
    return q, k, v, out, lse, options


def reference_options(options):
    return {k: v for k, v in options.items() if k not in ("max_seqlen_q", "max_seqlen_k")}


def padding_untouched(t):
    """Everything of t's buffer outside the view t must still be NaN (no stray writes)."""
    flat = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    mask = torch.ones_like(flat, dtype=torch.bool)
    idx = torch.as_strided(torch.arange(flat.numel()), t.shape, t.stride(), t.storage_offset())
    mask[idx.reshape(-1)] = False
    return bool(torch.isnan(flat[mask].float()).all())
