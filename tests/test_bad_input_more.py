"""More bad input, beyond tests/test_api.py's BAD table: every tensor argument given a non-array,
zero-size and 0-d tensors, byte-swapped / complex / bool dtypes, strides that are not whole
elements, misaligned data, sizes that would overflow the kernels' 32-bit fields.

Each case names the exception type and the argument the message must name ("[function] arg...").
Cases that would make an unvalidated kernel run for hours (2**31 rows viewed through a zero
stride) run in a child interpreter with a timeout, so a regression fails the test instead of
hanging or crashing the session.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import mtlflash
from numerics import check_against_reference

f = mtlflash.flash_attn_func
vf = mtlflash.flash_attn_varlen_func
Q = torch.randn(1, 8, 2, 16)
V3 = torch.randn(8, 2, 16)
CU = torch.tensor([0, 3, 8], dtype=torch.int32)
NQ = np.random.default_rng(0).standard_normal((1, 8, 2, 16)).astype(np.float32)


def dense(**over):
    args = dict(q=Q, k=Q, v=Q)
    args.update(over)
    return lambda: f(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def varlen(**over):
    args = dict(q=V3, k=V3, v=V3, cu_seqlens_q=CU, cu_seqlens_k=CU, max_seqlen_q=5, max_seqlen_k=5)
    args.update(over)
    return lambda: vf(**args)


def np_dense(**over):
    args = dict(q=NQ, k=NQ, v=NQ)
    args.update(over)
    return lambda: f(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def packed(fn, *args, **kw):
    return lambda: getattr(mtlflash, fn)(*args, **kw)


NON_ARRAYS = {"dict": {}, "str": "q", "int": 3, "float": 1.5, "list": [[1.0]], "tuple": (1, 2), "bytes": b"\0" * 64,
              "object": object()}

CASES = []
for kind, obj in NON_ARRAYS.items():
    for arg in ("q", "k", "v"):
        CASES.append((f"{arg} {kind}", dense(**{arg: obj}), TypeError, arg))
        CASES.append((f"varlen {arg} {kind}", varlen(**{arg: obj}), TypeError, arg))
    for arg in ("cu_seqlens_q", "cu_seqlens_k"):
        CASES.append((f"{arg} {kind}", varlen(**{arg: obj}), TypeError, arg))
    if kind != "float":  # float(1.5)-like slopes are not tensors either, but keep the table readable
        CASES.append((f"alibi_slopes {kind}", dense(alibi_slopes=obj), TypeError, "alibi_slopes"))
    CASES.append((f"qkv {kind}", packed("flash_attn_qkvpacked_func", obj), TypeError, "qkv"))
    CASES.append((f"kv {kind}", packed("flash_attn_kvpacked_func", Q, obj), TypeError, "kv"))
    CASES.append((f"varlen qkv {kind}", packed("flash_attn_varlen_qkvpacked_func", obj, CU, 5), TypeError, "qkv"))
    CASES.append((f"varlen kv {kind}", packed("flash_attn_varlen_kvpacked_func", V3, obj, CU, CU, 5, 5), TypeError,
                  "kv"))

CASES += [
    # zero-size and 0-d
    ("head dim 0", dense(q=torch.randn(1, 8, 2, 0), k=torch.randn(1, 8, 2, 0), v=torch.randn(1, 8, 2, 0)), ValueError,
     "q"),
    ("value head dim 0", dense(v=torch.randn(1, 8, 2, 0)), ValueError, "v"),
    ("no heads", dense(q=torch.randn(1, 8, 0, 16), k=torch.randn(1, 8, 0, 16), v=torch.randn(1, 8, 0, 16)),
     ValueError, "q"),
    ("no kv heads", dense(k=torch.randn(1, 8, 0, 16), v=torch.randn(1, 8, 0, 16)), ValueError, "k"),
    ("numpy head dim 0", np_dense(q=np.zeros((1, 8, 2, 0), np.float32), k=np.zeros((1, 8, 2, 0), np.float32),
                                  v=np.zeros((1, 8, 2, 0), np.float32)), ValueError, "q"),
    ("q 0-d", dense(q=torch.tensor(1.0)), ValueError, "q"),
    ("k 0-d", dense(k=torch.tensor(1.0)), ValueError, "k"),
    ("v 0-d numpy", np_dense(v=np.zeros((), np.float32)), ValueError, "v"),
    ("k numpy scalar", np_dense(k=np.float32(1.0)), TypeError, "k"),
    ("cu_seqlens_q 0-d", varlen(cu_seqlens_q=torch.tensor(0, dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    ("cu_seqlens_k empty", varlen(cu_seqlens_k=CU[:0]), ValueError, "cu_seqlens_k"),
    ("alibi 0-d", dense(alibi_slopes=torch.tensor(1.0)), ValueError, "alibi_slopes"),
    ("qkv 0-d", packed("flash_attn_qkvpacked_func", torch.tensor(1.0)), ValueError, "qkv"),
    ("kv zero-size wrong rank", packed("flash_attn_kvpacked_func", Q, torch.zeros(0)), ValueError, "kv"),
    # dtypes
    ("q bool", dense(q=Q.bool()), TypeError, "q"),
    ("k bool", dense(k=Q.bool()), TypeError, "k"),
    ("q complex64", dense(q=Q.to(torch.complex64), k=Q.to(torch.complex64), v=Q.to(torch.complex64)), TypeError, "q"),
    ("v complex128", dense(v=Q.to(torch.complex128)), TypeError, "v"),
    ("q int8", dense(q=Q.to(torch.int8)), TypeError, "q"),
    ("q float8", dense(q=Q.to(torch.float8_e4m3fn)), TypeError, "q") if hasattr(torch, "float8_e4m3fn") else None,
    ("numpy bool", np_dense(q=NQ > 0), TypeError, "q"),
    ("numpy complex", np_dense(q=NQ.astype(np.complex64), k=NQ.astype(np.complex64), v=NQ.astype(np.complex64)),
     TypeError, "q"),
    ("numpy float64 v", np_dense(v=NQ.astype(np.float64)), TypeError, "v"),
    ("numpy big-endian q", np_dense(q=NQ.astype(">f4"), k=NQ.astype(">f4"), v=NQ.astype(">f4")), TypeError, "q"),
    ("numpy big-endian k", np_dense(k=NQ.astype(">f4")), TypeError, "k"),
    ("numpy big-endian fp16 v", np_dense(q=NQ.astype(np.float16), k=NQ.astype(np.float16), v=NQ.astype(">f2")),
     TypeError, "v"),
    ("numpy big-endian cu", lambda: vf(V3.numpy(), V3.numpy(), V3.numpy(), CU.numpy().astype(">i4"), CU.numpy(), 5, 5),
     TypeError, "cu_seqlens_q"),
    ("numpy int64 cu", lambda: vf(V3.numpy(), V3.numpy(), V3.numpy(), CU.numpy(), CU.numpy().astype(np.int64), 5, 5),
     TypeError, "cu_seqlens_k"),
    ("cu float32", varlen(cu_seqlens_q=CU.float()), TypeError, "cu_seqlens_q"),
    ("cu bool", varlen(cu_seqlens_k=CU.bool()), TypeError, "cu_seqlens_k"),
    ("alibi float64", dense(alibi_slopes=torch.ones(2, dtype=torch.float64)), TypeError, "alibi_slopes"),
    ("alibi big-endian numpy", np_dense(alibi_slopes=np.ones(2, ">f4")), TypeError, "alibi_slopes"),
    # strides, layout, alignment
    ("numpy stride not a multiple of the element size",
     np_dense(q=np.lib.stride_tricks.as_strided(np.zeros(1024, np.float32), (1, 8, 2, 16), (4, 66, 6, 4))),
     ValueError, "q"),
    ("numpy last stride not a multiple", np_dense(
        k=np.lib.stride_tricks.as_strided(np.zeros(1024, np.float32), (1, 8, 2, 16), (512, 64, 32, 2))),
     ValueError, "k"),
    ("numpy reversed last dim", np_dense(v=NQ[..., ::-1]), ValueError, "v"),
    ("cu strided", varlen(cu_seqlens_q=torch.tensor([0, 0, 3, 0, 8, 0], dtype=torch.int32)[::2]), ValueError,
     "cu_seqlens_q"),
    ("alibi strided", dense(alibi_slopes=torch.ones(4)[::2]), ValueError, "alibi_slopes"),
    ("numpy misaligned q", np_dense(q=np.frombuffer(b"\0" + NQ.tobytes(), np.uint8)[1:].view(np.float32).reshape(NQ.shape)),
     ValueError, "q"),
    ("torch misaligned v", dense(v=torch.frombuffer(bytearray(b"\0" + Q.numpy().tobytes()), dtype=torch.float32,
                                                    offset=1, count=Q.numel()).view(Q.shape)), ValueError, "v"),
    ("too many dims", dense(q=torch.randn(1, 1, 1, 1, 1, 1, 2)), ValueError, "q"),
    ("sparse q", dense(q=Q.to_sparse()), TypeError, "q"),
    # kinds
    ("alibi numpy with torch q", dense(alibi_slopes=np.ones(2, np.float32)), TypeError, "alibi_slopes"),
    ("alibi torch with numpy q", np_dense(alibi_slopes=torch.ones(2)), TypeError, "alibi_slopes"),
    ("v numpy with torch q", dense(v=NQ), TypeError, "v"),
    # scalar arguments of the wrong kind
    ("window_size None", dense(window_size=None), TypeError, "window_size"),
    ("window_size dict", dense(window_size={0: 1, 1: 2}), TypeError, "window_size"),
    ("window_size float tensor", dense(window_size=torch.tensor([1.5, 2.0])), TypeError, "window_size"),
    ("window_size bools", dense(window_size=(True, False)), TypeError, "window_size"),
    ("dropout_p None", dense(dropout_p=None), TypeError, "dropout_p"),
    ("dropout_p > 1", dense(dropout_p=1.5), ValueError, "dropout_p"),
    ("dropout_p nan", dense(dropout_p=float("nan")), ValueError, "dropout_p"),
    ("softcap inf", dense(softcap=float("inf")), ValueError, "softcap"),
    ("softcap tensor of 2", dense(softcap=torch.ones(2)), TypeError, "softcap"),
    ("softmax_scale nan", dense(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("softmax_scale list", dense(softmax_scale=[0.5]), TypeError, "softmax_scale"),
    ("softmax_scale bool", dense(softmax_scale=True), TypeError, "softmax_scale"),
    ("causal None", dense(causal=None), TypeError, "causal"),
    ("causal tensor of 2", dense(causal=torch.ones(2)), TypeError, "causal"),
    ("return_attn_probs str", dense(return_attn_probs="yes"), TypeError, "return_attn_probs"),
    ("max_seqlen_q None", varlen(max_seqlen_q=None), TypeError, "max_seqlen_q"),
    ("max_seqlen_k str", varlen(max_seqlen_k="5"), TypeError, "max_seqlen_k"),
    ("max_seqlen_k bool", varlen(max_seqlen_k=True), TypeError, "max_seqlen_k"),
    ("max_seqlen_q float tensor", varlen(max_seqlen_q=torch.tensor(5.0)), TypeError, "max_seqlen_q"),
    ("max_seqlen_q 2-element tensor", varlen(max_seqlen_q=torch.tensor([5, 5])), TypeError, "max_seqlen_q"),
    ("max_seqlen_q 2**40", varlen(max_seqlen_q=2 ** 40), ValueError, "max_seqlen_q"),
    ("max_seqlen_k 2**31", varlen(max_seqlen_k=2 ** 31), ValueError, "max_seqlen_k"),
    ("cu_seqlens_k past the end", varlen(cu_seqlens_k=torch.tensor([0, 3, 2 ** 31 - 1], dtype=torch.int32),
                                         max_seqlen_k=2 ** 30), ValueError, "max_seqlen_k"),
    ("cu_seqlens_q negative", varlen(cu_seqlens_q=torch.tensor([0, -3, 8], dtype=torch.int32)), ValueError,
     "cu_seqlens_q"),
    ("cu_seqlens_q wraps", varlen(cu_seqlens_q=torch.tensor([0, 2 ** 31 - 1, -2 ** 31], dtype=torch.int32),
                                  max_seqlen_q=2 ** 30), ValueError, "max_seqlen_q"),
]
CASES = [c for c in CASES if c is not None]


@pytest.mark.parametrize("call,exc,arg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_more(call, exc, arg):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert msg.startswith("[flash_attn"), f"message does not start with [function]: {msg}"
    assert re.search(rf"\] {re.escape(arg)}\b", msg), f"message does not name {arg}: {msg}"


def test_bad_input_more_count():
    assert len(CASES) >= 100


# --- numbers too large for the kernels' fields: a child interpreter with a timeout ----------------

HUGE = {
    # (expected exception, argument named) for code that builds huge views through zero strides
    "seqlen 2**30 + 1": ("ValueError", "q",
                         "q = torch.zeros(1, 1, 1, 16).expand(1, 2**30 + 1, 1, 16); f(q, q, q)"),
    "seqlen_k 2**31": ("ValueError", "k", "k = torch.zeros(1, 1, 1, 16).expand(1, 2**31, 1, 16); f(Q, k, k)"),
    "heads 2**31": ("ValueError", "q",
                    "q = torch.zeros(1, 1, 1, 16).expand(1, 1, 2**31, 16); k = torch.zeros(1, 1, 1, 16); f(q, k, k)"),
    "batch 2**31": ("ValueError", "q", "q = torch.zeros(1, 1, 1, 16).expand(2**31, 1, 1, 16); f(q, q, q)"),
    "batch 2**32 + 1 numpy": ("ValueError", "q",
                              "a = np.lib.stride_tricks.as_strided(np.zeros(16, np.float32), (2**32 + 1, 1, 1, 16), "
                              "(0, 0, 0, 4)); f(a, a, a)"),
    "varlen rows 2**31": ("ValueError", "max_seqlen_q",
                          "q = torch.zeros(1, 1, 16).expand(2**31, 1, 16); "
                          "cu = torch.tensor([0, 2**31 - 1], dtype=torch.int32); vf(q, q, q, cu, cu, 2**31 - 1, 2**31 - 1)"),
    "varlen 2**31 sequences": ("ValueError", "cu_seqlens_q",
                               "cu = torch.zeros(1, dtype=torch.int32).expand(2**31 + 1); "
                               "vf(Q[0], Q[0], Q[0], cu, cu, 0, 0)"),
    "head dim 2**31": ("ValueError", "q", "q = torch.zeros(1, 1, 1, 1).expand(1, 1, 1, 2**31); f(q, q, q)"),
    "alibi 2**31 slopes": ("ValueError", "alibi_slopes",
                           "f(Q, Q, Q, alibi_slopes=torch.zeros(1).expand(2**31))"),
}

_CHILD = """
import json, sys
import numpy as np, torch, mtlflash
f, vf = mtlflash.flash_attn_func, mtlflash.flash_attn_varlen_func
Q = torch.zeros(1, 8, 1, 16)
cases = json.loads(sys.argv[1])
out = {}
for name, code in cases.items():
    try:
        exec(code)
        out[name] = ["no error", ""]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def huge_results():
    cases = {name: code for name, (_, _, code) in HUGE.items()}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), json.dumps(cases)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"child interpreter died ({proc.returncode}):\n{proc.stderr[-3000:]}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("name", list(HUGE))
