"""Property-based tests of the backward pass: random problems (the strategies of test_fuzz.py:
batch, heads with GQA/MQA, lengths around the tiling, head dims, Dv != D, dtype, layout, causal,
window, softcap, ALiBi, softmax_scale, varlen with empty sequences), gradients through autograd
checked against the fp64 reference backward by the acceptance rule (reference.compare_backward).

Same profiles as test_fuzz.py (MTLFLASH_FUZZ=ci | sanitize | large); the number of examples is
counted in test_fuzz's summary under "backward-dense" / "backward-varlen".
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mtlflash  # noqa: E402
from mtlflash import reference  # noqa: E402
from test_fuzz import (_PROFILE_NAME, DTYPES, PROFILE, STATS, _count, _in_layout, _randn, head_dims,  # noqa: E402
                       heads, lengths, options)

_BUDGET = {"ci": (60, 40), "sanitize": (25, 15), "large": (800, 500)}
N_DENSE, N_VARLEN = _BUDGET[PROFILE]
MAX_LEN = 200 if PROFILE == "large" else 100


def _grads(fn, inputs, gen):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    # the layout of each input survives clone(): strides are kept for dense tensors
    out = fn(*leaves)
    dout = _randn(out.shape, out.dtype, gen, 1.0)
    out.backward(dout)
    return dout, [x.grad for x in leaves]


def _check(grads, dout, q, k, v, **opts):
    res = reference.compare_backward(grads, dout, q, k, v, **opts)
    if not res.ok and q.dtype == torch.float32 and all("exceeds the bound" in p for p in res.problems):
        # fp32 with large scores: within twice a plain fp32 computation's error (as test_fuzz does)
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o, _ = reference.attention(*leaves, compute_dtype=torch.float32, **opts)
        naive = torch.autograd.grad(o, leaves, dout, allow_unused=True) if o.requires_grad else [None] * 3
        o64, l64 = reference.attention(q, k, v, compute_dtype=torch.float64, **opts)
        ref = reference.attention_backward(dout, q, k, v, o64, l64, compute_dtype=torch.float64, **opts)
        for g, n, r, (name, (_, b)) in zip(grads, naive, ref, res.errors.items()):
            n = torch.zeros_like(r) if n is None else n
            err = (g.double() - r).abs().max().item() if g.numel() else 0.0
            bound = 2 * ((n.double() - r).abs().max().item() if r.numel() else 0.0) + b
            assert err <= bound, f"{res!r}; {name} beyond twice the fp32 naive error ({err:.3g} > {bound:.3g})"
        STATS["fp32_large_score_fallbacks"] = STATS.get("fp32_large_score_fallbacks", 0) + 1
        return
    assert res.ok, repr(res)


@st.composite
def dense_case(draw):
    batch = draw(st.integers(1, 2))
    hq, hk = draw(heads())
    sq, sk = draw(lengths(MAX_LEN)), draw(lengths(MAX_LEN))
    d, dv = draw(head_dims())
    dtype = draw(st.sampled_from(list(DTYPES)))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    opts = draw(options(sk, batch, hq))
    return batch, hq, hk, sq, sk, d, dv, dtype, layout, opts, draw(st.integers(0, 2 ** 31 - 1))


@settings(settings.get_profile(_PROFILE_NAME), max_examples=N_DENSE)
@given(dense_case())
def test_fuzz_backward_dense(case):
    batch, hq, hk, sq, sk, d, dv, dtype, layout, opts, seed = case
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    q = _in_layout(_randn((batch, sq, hq, d), dt, gen, 1.0), layout, gen)
    k = _in_layout(_randn((batch, sk, hk, d), dt, gen, 1.0), layout, gen)
    v = _in_layout(_randn((batch, sk, hk, dv), dt, gen, 1.0), layout, gen)
    dout, grads = _grads(lambda a, b, c: mtlflash.flash_attn_func(a, b, c, **opts), (q, k, v), gen)
    _check(grads, dout, q, k, v, **opts)
    _count("backward-dense")


@st.composite
def varlen_case(draw):
    batch = draw(st.integers(1, 4))
    lens_q = [draw(lengths(MAX_LEN // 2)) for _ in range(batch)]
    lens_k = [draw(lengths(MAX_LEN // 2)) for _ in range(batch)]
    hq, hk = draw(heads())
    d, dv = draw(head_dims())
    dtype = draw(st.sampled_from(list(DTYPES)))
    extra_q, extra_k = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    opts = draw(options(max(lens_k), batch, hq))
    return lens_q, lens_k, hq, hk, d, dv, dtype, extra_q, extra_k, opts, draw(st.integers(0, 2 ** 31 - 1))


@settings(settings.get_profile(_PROFILE_NAME), max_examples=N_VARLEN)
@given(varlen_case())
def test_fuzz_backward_varlen(case):
    lens_q, lens_k, hq, hk, d, dv, dtype, extra_q, extra_k, opts, seed = case
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    cu_q = torch.tensor([0] + list(np.cumsum(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(np.cumsum(lens_k)), dtype=torch.int32)
    q = _randn((int(cu_q[-1]) + extra_q, hq, d), dt, gen, 1.0)
    k = _randn((int(cu_k[-1]) + extra_k, hk, d), dt, gen, 1.0)
    v = _randn((int(cu_k[-1]) + extra_k, hk, dv), dt, gen, 1.0)
    fn = lambda a, b, c: mtlflash.flash_attn_varlen_func(a, b, c, cu_q, cu_k, max(lens_q), max(lens_k),  # noqa: E731
                                                         **opts)
    dout, grads = _grads(fn, (q, k, v), gen)
    _check(grads, dout, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)
    if extra_q:
        assert torch.all(grads[0][int(cu_q[-1]):] == 0)
    if extra_k:
        assert torch.all(grads[1][int(cu_k[-1]):] == 0) and torch.all(grads[2][int(cu_k[-1]):] == 0)
    _count("backward-varlen")
