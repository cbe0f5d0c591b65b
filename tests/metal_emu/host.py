"""Runs a Metal launch plan (mtlflash._C.metal_plan) in the emulator, binding buffers exactly as
the bridge does: each tensor as (its storage from the first element on), strides in the params,
unused slots left unbound, scratch sized by the plan. The source is the self-contained text the
bridge compiles (mtlflash._C.metal_source), so the embedding is exercised too."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from mtlflash import _C

from . import emu
from .cases import buffer_of

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBS = {}


def library(source_name, defines):
    """Builds the expanded source of metal/<source_name> as the bridge would compile it."""
    text = _C.metal_source(source_name)
    key = (hashlib.sha256(text.encode()).hexdigest()[:16], tuple(sorted(defines.items())))
    if key not in _LIBS:
        folder = os.path.join(os.environ.get("MFEMU_BUILD_DIR", os.path.join(_HERE, "build")), "expanded")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{key[0]}_{source_name}")
        if not os.path.exists(path):
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        _LIBS[key] = emu.build(path, dict(defines))
    return _LIBS[key]


def caps(apple_family=7, bfloat=1, tensorops=0):
    return {"apple_family": apple_family, "bfloat": bfloat, "tensorops": tensorops}


def run(tier, q, k, v, *, lse=True, device_caps=None, schedule="forward", seed=0, cu_seqlens_q=None,
        cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, softmax_scale=None, causal=False,
        window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Plans a dense or varlen forward call for `tier` and executes it. Returns (out, lse, plan);
    out and lse start as NaN so unwritten elements show."""
    varlen = cu_seqlens_q is not None
    hq, dv = q.shape[-2], v.shape[-1]
    if varlen:
        out = torch.full((q.shape[0], hq, dv), float("nan"), dtype=q.dtype)
        lse_t = torch.full((hq, q.shape[0]), float("nan")) if lse else None
    else:
        out = torch.full((q.shape[0], q.shape[1], hq, dv), float("nan"), dtype=q.dtype)
        lse_t = torch.full((q.shape[0], hq, q.shape[1]), float("nan")) if lse else None
    plan = _C.metal_plan(tier, device_caps or caps(), "run", q, k, v, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size[0], window_size[1],
                         softcap, alibi_slopes, lse, out, lse_t)
    lib = library(plan["source"], plan["defines"])
    buffers = {emu.SLOT_Q: buffer_of(q), emu.SLOT_K: buffer_of(k), emu.SLOT_V: buffer_of(v),
               emu.SLOT_O: buffer_of(out), emu.SLOT_PARAMS: plan["params"]}
    if lse_t is not None:
        buffers[emu.SLOT_LSE] = buffer_of(lse_t)
    if varlen:
        buffers[emu.SLOT_CU_Q] = cu_seqlens_q.numpy()
        buffers[emu.SLOT_CU_K] = cu_seqlens_k.numpy()
    if alibi_slopes is not None:
        buffers[emu.SLOT_ALIBI] = buffer_of(alibi_slopes)
    if plan["scratch_floats"]:
        buffers[emu.SLOT_SCRATCH] = np.full(plan["scratch_floats"], np.nan, dtype=np.float32)
    for kernel, grid, threadgroup in plan["launches"]:
        lib.launch(kernel, grid=grid, threadgroup=threadgroup, buffers=buffers, schedule=schedule, seed=seed)
    return out, lse_t, plan