def test_sizes_beyond_32_bits_are_refused(name, huge_results):
    exc, arg, _ = HUGE[name]
    got, msg = huge_results[name]
    assert got == exc, f"{name}: expected {exc}, got {got}: {msg}"
    assert re.search(rf"\] {re.escape(arg)}\b", msg), f"message does not name {arg}: {msg}"


# --- numbers too large for the C core are refused (or, for windows, mean "no bound") ---------------

OVERFLOW = [
    ("max_seqlen_q 2**64", varlen(max_seqlen_q=2 ** 64), "max_seqlen_q"),
    ("softcap 10**400", dense(softcap=10 ** 400), "softcap"),
    ("softmax_scale 10**400", dense(softmax_scale=10 ** 400), "softmax_scale"),
    ("dropout_p 10**400", dense(dropout_p=10 ** 400), "dropout_p"),
]


@pytest.mark.parametrize("call,arg", [c[1:] for c in OVERFLOW], ids=[c[0] for c in OVERFLOW])
def test_overflowing_numbers_name_the_argument(call, arg):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert re.search(rf"\] {re.escape(arg)}\b", str(info.value))


def test_window_beyond_any_length_is_unbounded():
    q = torch.randn(1, 20, 2, 16)
    base = f(q, q, q, window_size=(-1, 0))
    assert torch.equal(f(q, q, q, window_size=(2 ** 70, 0)), base)
    assert torch.equal(f(q, q, q, window_size=(2 ** 30 + 1, 0)), base)


