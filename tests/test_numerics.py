"""The CPU backend against the fp64 reference over the numerics grid (README, "Semantics")."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlflash
from numerics import DTYPES, WINDOWS, check_against_reference, make, varlen_inputs

def run_dense(B, Sq, Sk, Hq, Hk, D, Dv, dtype, seed=0, **opts):
    q = make((B, Sq, Hq, D), dtype, seed)
    k = make((B, Sk, Hk, D), dtype, seed + 1)
    v = make((B, Sk, Hk, Dv), dtype, seed + 2)
    out, lse, s_dmask = mtlflash.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    assert s_dmask.numel() == 0
    assert lse.shape == (B, Hq, Sq)
    check_against_reference(out, lse, q, k, v, **opts)
    return out, lse


LENGTHS = [(1, 1), (2, 2), (63, 63), (64, 64), (65, 65), (97, 97), (128, 128), (200, 200), (1025, 1025),
           (1, 200), (200, 1), (65, 128), (128, 65), (17, 1025)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", LENGTHS)
def test_lengths(sq, sk, causal):
    dtype = torch.bfloat16 if (sq + sk) % 2 else torch.float32
    run_dense(2, sq, sk, 2, 2, 64, 64, dtype, seed=sq * 7 + sk, causal=causal)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 256])
def test_head_dims(d, dtype):
    run_dense(1, 97, 130, 2, 1, d, d, DTYPES[dtype], seed=d, causal=d % 2 == 0)


@pytest.mark.parametrize("d,dv", [(64, 32), (192, 128), (40, 111), (128, 256), (256, 16)])
def test_value_head_dim_differs(d, dv):
    run_dense(2, 70, 90, 4, 2, d, dv, torch.float16, seed=d + dv, causal=True)


@pytest.mark.parametrize("hq,hk", [(8, 2), (6, 1), (4, 4), (12, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa(hq, hk, causal):
    run_dense(2, 50, 77, hq, hk, 64, 64, torch.bfloat16, seed=hq * 10 + hk, causal=causal)




@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("sq,sk", [(80, 80), (40, 120), (120, 40)])
def test_windows(window, sq, sk):
    run_dense(1, sq, sk, 2, 1, 64, 64, torch.float32, seed=sq + sk, window_size=window)


@pytest.mark.parametrize("window", [(4, -1), (10, 3)])
def test_causal_with_window(window):
    # causal=True forces the right bound to 0 and keeps the left bound
    q = make((1, 60, 2, 32), torch.float32, 1)
    k = make((1, 90, 2, 32), torch.float32, 2)
    v = make((1, 90, 2, 32), torch.float32, 3)
    out = mtlflash.flash_attn_func(q, k, v, causal=True, window_size=window)
    ref = mtlflash.flash_attn_func(q, k, v, window_size=(window[0], 0))
    assert torch.equal(out, ref)
    check_against_reference(out, None, q, k, v, causal=True, window_size=window)


def test_causal_equals_window_left_unbounded_right_zero():
    q = make((2, 33, 2, 64), torch.float16, 4)
    k = make((2, 47, 2, 64), torch.float16, 5)
    v = make((2, 47, 2, 64), torch.float16, 6)
    a = mtlflash.flash_attn_func(q, k, v, causal=True)
    b = mtlflash.flash_attn_func(q, k, v, window_size=(-1, 0))
    assert torch.equal(a, b)


def test_causal_bottom_right_rows_that_see_nothing():
    # Sq > Sk with causal: the first Sq - Sk rows see no key: output 0, lse +inf
    out, lse = run_dense(1, 10, 4, 1, 1, 16, 16, torch.float32, causal=True)
    assert torch.all(out[0, :6] == 0)
    assert torch.all(torch.isinf(lse[0, 0, :6]))
    assert torch.all(torch.isfinite(lse[0, 0, 6:]))
    # row 6 sees exactly key 0: its output is v[0]
    q = make((1, 10, 1, 16), torch.float32, 0)
    v = make((1, 4, 1, 16), torch.float32, 2)
    k = make((1, 4, 1, 16), torch.float32, 1)
    o = mtlflash.flash_attn_func(q, k, v, causal=True)
    assert torch.allclose(o[0, 6, 0], v[0, 0, 0])


@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(softcap, dtype, causal):
    out, _ = run_dense(1, 70, 70, 2, 2, 64, 64, DTYPES[dtype], seed=3, causal=causal, softcap=softcap)
    plain = mtlflash.flash_attn_func(*[make(s, DTYPES[dtype], 3 + i) for i, s in
                                       enumerate([(1, 70, 2, 64), (1, 70, 2, 64), (1, 70, 2, 64)])], causal=causal)
    assert not torch.equal(out, plain)  # softcap changes the result (scores ~ N(0, 8) are capped)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(50, 50), (30, 80)])
def test_alibi(per_batch, causal, sq, sk):
    B, H = 2, 4
    g = torch.Generator().manual_seed(7)
    slopes = torch.rand(B, H, generator=g) if per_batch else torch.rand(H, generator=g)
    run_dense(B, sq, sk, H, 2, 64, 64, torch.float16, seed=11, causal=causal, alibi_slopes=slopes)


def test_softmax_scale():
    run_dense(1, 40, 40, 2, 2, 64, 64, torch.float32, softmax_scale=0.37)
    run_dense(1, 40, 40, 2, 2, 64, 64, torch.float32, softmax_scale=0.0)


def test_all_options_together():
    slopes = torch.rand(2, 4)
    run_dense(2, 77, 100, 4, 2, 80, 48, torch.bfloat16, seed=5, causal=True, window_size=(20, -1),
              softcap=12.0, alibi_slopes=slopes, softmax_scale=0.1)


# --- varlen ---------------------------------------------------------------------------------

VARLEN = [
    ([5, 0, 1, 130, 64], [7, 3, 0, 100, 64]),
    ([1], [1]),
    ([0], [5]),
    ([200, 33], [50, 260]),
    ([3, 3, 3], [3, 3, 3]),
]


@pytest.mark.parametrize("lens", VARLEN)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_varlen(lens, causal, dtype):
    lens_q, lens_k = lens
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 4, 2, 64, 64, DTYPES[dtype], seed=len(lens_q))
    out, lse, _ = mtlflash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                  return_attn_probs=True)
    assert lse.shape == (4, q.shape[0])
    check_against_reference(out, lse, q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_varlen_matches_dense_per_sequence():
    lens_q, lens_k = [9, 40, 1], [20, 31, 7]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 2, 1, 32, 32, torch.float32, seed=3)
    out = mtlflash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 31, causal=True, window_size=(5, 2))
    for b in range(3):
        qb = q[cu_q[b]:cu_q[b + 1]][None]
        kb, vb = k[cu_k[b]:cu_k[b + 1]][None], v[cu_k[b]:cu_k[b + 1]][None]
        dense = mtlflash.flash_attn_func(qb, kb, vb, causal=True, window_size=(5, 2))
        assert torch.allclose(out[cu_q[b]:cu_q[b + 1]], dense[0], atol=1e-6)


def test_varlen_all_options():
    q, k, v, cu_q, cu_k = varlen_inputs([10, 0, 70], [30, 4, 50], 6, 2, 96, 64, torch.bfloat16, seed=8)
    slopes = torch.rand(3, 6)
    out, lse, _ = mtlflash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 70, 50, causal=True, window_size=(16, -1),
                                                  softcap=8.0, alibi_slopes=slopes, return_attn_probs=True)
    check_against_reference(out, lse, q, k, v, causal=True, window_size=(16, -1), softcap=8.0,
                            alibi_slopes=slopes, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_varlen_rows_past_the_last_sequence_are_zero():
    q, k, v, cu_q, cu_k = varlen_inputs([4, 6], [5, 5], 2, 2, 32, 32, torch.float32, extra_rows=3)
    out, lse, _ = mtlflash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 5, return_attn_probs=True)
    assert torch.all(out[10:] == 0) and torch.all(torch.isinf(lse[:, 10:]))
    check_against_reference(out, lse, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_max_seqlen_as_tensor():
    q, k, v, cu_q, cu_k = varlen_inputs([4, 6], [5, 5], 2, 2, 32, 32, torch.float32)
    a = mtlflash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, torch.tensor(6), torch.tensor(5))
    b = mtlflash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 5)
    assert torch.equal(a, b)


# --- layouts and packed entry points ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided_batch"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_non_contiguous_views(layout, dtype):
    dt = DTYPES[dtype]
    B, S, H, D = 2, 70, 4, 64
    if layout == "transposed":  # stored as (B, H, S, D)
        q, k, v = (make((B, H, S, D), dt, i).transpose(1, 2) for i in range(3))
    elif layout == "sliced":  # a wider last dim, sliced: unit last stride, larger row strides
        q, k, v = (make((B, S, H, D + 24), dt, i)[..., 8:8 + D] for i in range(3))
    else:  # every other batch entry, and a sequence slice
        q, k, v = (make((2 * B, S + 10, H, D), dt, i)[::2, 5:5 + S] for i in range(3))
    assert not q.is_contiguous()
    out, lse, _ = mtlflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    check_against_reference(out, lse, q, k, v, causal=True)
    dense = mtlflash.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, dense)


def test_qkvpacked():
    qkv = make((2, 65, 3, 4, 64), torch.bfloat16, 1)
    out, lse, _ = mtlflash.flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True)
    check_against_reference(out, lse, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)


def test_kvpacked():
    q = make((2, 40, 6, 64), torch.float16, 1)
    kv = make((2, 90, 2, 2, 64), torch.float16, 2)
    out, lse, _ = mtlflash.flash_attn_kvpacked_func(q, kv, window_size=(10, 10), return_attn_probs=True)
    check_against_reference(out, lse, q, kv[:, :, 0], kv[:, :, 1], window_size=(10, 10))


def test_varlen_qkvpacked():
    cu = torch.tensor([0, 5, 5, 70], dtype=torch.int32)
    qkv = make((70, 3, 2, 32), torch.float32, 3)
    out, lse, _ = mtlflash.flash_attn_varlen_qkvpacked_func(qkv, cu, 65, causal=True, return_attn_probs=True)
    check_against_reference(out, lse, qkv[:, 0], qkv[:, 1], qkv[:, 2], causal=True, cu_seqlens_q=cu,
                            cu_seqlens_k=cu)


def test_varlen_kvpacked():
    cu_q = torch.tensor([0, 3, 40], dtype=torch.int32)
    cu_k = torch.tensor([0, 10, 30], dtype=torch.int32)
    q = make((40, 4, 64), torch.bfloat16, 4)
    kv = make((30, 2, 1, 64), torch.bfloat16, 5)
    out, lse, _ = mtlflash.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 37, 20, causal=True,
                                                           return_attn_probs=True)
    check_against_reference(out, lse, q, kv[:, 0], kv[:, 1], causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


# --- NumPy --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_in_numpy_out(dtype):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 50, 4, 64)).astype(dtype)
    k = rng.standard_normal((2, 60, 2, 64)).astype(dtype)
    v = rng.standard_normal((2, 60, 2, 32)).astype(dtype)
    out, lse, s = mtlflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == (2, 50, 4, 32)
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32 and lse.shape == (2, 4, 50)
    assert isinstance(s, np.ndarray) and s.size == 0
    check_against_reference(out, lse, q, k, v, causal=True)


def test_numpy_varlen():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((30, 2, 32)).astype(np.float32)
    k = rng.standard_normal((30, 2, 32)).astype(np.float32)
    cu = np.array([0, 10, 30], dtype=np.int32)
    out = mtlflash.flash_attn_varlen_func(q, k, k, cu, cu, 20, 20, causal=True)
    assert isinstance(out, np.ndarray)
    check_against_reference(out, None, q, k, k, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)


# --- determinism ----------------------------------------------------------------------------

def test_bitwise_identical_across_thread_counts(monkeypatch):
    q = make((2, 300, 4, 64), torch.bfloat16, 1)
    k = make((2, 300, 2, 64), torch.bfloat16, 2)
    v = make((2, 300, 2, 64), torch.bfloat16, 3)
    results = []
    for n in ["1", "2", "3", "7"]:
        monkeypatch.setenv("MTLFLASH_NUM_THREADS", n)
        assert mtlflash.backend_info()["num_threads"] == int(n)
        out, lse, _ = mtlflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        results.append((out, lse))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    again = mtlflash.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(again, results[0][0])


def test_fully_masked_rows_are_zero_not_nan():
    # window (0, 0) with Sk < Sq: rows whose diagonal falls outside [0, Sk) see nothing
    out, lse = run_dense(1, 20, 5, 2, 2, 32, 32, torch.float16, window_size=(0, 0))
    assert torch.isinf(lse).any() and torch.isfinite(lse).any()


def _kv_layout(shape, dtype, seed, layout):
    """K or V (B, Sk, H, D) stored as asked: 'bshd' contiguous, 'bhsd' head by head (a transposed
    view), 'padded' with unused heads and elements around the ones the call sees."""
    B, Sk, H, D = shape
    if layout == "bshd":
        return make(shape, dtype, seed)
    if layout == "bhsd":
        return make((B, H, Sk, D), dtype, seed).transpose(1, 2)
    return make((B, Sk, H + 1, D + 8), dtype, seed)[:, :, 1:, 4:4 + D]


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "padded"])
@pytest.mark.parametrize("sq,hq,hk,opts", [
    (1, 8, 2, {}),                                   # decode: few columns, K/V read in place
    (3, 8, 2, {"causal": True}),                     # 12 columns: tiles packed per item
    (20, 4, 4, {"window_size": (700, 30)}),          # a row block per head, masked tiles
    (1, 6, 1, {"softcap": 20.0}),
])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_split_kv_layouts(layout, sq, hq, hk, opts, dtype):
    # Long keys and few work items: the keys are split over tasks that run every kv head of a
    # sequence tile by tile (and read each tile's rows of all heads in address order when the
    # heads sit side by side in memory).
    dt = DTYPES[dtype]
    B, Sk, D = 2, 2600, 64
    q = make((B, sq, hq, D), dt, 1)
    k = _kv_layout((B, Sk, hk, D), dt, 2, layout)
    v = _kv_layout((B, Sk, hk, D), dt, 3, layout)
    out, lse, _ = mtlflash.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    check_against_reference(out, lse, q, k, v, **opts)


@pytest.mark.parametrize("d,dv,dtype", [(320, 320, "bf16"), (512, 512, "fp32"), (576, 512, "fp16"), (512, 64, "bf16")])
def test_head_dims_beyond_256(d, dv, dtype):
    """The CPU backend serves q/k head dims up to 576 and v up to 512 for prefill as well."""
    run_dense(1, 100, 130, 4, 2, d, dv, DTYPES[dtype], seed=d + dv, causal=True)
    run_dense(2, 1, 700, 8, 1, d, dv, DTYPES[dtype], seed=d, window_size=(300, 0))
