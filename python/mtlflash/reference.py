"""The chunked reference implementation of attention, in torch.

It is the oracle every test compares against, and the ``reference`` tier: the safe fallback that
runs wherever torch runs (including MPS tensors when no Metal kernel serves a shape).

It follows the semantics of ``flash_attn`` exactly (see README, "Semantics"): bottom-right causal
alignment, ``window_size=(left, right)``, softcap applied to the scaled scores, ALiBi bias
``-slope * |i + Sk - Sq - j|``, GQA/MQA, varlen sequences, ``lse`` in natural log, and a query
row that sees no key gives a zero output row and ``lse = +inf``.

Scores are materialised one chunk of query rows at a time (all keys, all heads of one
sequence), never the whole ``Sq x Sk`` matrix of a long sequence.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention", "attention_backward", "dropout_keep", "philox_word0", "kvcache_attention", "apply_rotary", "compare", "compare_kvcache", "Comparison"]

# Upper bound on the elements of one chunk of scores (heads x rows x keys).
_CHUNK_ELEMENTS = 1 << 24


def _visible(i: torch.Tensor, j: torch.Tensor, sq: int, sk: int, causal: bool, window, key_lo: int = 0) -> torch.Tensor:
    """Boolean (rows, keys) mask of the keys each query row sees (keys before key_lo are padding)."""
    left, right = window
    if causal:
        right = 0
    diag = i[:, None] + (sk - sq)  # the key aligned with each query row
    jj = j[None, :]
    mask = (jj >= key_lo).expand(i.shape[0], j.shape[0]).clone()
    if left is not None and left >= 0:
        mask &= jj >= diag - left
    if right is not None and right >= 0:
        mask &= jj <= diag + right
    return mask


def _one_sequence(q, k, v, *, scale, causal, window, softcap, slopes, compute_dtype, key_lo=0, dropout=None):
    """q (Sq, Hq, D), k (Sk, Hk, D), v (Sk, Hk, Dv) -> out (Sq, Hq, Dv), lse (Hq, Sq).
    dropout: None or (p, seed, offset, sequence index): see :func:`dropout_keep`."""
    sq, hq, _ = q.shape
    sk, hk, dv = v.shape
    group = hq // hk
    dev = q.device
    out = torch.zeros(sq, hq, dv, dtype=compute_dtype, device=dev)
    lse = torch.full((hq, sq), math.inf, dtype=torch.float32 if compute_dtype != torch.float64 else torch.float64, device=dev)
    if sq == 0:
        return out, lse
    if sk == 0:
        return out, lse
    # Grouped-query attention without copying K/V per query head: the `group` query heads that
    # share a kv head are stacked along the rows, (Hk, group * rows, D) @ (Hk, D, Sk).
    qh = q.to(compute_dtype).permute(1, 0, 2).reshape(hk, group, sq, -1)  # (Hk, group, Sq, D)
    kh = k.to(compute_dtype).permute(1, 0, 2)  # (Hk, Sk, D)
    vh = v.to(compute_dtype).permute(1, 0, 2)  # (Hk, Sk, Dv)
    j = torch.arange(sk, device=dev)
    rows = max(1, min(sq, _CHUNK_ELEMENTS // max(1, hq * sk)))
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        i = torch.arange(r0, r1, device=dev)
        qc = qh[:, :, r0:r1].reshape(hk, group * (r1 - r0), -1)
        s = (torch.matmul(qc, kh.transpose(1, 2)) * scale).reshape(hq, r1 - r0, sk)  # (Hq, rows, Sk)
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if slopes is not None:
            dist = (i[:, None] + (sk - sq) - j[None, :]).abs().to(compute_dtype)
            s = s - slopes.to(compute_dtype)[:, None, None] * dist[None]
        mask = _visible(i, j, sq, sk, causal, window, key_lo)
        s = s.masked_fill(~mask[None], -math.inf)
        m = s.amax(dim=-1, keepdim=True)
        seen = torch.isfinite(m) | torch.isnan(m)  # rows with at least one visible key
        m = torch.where(seen, m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(dim=-1, keepdim=True)
        if dropout is not None:  # the row sums (and lse) see every probability; out the kept ones
            keep = dropout_keep(dropout[0], dropout[1], dropout[2], dropout[3], hq, i, j)
            p = torch.where(keep, p * (1.0 / (1.0 - dropout[0]) if dropout[0] < 1 else 0.0), torch.zeros_like(p))
        o = torch.matmul(p.reshape(hk, group * (r1 - r0), sk), vh).reshape(hq, r1 - r0, dv)
        o = o / torch.where(seen, l, torch.ones_like(l))
        o = torch.where(seen, o, torch.zeros_like(o))
        out[r0:r1] = o.permute(1, 0, 2)
        lse_chunk = torch.where(seen, m + torch.log(l), torch.full_like(m, math.inf))[..., 0]
        lse[:, r0:r1] = lse_chunk.to(lse.dtype)
    return out, lse


def _paged_keys(cache, table_row, length):
    """The first ``length`` keys of one sequence of a paged cache (num_blocks, page_size, H, D),
    gathered through its block-table row: key j lives in block table_row[j // page_size], slot
    j % page_size."""
    page = cache.shape[1]
    n_blocks = -(-length // page)
    blocks = table_row[:n_blocks].long().to(cache.device)
    return cache[blocks].reshape(n_blocks * page, *cache.shape[2:])[:length]


def attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, block_table=None,
              compute_dtype=torch.float32, dropout_p=0.0, rng_state=None):
    """Reference attention.

    Dense: q (B, Sq, Hq, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv) -> out (B, Sq, Hq, Dv),
    lse (B, Hq, Sq). Varlen (cu_seqlens_q/k given, int32 (B+1,)): q (total_q, Hq, D), k/v
    (total_k, Hk, D/Dv) -> out (total_q, Hq, Dv), lse (Hq, total_q); rows past cu_seqlens_q[-1]
    are zero with lse +inf. Varlen with ``block_table`` (B, max_blocks) int32: k/v are paged caches
    (num_blocks, page_size, Hk, D/Dv) and sequence b's keys are its first
    ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` positions, addressed through its block-table row.

    ``compute_dtype`` is the precision of every step (float32 by default; float64 for a tighter
    oracle; the input dtype for the "naive low precision" baseline of the acceptance rule). out is
    returned in compute_dtype, lse in float32 (float64 when computing in float64). NumPy arrays
    are accepted and converted. Differentiable with torch autograd (the naive baseline of the
    backward's acceptance rule).

    Dropout: ``dropout_p`` > 0 with ``rng_state`` (seed, offset) drops each probability where
    :func:`dropout_keep` says (the generator of the C core) and scales the rest by 1 / (1 - p);
    lse is that of the undropped scores.
    """
    import numpy as np

    def as_t(x):
        return torch.from_numpy(x) if isinstance(x, np.ndarray) else x

    q, k, v = as_t(q), as_t(k), as_t(v)
    alibi_slopes = as_t(alibi_slopes)
    block_table = as_t(block_table)
    d = q.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    window = (int(window_size[0]), int(window_size[1]))
    varlen = cu_seqlens_q is not None
    if varlen:
        cq = [int(x) for x in as_t(cu_seqlens_q).tolist()]
        ck = [int(x) for x in as_t(cu_seqlens_k).tolist()]
        batch = len(cq) - 1
        total_q, hq = q.shape[0], q.shape[1]
        out = torch.zeros(total_q, hq, v.shape[-1], dtype=compute_dtype, device=q.device)
        lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        lse = torch.full((hq, total_q), math.inf, dtype=lse_dtype, device=q.device)
    else:
        batch = q.shape[0]
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=compute_dtype, device=q.device)
        lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), math.inf, dtype=lse_dtype, device=q.device)
    for b in range(batch):
        if alibi_slopes is None:
            slopes = None
        else:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        if varlen and block_table is not None:
            qs = q[cq[b]:cq[b + 1]]
            ks = _paged_keys(k, block_table[b], ck[b + 1] - ck[b])
            vs = _paged_keys(v, block_table[b], ck[b + 1] - ck[b])
        elif varlen:
            qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        else:
            qs, ks, vs = q[b], k[b], v[b]
        o, l = _one_sequence(qs, ks, vs, scale=scale, causal=causal, window=window, softcap=float(softcap),
                             slopes=slopes, compute_dtype=compute_dtype,
                             dropout=_dropout_arg(dropout_p, rng_state, b))
        if varlen:
            out[cq[b]:cq[b + 1]] = o
            lse[:, cq[b]:cq[b + 1]] = l
        else:
            out[b] = o
            lse[b] = l
    return out, lse


def apply_rotary(x, cos, sin, positions, interleaved=True):
    """Rotary embedding of x (S, H, D) at integer positions (S,), computed in fp32 and returned in
    x's dtype. cos/sin (seqlen_ro, rotary_dim / 2); dims past rotary_dim are unchanged.
    interleaved=True rotates the pairs (x[2i], x[2i+1]) (GPT-J); False the pairs
    (x[i], x[i + rotary_dim / 2]) (GPT-NeoX)."""
    rd = 2 * cos.shape[-1]
    pos = positions.long().to(cos.device)
    c = cos[pos].float()[:, None, :]  # (S, 1, rd/2)
    s = sin[pos].float()[:, None, :]
    xf = x.float()
    out = xf.clone()
    if interleaved:
        x0, x1 = xf[..., 0:rd:2], xf[..., 1:rd:2]
        out[..., 0:rd:2] = x0 * c - x1 * s
        out[..., 1:rd:2] = x0 * s + x1 * c
    else:
        h = rd // 2
        x0, x1 = xf[..., :h], xf[..., h:rd]
        out[..., :h] = x0 * c - x1 * s
        out[..., h:rd] = x0 * s + x1 * c
    return out.to(x.dtype)


def kvcache_attention(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                      cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                      window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                      compute_dtype=torch.float32, update_cache=True):
    """The semantics of ``flash_attn_with_kvcache``, written plainly (the oracle for it).

    q (B, Sq, Hq, D); k_cache/v_cache dense (B_cache, S_cache, Hk, D/Dv) or, with block_table
    (B, max_blocks) int32, paged (num_blocks, page_size, Hk, D/Dv). New k/v (B, S_new, Hk, D/Dv)
    are written at positions ``cache_seqlens[b] + t`` (k rotated there when rotary_cos/sin are
    given); q is rotated at ``cache_seqlens[b] + i`` when causal or local, else at
    ``cache_seqlens[b]``; sequence b then attends over keys ``[cache_leftpad[b],
    cache_seqlens[b] + S_new)`` (all of the cache when cache_seqlens is None), causal/window
    aligned bottom-right against ``cache_seqlens[b] + S_new``. Pages are gathered and rotary is
    computed in fp32. With ``update_cache=False`` the caches are cloned first and left alone.
    Returns (out (B, Sq, Hq, Dv) in compute_dtype, lse (B, Hq, Sq), k_cache, v_cache).
    """
    import numpy as np

    def as_t(x):
        return torch.from_numpy(x) if isinstance(x, np.ndarray) else x

    q, k_cache, v_cache, k, v = (as_t(x) for x in (q, k_cache, v_cache, k, v))
    rotary_cos, rotary_sin, block_table = as_t(rotary_cos), as_t(rotary_sin), as_t(block_table)
    cache_batch_idx, cache_leftpad, alibi_slopes = as_t(cache_batch_idx), as_t(cache_leftpad), as_t(alibi_slopes)
    if not update_cache:
        k_cache, v_cache = k_cache.clone(), v_cache.clone()
    B, sq = q.shape[0], q.shape[1]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if cache_seqlens is None:
        lens = [capacity] * B
    elif isinstance(cache_seqlens, int):
        lens = [cache_seqlens] * B
    else:
        lens = [int(x) for x in as_t(cache_seqlens).reshape(-1).tolist()]
    s_new = 0 if k is None else k.shape[1]
    local = causal or window_size[0] >= 0 or window_size[1] >= 0
    d = q.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.zeros(*q.shape[:3], v_cache.shape[-1], dtype=compute_dtype, device=q.device)
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    lse = torch.full((B, q.shape[2], sq), math.inf, dtype=lse_dtype, device=q.device)
    for b in range(B):
        row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
        if s_new:
            pos = torch.arange(lens[b], lens[b] + s_new)
            kb = k[b]
            if rotary_cos is not None:
                kb = apply_rotary(kb, rotary_cos, rotary_sin, pos, rotary_interleaved)
            if paged:
                blocks = block_table[b].long()[pos // k_cache.shape[1]]
                k_cache[blocks.to(k_cache.device), (pos % k_cache.shape[1]).to(k_cache.device)] = kb
                v_cache[blocks.to(v_cache.device), (pos % v_cache.shape[1]).to(v_cache.device)] = v[b]
            else:
                k_cache[row, lens[b]:lens[b] + s_new] = kb
                v_cache[row, lens[b]:lens[b] + s_new] = v[b]
        qb = q[b]
        if rotary_cos is not None and k is not None:  # q is rotated whenever new rows are passed, even 0 of them
            qpos = lens[b] + (torch.arange(sq) if local else torch.zeros(sq, dtype=torch.long))
            qb = apply_rotary(qb, rotary_cos, rotary_sin, qpos, rotary_interleaved)
        length = lens[b] + s_new if cache_seqlens is not None else capacity
        if paged:
            ks, vs = _paged_keys(k_cache, block_table[b], length), _paged_keys(v_cache, block_table[b], length)
        else:
            ks, vs = k_cache[row, :length], v_cache[row, :length]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        key_lo = int(cache_leftpad[b]) if cache_leftpad is not None else 0
        o, l = _one_sequence(qb, ks, vs, scale=scale, causal=causal, window=(int(window_size[0]), int(window_size[1])),
                             softcap=float(softcap), slopes=slopes, compute_dtype=compute_dtype, key_lo=key_lo)
        out[b] = o
        lse[b] = l
    return out, lse, k_cache, v_cache


# --- dropout: the counter-based generator of the C core (csrc/cpu/philox.h) ---------------------

_M32 = 0xFFFFFFFF


def _mulhilo(a, m):
    """(hi, lo) 32-bit halves of a * m for int64 tensors a in [0, 2^32) and a constant m < 2^32,
    without int64 overflow (a is split into 16-bit halves)."""
    al, ah = a & 0xFFFF, a >> 16
    x = al * m  # < 2^48
    y = ah * m  # < 2^48; a * m = x + y * 2^16
    s = (x & _M32) + ((y & 0xFFFF) << 16)
    lo = s & _M32
    hi = ((x >> 32) + (y >> 16) + (s >> 32)) & _M32
    return hi, lo


def philox_word0(c0, c1, c2, c3, k0, k1):
    """Word 0 of Philox4x32-10 for int64 tensors (or ints) holding 32-bit counters c0..c3 and key
    k0, k1; broadcasting like any elementwise op."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    k0, k1 = int(k0) & _M32, int(k1) & _M32
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0


def dropout_keep(p, seed, offset, b, heads, rows, keys):
    """Boolean (heads, len(rows), len(keys)) mask of kept probabilities of sequence b for query
    heads 0..heads-1, rows and keys of that sequence (int tensors): the draw of element
    (b, h, i, j) is word 0 of Philox4x32-10 with key (seed low, seed high 32 bits) and counter
    (j, i, b + (offset >> 32), h + (offset & 0xffffffff)); kept iff draw >= floor(p * 2^32)."""
    seed, offset = int(seed) & ((1 << 64) - 1), int(offset) & ((1 << 64) - 1)
    thr = math.floor(p * 4294967296.0)
    dev = rows.device
    h = (torch.arange(heads, dtype=torch.int64, device=dev) + (offset & _M32)) & _M32
    u = philox_word0(keys.to(torch.int64)[None, None, :] & _M32, rows.to(torch.int64)[None, :, None] & _M32,
                     (b + (offset >> 32)) & _M32, h[:, None, None], seed & _M32, seed >> 32)
    if thr >= 4294967296:
        return torch.zeros(u.shape, dtype=torch.bool, device=dev)
    return u >= thr


def _dropout_arg(dropout_p, rng_state, b):
    if not dropout_p:
        return None
    if rng_state is None:
        raise ValueError("reference: dropout_p > 0 needs rng_state (seed, offset)")
    seed, offset = (int(x) for x in (rng_state.tolist() if isinstance(rng_state, torch.Tensor) else rng_state))
    return (float(dropout_p), seed, offset, b)


# --- the backward pass ---------------------------------------------------------------------------

def _one_sequence_backward(do, q, k, v, o, lse, *, scale, causal, window, softcap, slopes, compute_dtype,
                           dropout=None):
    """FlashAttention-2's backward equations on one sequence, one chunk of query rows at a time:
    q (Sq, Hq, D), k (Sk, Hk, D), v (Sk, Hk, Dv), do/o (Sq, Hq, Dv), lse (Hq, Sq) ->
    dq, dk, dv (compute_dtype), delta (Hq, Sq)."""
    sq, hq, d = q.shape
    sk, hk, dv_ = v.shape
    group = hq // hk
    dev = q.device
    cd = compute_dtype
    dq = torch.zeros(sq, hq, d, dtype=cd, device=dev)
    dk = torch.zeros(hk, sk, d, dtype=cd, device=dev)
    dv = torch.zeros(hk, sk, dv_, dtype=cd, device=dev)
    delta = (do.to(cd) * o.to(cd)).sum(-1).t().contiguous() if sq else torch.zeros(hq, 0, dtype=cd, device=dev)
    if sq == 0 or sk == 0:
        return dq, dk.permute(1, 0, 2), dv.permute(1, 0, 2), delta
    qh = q.to(cd).permute(1, 0, 2).reshape(hk, group, sq, d)
    doh = do.to(cd).permute(1, 0, 2).reshape(hk, group, sq, dv_)
    kh = k.to(cd).permute(1, 0, 2)
    vh = v.to(cd).permute(1, 0, 2)
    lse_c = lse.to(cd)
    j = torch.arange(sk, device=dev)
    rows = max(1, min(sq, _CHUNK_ELEMENTS // max(1, hq * sk)))
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        n = r1 - r0
        i = torch.arange(r0, r1, device=dev)
        qc = qh[:, :, r0:r1].reshape(hk, group * n, d)
        doc = doh[:, :, r0:r1].reshape(hk, group * n, dv_)
        x = (torch.matmul(qc, kh.transpose(1, 2)) * scale).reshape(hq, n, sk)  # scaled scores
        s = x
        if softcap > 0:
            t = torch.tanh(x / softcap)
            s = softcap * t
        if slopes is not None:
            dist = (i[:, None] + (sk - sq) - j[None, :]).abs().to(cd)
            s = s - slopes.to(cd)[:, None, None] * dist[None]
        mask = _visible(i, j, sq, sk, causal, window)
        lc = lse_c[:, r0:r1, None]
        p = torch.where(mask[None] & torch.isfinite(lc), torch.exp(s - torch.where(torch.isfinite(lc), lc, 0)), 0.0)
        z = None
        if dropout is not None:
            keep = dropout_keep(dropout[0], dropout[1], dropout[2], dropout[3], hq, i, j)
            z = torch.where(keep, torch.full((), 1.0 / (1.0 - dropout[0]) if dropout[0] < 1 else 0.0,
                                             dtype=cd, device=dev), torch.zeros((), dtype=cd, device=dev))
        pz = p if z is None else p * z
        dv += torch.matmul(_group_t(pz, hk, group, n, sk), doc)
        dp = torch.matmul(doc, vh.transpose(1, 2)).reshape(hq, n, sk)
        if z is not None:
            dp = dp * z
        ds = p * (dp - delta[:, r0:r1, None])
        if softcap > 0:
            ds = ds * (1 - t * t)
        dsg = ds.reshape(hk, group * n, sk)
        dq[r0:r1] = (torch.matmul(dsg, kh) * scale).reshape(hq, n, d).permute(1, 0, 2)
        dk += torch.matmul(_group_t(ds, hk, group, n, sk), qc) * scale
    return dq, dk.permute(1, 0, 2), dv.permute(1, 0, 2), delta


def _group_t(x, hk, group, n, sk):
    """(Hq, n, Sk) -> (Hk, Sk, group * n): the transposed rows of a kv head's query heads side by side."""
    return x.reshape(hk, group * n, sk).transpose(1, 2)


def attention_backward(dout, q, k, v, out, lse, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                       softcap=0.0, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=0.0,
                       rng_state=None, compute_dtype=torch.float32):
    """The reference backward pass (FlashAttention-2's equations, chunked over query rows: memory
    O(rows x Sk) per chunk, never the whole score matrix of a long sequence).

    Takes the forward's inputs (layouts as :func:`attention`), its out and lse, and dout. Returns
    (dq, dk, dv, softmax_d) with the gradients in compute_dtype and softmax_d = rowsum(dout * out)
    of lse's shape. Rows that see no key get zero gradients. With compute_dtype=float64 it is the
    oracle of the backward's acceptance rule; in float32 it is the ``reference`` tier's backward
    (MPS tensors).
    """
    import numpy as np

    def as_t(x):
        return torch.from_numpy(x) if isinstance(x, np.ndarray) else x

    dout, q, k, v, out, lse = (as_t(x) for x in (dout, q, k, v, out, lse))
    alibi_slopes = as_t(alibi_slopes)
    d = q.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    window = (int(window_size[0]), int(window_size[1]))
    dq = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute_dtype, device=q.device)
    delta = torch.zeros(lse.shape, dtype=torch.float32 if compute_dtype != torch.float64 else torch.float64,
                        device=q.device)
    varlen = cu_seqlens_q is not None
    if varlen:
        cq = [int(x) for x in as_t(cu_seqlens_q).tolist()]
        ck = [int(x) for x in as_t(cu_seqlens_k).tolist()]
        batch = len(cq) - 1
    else:
        batch = q.shape[0]
    for b in range(batch):
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        if varlen:
            sl_q, sl_k = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            args = (dout[sl_q], q[sl_q], k[sl_k], v[sl_k], out[sl_q], lse[:, sl_q])
        else:
            args = (dout[b], q[b], k[b], v[b], out[b], lse[b])
        g = _one_sequence_backward(*args, scale=scale, causal=causal, window=window, softcap=float(softcap),
                                   slopes=slopes, compute_dtype=compute_dtype,
                                   dropout=_dropout_arg(dropout_p, rng_state, b))
        if varlen:
            dq[sl_q], dk[sl_k], dv[sl_k] = g[0], g[1], g[2]
            delta[:, sl_q] = g[3].to(delta.dtype)
        else:
            dq[b], dk[b], dv[b] = g[0], g[1], g[2]
            delta[b] = g[3].to(delta.dtype)
    return dq, dk, dv, delta


# --- the numerical acceptance rule ---------------------------------------------------------------

FP32_TOL = 5e-5  # fp32 inputs: tolerance against the fp64 reference, relative to max(1, max|ref|)
LOWP_SLACK = 1e-4  # fp16/bf16 inputs: slack added to twice the naive low-precision error


class Comparison:
    """Result of :func:`compare`: ``ok``, the errors and bounds, and what failed."""

    def __init__(self):
        self.problems = []
        self.err_out = self.bound_out = 0.0
        self.err_lse = self.bound_lse = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __repr__(self):
        state = "ok" if self.ok else "; ".join(self.problems)
        return f"Comparison({state}, out error {self.err_out:.3g} <= {self.bound_out:.3g})"


def _max_abs(a, b) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def compare(out, lse, q, k, v, **options) -> Comparison:
    """Checks an attention result against this reference by the acceptance rule.

    Low-precision inputs (fp16/bf16): ``max|out - ref| <= 2 * max|naive - ref| + slack`` where
    ``ref`` is computed in fp64 from the same inputs and ``naive`` entirely in the input dtype.
    fp32 inputs: ``max|out - ref| <= FP32_TOL * max(1, max|ref|)`` (scores and lse grow with the
    inputs' scale, and fp32 rounding with them). lse is compared the same way; rows that see no key
    must have lse = +inf exactly where the reference does. Tensors on any device (moved to the
    CPU) and NumPy arrays are accepted. ``options`` are those of :func:`attention`.
    """
    out, lse, q, k, v = (_cpu(x) for x in (out, lse, q, k, v))
    options = {key: _cpu(val) for key, val in options.items()}
    return _check(out, lse, q.dtype, lambda dt: attention(q, k, v, compute_dtype=dt, **options))


def compare_kvcache(out, lse, q, k_cache, v_cache, *, factor=2.0, **options) -> Comparison:
    """:func:`compare` for ``flash_attn_with_kvcache``: ``k_cache``/``v_cache`` are the caches as
    they were BEFORE the call (the reference appends to copies); ``options`` are those of
    :func:`kvcache_attention`. ``factor`` replaces the 2 of the low-precision rule (FA2's own
    kv-cache tests use 3, and 5 with ALiBi)."""
    out, lse, q, k_cache, v_cache = (_cpu(x) for x in (out, lse, q, k_cache, v_cache))
    options = {key: _cpu(val) for key, val in options.items()}

    def ref(dt):
        o, l, _, _ = kvcache_attention(q, k_cache, v_cache, compute_dtype=dt, update_cache=False, **options)
        return o, l

    return _check(out, lse, q.dtype, ref, factor)


def _cpu(x):
    import numpy as np

    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def _check(out, lse, dtype, ref_fn, factor=2.0) -> Comparison:
    """The acceptance rule for one result; ref_fn(compute_dtype) -> (out, lse) of the reference."""
    res = Comparison()
    ref_out, ref_lse = ref_fn(torch.float64)
    if tuple(out.shape) != tuple(ref_out.shape):
        res.problems.append(f"out shape {tuple(out.shape)} != reference {tuple(ref_out.shape)}")
        return res
    if out.dtype != dtype:
        res.problems.append(f"out dtype {out.dtype} != input dtype {dtype}")
    if torch.isnan(out).any():
        res.problems.append("out has NaN")
    if dtype == torch.float32:
        finite = torch.isfinite(ref_lse)
        res.bound_out = FP32_TOL * max(1.0, _max_abs(ref_out, torch.zeros_like(ref_out)))
        res.bound_lse = FP32_TOL * max(1.0, _max_abs(ref_lse[finite], torch.zeros_like(ref_lse[finite])))
    else:
        naive_out, naive_lse = ref_fn(dtype)
        res.bound_out = factor * _max_abs(naive_out, ref_out) + LOWP_SLACK
        finite = torch.isfinite(ref_lse) & torch.isfinite(naive_lse)
        res.bound_lse = factor * _max_abs(naive_lse[finite], ref_lse[finite]) + LOWP_SLACK
    res.err_out = _max_abs(out, ref_out)
    if not res.err_out <= res.bound_out:
        res.problems.append(f"out error {res.err_out:.3g} exceeds the bound {res.bound_out:.3g}")
    if lse is not None:
        empty = torch.isinf(ref_lse)  # rows that see no key
        if lse.dtype != torch.float32:
            res.problems.append(f"lse dtype {lse.dtype} != float32")
        if tuple(lse.shape) != tuple(ref_lse.shape):
            res.problems.append(f"lse shape {tuple(lse.shape)} != reference {tuple(ref_lse.shape)}")
            return res
        if torch.isnan(lse).any():
            res.problems.append("lse has NaN")
        if not torch.equal(torch.isinf(lse), empty) or not (lse[empty] > 0).all():
            res.problems.append("lse is not +inf exactly on the rows that see no key")
        res.err_lse = _max_abs(lse[~empty], ref_lse[~empty])
        if not res.err_lse <= res.bound_lse:
            res.problems.append(f"lse error {res.err_lse:.3g} exceeds the bound {res.bound_lse:.3g}")
    return res


# --- the acceptance rule for gradients -------------------------------------------------------------

FP32_GRAD_TOL = 1e-4  # fp32 inputs: gradient tolerance against fp64, relative to max(1, max|ref|)


class GradComparison:
    """Result of :func:`compare_backward`: ``ok``, per-gradient (error, bound), and what failed."""

    def __init__(self):
        self.problems = []
        self.errors = {}

    @property
    def ok(self) -> bool:
        return not self.problems

    def __repr__(self):
        state = "ok" if self.ok else "; ".join(self.problems)
        errs = ", ".join(f"{n} {e:.3g} <= {b:.3g}" for n, (e, b) in self.errors.items())
        return f"GradComparison({state}; {errs})"


def compare_backward(grads, dout, q, k, v, *, factor=2.0, **options) -> GradComparison:
    """Checks (dq, dk, dv) of an attention call against this reference by FlashAttention-2's rule.

    ``ref``: :func:`attention_backward` in fp64 from the same inputs, out and lse (out and lse of the
    fp64 forward). Low-precision inputs: ``max|g - ref| <= factor * max|naive - ref| + LOWP_SLACK``
    + ulp(max|ref|) per gradient (the rounding of the result to the input dtype), ``naive`` being torch autograd through :func:`attention` computed entirely in the
    input dtype (a plain matmul-softmax-matmul). fp32 inputs: ``max|g - ref| <= FP32_GRAD_TOL *
    max(1, max|ref|)``. Gradients must have the inputs' shapes and dtype and no NaN. ``options``
    are those of :func:`attention` (dropout_p and rng_state included)."""
    grads = [_cpu(g) for g in grads]
    dout, q, k, v = (_cpu(x) for x in (dout, q, k, v))
    options = {key: _cpu(val) for key, val in options.items()}
    res = GradComparison()
    o64, l64 = attention(q, k, v, compute_dtype=torch.float64, **options)
    bwd_opts = {key: val for key, val in options.items() if key != "block_table"}
    ref = attention_backward(dout, q, k, v, o64, l64, compute_dtype=torch.float64, **bwd_opts)[:3]
    naive = None
    if q.dtype != torch.float32:
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o, _ = attention(*leaves, compute_dtype=q.dtype, **options)
        naive = (torch.autograd.grad(o, leaves, dout.to(o.dtype), allow_unused=True) if o.requires_grad
                 else [None] * 3)  # e.g. no query rows at all
        naive = [torch.zeros_like(x) if g is None else g for g, x in zip(naive, leaves)]
    for idx, (name, g, x) in enumerate(zip(("dq", "dk", "dv"), grads, (q, k, v))):
        r = ref[idx]
        if tuple(g.shape) != tuple(x.shape):
            res.problems.append(f"{name} shape {tuple(g.shape)} != {tuple(x.shape)}")
            continue
        if g.dtype != x.dtype:
            res.problems.append(f"{name} dtype {g.dtype} != input dtype {x.dtype}")
        if torch.isnan(g).any():
            res.problems.append(f"{name} has NaN")
        if naive is None:
            bound = FP32_GRAD_TOL * max(1.0, _max_abs(r, torch.zeros_like(r)))
        else:
            # slack: LOWP_SLACK plus one unit in the last place of the input dtype at the gradient's
            # largest magnitude (the unavoidable rounding of the result, which on tiny problems can
            # exceed a naive computation that happens to round luckily)
            bound = factor * _max_abs(naive[idx], r) + LOWP_SLACK + torch.finfo(x.dtype).eps * _max_abs(
                r, torch.zeros_like(r))
        err = _max_abs(g, r)
        res.errors[name] = (err, bound)
        if not err <= bound:
            res.problems.append(f"{name} error {err:.3g} exceeds the bound {bound:.3g}")
    return res
