"""The numerical acceptance rule, as an assertion for tests (the rule itself lives in
mtlflash.reference.compare, so `python -m mtlflash check` applies exactly the same one).

Low-precision inputs (fp16/bf16): max|out - ref| <= 2 * max|naive - ref| + slack, with `ref` in
fp64 from the same inputs and `naive` computed entirely in the input dtype. fp32 inputs: a tight
absolute tolerance. lse likewise; rows that see no key must be +inf in both.
"""
from __future__ import annotations

import numpy as np
import torch

from mtlflash import reference

# the inputs of the numerics grids (tests/test_numerics.py forward, tests/test_backward.py backward)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WINDOWS = [(-1, 0), (0, 0), (16, -1), (-1, 16), (8, 8), (3, 5), (0, -1), (200, 300)]


def make(shape, dtype, seed, scale=1.0):
    """A seeded standard-normal tensor (times scale) in dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def varlen_inputs(lens_q, lens_k, hq, hk, d, dv, dtype, seed=0, extra_rows=0):
    """Packed q, k, v and int32 cu_seqlens for sequences of the given lengths; extra_rows rows of
    q past the last sequence."""
    cu_q = torch.tensor([0] + list(np.cumsum(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(np.cumsum(lens_k)), dtype=torch.int32)
    q = make((int(cu_q[-1]) + extra_rows, hq, d), dtype, seed)
    k = make((int(cu_k[-1]), hk, d), dtype, seed + 1)
    v = make((int(cu_k[-1]), hk, dv), dtype, seed + 2)
    return q, k, v, cu_q, cu_k


def check_against_reference(out, lse, q, k, v, **options):
    """Asserts out (and lse, when given) pass the acceptance rule; returns (error, bound)."""
    res = reference.compare(out, lse, q, k, v, **options)
    assert res.ok, "; ".join(res.problems)
    return res.err_out, res.bound_out


def check_grads_against_reference(grads, dout, q, k, v, **options):
    """Asserts (dq, dk, dv) pass the backward's acceptance rule (mtlflash.reference.compare_backward)."""
    res = reference.compare_backward(grads, dout, q, k, v, **options)
    assert res.ok, repr(res)
    return res
