"""``flash_attn.layers.rotary``, served by mtlflash: rotary position embedding in torch.

Same arguments and results as flash_attn's Triton version; the rotation is computed in
fp32 and written back in the input dtype.
"""

import torch

__all__ = [
    "apply_rotary_emb",
    "apply_rotary_emb_func",
    "apply_rotary_emb_qkv_",
    "apply_rotary_emb_kv_",
]


def _positions(x, seqlen_offsets, cu_seqlens, max_seqlen):
    """Rotary position of every token: (B, S) for batched x, (total,) for varlen x."""
    device = x.device
    if cu_seqlens is None:
        batch, seqlen = x.shape[0], x.shape[1]
        pos = torch.arange(seqlen, device=device, dtype=torch.long).expand(batch, seqlen)
        if isinstance(seqlen_offsets, torch.Tensor):
            pos = pos + seqlen_offsets.to(device=device, dtype=torch.long).view(batch, 1)
        else:
            pos = pos + int(seqlen_offsets)
        return pos
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    total = x.shape[0]
    lengths = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    if seq_of_token.numel() != total:
        raise ValueError(
            "apply_rotary_emb: cu_seqlens[-1] (%d) must equal x.shape[0] (%d)"
            % (int(cu[-1]), total)
        )
    pos = torch.arange(total, device=device, dtype=torch.long) - cu[seq_of_token]
    if isinstance(seqlen_offsets, torch.Tensor):
        pos = pos + seqlen_offsets.to(device=device, dtype=torch.long)[seq_of_token]
    else:
        pos = pos + int(seqlen_offsets)
    return pos


def apply_rotary_emb(
    x,
    cos,
    sin,
    interleaved=False,
    inplace=False,
    seqlen_offsets=0,
    cu_seqlens=None,
    max_seqlen=None,
):
    """Rotate the first ``2 * cos.shape[-1]`` features of every head of ``x``.

    x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with
    ``cu_seqlens`` (batch + 1,). cos, sin: (seqlen_rotary, rotary_dim / 2).
    interleaved=False rotates the two halves (GPT-NeoX), True rotates pairs of neighbours
    (GPT-J). seqlen_offsets: int or (batch,) tensor, added to each token's position (for
    decoding with a KV cache). Returns a tensor shaped like x (x itself when inplace).
    """
    rot_half = cos.shape[-1]
    rotary_dim = 2 * rot_half
    if sin.shape != cos.shape:
        raise ValueError("apply_rotary_emb: cos and sin must have the same shape")
    if rotary_dim > x.shape[-1]:
        raise ValueError(
            "apply_rotary_emb: rotary_dim (%d) must be <= headdim (%d)" % (rotary_dim, x.shape[-1])
        )
    pos = _positions(x, seqlen_offsets, cu_seqlens, max_seqlen)
    if pos.numel() and int(pos.max()) >= cos.shape[0]:
        raise ValueError(
            "apply_rotary_emb: positions up to %d need cos/sin with more than %d rows"
            % (int(pos.max()), cos.shape[0])
        )
    c = cos.to(torch.float32)[pos].unsqueeze(-2)  # (..., 1, rot_half), broadcast over heads
    s = sin.to(torch.float32)[pos].unsqueeze(-2)
    xr = x[..., :rotary_dim].to(torch.float32)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :rot_half], xr[..., rot_half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    rotated = rotated.to(x.dtype)
    if inplace:
        x[..., :rotary_dim] = rotated
        return x
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


apply_rotary_emb_func = apply_rotary_emb


def apply_rotary_emb_qkv_(
    qkv,
    cos,
    sin,
    cos_k=None,
    sin_k=None,
    interleaved=False,
    seqlen_offsets=0,
    num_heads_q=None,
):
    """Rotate q and k of a packed qkv in place.

    qkv: (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, nheads_q + 2 * nheads_k,
    headdim) with ``num_heads_q`` (GQA). cos_k/sin_k default to cos/sin.
    """
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    if qkv.dim() == 5:
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        if num_heads_q is None:
            raise ValueError("apply_rotary_emb_qkv_: num_heads_q is required for 4-D qkv")
        num_heads_k = (qkv.shape[2] - num_heads_q) // 2
        q = qkv[:, :, :num_heads_q]
        k = qkv[:, :, num_heads_q : num_heads_q + num_heads_k]
    apply_rotary_emb(q, cos, sin, interleaved=interleaved, inplace=True, seqlen_offsets=seqlen_offsets)
    apply_rotary_emb(k, cos_k, sin_k, interleaved=interleaved, inplace=True, seqlen_offsets=seqlen_offsets)
    return qkv


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """Rotate k of a packed kv (batch, seqlen, 2, nheads, headdim) in place."""
    apply_rotary_emb(
        kv[:, :, 0], cos, sin, interleaved=interleaved, inplace=True, seqlen_offsets=seqlen_offsets
    )
    return kv
