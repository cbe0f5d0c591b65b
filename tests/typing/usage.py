"""A newcomer's use of mtlflash, type-checked with mypy --strict (tests/test_typing.py, CI).
The shapes and the tuple unpacking must type-check without casts."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

import mtlflash
from mtlflash import flash_attn_func, flash_attn_varlen_func


def torch_usage() -> tuple[int, ...]:
    q = torch.randn(1, 16, 4, 32)
    out = flash_attn_func(q, q, q, causal=True)
    shape: torch.Size = out.shape  # a Tensor, not a tuple
    out2, lse, _ = flash_attn_func(q, q, q, window_size=(8, 0), return_attn_probs=True)
    lse_f: torch.Tensor = lse.float()
    cu = torch.tensor([0, 16], dtype=torch.int32)
    x = torch.randn(16, 4, 32)
    out3: torch.Tensor = flash_attn_varlen_func(x, x, x, cu, cu, 16, 16)
    res = flash_attn_func(q, q, q, return_attn_probs=bool(len(shape)))  # only known at run time
    assert isinstance(res, (tuple, torch.Tensor))
    return tuple(shape) + tuple(out2.shape) + tuple(lse_f.shape) + tuple(out3.shape)


def numpy_usage() -> npt.NDArray[np.float32]:
    q = np.ones((1, 8, 2, 16), np.float32)
    out = mtlflash.flash_attn_func(q, q, q)
    _, lse, _ = mtlflash.flash_attn_func(q, q, q, return_attn_probs=True)
    assert lse.dtype == np.float32
    return out.astype(np.float32)


def kvcache_usage() -> torch.Tensor:
    q = torch.randn(1, 1, 4, 32)
    cache = torch.zeros(1, 64, 4, 32)
    out, lse = mtlflash.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3, return_softmax_lse=True)
    only_out: torch.Tensor = mtlflash.flash_attn_with_kvcache(q, cache, cache)
    return out + lse.sum() + only_out


info: dict[str, object] = mtlflash.backend_info()
version: str = mtlflash.__version__
