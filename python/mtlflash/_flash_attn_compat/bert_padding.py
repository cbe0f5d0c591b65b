"""``flash_attn.bert_padding``, served by mtlflash: remove and restore padding tokens.

Pure torch; the functions are differentiable through torch's own indexing ops.
``unpad_input`` returns the 5-tuple of flash_attn >= 2.7.
"""

import torch
import torch.nn.functional as F

__all__ = [
    "index_first_axis",
    "index_put_first_axis",
    "unpad_input",
    "pad_input",
    "unpad_input_for_concatenated_sequences",
]


def index_first_axis(input, indices):
    """``input[indices]`` along the first axis: (N, ...) -> (len(indices), ...)."""
    if input.dim() < 2:
        raise ValueError("index_first_axis: input must have at least 2 dimensions")
    return torch.index_select(input, 0, indices)


def index_put_first_axis(values, indices, first_axis_dim):
    """Scatter ``values`` (len(indices), ...) into zeros of shape (first_axis_dim, ...)."""
    if indices.dim() != 1 or values.dim() < 2:
        raise ValueError("index_put_first_axis: indices must be 1-D and values at least 2-D")
    output = torch.zeros(
        (first_axis_dim,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device
    )
    return output.index_copy(0, indices, values)


def _cu_seqlens(seqlens):
    return F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """Drop the padding tokens of a batch.

    hidden_states (B, S, ...), attention_mask (B, S) bool/int, 1 = token. ``unused_mask``
    (B, S) marks tokens that are kept in the output but not counted as used.

    Returns ``(hidden_states (total, ...), indices (total,), cu_seqlens (B+1,) int32,
    max_seqlen_in_batch int, seqused (B,) int32)``.
    """
    all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    cu_seqlens = _cu_seqlens(seqlens_in_batch)
    b, s = hidden_states.shape[0], hidden_states.shape[1]
    flat = hidden_states.reshape((b * s,) + tuple(hidden_states.shape[2:]))
    return (
        index_first_axis(flat, indices),
        indices,
        cu_seqlens,
        max_seqlen_in_batch,
        used_seqlens_in_batch,
    )


def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of :func:`unpad_input`: (total, ...) -> (batch, seqlen, ...), zeros at padding."""
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.view((batch, seqlen) + tuple(hidden_states.shape[1:]))


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """Unpad rows that each hold several concatenated sequences.

    ``attention_mask_in_length`` (B, S) lists, per row, the lengths of the sequences packed
    into it, followed by zeros; e.g. ``[2, 3, 0, 0, 0, 0]`` is two sequences of 2 and 3
    tokens then one padding token. Returns ``(hidden_states (total, ...), indices,
    cu_seqlens (num_sequences+1,) int32, max_seqlen int)``.
    """
    lengths = attention_mask_in_length.sum(dim=-1)
    seqlen = attention_mask_in_length.size(-1)
    positions = torch.arange(seqlen, device=lengths.device).expand(len(lengths), seqlen)
    attention_mask_2d = positions < lengths.unsqueeze(1)
    flat_lengths = attention_mask_in_length.flatten()
    seqlens_in_batch = flat_lengths[torch.nonzero(flat_lengths, as_tuple=False).flatten()]
    seqlens_in_batch = seqlens_in_batch.to(torch.int32)
    indices = torch.nonzero(attention_mask_2d.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    cu_seqlens = _cu_seqlens(seqlens_in_batch)
    b, s = hidden_states.shape[0], hidden_states.shape[1]
    flat = hidden_states.reshape((b * s,) + tuple(hidden_states.shape[2:]))
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen_in_batch
