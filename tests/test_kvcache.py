"""flash_attn_with_kvcache and paged varlen K/V on the CPU backend, against the reference.

Each case checks the output and lse by the acceptance rule and the caches after the call (new v
rows bitwise, rotated k within tolerance, everything else bitwise unchanged); see
tests/kvcache_cases.py."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import mtlflash
from kvcache_cases import KVCase, check_call, make_call, ref_kwargs
from mtlflash import reference
from numerics import check_against_reference

BASE = KVCase()
BF16 = torch.bfloat16
F16 = torch.float16

CASES = {
    # new rows: none, one, several (chunked prefill / speculative decoding)
    "s_new=0": BASE.with_(seqlen_new=0),
    "s_new=1": BASE,
    "s_new=5,sq=5,causal": BASE.with_(seqlen_new=5, seqlen_q=5, opts={"causal": True}),
    "sq=7,s_new=3": BASE.with_(seqlen_new=3, seqlen_q=7, opts={"causal": True}, dtype=F16),
    # cache_seqlens: 0 and capacity - S_new; an int; None
    "lengths 0 and full": BASE.with_(seqlen_new=2, lengths=(0, 98)),
    "int seqlens": BASE.with_(int_seqlens=True, dtype=BF16),
    "no seqlens": BASE.with_(seqlen_new=0, no_seqlens=True, seqlen_q=3, opts={"causal": True}),
    # layouts
    "batch_idx": BASE.with_(batch_idx=True, seqlen_new=2),
    "leftpad": BASE.with_(leftpad=True, seqlen_new=2, seqlen_q=2, opts={"causal": True}),
    "leftpad window": BASE.with_(leftpad=True, opts={"window_size": (7, 0)}),
    "page 1": BASE.with_(page_size=1, capacity=40),
    "page 16": BASE.with_(page_size=16, capacity=100, seqlen_new=3, seqlen_q=3, opts={"causal": True}),
    "page 256": BASE.with_(page_size=256, capacity=512, seqlen_new=2, dtype=BF16),
    "page 7 lengths 0 and full": BASE.with_(page_size=7, capacity=70, seqlen_new=4, lengths=(0, 66)),
    "paged leftpad": BASE.with_(page_size=16, leftpad=True, capacity=96),
    # rotary: interleaved and not, rotary_dim < D, q per row (causal / local) or at cache_seqlens
    "rotary interleaved": BASE.with_(rotary_dim=32, seqlen_new=3, seqlen_q=3, opts={"causal": True}),
    "rotary halves": BASE.with_(rotary_dim=32, interleaved=False, seqlen_new=3, seqlen_q=3),
    "rotary full bf16 local": BASE.with_(rotary_dim=64, dtype=BF16, seqlen_new=2, seqlen_q=2,
                                         opts={"window_size": (10, 3)}),
    "rotary paged fp16": BASE.with_(rotary_dim=16, interleaved=False, page_size=16, dtype=F16, seqlen_new=4,
                                    seqlen_q=4, opts={"causal": True}),
    # attention options
    "causal": BASE.with_(seqlen_q=4, seqlen_new=4, opts={"causal": True}),
    "local": BASE.with_(seqlen_q=4, seqlen_new=2, opts={"window_size": (5, 2)}),
    "softcap": BASE.with_(opts={"softcap": 3.0}, dtype=BF16),
    "alibi": BASE.with_(alibi=True, seqlen_q=3, seqlen_new=3, opts={"causal": True}),
    "gqa": BASE.with_(heads_q=8, heads_k=2, page_size=16),
    "mqa": BASE.with_(heads_q=6, heads_k=1),
    "dv != d": BASE.with_(head_dim=96, head_dim_v=40, page_size=16),
    "scale": BASE.with_(opts={"softmax_scale": 0.3}),
    # MLA decode (DeepSeek, absorbed projections): q/k 576, v 512, one kv head
    "mla 576/512": BASE.with_(head_dim=576, head_dim_v=512, heads_q=16, heads_k=1, page_size=16, capacity=64,
                              dtype=BF16),
    "mla 576/512 fp32 split": BASE.with_(head_dim=576, head_dim_v=512, heads_q=8, heads_k=1, capacity=2600,
                                         page_size=64, batch=1, lengths=(2500,), opts={"num_splits": 0}),
    # long caches: the split-KV path (heuristic and forced), dense and paged
    "split heuristic": BASE.with_(capacity=3000, batch=1, lengths=(2900,), dtype=BF16),
    "split paged 16": BASE.with_(capacity=3000, batch=1, page_size=16, lengths=(2990,), heads_q=8),
    "split forced 5": BASE.with_(capacity=600, opts={"num_splits": 5}),
    "no split": BASE.with_(capacity=3000, batch=1, lengths=(2900,), opts={"num_splits": 1}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kvcache(name):
    check_call(CASES[name])


@pytest.mark.parametrize("dtype", [torch.float32, F16, BF16])
@pytest.mark.parametrize("page_size", [0, 1, 16, 256])
def test_dtypes_and_pages(dtype, page_size):
    check_call(BASE.with_(dtype=dtype, page_size=page_size, capacity=300, seqlen_new=2, seqlen_q=2,
                          rotary_dim=32, opts={"causal": True}, seed=page_size))


def test_lse_and_return_forms():
    args, _ = make_call(BASE.with_(seqlen_new=0))
    out = mtlflash.flash_attn_with_kvcache(**args)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 4, 64)
    out2, lse = mtlflash.flash_attn_with_kvcache(**args, return_softmax_lse=True)
    assert torch.equal(out, out2) and lse.shape == (2, 4, 1) and lse.dtype == torch.float32


def test_empty_cache_row_sees_nothing():
    """A sequence with an empty cache and no new rows sees no key: zero output, lse +inf."""
    args, _ = make_call(BASE.with_(seqlen_new=0, lengths=(0, 5)))
    out, lse = mtlflash.flash_attn_with_kvcache(**args, return_softmax_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all()
    assert torch.isfinite(lse[1]).all()


def test_signature_is_fa2():
    names = list(inspect.signature(mtlflash.flash_attn_with_kvcache).parameters)
    assert names == ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
                     "cache_batch_idx", "cache_leftpad", "block_table", "softmax_scale", "causal", "window_size",
                     "softcap", "rotary_interleaved", "alibi_slopes", "num_splits", "return_softmax_lse"]


@pytest.mark.parametrize("paged", [False, True])
def test_thread_count_invariance(monkeypatch, paged):
    """Bitwise the same output and cache for 1, 2 and 3 threads, split or not."""
    case = BASE.with_(capacity=2500, batch=1, lengths=(2400,), page_size=16 if paged else 0, seqlen_new=2,
                      seqlen_q=2, rotary_dim=32, dtype=BF16, opts={"causal": True})
    results = []
    for n in ("1", "2", "3"):
        monkeypatch.setenv("MTLFLASH_NUM_THREADS", n)
        results.append(check_call(case))
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


def test_num_splits_changes_nothing_but_speed():
    case = BASE.with_(capacity=3000, batch=1, lengths=(2999,), seqlen_new=0)
    outs = [check_call(case.with_(opts={"num_splits": n}))[0] for n in (0, 1, 3, 200)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-6, rtol=0)


def test_numpy_arrays():
    args, lengths = make_call(BASE.with_(seqlen_new=2, seqlen_q=2, dtype=torch.float16, rotary_dim=16,
                                         opts={"causal": True}))
    np_args = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    kc0, vc0 = np_args["k_cache"].copy(), np_args["v_cache"].copy()
    out = mtlflash.flash_attn_with_kvcache(**np_args)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16
    res = reference.compare_kvcache(out, None, args["q"], torch.from_numpy(kc0), torch.from_numpy(vc0), factor=3.0,
                                    **ref_kwargs(args))
    assert res.ok, res.problems
    assert not np.array_equal(np_args["v_cache"], vc0)  # the arrays were written in place


def test_numpy_read_only_cache_refused():
    args, _ = make_call(BASE.with_(dtype=torch.float32))
    np_args = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    np_args["k_cache"].setflags(write=False)
    before = np_args["v_cache"].copy()
    with pytest.raises(ValueError, match=r"k_cache: is read-only"):
        mtlflash.flash_attn_with_kvcache(**np_args)
    assert np.array_equal(np_args["v_cache"], before)
    # without new rows nothing is written, so a read-only cache is fine
    np_args.pop("k"), np_args.pop("v")
    mtlflash.flash_attn_with_kvcache(**np_args)


# --- paged K/V for varlen prefill (flash_attn_varlen_func(..., block_table=...)) ---------------


@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_paged(page_size, dtype, causal):
    g = torch.Generator().manual_seed(page_size)
    lens_q, lens_k = [5, 0, 37, 64], [9, 3, 37, 300]
    hq, hk, d = 4, 2, 64
    max_blocks = -(-max(lens_k) // page_size)
    nb = len(lens_k) * max_blocks + 2
    kc = torch.randn(nb, page_size, hk, d, generator=g).to(dtype)
    vc = torch.randn(nb, page_size, hk, d, generator=g).to(dtype)
    table = torch.randperm(nb, generator=g)[: len(lens_k) * max_blocks].reshape(len(lens_k), max_blocks).int()
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    cu_q = torch.tensor(np.cumsum([0] + lens_q), dtype=torch.int32)
    cu_k = torch.tensor(np.cumsum([0] + lens_k), dtype=torch.int32)
    out, lse, _ = mtlflash.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                  block_table=table, return_attn_probs=True)
    check_against_reference(out, lse, q, kc, vc, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal,
                            block_table=table)
    # the same keys laid out densely give the same answer
    dense_k = torch.cat([reference._paged_keys(kc, table[b], n) for b, n in enumerate(lens_k)])
    dense_v = torch.cat([reference._paged_keys(vc, table[b], n) for b, n in enumerate(lens_k)])
    out_dense = mtlflash.flash_attn_varlen_func(q, dense_k, dense_v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                causal=causal)
    torch.testing.assert_close(out, out_dense, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)


def test_varlen_paged_bad_input():
    q = torch.randn(10, 2, 16)
    kc = torch.randn(4, 8, 2, 16)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_table: entry \(0, 1\) is 9, outside \[0, 4\)"):
        mtlflash.flash_attn_varlen_func(q, kc, kc, cu, cu, 10, 10, block_table=torch.tensor([[0, 9]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_k: sequence 0 has 10 keys, more than its block_table row"):
        mtlflash.flash_attn_varlen_func(q, kc, kc, cu, cu, 10, 10, block_table=torch.tensor([[0]], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"block_table: expected dtype torch.int32 \(FlashAttention-2 requires int32\)"):
        mtlflash.flash_attn_varlen_func(q, kc, kc, cu, cu, 10, 10, block_table=torch.tensor([[0, 1]]))


def test_shim_serves_kvcache(tmp_path):
    """The flash_attn shim exports flash_attn_with_kvcache at the top level and in
    flash_attn.flash_attn_interface (fresh interpreter, MTLFLASH_SHIM=on)."""
    import os
    import subprocess
    import sys

    code = ("import flash_attn, flash_attn.flash_attn_interface as fi, mtlflash; "
            "assert flash_attn.flash_attn_with_kvcache is mtlflash.flash_attn_with_kvcache; "
            "assert fi.flash_attn_with_kvcache is mtlflash.flash_attn_with_kvcache; print('ok')")
    env = dict(os.environ, MTLFLASH_SHIM="on")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_rotary_with_zero_new_rows_still_rotates_q():
    """k/v given with 0 rows: nothing is appended, but q is still rotated (as FA2's kernel does
    whenever new k/v are passed)."""
    case = BASE.with_(seqlen_new=0, seqlen_q=3, rotary_dim=32, opts={"causal": True})
    args, _ = make_call(case)
    g = torch.Generator().manual_seed(5)
    args["k"] = torch.randn(2, 0, 2, 64, generator=g)
    args["v"] = torch.randn(2, 0, 2, 64, generator=g)
    seqlen_ro = 200
    ang = torch.rand(seqlen_ro, 16, generator=g) * 6
    args["rotary_cos"], args["rotary_sin"] = ang.cos(), ang.sin()
    k0, v0 = args["k_cache"].clone(), args["v_cache"].clone()
    out, lse = mtlflash.flash_attn_with_kvcache(**args, return_softmax_lse=True)
    res = reference.compare_kvcache(out, lse, args["q"], k0, v0, **ref_kwargs(args))
    assert res.ok, res.problems
    plain = mtlflash.flash_attn_with_kvcache(**{**args, "rotary_cos": None, "rotary_sin": None})
    assert not torch.allclose(out, plain)  # the rotation made a difference
    assert torch.equal(args["k_cache"], k0) and torch.equal(args["v_cache"], v0)
