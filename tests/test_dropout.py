"""Dropout (api-contract.md section 10): each probability kept with probability 1 - p and scaled by
1 / (1 - p); the mask comes from a counter-based Philox generator keyed by (seed, offset, sequence,
head, row, key), the same in the C core and in the reference (the oracle); the seed comes from
torch's default generator."""
from __future__ import annotations

import math

import pytest
import torch

import mtlflash
from mtlflash import autograd, reference
from mtlflash import fa2_private as fa
from numerics import check_against_reference, check_grads_against_reference


def make(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def probe(p, B=1, S=512, H=4, Sk=256, seed=0):
    """q = 0 makes every probability 1 / Sk; v = one-hot rows make out[b, i, h, j] = Z_ij / Sk, so
    the output shows the mask and the scaling directly. Returns (out * Sk, rng_state, inputs)."""
    q = torch.zeros(B, S, H, 16)
    k = make((B, Sk, H, 16), seed=seed)
    v = torch.eye(Sk).expand(B, H, Sk, Sk).permute(0, 2, 1, 3).contiguous()
    out, lse, _, rng = fa._flash_attn_forward(q, k, v, p, None, False)
    assert torch.allclose(lse, torch.full_like(lse, math.log(Sk)))  # lse ignores dropout
    return out * Sk, rng, (q, k, v)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.83])
def test_kept_fraction_and_scaling(p):
    z, _, _ = probe(p)
    n = z.numel()
    kept = (z > 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, (kept, 1 - p, sigma)
    vals = z[z > 0]
    assert torch.allclose(vals, torch.full_like(vals, 1 / (1 - p)), rtol=1e-5)  # survivors scaled by 1/(1-p)
    assert torch.all((z == 0) | (z > 0))


def test_mask_is_exactly_the_reference_generator():
    z, rng, (q, k, v) = probe(0.3, B=2, S=40, H=3, Sk=64)
    seed, offset = rng.tolist()
    for b in range(2):
        keep = reference.dropout_keep(0.3, seed, offset, b, 3, torch.arange(40), torch.arange(64))  # (H, S, Sk)
        assert torch.equal(z[b].permute(1, 0, 2) > 0, keep)
    ref, _ = reference.attention(q, k, v, dropout_p=0.3, rng_state=rng, compute_dtype=torch.float64)
    assert torch.allclose(z / 64, ref.float(), atol=1e-6)


def test_philox_known_answer():
    # Random123's published known-answer vector for Philox4x32-10: counter = key = 0
    assert int(reference.philox_word0(0, 0, 0, 0, 0, 0)) == 0x6627E8D5


def test_seed_from_torch_default_generator():
    q, k, v = (make((1, 64, 2, 32), seed=i) for i in range(3))
    torch.manual_seed(3)
    a = mtlflash.flash_attn_func(q, k, v, dropout_p=0.4)
    b = mtlflash.flash_attn_func(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    c = mtlflash.flash_attn_func(q, k, v, dropout_p=0.4)
    assert torch.equal(a, c) and not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [{"causal": True}, {"window_size": (10, 5), "softcap": 4.0},
                                  {"alibi_slopes": torch.rand(4)}])
def test_forward_and_gradients_through_dropout(dtype, opts):
    q = make((2, 70, 4, 32), dtype, 1)
    k = make((2, 90, 2, 32), dtype, 2)
    v = make((2, 90, 2, 32), dtype, 3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(11)
    out = mtlflash.flash_attn_func(*leaves, dropout_p=0.25, **opts)
    torch.manual_seed(11)
    rng = torch.tensor([autograd.draw_seed(), 0])
    check_against_reference(out.detach(), None, q, k, v, dropout_p=0.25, rng_state=rng, **opts)
    dout = make(out.shape, dtype, 4)
    out.backward(dout)
    check_grads_against_reference([x.grad for x in leaves], dout, q, k, v, dropout_p=0.25, rng_state=rng, **opts)


def test_varlen_dropout_gradients():
    cu_q = torch.tensor([0, 30, 30, 70], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 45, 90], dtype=torch.int32)
    q, k, v = make((70, 4, 32), seed=1), make((90, 2, 32), seed=2), make((90, 2, 32), seed=3)
    out, lse, _, rng = fa._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 40, 45, 0.5, None, True)
    check_against_reference(out, lse, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, dropout_p=0.5,
                            rng_state=rng)
    dout = make(out.shape, seed=4)
    g = [torch.empty_like(x) for x in (q, k, v)]
    fa._flash_attn_varlen_backward(dout, q, k, v, out, lse, *g, cu_q, cu_k, 40, 45, 0.5, None, True, -1, -1, 0.0, None,
                                   False, rng)
    check_grads_against_reference(g, dout, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True,
                                  dropout_p=0.5, rng_state=rng)


def test_p_zero_is_bitwise_no_dropout_and_tiny_p_drops_nothing():
    q, k, v = (make((2, 100, 4, 64), torch.bfloat16, i) for i in range(3))

    def run(p):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = mtlflash.flash_attn_func(*leaves, causal=True, dropout_p=p)
        out.backward(make(out.shape, torch.bfloat16, 9))
        return [out.detach()] + [x.grad for x in leaves]

    base = run(0.0)
    assert all(torch.equal(a, b) for a, b in zip(base, run(0)))  # int 0 as well
    assert all(torch.equal(a, b) for a, b in zip(base, run(1e-30)))  # diffusers' 1e-30


def test_p_one_drops_everything():
    q, k, v = (make((1, 20, 2, 16), seed=i).requires_grad_() for i in range(3))
    out = mtlflash.flash_attn_func(q, k, v, dropout_p=1.0)
    assert torch.all(out == 0)
    out.sum().backward()
    assert all(torch.all(x.grad == 0) for x in (q, k, v))


def test_dropout_bitwise_identical_across_thread_counts(monkeypatch):
    q, k, v = (make((2, 150, 4, 64), torch.float16, i) for i in range(3))
    results = []
    for n in ["1", "2", "5"]:
        monkeypatch.setenv("MTLFLASH_NUM_THREADS", n)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(5)
        out = mtlflash.flash_attn_func(*leaves, dropout_p=0.3, causal=True)
        out.backward(make(out.shape, torch.float16, 6))
        results.append([out.detach()] + [x.grad for x in leaves])
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))
