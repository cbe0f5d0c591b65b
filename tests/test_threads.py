"""Thread safety: many Python threads calling at once get bitwise the results of serial calls.

The C core releases the GIL around the compute, and its worker pool serves one call at a time
(a concurrent caller runs its call on its own thread), so concurrent calls must neither corrupt
each other nor change a single bit of any result, whatever MTLFLASH_NUM_THREADS says. (tests/
test_api.py covers one shape and the GIL release itself.)
"""
from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest
import torch

import mtlflash

N_THREADS = 8
ROUNDS = 2 if os.environ.get("MTLFLASH_SANITIZED") else 4  # each thread runs every call this many times


def _t(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _calls():
    """(name, zero-argument function) pairs: mixed shapes, dtypes, options, entry points, kinds."""
    f, vf = mtlflash.flash_attn_func, mtlflash.flash_attn_varlen_func
    calls = []
    q, k, v = _t((2, 150, 4, 64), torch.float32, 1), _t((2, 150, 2, 64), torch.float32, 2), _t((2, 150, 2, 64), torch.float32, 3)
    calls.append(("fp32 causal gqa", lambda: f(q, k, v, causal=True, return_attn_probs=True)[:2]))
    qh, kh = _t((1, 97, 8, 128), torch.float16, 4), _t((1, 130, 1, 128), torch.float16, 5)
    calls.append(("fp16 mqa window", lambda: f(qh, kh, kh, window_size=(20, 7))))
    qb = _t((3, 64, 2, 80), torch.bfloat16, 6)
    slopes = torch.rand(3, 2)
    calls.append(("bf16 softcap alibi", lambda: f(qb, qb, qb, softcap=5.0, alibi_slopes=slopes, return_attn_probs=True)[:2]))
    qd, vd = _t((1, 200, 2, 192), torch.float32, 7), _t((1, 200, 2, 128), torch.float32, 8)
    calls.append(("fp32 d192 dv128", lambda: f(qd, qd, vd, softmax_scale=0.3)))
    qt = _t((2, 4, 120, 32), torch.bfloat16, 9).transpose(1, 2)
    calls.append(("bf16 transposed", lambda: f(qt, qt, qt, causal=True)))
    cu = torch.tensor([0, 17, 17, 140, 141], dtype=torch.int32)
    vq, vk = _t((150, 6, 64), torch.float16, 10), _t((141, 3, 64), torch.float16, 11)
    calls.append(("varlen fp16", lambda: vf(vq, vk, vk, cu, cu, 123, 123, causal=True, return_attn_probs=True)[:2]))
    nq = np.random.default_rng(12).standard_normal((2, 90, 2, 48)).astype(np.float32)
    calls.append(("numpy fp32", lambda: f(nq, nq, nq, causal=True, return_attn_probs=True)[:2]))
    nh = np.random.default_rng(13).standard_normal((1, 60, 4, 16)).astype(np.float16)
    calls.append(("numpy fp16 small", lambda: f(nh, nh, nh)))
    qkv = _t((1, 80, 3, 2, 64), torch.float32, 14)
    calls.append(("qkvpacked", lambda: mtlflash.flash_attn_qkvpacked_func(qkv, causal=True)))
    tiny = _t((1, 1, 1, 8), torch.float32, 15)
    calls.append(("tiny", lambda: f(tiny, tiny, tiny)))
    empty = _t((1, 0, 2, 16), torch.float32, 16)
    calls.append(("empty", lambda: f(empty, empty, empty)))
    bad_q = _t((1, 8, 3, 16), torch.float32, 17)
    calls.append(("error", lambda: f(bad_q, q[:, :8, :2, :16], q[:, :8, :2, :16])))  # 3 heads vs 2: ValueError
    return calls


def _result(fn):
    try:
        r = fn()
    except ValueError as e:
        return ("ValueError", str(e))
    return r if isinstance(r, tuple) else (r,)


def _equal(a, b):
    if isinstance(a[0], str):
        return a == b
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            if not (x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)):
                return False
        elif not (x.dtype == y.dtype and torch.equal(x, y)):
            return False
    return True


@pytest.mark.parametrize("num_threads", [None, "1", "2", "3", "8"])
def test_concurrent_mixed_calls_bitwise_equal_serial(monkeypatch, num_threads):
    calls = _calls()
    serial = [_result(fn) for _, fn in calls]  # default thread count
    if num_threads is not None:
        monkeypatch.setenv("MTLFLASH_NUM_THREADS", num_threads)
    start = threading.Barrier(N_THREADS)
    failures, results = [], {}

    def worker(tid):
        order = [i for i in range(len(calls)) for _ in range(ROUNDS)]
        random.Random(tid).shuffle(order)
        start.wait()
        for i in order:
            got = _result(calls[i][1])
            if not _equal(got, serial[i]):
                failures.append((tid, calls[i][0]))
            results[tid] = results.get(tid, 0) + 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, f"results differ from the serial ones: {failures[:10]}"
    assert sum(results.values()) == N_THREADS * ROUNDS * len(calls)

