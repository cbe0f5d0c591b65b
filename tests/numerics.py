"""The numerical acceptance rule shared by every test (README, "How results are checked").

Low-precision inputs (fp16/bf16): compare with a reference computed in fp64 from the same inputs,
    max|out - ref| <= 2 * max|naive - ref| + slack,
where `naive` is the same attention computed entirely in the input dtype (what a plain
matmul-softmax-matmul in that dtype gets). fp32 inputs: a tight absolute tolerance. lse is
compared the same way; a row that sees no key must be +inf in both, and its output exactly 0.
"""
from __future__ import annotations

import numpy as np
import torch

from mtlflash import reference

FP32_ATOL = 5e-5
LOWP_SLACK = 1e-4


def to_torch(x):
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _max_abs(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check_against_reference(out, lse, q, k, v, **options):
    """Asserts out (and lse, when given) pass the acceptance rule. `options` are those of
    mtlflash.reference.attention (softmax_scale, causal, window_size, softcap, alibi_slopes,
    cu_seqlens_q, cu_seqlens_k). Returns (error, bound) of out for reporting."""
    out, lse = to_torch(out), to_torch(lse) if lse is not None else None
    q, k, v = to_torch(q), to_torch(k), to_torch(v)
    options = {key: to_torch(val) for key, val in options.items()}
    ref_out, ref_lse = reference.attention(q, k, v, compute_dtype=torch.float64, **options)
    assert out.shape == ref_out.shape, f"out shape {tuple(out.shape)} != reference {tuple(ref_out.shape)}"
    assert out.dtype == q.dtype, f"out dtype {out.dtype} != input dtype {q.dtype}"
    assert not torch.isnan(out).any(), "out has NaN"
    if q.dtype == torch.float32:
        bound_out, bound_lse = FP32_ATOL, FP32_ATOL
    else:
        naive_out, naive_lse = reference.attention(q, k, v, compute_dtype=q.dtype, **options)
        bound_out = 2 * _max_abs(naive_out, ref_out) + LOWP_SLACK
        finite = torch.isfinite(ref_lse) & torch.isfinite(naive_lse)
        bound_lse = 2 * _max_abs(naive_lse[finite], ref_lse[finite]) + LOWP_SLACK
    err_out = _max_abs(out, ref_out)
    assert err_out <= bound_out, f"out error {err_out:.3g} exceeds the bound {bound_out:.3g}"
    empty = torch.isinf(ref_lse)  # rows that see no key
    if lse is not None:
        assert lse.dtype == torch.float32, f"lse dtype {lse.dtype} != float32"
        assert lse.shape == ref_lse.shape, f"lse shape {tuple(lse.shape)} != reference {tuple(ref_lse.shape)}"
        assert not torch.isnan(lse).any(), "lse has NaN"
        assert torch.equal(torch.isinf(lse), empty), "lse is +inf on different rows than the reference"
        assert (lse[empty] > 0).all(), "lse of a row that sees no key must be +inf"
        err_lse = _max_abs(lse[~empty], ref_lse[~empty])
        assert err_lse <= bound_lse, f"lse error {err_lse:.3g} exceeds the bound {bound_lse:.3g}"
    return err_out, bound_out