# --- unusual but valid inputs: accepted, and computed correctly -----------------------------------

def test_zero_size_numpy_inputs():
    # NumPy gives empty arrays all-zero strides; they are valid (nothing is read)
    for shape in [(0, 8, 2, 16), (1, 0, 2, 16), (2, 5, 2, 16)]:
        q = np.zeros(shape, np.float32)
        k = np.zeros((shape[0], 0, 2, 16), np.float32)
        out, lse, _ = f(q, k, k, return_attn_probs=True)
        assert out.shape == shape and lse.shape == (shape[0], 2, shape[1])
        assert np.all(out == 0) and np.all(np.isposinf(lse))


def test_zero_size_numpy_varlen():
    q = np.zeros((0, 2, 16), np.float16)
    cu = np.zeros(3, np.int32)
    out, lse, _ = vf(q, q, q, cu, cu, 0, 0, return_attn_probs=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


def test_readonly_numpy_inputs():
    q, k, v = (np.random.default_rng(i).standard_normal((1, 20, 2, 16)).astype(np.float32) for i in range(3))
    cu = np.array([0, 20], np.int32)
    slopes = np.array([0.5, 0.25], np.float32)
    ref = f(q, k, v, causal=True, alibi_slopes=slopes)
    for a in (q, k, v, cu, slopes):
        a.setflags(write=False)
    out = f(q, k, v, causal=True, alibi_slopes=slopes)
    assert out.flags.writeable and np.array_equal(out, ref)
    vf(q[0], k[0], v[0], cu, cu, 20, 20)


def test_negative_strides_numpy():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 30, 4, 32)).astype(np.float16) for _ in range(3))
    qr, kr, vr = q[::-1, ::-1, ::-1], k[:, ::-1], v[::-1]  # negative batch, sequence and head strides
    out, lse, _ = f(qr, kr, vr, causal=True, return_attn_probs=True)
    check_against_reference(out, lse, qr.copy(), kr.copy(), vr.copy(), causal=True)
    assert np.array_equal(out, f(qr.copy(), kr.copy(), vr.copy(), causal=True))


