"""The numerical acceptance rule, as an assertion for tests (the rule itself lives in
mtlflash.reference.compare, so `python -m mtlflash check` applies exactly the same one).

Low-precision inputs (fp16/bf16): max|out - ref| <= 2 * max|naive - ref| + slack, with `ref` in
fp64 from the same inputs and `naive` computed entirely in the input dtype. fp32 inputs: a tight
absolute tolerance. lse likewise; rows that see no key must be +inf in both.
"""
from __future__ import annotations

from mtlflash import reference


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
