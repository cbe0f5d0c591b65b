"""FlashAttention-2's private entry points (flash_attn 2.8.3 signatures): _flash_attn_backward and
_flash_attn_varlen_backward write into the given dq/dk/dv and return softmax_d; the _wrapped_*
aliases diffusers imports; _flash_attn_forward stays introspectable (ring-flash-attn reads its
defaults with inspect.getfullargspec)."""
from __future__ import annotations

import inspect

import pytest
import torch

import mtlflash
from mtlflash import fa2_private as fa
from numerics import check_grads_against_reference


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


FWD_ARGS = ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right",
            "softcap", "alibi_slopes", "return_softmax"]
BWD_ARGS = ["dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p", "softmax_scale", "causal",
            "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic", "rng_state"]
VARLEN_BWD_ARGS = (BWD_ARGS[:9] + ["cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"] + BWD_ARGS[9:]
                   + ["zero_tensors"])


def test_signatures_are_fa2s_and_introspectable():
    spec = inspect.getfullargspec(fa._flash_attn_forward)
    assert spec.args == FWD_ARGS
    assert dict(zip(spec.args[-len(spec.defaults):], spec.defaults)) == {
        "window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
        "return_softmax": False}
    assert inspect.getfullargspec(fa._flash_attn_backward).args == BWD_ARGS
    assert inspect.getfullargspec(fa._flash_attn_varlen_backward).args == VARLEN_BWD_ARGS
    assert fa._wrapped_flash_attn_backward is fa._flash_attn_backward
    assert fa._wrapped_flash_attn_varlen_backward is fa._flash_attn_varlen_backward
    assert mtlflash._flash_attn_backward is fa._flash_attn_backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_private_backward_writes_gradients_in_place(dtype, causal):
    q = make((2, 70, 4, 64), dtype, 1)
    k = make((2, 90, 2, 64), dtype, 2)
    v = make((2, 90, 2, 64), dtype, 3)
    out, lse, s_dmask, rng_state = fa._flash_attn_forward(q, k, v, 0.0, None, causal, -1, -1, 0.0, None, False)
    dout = make(out.shape, dtype, 4)
    # buffers wider than needed: gradients land in views with padded strides
    big = [torch.full((*x.shape[:-1], x.shape[-1] + 8), 7.0, dtype=dtype) for x in (q, k, v)]
    dq, dk, dv = (b[..., :x.shape[-1]] for b, x in zip(big, (q, k, v)))
    softmax_d = fa._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, None, causal, -1, -1, 0.0, None,
                                        False, rng_state)
    assert all(torch.all(b[..., -8:] == 7.0) for b in big)  # nothing written outside the views
    check_grads_against_reference((dq, dk, dv), dout, q, k, v, causal=causal)
    want = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    assert softmax_d.shape == lse.shape and softmax_d.dtype == torch.float32
    assert torch.allclose(softmax_d, want, atol=1e-5)
    # the same numbers as autograd through flash_attn_func (one core)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    mtlflash.flash_attn_func(*leaves, causal=causal).backward(dout)
    assert all(torch.equal(a.grad, b) for a, b in zip(leaves, (dq, dk, dv)))


def test_private_varlen_backward():
    cu_q = torch.tensor([0, 5, 5, 60], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 20, 80], dtype=torch.int32)
    q, k, v = make((60, 4, 32), torch.float16, 1), make((80, 2, 32), torch.float16, 2), make((80, 2, 32), torch.float16, 3)
    out, lse, _, rng = fa._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 55, 60, 0.0, 0.3, True, window_size_left=10)
    assert lse.shape == (4, 60)
    dout = make(out.shape, torch.float16, 4)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d = fa._flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, 55, 60, 0.0, 0.3, True, 10, -1,
                                       0.0, None, False, rng)
    assert d.shape == (4, 60)
    check_grads_against_reference((dq, dk, dv), dout, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  softmax_scale=0.3, causal=True, window_size=(10, -1))


def test_private_backward_without_buffers_and_bad_input():
    q, k, v = (make((1, 20, 2, 32), torch.float32, i) for i in range(3))
    out, lse, _, rng = fa._flash_attn_forward(q, k, v, 0.0, None, False)
    d = fa._flash_attn_backward(out, q, k, v, out, lse, None, None, None, 0.0, None, False)
    assert d.shape == lse.shape
    with pytest.raises(ValueError, match=r"\[_flash_attn_backward\] softmax_lse: the backward pass needs"):
        fa._flash_attn_backward(out, q, k, v, out, None, None, None, None, 0.0, None, False)
    with pytest.raises(ValueError, match=r"\[_flash_attn_backward\] dq: expected the shape of q"):
        fa._flash_attn_backward(out, q, k, v, out, lse, torch.empty(1, 20, 1, 32), None, None, 0.0, None, False)
    with pytest.raises(ValueError, match="rng_state"):
        fa._flash_attn_backward(out, q, k, v, out, lse, None, None, None, 0.5, None, False, rng_state=None)


def test_diffusers_tiny_dropout_returns_lse_and_drops_nothing():
    # diffusers' context-parallel path: dropout_p = 1e-30 whenever gradients are needed, to get lse
    q, k, v = (make((2, 40, 3, 16), torch.float32, i) for i in range(3))
    out0, lse0, _, _ = fa._wrapped_flash_attn_forward(q, k, v, 0.0, 0.3, True, -1, -1, 0.0, None, True)
    out1, lse1, _, rng = fa._wrapped_flash_attn_forward(q, k, v, 1e-30, 0.3, True, -1, -1, 0.0, None, False)
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)
    assert rng.dtype == torch.int64 and rng.shape == (2,)
    dout = make(out0.shape, torch.float32, 5)
    g0 = [torch.empty_like(x) for x in (q, k, v)]
    g1 = [torch.empty_like(x) for x in (q, k, v)]
    fa._wrapped_flash_attn_backward(dout, q, k, v, out0, lse0, *g0, 0.0, 0.3, True, -1, -1, 0.0, None, False, None)
    fa._wrapped_flash_attn_backward(dout, q, k, v, out1, lse1, *g1, 1e-30, 0.3, True, -1, -1, 0.0, None, False, rng)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
