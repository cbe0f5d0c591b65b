# Type stubs of the FlashAttention-2 API. The array type of q decides the rest: torch tensors in,
# torch tensors out; NumPy arrays in, NumPy arrays out (a constrained TypeVar).
from typing import Any, Literal, Sequence, TypeVar, Union, overload

import numpy as np
import numpy.typing as npt
import torch

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

_A = TypeVar("_A", torch.Tensor, npt.NDArray[Any])
_Window = Union[tuple[int, int], Sequence[int], torch.Tensor]
_Int = Union[int, torch.Tensor]

# --- flash_attn_func ---
@overload
def flash_attn_func(q: _A, k: _A, v: _A, dropout_p: float = ..., softmax_scale: float | None = ...,
                    causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                    alibi_slopes: _A | None = ..., deterministic: bool = ...,
                    return_attn_probs: Literal[False] = ...) -> _A: ...
@overload
def flash_attn_func(q: _A, k: _A, v: _A, dropout_p: float = ..., softmax_scale: float | None = ...,
                    causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                    alibi_slopes: _A | None = ..., deterministic: bool = ..., *,
                    return_attn_probs: Literal[True]) -> tuple[_A, _A, _A]: ...
@overload
def flash_attn_func(q: _A, k: _A, v: _A, dropout_p: float = ..., softmax_scale: float | None = ...,
                    causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                    alibi_slopes: _A | None = ..., deterministic: bool = ...,
                    return_attn_probs: bool = ...) -> _A | tuple[_A, _A, _A]: ...

# --- flash_attn_qkvpacked_func ---
@overload
def flash_attn_qkvpacked_func(qkv: _A, dropout_p: float = ..., softmax_scale: float | None = ...,
                              causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                              alibi_slopes: _A | None = ..., deterministic: bool = ...,
                              return_attn_probs: Literal[False] = ...) -> _A: ...
@overload
def flash_attn_qkvpacked_func(qkv: _A, dropout_p: float = ..., softmax_scale: float | None = ...,
                              causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                              alibi_slopes: _A | None = ..., deterministic: bool = ..., *,
                              return_attn_probs: Literal[True]) -> tuple[_A, _A, _A]: ...
@overload
def flash_attn_qkvpacked_func(qkv: _A, dropout_p: float = ..., softmax_scale: float | None = ...,
                              causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                              alibi_slopes: _A | None = ..., deterministic: bool = ...,
                              return_attn_probs: bool = ...) -> _A | tuple[_A, _A, _A]: ...

# --- flash_attn_kvpacked_func ---
@overload
def flash_attn_kvpacked_func(q: _A, kv: _A, dropout_p: float = ..., softmax_scale: float | None = ...,
                             causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                             alibi_slopes: _A | None = ..., deterministic: bool = ...,
                             return_attn_probs: Literal[False] = ...) -> _A: ...
@overload
def flash_attn_kvpacked_func(q: _A, kv: _A, dropout_p: float = ..., softmax_scale: float | None = ...,
                             causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                             alibi_slopes: _A | None = ..., deterministic: bool = ..., *,
                             return_attn_probs: Literal[True]) -> tuple[_A, _A, _A]: ...
@overload
def flash_attn_kvpacked_func(q: _A, kv: _A, dropout_p: float = ..., softmax_scale: float | None = ...,
                             causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                             alibi_slopes: _A | None = ..., deterministic: bool = ...,
                             return_attn_probs: bool = ...) -> _A | tuple[_A, _A, _A]: ...

# --- flash_attn_varlen_func ---
@overload
def flash_attn_varlen_func(q: _A, k: _A, v: _A, cu_seqlens_q: _A, cu_seqlens_k: _A, max_seqlen_q: _Int,
                           max_seqlen_k: _Int, dropout_p: float = ..., softmax_scale: float | None = ...,
                           causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                           alibi_slopes: _A | None = ..., deterministic: bool = ...,
                           return_attn_probs: Literal[False] = ..., block_table: _A | None = ...) -> _A: ...
@overload
def flash_attn_varlen_func(q: _A, k: _A, v: _A, cu_seqlens_q: _A, cu_seqlens_k: _A, max_seqlen_q: _Int,
                           max_seqlen_k: _Int, dropout_p: float = ..., softmax_scale: float | None = ...,
                           causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                           alibi_slopes: _A | None = ..., deterministic: bool = ..., *,
                           return_attn_probs: Literal[True], block_table: _A | None = ...) -> tuple[_A, _A, _A]: ...
@overload
def flash_attn_varlen_func(q: _A, k: _A, v: _A, cu_seqlens_q: _A, cu_seqlens_k: _A, max_seqlen_q: _Int,
                           max_seqlen_k: _Int, dropout_p: float = ..., softmax_scale: float | None = ...,
                           causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                           alibi_slopes: _A | None = ..., deterministic: bool = ...,
                           return_attn_probs: bool = ..., block_table: _A | None = ...) -> _A | tuple[_A, _A, _A]: ...

# --- flash_attn_varlen_qkvpacked_func ---
@overload
def flash_attn_varlen_qkvpacked_func(qkv: _A, cu_seqlens: _A, max_seqlen: _Int, dropout_p: float = ...,
                                     softmax_scale: float | None = ..., causal: bool = ...,
                                     window_size: _Window = ..., softcap: float = ...,
                                     alibi_slopes: _A | None = ..., deterministic: bool = ...,
                                     return_attn_probs: Literal[False] = ...) -> _A: ...
