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
        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, block_table=None):
    """Plans a dense or varlen forward call (varlen with block_table: paged K/V) for `tier` and
    executes it. Returns (out, lse, plan); out and lse start as NaN so unwritten elements show."""
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
                         softcap, alibi_slopes, lse, out, lse_t, block_table=block_table)
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
    if block_table is not None:
        buffers[emu.SLOT_KV_INDEX] = buffer_of(block_table)
    if plan["scratch_floats"]:
        buffers[emu.SLOT_SCRATCH] = np.full(plan["scratch_floats"], np.nan, dtype=np.float32)
    for kernel, grid, threadgroup in plan["launches"]:
        lib.launch(kernel, grid=grid, threadgroup=threadgroup, buffers=buffers, schedule=schedule, seed=seed)
    return out, lse_t, plan


def _ints(x):
    """An index argument as the kernels read it (int32, from its first element on), or None."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x
    return buffer_of(x)


def run_kvcache(tier, q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, *,
                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                alibi_slopes=None, num_splits=0, lse=True, device_caps=None, schedule="forward", seed=0):
    """Plans a flash_attn_with_kvcache call (mtlflash._C.kvcache_metal_plan) for `tier` and executes
    it as the bridge does: the append pass (its own slots) first, writing into k_cache / v_cache in
    place and into q_rot, then the attention launches reading q_rot (or q). Index tensors are bound
    as given (int32 CPU tensors standing for their device copies). Returns (out, lse, plan); out,
    lse and q_rot start as NaN."""
    plan = _C.kvcache_metal_plan(tier, device_caps or caps(), "run", q, k_cache, v_cache, k, v, rotary_cos,
                                 rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                                 softmax_scale, causal, window_size[0], window_size[1], softcap, rotary_interleaved,
                                 alibi_slopes, num_splits, lse)
    out, lse_t, q_rot = plan["out"], plan["lse"], plan["q_rot"]
    for t in (out, lse_t, q_rot):
        if t is not None:
            t.fill_(float("nan"))
    kv_index = _ints(block_table if block_table is not None else cache_batch_idx)
    seqused = _ints(cache_seqlens)
    ap = plan["append"]
    if ap is not None:
        lib = library(ap["source"], ap["defines"])
        buffers = {emu.APP_SLOT_K_CACHE: buffer_of(k_cache), emu.APP_SLOT_V_CACHE: buffer_of(v_cache),
                   emu.APP_SLOT_K_NEW: buffer_of(k), emu.APP_SLOT_V_NEW: buffer_of(v),
                   emu.APP_SLOT_APP_PARAMS: np.frombuffer(ap["params"], dtype=np.uint8).copy(),
                   emu.SLOT_PARAMS: plan["params"]}
        if q_rot is not None:
            buffers.update({emu.APP_SLOT_Q_SRC: buffer_of(q), emu.APP_SLOT_Q_ROT: buffer_of(q_rot),
                            emu.APP_SLOT_COS: buffer_of(rotary_cos), emu.APP_SLOT_SIN: buffer_of(rotary_sin)})
        if kv_index is not None:
            buffers[emu.SLOT_KV_INDEX] = kv_index
        if seqused is not None:
            buffers[emu.SLOT_SEQUSED_K] = seqused
        kernel, grid, threadgroup = ap["launch"]
        lib.launch(kernel, grid=grid, threadgroup=threadgroup, buffers=buffers, schedule=schedule, seed=seed)
    lib = library(plan["source"], plan["defines"])
    buffers = {emu.SLOT_Q: buffer_of(q_rot if q_rot is not None else q), emu.SLOT_K: buffer_of(k_cache),
               emu.SLOT_V: buffer_of(v_cache), emu.SLOT_O: buffer_of(out), emu.SLOT_PARAMS: plan["params"]}
    if lse_t is not None:
        buffers[emu.SLOT_LSE] = buffer_of(lse_t)
    if alibi_slopes is not None:
        buffers[emu.SLOT_ALIBI] = buffer_of(alibi_slopes)
    if kv_index is not None:
        buffers[emu.SLOT_KV_INDEX] = kv_index
    if seqused is not None:
        buffers[emu.SLOT_SEQUSED_K] = seqused
    if cache_leftpad is not None:
        buffers[emu.SLOT_LEFTPAD_K] = _ints(cache_leftpad)
    if plan["scratch_floats"]:
        buffers[emu.SLOT_SCRATCH] = np.full(plan["scratch_floats"], np.nan, dtype=np.float32)
    for kernel, grid, threadgroup in plan["launches"]:
        lib.launch(kernel, grid=grid, threadgroup=threadgroup, buffers=buffers, schedule=schedule, seed=seed)
    return out, lse_t, plan
