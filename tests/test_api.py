"""The public API's contract: signatures, returns, errors for bad input, tiers, env knobs."""
from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch

import mtlflash

OPTS = ["dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
        "return_attn_probs"]
SIGNATURES = {
    "flash_attn_func": ["q", "k", "v"] + OPTS,
    "flash_attn_qkvpacked_func": ["qkv"] + OPTS,
    "flash_attn_kvpacked_func": ["q", "kv"] + OPTS,
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
    + OPTS + ["block_table"],
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"] + OPTS,
    "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                        "max_seqlen_k"] + OPTS,
}
DEFAULTS = {"dropout_p": 0.0, "softmax_scale": None, "causal": False, "window_size": (-1, -1), "softcap": 0.0,
            "alibi_slopes": None, "deterministic": False, "return_attn_probs": False, "block_table": None}


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_signatures_match_flash_attn(name):
    sig = inspect.signature(getattr(mtlflash, name))
    assert list(sig.parameters) == SIGNATURES[name]
    for p in sig.parameters.values():
        if p.name in DEFAULTS:
            assert p.default == DEFAULTS[p.name], p.name
        else:
            assert p.default is inspect.Parameter.empty, p.name


def qkv(B=1, S=8, H=2, D=16, dtype=torch.float32):
    return (torch.randn(B, S, H, D, dtype=dtype) for _ in range(3))


def test_returns_single_tensor_without_probs():
    q, k, v = qkv()
    out = mtlflash.flash_attn_func(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_diffusers_style_unpacking():
    q, k, v = qkv()
    out, lse, *_ = mtlflash.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (1, 2, 8) and lse.dtype == torch.float32


def test_dropout_needs_torch_tensors():
    q, k, v = (t.numpy() for t in qkv())
    with pytest.raises(NotImplementedError, match="dropout"):
        mtlflash.flash_attn_func(q, k, v, dropout_p=0.1)
    assert mtlflash.flash_attn_func(q, k, v, dropout_p=0.0).shape == q.shape


def test_block_table_needs_a_paged_cache():
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k: expected 4 dimensions \(num_blocks, page_size"):
        mtlflash.flash_attn_varlen_func(q, q, q, cu, cu, 8, 8, block_table=torch.zeros(1, 1, dtype=torch.int32))


def test_deterministic_is_accepted():
    q, k, v = qkv()
    assert torch.equal(mtlflash.flash_attn_func(q, k, v, deterministic=True), mtlflash.flash_attn_func(q, k, v))


def test_window_size_as_list_and_tensor():
    q, k, v = qkv(S=30)
    a = mtlflash.flash_attn_func(q, k, v, window_size=(3, 2))
    assert torch.equal(a, mtlflash.flash_attn_func(q, k, v, window_size=[3, 2]))
    assert torch.equal(a, mtlflash.flash_attn_func(q, k, v, window_size=torch.tensor([3, 2])))


def test_backward_runs_and_forward_matches_no_grad():
    q, k, v = (t.requires_grad_() for t in qkv())
    out = mtlflash.flash_attn_func(q, k, v, causal=True)
    assert out.requires_grad
    with torch.no_grad():
        assert torch.equal(out.detach(), mtlflash.flash_attn_func(q, k, v, causal=True))
    out.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))


# --- bad input: (description, call, exception, text the message must contain) ---------------

