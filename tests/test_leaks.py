"""Leaks: reference counts over many calls (successful and failing), and resident memory over
repeated large calls.

A reference leaked per call on an input, an output, a dtype or a cached torch object shows as a
count that grows with the number of calls; a buffer leaked per call shows as resident memory
growing by about its size per call.
"""
from __future__ import annotations

import gc
import os
import sys

import numpy as np
import pytest
import torch

import mtlflash

SANITIZED = bool(os.environ.get("MTLFLASH_SANITIZED"))
N_CALLS = 2000 if SANITIZED else 10000


def _counts(objs):
    return [sys.getrefcount(o) for o in objs]


def test_refcounts_stable_over_many_calls_torch():
    f, vf = mtlflash.flash_attn_func, mtlflash.flash_attn_varlen_func
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    slopes = torch.rand(2)
    vq, vk = torch.randn(6, 2, 8), torch.randn(6, 1, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    bad_heads, half_v = torch.randn(1, 6, 3, 8), v.half()
    sparse = q.to_sparse()
    watched = [q, k, v, slopes, vq, vk, cu, bad_heads, half_v, sparse,
               torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.Tensor, torch]
    failing = [
        (lambda: f(q, bad_heads, bad_heads), ValueError),  # problem.c: 3 kv heads do not divide 2
        (lambda: f(q, k, half_v), TypeError),               # problem.c: dtype mismatch
        (lambda: f(sparse, k, v), TypeError),               # tensor.c: a Python error while reading the tensor
        (lambda: f(q, k, v, alibi_slopes=slopes[:1]), ValueError),
        (lambda: vf(vq, vk, vk, cu.flip(0), cu, 4, 4), ValueError),
        (lambda: f(q, k, v, window_size=None), TypeError),  # interface.py
        (lambda: f(q, k, {}), TypeError),
    ]
    def one_round(i):
        out, lse, _ = f(q, k, v, causal=True, alibi_slopes=slopes, return_attn_probs=True)
        assert sys.getrefcount(out) == 2 and sys.getrefcount(lse) == 2
        out = vf(vq, vk, vk, cu, cu, 4, 4, softcap=2.0)
        assert sys.getrefcount(out) == 2
        call, exc = failing[i % len(failing)]
        try:
            call()
        except exc:
            pass
        else:
            raise AssertionError("a failing call succeeded")

    for i in range(5 * len(failing)):  # warm-up: caches and lazily created objects
        one_round(i)
    gc.collect()
    before = _counts(watched)
    for i in range(N_CALLS):
        one_round(i)
    gc.collect()
    assert _counts(watched) == before


def test_refcounts_stable_over_many_calls_numpy():
    f = mtlflash.flash_attn_func
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 6, 2, 8)).astype(np.float32), rng.standard_normal((1, 6, 2, 8)).astype(np.float32)
    h = q.astype(np.float16)
    swapped = q.astype(">f4")
    slopes = np.ones(2, np.float32)
    cu = np.array([0, 6], np.int32)
    watched = [q, k, h, swapped, slopes, cu, np.dtype(np.float32), np.dtype(np.float16), np.ndarray, np]
    for _ in range(50):
        f(q, k, k)
    gc.collect()
    before = _counts(watched)
    for i in range(N_CALLS // 2):
        out, lse, empty = f(q, k, k, alibi_slopes=slopes, return_attn_probs=True)
        assert sys.getrefcount(out) == 2 and sys.getrefcount(lse) == 2
        out = f(h, h, h, causal=True)
        assert sys.getrefcount(out) == 2
        out = mtlflash.flash_attn_varlen_func(q[0], k[0], k[0], cu, cu, 6, 6)
        for bad in (lambda: f(swapped, swapped, swapped), lambda: f(q, k, h), lambda: f(q, k, k, alibi_slopes=cu)):
            try:
                bad()
            except TypeError:
                pass
            else:
                raise AssertionError("a failing call succeeded")
    del out, lse, empty
    gc.collect()
    assert _counts(watched) == before


def test_gc_tracked_objects_do_not_grow():
    q = torch.randn(1, 6, 2, 8)
    for _ in range(100):
        mtlflash.flash_attn_func(q, q, q, return_attn_probs=True)
    gc.collect()
    n0 = len(gc.get_objects())
    for _ in range(2000):
        mtlflash.flash_attn_func(q, q, q, return_attn_probs=True)
        try:
            mtlflash.flash_attn_func(q, q, q.double())
        except TypeError:
            pass
    gc.collect()
    assert len(gc.get_objects()) - n0 < 50


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
@pytest.mark.skipif(SANITIZED, reason="ASan's quarantine holds freed memory on purpose")
@pytest.mark.parametrize("kind", ["torch", "numpy", "varlen"])
def test_rss_stable_over_large_calls(kind):
    if kind == "numpy":
        q = np.random.default_rng(0).standard_normal((1, 512, 8, 128)).astype(np.float32)  # out: 2 MiB
        call = lambda: mtlflash.flash_attn_func(q, q, q, causal=True, return_attn_probs=True)  # noqa: E731
    elif kind == "varlen":
        q = torch.randn(1024, 8, 128)
        cu = torch.tensor([0, 300, 300, 1000], dtype=torch.int32)
        call = lambda: mtlflash.flash_attn_varlen_func(q, q, q, cu, cu, 700, 700, causal=True,  # noqa: E731
                                                       return_attn_probs=True)
    else:
        q = torch.randn(1, 512, 8, 128)
        call = lambda: mtlflash.flash_attn_func(q, q, q, causal=True, return_attn_probs=True)  # noqa: E731
    out_bytes = 512 * 8 * 128 * 4
    for _ in range(5):  # warm-up: the worker pool, allocator arenas, torch's caches
        call()
    gc.collect()
    rss0 = _rss_bytes()
    n = 40
    for _ in range(n):
        res = call()
        del res
    gc.collect()
    grown = _rss_bytes() - rss0
    # leaking the output alone would add n * 2 MiB = 80 MiB; allow allocator noise
    assert grown < 8 * out_bytes, f"resident memory grew by {grown / 2**20:.1f} MiB over {n} calls"


def test_refcounts_stable_over_many_kvcache_calls():
    """flash_attn_with_kvcache: the caches, index tensors, rotary tables and outputs (q_rot, which
    the call allocates and drops, included) keep their counts over successful and refused calls."""
    f = mtlflash.flash_attn_with_kvcache
    g = torch.Generator().manual_seed(0)
    q, kn, vn = torch.randn(2, 2, 4, 16, generator=g), torch.randn(2, 2, 2, 16, generator=g), torch.randn(2, 2, 2, 16, generator=g)
    kc, vc = torch.randn(9, 4, 2, 16, generator=g), torch.randn(9, 4, 2, 16, generator=g)
    table = torch.randperm(9, generator=g)[:8].reshape(2, 4).int()
    lens, pad = torch.tensor([3, 10], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)
    cos, sin = torch.rand(32, 4, generator=g), torch.rand(32, 4, generator=g)
    lens64 = lens.long()
    watched = [q, kn, vn, kc, vc, table, lens, pad, cos, sin, lens64, torch.int32, torch.float32]
    failing = [
        (lambda: f(q, kc, vc, kn, vn, cache_seqlens=lens64, block_table=table), TypeError),
        (lambda: f(q, kc, vc, kn, vn, cache_seqlens=lens + 20, block_table=table), ValueError),
        (lambda: f(q, kc, vc, kn, None, cache_seqlens=lens, block_table=table), ValueError),
    ]

    def one_round(i):
        out, lse = f(q, kc, vc, kn, vn, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens, cache_leftpad=pad,
                     block_table=table, causal=True, return_softmax_lse=True)
        assert sys.getrefcount(out) == 2 and sys.getrefcount(lse) == 2
        call, exc = failing[i % len(failing)]
        try:
            call()
        except exc:
            pass
        else:
            raise AssertionError("a failing call succeeded")

    def live_tensors():
        return sum(type(o) is torch.Tensor for o in gc.get_objects())

    for i in range(3 * len(failing)):
        one_round(i)
    gc.collect()
    before, tensors = _counts(watched), live_tensors()
    for i in range(N_CALLS // 5):
        one_round(i)
    gc.collect()
    assert _counts(watched) == before
    assert live_tensors() <= tensors  # no output (or q_rot) outlives its call
