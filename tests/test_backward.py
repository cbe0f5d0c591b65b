"""The backward pass (CPU tier) against the fp64 reference backward over the numerics grid, by
FlashAttention-2's acceptance rule (mtlflash.reference.compare_backward); determinism across
thread counts; a finite-difference check; bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlflash
from mtlflash import _C, reference
from numerics import DTYPES, WINDOWS, check_grads_against_reference, make, varlen_inputs

def grads_of(fn, inputs, dout_seed=99):
    """Runs fn on leaf copies of inputs, backpropagates a random dout; (out, dout, grads)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    if isinstance(out, tuple):
        out = out[0]
    dout = make(out.shape, out.dtype, dout_seed)
    out.backward(dout)
    return out, dout, [x.grad for x in leaves]


def run_dense(B, Sq, Sk, Hq, Hk, D, Dv, dtype, seed=0, **opts):
    q = make((B, Sq, Hq, D), dtype, seed)
    k = make((B, Sk, Hk, D), dtype, seed + 1)
    v = make((B, Sk, Hk, Dv), dtype, seed + 2)
    out, dout, g = grads_of(lambda a, b, c: mtlflash.flash_attn_func(a, b, c, **opts), (q, k, v))
    check_grads_against_reference(g, dout, q, k, v, **opts)
    return g