@overload
def flash_attn_varlen_qkvpacked_func(qkv: _A, cu_seqlens: _A, max_seqlen: _Int, dropout_p: float = ...,
                                     softmax_scale: float | None = ..., causal: bool = ...,
                                     window_size: _Window = ..., softcap: float = ...,
                                     alibi_slopes: _A | None = ..., deterministic: bool = ..., *,
                                     return_attn_probs: Literal[True]) -> tuple[_A, _A, _A]: ...
@overload
def flash_attn_varlen_qkvpacked_func(qkv: _A, cu_seqlens: _A, max_seqlen: _Int, dropout_p: float = ...,
                                     softmax_scale: float | None = ..., causal: bool = ...,
                                     window_size: _Window = ..., softcap: float = ...,
                                     alibi_slopes: _A | None = ..., deterministic: bool = ...,
                                     return_attn_probs: bool = ...) -> _A | tuple[_A, _A, _A]: ...

# --- flash_attn_varlen_kvpacked_func ---
@overload
def flash_attn_varlen_kvpacked_func(q: _A, kv: _A, cu_seqlens_q: _A, cu_seqlens_k: _A, max_seqlen_q: _Int,
                                    max_seqlen_k: _Int, dropout_p: float = ..., softmax_scale: float | None = ...,
                                    causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                                    alibi_slopes: _A | None = ..., deterministic: bool = ...,
                                    return_attn_probs: Literal[False] = ...) -> _A: ...
@overload
def flash_attn_varlen_kvpacked_func(q: _A, kv: _A, cu_seqlens_q: _A, cu_seqlens_k: _A, max_seqlen_q: _Int,
                                    max_seqlen_k: _Int, dropout_p: float = ..., softmax_scale: float | None = ...,
                                    causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                                    alibi_slopes: _A | None = ..., deterministic: bool = ..., *,
                                    return_attn_probs: Literal[True]) -> tuple[_A, _A, _A]: ...
@overload
def flash_attn_varlen_kvpacked_func(q: _A, kv: _A, cu_seqlens_q: _A, cu_seqlens_k: _A, max_seqlen_q: _Int,
                                    max_seqlen_k: _Int, dropout_p: float = ..., softmax_scale: float | None = ...,
                                    causal: bool = ..., window_size: _Window = ..., softcap: float = ...,
                                    alibi_slopes: _A | None = ..., deterministic: bool = ...,
                                    return_attn_probs: bool = ...) -> _A | tuple[_A, _A, _A]: ...

# --- flash_attn_with_kvcache (returns out, or (out, softmax_lse) with return_softmax_lse=True) ---
@overload
def flash_attn_with_kvcache(q: _A, k_cache: _A, v_cache: _A, k: _A | None = ..., v: _A | None = ...,
                            rotary_cos: _A | None = ..., rotary_sin: _A | None = ...,
                            cache_seqlens: _A | int | None = ..., cache_batch_idx: _A | None = ...,
                            cache_leftpad: _A | None = ..., block_table: _A | None = ...,
                            softmax_scale: float | None = ..., causal: bool = ..., window_size: _Window = ...,
                            softcap: float = ..., rotary_interleaved: bool = ..., alibi_slopes: _A | None = ...,
                            num_splits: int = ..., return_softmax_lse: Literal[False] = ...) -> _A: ...
@overload
def flash_attn_with_kvcache(q: _A, k_cache: _A, v_cache: _A, k: _A | None = ..., v: _A | None = ...,
                            rotary_cos: _A | None = ..., rotary_sin: _A | None = ...,
                            cache_seqlens: _A | int | None = ..., cache_batch_idx: _A | None = ...,
                            cache_leftpad: _A | None = ..., block_table: _A | None = ...,
                            softmax_scale: float | None = ..., causal: bool = ..., window_size: _Window = ...,
                            softcap: float = ..., rotary_interleaved: bool = ..., alibi_slopes: _A | None = ...,
                            num_splits: int = ..., *, return_softmax_lse: Literal[True]) -> tuple[_A, _A]: ...
@overload
def flash_attn_with_kvcache(q: _A, k_cache: _A, v_cache: _A, k: _A | None = ..., v: _A | None = ...,
                            rotary_cos: _A | None = ..., rotary_sin: _A | None = ...,
                            cache_seqlens: _A | int | None = ..., cache_batch_idx: _A | None = ...,
                            cache_leftpad: _A | None = ..., block_table: _A | None = ...,
                            softmax_scale: float | None = ..., causal: bool = ..., window_size: _Window = ...,
                            softcap: float = ..., rotary_interleaved: bool = ..., alibi_slopes: _A | None = ...,
                            num_splits: int = ..., return_softmax_lse: bool = ...) -> _A | tuple[_A, _A]: ...

def metal_params(q: _A, k: _A, v: _A, out: _A, lse: _A | None = ..., *, cu_seqlens_q: _A | None = ...,
                 cu_seqlens_k: _A | None = ..., max_seqlen_q: _Int | None = ..., max_seqlen_k: _Int | None = ...,
                 softmax_scale: float | None = ..., causal: bool = ..., window_size: _Window = ...,
                 softcap: float = ..., alibi_slopes: _A | None = ..., num_splits: int = ...) -> bytes: ...