def test_cu_seqlens_of_the_other_kind_are_accepted():
    # cu_seqlens are only read on the CPU, so either kind is fine with either kind of q/k/v
    q = torch.randn(8, 2, 16)
    a = vf(q, q, q, CU, CU, 5, 5)
    assert torch.equal(vf(q, q, q, CU.numpy(), CU, 5, 5), a)
    b = vf(q.numpy(), q.numpy(), q.numpy(), CU, CU.numpy(), 5, 5)
    assert isinstance(b, np.ndarray) and np.array_equal(b, a.numpy())


def test_parameter_and_inference_tensors():
    p = torch.nn.Parameter(torch.randn(1, 8, 2, 16))
    with torch.no_grad():
        assert f(p, p, p).shape == p.shape
    with torch.inference_mode():
        q = torch.randn(1, 8, 2, 16)
        assert f(q, q, q).shape == q.shape


def test_max_seqlen_of_numpy_integer_types():
    q = torch.randn(8, 2, 16)
    a = vf(q, q, q, CU, CU, 5, 5)
    for m in (np.int64(5), np.int32(5), np.uint8(5), torch.tensor(5, dtype=torch.int32), torch.tensor([5])):
        assert torch.equal(vf(q, q, q, CU, CU, m, m), a)


def test_messages_after_errors_leave_no_pending_exception():
    # a failed call must not leave a Python error set for the next one
    for call, exc in [(dense(q=Q.bool()), TypeError), (dense(k=Q.to_sparse()), TypeError),
                      (np_dense(q=NQ.astype(">f4"), k=NQ.astype(">f4"), v=NQ.astype(">f4")), TypeError)]:
        with pytest.raises(exc):
            call()
        assert f(Q, Q, Q).shape == Q.shape