LENGTHS = [(1, 1), (2, 2), (47, 47), (48, 48), (49, 49), (95, 95), (96, 96), (97, 97), (193, 193),
           (1, 150), (150, 1), (65, 128), (128, 65), (17, 300)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", LENGTHS)
def test_lengths(sq, sk, causal):
    dtype = torch.bfloat16 if (sq + sk) % 2 else torch.float32
    run_dense(2, sq, sk, 2, 2, 64, 64, dtype, seed=sq * 7 + sk, causal=causal)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", [32, 40, 59, 64, 96, 128, 192, 256])
def test_head_dims(d, dtype):
    run_dense(1, 67, 110, 2, 1, d, d, DTYPES[dtype], seed=d, causal=d % 2 == 0)


@pytest.mark.parametrize("d,dv", [(64, 32), (192, 128), (40, 111), (128, 256), (256, 16)])
def test_value_head_dim_differs(d, dv):
    run_dense(2, 50, 70, 4, 2, d, dv, torch.float16, seed=d + dv, causal=True)


@pytest.mark.parametrize("hq,hk", [(8, 2), (6, 1), (4, 4), (12, 3), (64, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa(hq, hk, causal):
    run_dense(2, 30, 57, hq, hk, 32, 32, torch.bfloat16, seed=hq * 10 + hk, causal=causal)




@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("sq,sk", [(80, 80), (40, 150), (150, 40)])
def test_windows(window, sq, sk):
    run_dense(1, sq, sk, 2, 1, 32, 32, torch.float32, seed=sq + sk, window_size=window)


@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(softcap, dtype, causal):
    run_dense(1, 70, 100, 2, 2, 64, 64, DTYPES[dtype], seed=3, causal=causal, softcap=softcap)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(50, 50), (30, 80)])
def test_alibi(per_batch, causal, sq, sk):
    B, H = 2, 4
    g = torch.Generator().manual_seed(7)
    slopes = torch.rand(B, H, generator=g) if per_batch else torch.rand(H, generator=g)
    run_dense(B, sq, sk, H, 2, 64, 64, torch.float16, seed=11, causal=causal, alibi_slopes=slopes)


def test_alibi_slopes_get_no_gradient():
    slopes = torch.rand(2, requires_grad=True)
    q = make((1, 20, 2, 32), torch.float32, 1).requires_grad_()
    out = mtlflash.flash_attn_func(q, q, q, alibi_slopes=slopes)
    out.sum().backward()
    assert slopes.grad is None and q.grad is not None


def test_all_options_together():
    slopes = torch.rand(2, 4)
    run_dense(2, 77, 100, 4, 2, 80, 48, torch.bfloat16, seed=5, causal=True, window_size=(20, -1),
              softcap=12.0, alibi_slopes=slopes, softmax_scale=0.1)


def test_rows_that_see_no_key_get_zero_gradients():
    # Sq > Sk with causal: the first Sq - Sk rows see nothing
    dq, dk, dv = run_dense(1, 10, 4, 1, 1, 16, 16, torch.float32, causal=True)
    assert torch.all(dq[0, :6] == 0) and torch.isfinite(dq).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
    # a window that leaves some rows without keys
    g = run_dense(1, 20, 5, 2, 2, 32, 32, torch.float16, window_size=(0, 0))
    assert all(torch.isfinite(x).all() for x in g)


def test_return_attn_probs_is_differentiable():
    q, k, v = (make((1, 40, 2, 32), torch.float32, i).requires_grad_() for i in range(3))
    out, lse, s = mtlflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad and s.numel() == 0
    (out.sum() + lse.sum().detach()).backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


# --- varlen ---------------------------------------------------------------------------------

VARLEN = [
    ([5, 0, 1, 130, 64], [7, 3, 0, 100, 64]),
    ([1], [1]),
    ([0], [5]),
    ([150, 33], [50, 200]),
]


@pytest.mark.parametrize("lens", VARLEN)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_varlen(lens, causal, dtype):
    lens_q, lens_k = lens
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 4, 2, 64, 64, DTYPES[dtype], seed=len(lens_q))
    fn = lambda a, b, c: mtlflash.flash_attn_varlen_func(a, b, c, cu_q, cu_k, max(lens_q), max(lens_k),  # noqa: E731
                                                         causal=causal)
    _, dout, g = grads_of(fn, (q, k, v))
    check_grads_against_reference(g, dout, q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_varlen_all_options_and_tail_rows():
    q, k, v, cu_q, cu_k = varlen_inputs([10, 0, 70], [30, 4, 50], 6, 2, 96, 64, torch.bfloat16, seed=8,
                                        extra_rows=3)
    k = torch.cat([k, make((2, 2, 96), torch.bfloat16, 30)])  # key rows past the last sequence
    v = torch.cat([v, make((2, 2, 64), torch.bfloat16, 31)])
    slopes = torch.rand(3, 6)
    opts = dict(causal=True, window_size=(16, -1), softcap=8.0, alibi_slopes=slopes)
    fn = lambda a, b, c: mtlflash.flash_attn_varlen_func(a, b, c, cu_q, cu_k, 70, 50, **opts)  # noqa: E731
    _, dout, g = grads_of(fn, (q, k, v))
    check_grads_against_reference(g, dout, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)
    assert torch.all(g[0][80:] == 0) and torch.all(g[1][84:] == 0) and torch.all(g[2][84:] == 0)


# --- packed entry points return packed gradients ---------------------------------------------------

def test_qkvpacked():
    qkv = make((2, 65, 3, 4, 64), torch.bfloat16, 1)
    _, dout, (g,) = grads_of(lambda x: mtlflash.flash_attn_qkvpacked_func(x, causal=True), (qkv,))
    assert g.shape == qkv.shape and g.dtype == qkv.dtype
    check_grads_against_reference((g[:, :, 0], g[:, :, 1], g[:, :, 2]), dout, qkv[:, :, 0], qkv[:, :, 1],
                                  qkv[:, :, 2], causal=True)


def test_kvpacked():
    q = make((2, 40, 6, 64), torch.float16, 1)
    kv = make((2, 90, 2, 2, 64), torch.float16, 2)
    _, dout, (gq, gkv) = grads_of(lambda a, b: mtlflash.flash_attn_kvpacked_func(a, b, window_size=(10, 10)),
                                  (q, kv))
    assert gkv.shape == kv.shape
    check_grads_against_reference((gq, gkv[:, :, 0], gkv[:, :, 1]), dout, q, kv[:, :, 0], kv[:, :, 1],
                                  window_size=(10, 10))


def test_varlen_qkvpacked():
    cu = torch.tensor([0, 5, 5, 70], dtype=torch.int32)
    qkv = make((70, 3, 2, 32), torch.float32, 3)
    _, dout, (g,) = grads_of(lambda x: mtlflash.flash_attn_varlen_qkvpacked_func(x, cu, 65, causal=True), (qkv,))
    assert g.shape == qkv.shape
    check_grads_against_reference((g[:, 0], g[:, 1], g[:, 2]), dout, qkv[:, 0], qkv[:, 1], qkv[:, 2], causal=True,
                                  cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_varlen_kvpacked():
    cu_q = torch.tensor([0, 3, 40], dtype=torch.int32)
    cu_k = torch.tensor([0, 10, 30], dtype=torch.int32)
    q = make((40, 4, 64), torch.bfloat16, 4)
    kv = make((30, 2, 1, 64), torch.bfloat16, 5)
    fn = lambda a, b: mtlflash.flash_attn_varlen_kvpacked_func(a, b, cu_q, cu_k, 37, 20, causal=True)  # noqa: E731
    _, dout, (gq, gkv) = grads_of(fn, (q, kv))
    assert gkv.shape == kv.shape
    check_grads_against_reference((gq, gkv[:, 0], gkv[:, 1]), dout, q, kv[:, 0], kv[:, 1], causal=True,
                                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_inputs_and_dout(layout):
    B, S, H, D = 2, 70, 4, 64
    if layout == "transposed":
        q, k, v = (make((B, H, S, D), torch.float32, i).transpose(1, 2) for i in range(3))
    else:
        q, k, v = (make((B, S, H, D + 24), torch.float32, i)[..., 8:8 + D] for i in range(3))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = mtlflash.flash_attn_func(*leaves, causal=True)
    dout = make((B, H, S, D), torch.float32, 9).transpose(1, 2)  # a non-contiguous dout
    out.backward(dout)
    check_grads_against_reference([x.grad for x in leaves], dout, q, k, v, causal=True)


# --- the reference backward itself ----------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"softcap": 3.0, "window_size": (5, 9)},
                                  {"alibi_slopes": torch.rand(4, dtype=torch.float64), "causal": True}])
def test_reference_backward_matches_autograd_in_fp64(opts):
    q = make((2, 37, 4, 16), torch.float64, 1)
    k = make((2, 45, 2, 16), torch.float64, 2)
    v = make((2, 45, 2, 24), torch.float64, 3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = reference.attention(*leaves, compute_dtype=torch.float64, **opts)
    dout = make(out.shape, torch.float64, 4)
    auto = torch.autograd.grad(out, leaves, dout)
    mine = reference.attention_backward(dout, q, k, v, out.detach(), lse, compute_dtype=torch.float64, **opts)
    for a, b in zip(auto, mine[:3]):
        assert (a - b).abs().max().item() < 1e-12


def test_finite_differences_fp32():
    # the directional derivative of sum(out * w) along a random direction, against <grad, direction>
    torch.manual_seed(0)
    for opts in ({"causal": True}, {"softcap": 2.0, "window_size": (3, 2)}, {"alibi_slopes": torch.rand(2)}):
        q, k, v = (make((1, 9, 2, 8), torch.float32, i) for i in range(3))
        w = make((1, 9, 2, 8), torch.float32, 7)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        (mtlflash.flash_attn_func(*leaves, **opts) * w).sum().backward()
        for x, leaf in zip((q, k, v), leaves):
            d = make(x.shape, torch.float32, 11)
            eps = 1e-2

            def f(t, x=x, d=d):
                args = [t if y is x else y for y in (q, k, v)]
                return (mtlflash.flash_attn_func(*[a.double().float() for a in args], **opts).double() * w).sum()

            numeric = (f(x + eps * d) - f(x - eps * d)).item() / (2 * eps)
            analytic = (leaf.grad.double() * d).sum().item()
            assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (opts, numeric, analytic)


# --- determinism ----------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{"causal": True}, {"window_size": (30, 10), "softcap": 5.0}])
def test_bitwise_identical_across_thread_counts(monkeypatch, opts):
    q = make((2, 300, 4, 64), torch.bfloat16, 1)
    k = make((2, 250, 2, 64), torch.bfloat16, 2)
    v = make((2, 250, 2, 64), torch.bfloat16, 3)
    results = []
    for n in ["1", "2", "3", "7"]:
        monkeypatch.setenv("MTLFLASH_NUM_THREADS", n)
        _, _, g = grads_of(lambda a, b, c: mtlflash.flash_attn_func(a, b, c, **opts), (q, k, v))
        results.append(g)
    for g in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, results[0]))


def test_deterministic_flag_accepted():
    q = make((1, 30, 2, 32), torch.float16, 1)
    a = grads_of(lambda x: mtlflash.flash_attn_func(x, x, x, deterministic=True), (q,))[2][0]
    b = grads_of(lambda x: mtlflash.flash_attn_func(x, x, x, deterministic=False), (q,))[2][0]
    assert torch.equal(a, b)


# --- bad input ----------------------------------------------------------------------------

def _fwd(dtype=torch.float32):
    q, k, v = (make((1, 20, 2, 32), dtype, i) for i in range(3))
    out, lse, _ = mtlflash.flash_attn_func(q, k, v, return_attn_probs=True)
    return q, k, v, out, lse


def test_bad_dout_shape_and_dtype():
    q, k, v, out, lse = _fwd()
    with pytest.raises(ValueError, match=r"\[t\] dout: expected the shape of out"):
        _C.backward("t", out[:, :10], q, k, v, out, lse)
    with pytest.raises(TypeError, match=r"\[t\] dout: dtype torch.float16 does not match out's dtype"):
        _C.backward("t", out.half(), q, k, v, out, lse)


def test_missing_lse_and_out():
    q, k, v, out, lse = _fwd()
    with pytest.raises(ValueError, match=r"softmax_lse: the backward pass needs the forward's lse"):
        _C.backward("t", out, q, k, v, out, None)
    with pytest.raises(ValueError, match=r"out: the backward pass needs the forward's output"):
        _C.backward("t", out, q, k, v, None, lse)
    with pytest.raises(ValueError, match=r"lse: wrong shape"):
        _C.backward("t", out, q, k, v, out, lse[:, :1])


def test_bad_gradient_buffers():
    q, k, v, out, lse = _fwd()
    with pytest.raises(ValueError, match=r"\[t\] dk: expected the shape of k"):
        _C.backward("t", out, q, k, v, out, lse, dq=torch.empty_like(q), dk=torch.empty(1, 20, 1, 32),
                    dv=torch.empty_like(v))
    with pytest.raises(TypeError, match=r"\[t\] dq: dtype"):
        _C.backward("t", out, q, k, v, out, lse, dq=torch.empty_like(q, dtype=torch.float16))


def test_backward_refuses_paged_kv():
    q = make((10, 2, 32), torch.float32, 1).requires_grad_()
    cache = make((4, 8, 2, 32), torch.float32, 2)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    out = mtlflash.flash_attn_varlen_func(q, cache, cache, cu, cu, 10, 10, block_table=table)
    with pytest.raises(NotImplementedError, match="block_table"):
        out.sum().backward()


def test_numpy_backward_through_core():
    # the C core serves NumPy arrays too (no autograd: the caller passes dout)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 30, 2, 32)).astype(np.float32) for _ in range(3))
    out, lse, _ = mtlflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv, delta, tier = _C.backward("t", dout, q, k, v, out, lse, causal=True)
    assert tier == "cpu" and isinstance(dq, np.ndarray) and delta.shape == lse.shape
    check_grads_against_reference([torch.from_numpy(x) for x in (dq, dk, dv)], torch.from_numpy(dout),
                                  *(torch.from_numpy(x) for x in (q, k, v)), causal=True)


# --- the reference tier (what MPS tensors use) ------------------------------------------------

@pytest.mark.parametrize("opts", [{"causal": True}, {"softcap": 4.0, "window_size": (9, 3)}])
def test_reference_tier_backward(monkeypatch, opts):
    # MTLFLASH_KERNEL=reference runs forward and backward in torch, as for MPS tensors
    monkeypatch.setenv("MTLFLASH_KERNEL", "reference")
    from mtlflash import autograd

    q, k, v = make((2, 40, 4, 32), torch.bfloat16, 1), make((2, 50, 2, 32), torch.bfloat16, 2), \
        make((2, 50, 2, 32), torch.bfloat16, 3)
    _, dout, g = grads_of(lambda a, b, c: mtlflash.flash_attn_func(a, b, c, **opts), (q, k, v))
    assert autograd.last_tier[0] == "reference"
    check_grads_against_reference(g, dout, q, k, v, **opts)
    # FA2's private backward on the reference tier writes into the given buffers too
    from mtlflash import fa2_private as fa

    out, lse, _, rng = fa._flash_attn_forward(q, k, v, 0.0, None, opts.get("causal", False),
                                              *opts.get("window_size", (-1, -1)), opts.get("softcap", 0.0))
    bufs = [torch.empty_like(x) for x in (q, k, v)]
    fa._flash_attn_backward(dout, q, k, v, out, lse, *bufs, 0.0, None, opts.get("causal", False),
                            *opts.get("window_size", (-1, -1)), opts.get("softcap", 0.0), None, False, rng)
    check_grads_against_reference(bufs, dout, q, k, v, **opts)