def _q(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


GOOD = dict(q=_q(1, 8, 2, 16), k=_q(1, 8, 2, 16), v=_q(1, 8, 2, 16))
CU = torch.tensor([0, 3, 8], dtype=torch.int32)
VQ = _q(8, 2, 16)


def dense(**over):
    args = {**GOOD, **over}
    return lambda: mtlflash.flash_attn_func(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def varlen(**over):
    args = dict(q=VQ, k=VQ, v=VQ, cu_seqlens_q=CU, cu_seqlens_k=CU, max_seqlen_q=5, max_seqlen_k=5)
    args.update(over)
    return lambda: mtlflash.flash_attn_varlen_func(**args)


BAD = [
    ("q float64", dense(q=_q(1, 8, 2, 16, dtype=torch.float64)), TypeError, "q: expected dtype"),
    ("q int32", dense(q=torch.zeros(1, 8, 2, 16, dtype=torch.int32)), TypeError, "q: expected dtype"),
    ("k dtype differs", dense(k=_q(1, 8, 2, 16, dtype=torch.float16)), TypeError, "k: dtype"),
    ("v dtype differs", dense(v=_q(1, 8, 2, 16, dtype=torch.bfloat16)), TypeError, "v: dtype"),
    ("q 3-d", dense(q=_q(8, 2, 16)), ValueError, "q: expected 4 dimensions"),
    ("k 5-d", dense(k=_q(1, 1, 8, 2, 16)), ValueError, "k: expected 4 dimensions"),
    ("batch differs", dense(k=_q(2, 8, 2, 16), v=_q(2, 8, 2, 16)), ValueError, "k: batch size"),
    ("v seqlen differs", dense(v=_q(1, 9, 2, 16)), ValueError, "v: sequence length"),
    ("v heads differ", dense(v=_q(1, 8, 1, 16)), ValueError, "v: number of heads"),
    ("Hq % Hk", dense(q=_q(1, 8, 3, 16)), ValueError, "k: its 2 heads must divide q's 3"),
    ("head dim differs", dense(k=_q(1, 8, 2, 32), v=_q(1, 8, 2, 32)), ValueError, "k: head dim"),
    ("D > 576", dense(q=_q(1, 8, 2, 584), k=_q(1, 8, 2, 584), v=_q(1, 8, 2, 64)), ValueError, "q: head dim"),
    ("Dv > 512", dense(v=_q(1, 8, 2, 520)), ValueError, "v: head dim"),
    ("non-unit last stride", dense(q=_q(1, 8, 2, 32)[..., ::2]), ValueError, "q: the last dimension"),
    ("q a list", dense(q=[[1.0]]), TypeError, "q: expected a torch.Tensor or numpy.ndarray"),
    ("k None", dense(k=None), TypeError, "k: expected a torch.Tensor"),
    ("numpy float64", dense(q=np.zeros((1, 8, 2, 16)), k=np.zeros((1, 8, 2, 16)), v=np.zeros((1, 8, 2, 16))),
     TypeError, "q: expected dtype float16 or float32, got float64"),
    ("numpy mixed with torch", dense(q=np.zeros((1, 8, 2, 16), np.float32)), TypeError, "k: is a torch.Tensor"),
    ("meta device", dense(q=torch.empty(1, 8, 2, 16, device="meta")), ValueError, "q: tensors on device 'meta'"),
    ("window one int", dense(window_size=3), TypeError, "window_size: expected two ints"),
    ("window three ints", dense(window_size=(1, 2, 3)), TypeError, "window_size"),
    ("window floats", dense(window_size=(1.5, 2)), TypeError, "window_size"),
    ("negative softcap", dense(softcap=-1.0), ValueError, "softcap: must be a finite number >= 0"),
    ("nan softcap", dense(softcap=float("nan")), ValueError, "softcap"),
    ("softcap string", dense(softcap="big"), TypeError, "softcap: expected a float"),
    ("softmax_scale string", dense(softmax_scale="x"), TypeError, "softmax_scale: expected a float"),
    ("softmax_scale inf", dense(softmax_scale=float("inf")), ValueError, "softmax_scale: must be a finite"),
    ("dropout string", dense(dropout_p="a"), TypeError, "dropout_p"),
    ("dropout negative", dense(dropout_p=-0.5), ValueError, "dropout_p"),
    ("causal string", dense(causal="yes"), TypeError, "causal: expected a bool"),
    ("alibi float16", dense(alibi_slopes=torch.ones(2, dtype=torch.float16)), TypeError, "alibi_slopes: expected dtype"),
    ("alibi wrong shape", dense(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes: expected shape"),
    ("alibi wrong batch", dense(alibi_slopes=torch.ones(4, 2)), ValueError, "alibi_slopes: expected shape"),
    ("alibi a list", dense(alibi_slopes=[1.0, 2.0]), TypeError, "alibi_slopes: expected a torch.Tensor"),
    ("cu int64", varlen(cu_seqlens_q=CU.long()), TypeError, "cu_seqlens_q: expected dtype torch.int32"),
    ("cu not monotone", varlen(cu_seqlens_k=torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError,
     "cu_seqlens_k: must be non-decreasing"),
    ("cu not from 0", varlen(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError,
     "cu_seqlens_q: must start at 0"),
    ("cu out of range", varlen(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32), max_seqlen_q=6),
     ValueError, "cu_seqlens_q: last entry 9 exceeds the 8 rows of q"),
    ("cu lengths differ", varlen(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32), max_seqlen_k=8),
     ValueError, "cu_seqlens_k: has 2 entries"),
    ("cu 2-d", varlen(cu_seqlens_q=CU[None]), ValueError, "cu_seqlens_q: expected a 1-D tensor"),
    ("cu missing", varlen(cu_seqlens_k=None), TypeError, "cu_seqlens_k"),
    ("max_seqlen too small", varlen(max_seqlen_q=4), ValueError, "max_seqlen_q=4 is smaller than the length 5"),
    ("max_seqlen float", varlen(max_seqlen_k=5.0), TypeError, "max_seqlen_k: expected an int"),
    ("max_seqlen negative", varlen(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    ("varlen q 4-d", varlen(q=_q(1, 8, 2, 16)), ValueError, "q: expected 3 dimensions"),
    ("qkv 4-d", lambda: mtlflash.flash_attn_qkvpacked_func(_q(1, 8, 2, 16)), ValueError, "qkv: expected shape"),
    ("qkv not 3", lambda: mtlflash.flash_attn_qkvpacked_func(_q(1, 8, 2, 2, 16)), ValueError, "qkv: expected shape"),
    ("kv not 2", lambda: mtlflash.flash_attn_kvpacked_func(_q(1, 8, 2, 16), _q(1, 8, 3, 2, 16)), ValueError,
     "kv: expected shape"),
    ("qkv a string", lambda: mtlflash.flash_attn_qkvpacked_func("qkv"), TypeError, "qkv: expected a torch.Tensor"),
]


@pytest.mark.parametrize("call,exc,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)
    assert str(info.value).startswith("[flash_attn"), "messages start with [function name]"


def test_bad_input_count():
    assert len(BAD) >= 30


def test_refcounts_stable_over_many_calls():
    q, k, v = qkv()
    bad = torch.randn(1, 8, 3, 16)
    before = [sys.getrefcount(t) for t in (q, k, v, bad)]
    for i in range(2000):
        out, lse, _ = mtlflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        assert sys.getrefcount(out) == 2 and sys.getrefcount(lse) == 2
        with pytest.raises(ValueError):
            mtlflash.flash_attn_func(bad, k, v)
        with pytest.raises(TypeError):
            mtlflash.flash_attn_func(q, k, v.half())
    del out, lse
    assert [sys.getrefcount(t) for t in (q, k, v, bad)] == before


def test_zero_size_inputs():
    q = torch.randn(0, 8, 2, 16)
    assert mtlflash.flash_attn_func(q, q, q).shape == (0, 8, 2, 16)
    q = torch.randn(1, 0, 2, 16)
    out, lse, _ = mtlflash.flash_attn_func(q, q, q, return_attn_probs=True)
    assert out.shape == (1, 0, 2, 16) and lse.shape == (1, 2, 0)
    # no keys at all: every row sees nothing
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 0, 2, 16)
    out, lse, _ = mtlflash.flash_attn_func(q, k, k, return_attn_probs=True)
    assert torch.all(out == 0) and torch.all(torch.isinf(lse))


# --- tiers and environment knobs ----------------------------------------------------------------

def test_backend_info():
    info = mtlflash.backend_info()
    assert info["tiers"]["cpu"]["available"]
    assert info["tiers"]["reference"]["available"]
    assert set(info["tiers"]) == {"cpu", "vec", "simdgroup", "tensorops", "reference"}
    assert info["cpu_simd"] in ("avx512", "avx2+fma", "generic")
    if sys.platform != "darwin":
        assert not info["tiers"]["vec"]["available"]
        assert "not built" in info["tiers"]["vec"]["reason"]


def test_unknown_kernel_lists_valid_values(monkeypatch):
    monkeypatch.setenv("MTLFLASH_KERNEL", "fastest")
    with pytest.raises(ValueError, match="auto, cpu, vec, simdgroup, tensorops, reference"):
        mtlflash.flash_attn_func(*qkv())


@pytest.mark.skipif(sys.platform == "darwin", reason="the Metal tiers may exist on macOS")
@pytest.mark.parametrize("tier", ["vec", "simdgroup", "tensorops"])
def test_forcing_a_tier_that_cannot_run_says_why(monkeypatch, tier):
    monkeypatch.setenv("MTLFLASH_KERNEL", tier)
    with pytest.raises(RuntimeError, match=f"MTLFLASH_KERNEL={tier} cannot run this call: Metal backend not built"):
        mtlflash.flash_attn_func(*qkv())


def test_forced_reference_tier_matches_cpu(monkeypatch):
    q, k, v = qkv(S=40, dtype=torch.bfloat16)
    cpu = mtlflash.flash_attn_func(q, k, v, causal=True)
    monkeypatch.setenv("MTLFLASH_KERNEL", "reference")
    ref, lse, _ = mtlflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert ref.dtype == torch.bfloat16 and lse.shape == (1, 2, 40)
    assert (ref.float() - cpu.float()).abs().max() <= 2 ** -7


def test_forced_reference_refuses_numpy(monkeypatch):
    monkeypatch.setenv("MTLFLASH_KERNEL", "reference")
    a = np.zeros((1, 4, 1, 8), np.float32)
    with pytest.raises(RuntimeError, match="reference tier runs in torch"):
        mtlflash.flash_attn_func(a, a, a)


def test_forced_cpu_and_auto(monkeypatch):
    q, k, v = qkv()
    base = mtlflash.flash_attn_func(q, k, v)
    for value in ["cpu", "auto", ""]:
        monkeypatch.setenv("MTLFLASH_KERNEL", value)
        assert torch.equal(mtlflash.flash_attn_func(q, k, v), base)


def test_bad_thread_count(monkeypatch):
    monkeypatch.setenv("MTLFLASH_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="MTLFLASH_NUM_THREADS"):
        mtlflash.flash_attn_func(*qkv())


def test_simd_paths_match(monkeypatch):
    # Every SIMD path this CPU has (baseline, AVX2, AVX-512) gives the same answers within fp32
    # rounding; MTLFLASH_CPU_ISA caps the choice.
    code = ("import torch, mtlflash; torch.manual_seed(0); q = torch.randn(1, 100, 2, 72); "
            "k = torch.randn(1, 130, 2, 72); "
            "o = mtlflash.flash_attn_func(q, k, k, causal=True); "
            "print(mtlflash.backend_info()['cpu_simd']); torch.save(o, __import__('sys').argv[1])")
    import os
    import tempfile

    outs = {}
    with tempfile.TemporaryDirectory() as d:
        for isa in ["generic", "avx2", "best"]:
            path = os.path.join(d, isa + ".pt")
            env = dict(os.environ, MTLFLASH_CPU_ISA=isa)
            res = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True,
                                 check=True)
            outs[isa] = (res.stdout.strip(), torch.load(path))
    assert outs["generic"][0] == "generic"
    assert outs["avx2"][0] in ("avx2+fma", "generic")
    assert outs["best"][0] == mtlflash.backend_info()["cpu_simd"]
    for isa in ("generic", "avx2"):
        assert (outs[isa][1] - outs["best"][1]).abs().max() < 1e-5, isa


def test_gil_released_during_compute():
    import threading
    import time

    q = torch.randn(1, 2048, 8, 64)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.01)
    start = time.perf_counter()
    mtlflash.flash_attn_func(q, q, q)
    end = time.perf_counter()
    stop.set()
    t.join()
    during = [x for x in ticks if start < x < end]
    assert end - start > 0.02, "the call was too short to observe"
    assert len(during) >= 3, "another Python thread made no progress while the kernel ran"


def test_concurrent_python_threads_bitwise_equal_serial():
    from concurrent.futures import ThreadPoolExecutor

    inputs = [tuple(torch.randn(1, 150, 4, 32) for _ in range(3)) for _ in range(8)]
    serial = [mtlflash.flash_attn_func(*x, causal=True) for x in inputs]
    with ThreadPoolExecutor(8) as ex:
        parallel = list(ex.map(lambda x: mtlflash.flash_attn_func(*x, causal=True), inputs * 3))
    for i, out in enumerate(parallel):
        assert torch.equal(out, serial[i % 8])


def test_metal_params_packing():
    import struct

    q, k, v = qkv(B=2, S=10, H=4, D=32)
    out = torch.empty(2, 10, 4, 32)
    lse = torch.empty(2, 4, 10)
    blob = mtlflash.metal_params(q, k, v, out, lse, causal=True, softcap=3.0, num_splits=3)
    assert len(blob) == 208
    strides = struct.unpack_from("<15q", blob, 0)
    assert strides[:3] == (q.stride(0), q.stride(1), q.stride(2))
    ints = struct.unpack_from("<16i", blob, 128)
    batch, hq, hk, group, d, dv, sq, sk, wl, wr, flags, nsplit, split = ints[:13]
    assert (batch, hq, hk, group, d, dv, sq, sk, wl, wr) == (2, 4, 4, 1, 32, 32, 10, 10, -1, 0)
    assert (nsplit, split) == (3, 4)
    assert flags == 4 | 8 | 16  # softcap, lse, causal
    scale, scale_log2, softcap = struct.unpack_from("<3f", blob, 192)
    assert abs(scale - 32 ** -0.5) < 1e-7 and abs(softcap - 3.0) < 1e-7


def test_unknown_dispatch_mode(monkeypatch):
    monkeypatch.setenv("MTLFLASH_DISPATCH", "fast")
    with pytest.raises(ValueError, match="MTLFLASH_DISPATCH: unknown value 'fast'; valid values: queue, stream"):
        mtlflash.flash_attn_func(*qkv())
    for value in ["queue", "stream", ""]:
        monkeypatch.setenv("MTLFLASH_DISPATCH", value)
        mtlflash.flash_attn_func(*qkv())


def test_metal_can_be_turned_off_for_the_process():
    code = ("import mtlflash; from mtlflash import _C; _C.disable_metal('kernel compile failed'); "
            "print(mtlflash.backend_info()['tiers']['simdgroup']['reason'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "disabled after an error in this process: kernel compile failed"


def test_calls_work_in_a_forked_child():
    # the pool's threads do not survive fork(); the child must start a fresh pool, not hang
    code = ("import os, torch, mtlflash\n"
            "q = torch.randn(1, 300, 4, 32)\n"
            "a = mtlflash.flash_attn_func(q, q, q, causal=True)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    b = mtlflash.flash_attn_func(q, q, q, causal=True)\n"
            "    os._exit(0 if torch.equal(a, b) else 3)\n"
            "_, status = os.waitpid(pid, 0)\n"
            "print(os.waitstatus_to_exitcode(status))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "MTLFLASH_NUM_THREADS": "2"})
    assert res.stdout.strip() == "0", res.stdout + res.stderr
