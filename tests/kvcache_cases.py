"""Building and checking flash_attn_with_kvcache calls (shared by the kv-cache tests).

A `KVCase` describes one call: shapes, layout (dense, cache_batch_idx, paged with a page size),
lengths, new rows, rotary and the attention options. `make_call` builds every tensor from a
seed (paged block tables are random permutations, so pages are shuffled and some blocks are
left unused), and `check_call` runs mtlflash on copies of the caches and checks

- out and lse against mtlflash.reference.kvcache_attention by the acceptance rule (FA2's own
  kv-cache rule: 3x the naive error in low precision, 5x with ALiBi);
- the caches after the call against the reference's: every new v row bitwise equal, every
  rotated k row within tolerance (bitwise when there is no rotary), every other position
  bitwise unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

import mtlflash
from mtlflash import reference


@dataclass(frozen=True)
class KVCase:
    batch: int = 2
    seqlen_q: int = 1
    seqlen_new: int = 1  # rows appended (0: none)
    heads_q: int = 4
    heads_k: int = 2
    head_dim: int = 64
    head_dim_v: int = 64
    capacity: int = 100  # S_cache, or max_blocks x page_size when paged
    page_size: int = 0  # 0: dense cache
    batch_idx: bool = False  # dense: cache rows picked by cache_batch_idx
    leftpad: bool = False
    lengths: tuple = ()  # cache_seqlens per sequence; () = random
    int_seqlens: bool = False  # pass cache_seqlens as a Python int
    no_seqlens: bool = False  # cache_seqlens=None (attend the whole cache; no new rows)
    rotary_dim: int = 0
    interleaved: bool = True
    dtype: torch.dtype = torch.float32
    opts: dict = field(default_factory=dict)  # causal, window_size, softcap, num_splits, ...
    alibi: bool = False
    seed: int = 0

    def with_(self, **kw):
        return replace(self, **kw)


def _rand(shape, dtype, g):
    return torch.randn(*shape, generator=g).to(dtype)


def make_call(c: KVCase):
    """All arguments of the call (kwargs of flash_attn_with_kvcache) and the lengths used."""
    g = torch.Generator().manual_seed(c.seed)
    B, dt = c.batch, c.dtype
    args = {"q": _rand((B, c.seqlen_q, c.heads_q, c.head_dim), dt, g)}
    if c.page_size:
        max_blocks = -(-c.capacity // c.page_size)
        num_blocks = B * max_blocks + 3  # a few blocks nobody uses
        args["k_cache"] = _rand((num_blocks, c.page_size, c.heads_k, c.head_dim), dt, g)
        args["v_cache"] = _rand((num_blocks, c.page_size, c.heads_k, c.head_dim_v), dt, g)
        perm = torch.randperm(num_blocks, generator=g)[: B * max_blocks]
        args["block_table"] = perm.reshape(B, max_blocks).to(torch.int32)
        cap = max_blocks * c.page_size
    else:
        rows = B + 2 if c.batch_idx else B
        args["k_cache"] = _rand((rows, c.capacity, c.heads_k, c.head_dim), dt, g)
        args["v_cache"] = _rand((rows, c.capacity, c.heads_k, c.head_dim_v), dt, g)
        if c.batch_idx:
            args["cache_batch_idx"] = torch.randperm(rows, generator=g)[:B].to(torch.int32)
        cap = c.capacity
    if c.seqlen_new:
        args["k"] = _rand((B, c.seqlen_new, c.heads_k, c.head_dim), dt, g)
        args["v"] = _rand((B, c.seqlen_new, c.heads_k, c.head_dim_v), dt, g)
    if c.no_seqlens:
        lengths = [cap] * B
    else:
        if c.lengths:
            lengths = list(c.lengths)
        else:
            lengths = torch.randint(0, cap - c.seqlen_new + 1, (B,), generator=g).tolist()
        if c.int_seqlens:
            lengths = [lengths[0]] * B
            args["cache_seqlens"] = lengths[0]
        else:
            args["cache_seqlens"] = torch.tensor(lengths, dtype=torch.int32)
    if c.leftpad:
        args["cache_leftpad"] = torch.tensor([int(x * float(torch.rand(1, generator=g))) for x in lengths],
                                             dtype=torch.int32)
    if c.rotary_dim:
        seqlen_ro = cap + c.seqlen_q
        angles = torch.rand(seqlen_ro, c.rotary_dim // 2, generator=g) * 6.0
        args["rotary_cos"], args["rotary_sin"] = angles.cos().to(dt), angles.sin().to(dt)
        args["rotary_interleaved"] = c.interleaved
    if c.alibi:
        args["alibi_slopes"] = torch.rand(c.heads_q, generator=g) * 0.3
    args.update(c.opts)
    return args, lengths


def written_mask(args, lengths, seqlen_new):
    """Boolean mask over the cache's first two axes: the positions the call writes."""
    kc = args["k_cache"]
    mask = torch.zeros(kc.shape[0], kc.shape[1], dtype=torch.bool)
    for b, n in enumerate(lengths):
        for pos in range(n, n + seqlen_new):
            if "block_table" in args:
                page = kc.shape[1]
                mask[int(args["block_table"][b, pos // page]), pos % page] = True
            else:
                row = int(args["cache_batch_idx"][b]) if "cache_batch_idx" in args else b
                mask[row, pos] = True
    return mask


def ref_kwargs(args):
    return {k: v for k, v in args.items() if k not in ("q", "k_cache", "v_cache", "num_splits", "return_softmax_lse")}


def check_call(c: KVCase, run=None):
    """Runs the call (run(**kwargs) -> (out, lse); default mtlflash) on copies of the caches and
    checks the output and the caches. Returns (out, lse, k_cache, v_cache) after the call."""
    args, lengths = make_call(c)
    k0, v0 = args["k_cache"].clone(), args["v_cache"].clone()
    call = dict(args)
    call["k_cache"], call["v_cache"] = k0.clone(), v0.clone()
    run = run or (lambda **kw: mtlflash.flash_attn_with_kvcache(**kw, return_softmax_lse=True))
    out, lse = run(**call)
    factor = 5.0 if c.alibi else 3.0
    res = reference.compare_kvcache(out, lse, args["q"], k0, v0, factor=factor, **ref_kwargs(args))
    assert res.ok, f"{c}: " + "; ".join(res.problems)
    _, _, k_ref, v_ref = reference.kvcache_attention(args["q"], k0, v0, update_cache=False, **ref_kwargs(args))
    kc, vc = call["k_cache"], call["v_cache"]
    mask = written_mask(args, lengths, c.seqlen_new)
    assert torch.equal(vc, v_ref), "v_cache differs from the reference (new rows must land bitwise)"
    assert torch.equal(kc[~mask], k0[~mask]), "k_cache changed outside the appended rows"
    assert torch.equal(vc[~mask], v0[~mask]), "v_cache changed outside the appended rows"
    if c.rotary_dim:
        tol = 8e-3 if c.dtype == torch.bfloat16 else 1e-3
        torch.testing.assert_close(kc[mask].float(), k_ref[mask].float(), atol=tol, rtol=tol)
    else:
        assert torch.equal(kc, k_ref), "k_cache differs from the reference (new rows must land bitwise)"
    return out, lse, kc, vc
