"""The vec tier (metal/attn_vec.metal) run in the MSL emulator against mtlflash.reference.

Every case builds its tensors on the CPU, asks the C core for the exact mf_params a real Metal
call would bind (mtlflash.metal_params), launches the kernels with the geometry of vec_launch()
under each of four schedules (forward, reverse, two seeded random orders), and checks out and
lse with the project's acceptance rule (tests/numerics.py). Output buffers start as NaN (view and
padding), so a row the kernel forgets to write, or a write outside the view, fails.
"""

import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KERNEL = os.path.join(ROOT, "metal", "attn_vec.metal")
sys.path.insert(0, HERE)

import mtlflash  # noqa: E402
from mtlflash import reference  # noqa: E402
from numerics import check_against_reference  # noqa: E402
from metal_emu import cases, emu  # noqa: E402
from metal_emu.cases import buffer_of, make_problem, padding_untouched, reference_options  # noqa: E402,F401

# --------------------------------------------------------------------------------------------
# Host side of the vec tier: functions of the mf_params fields (a dict of field -> value, as
# emu.unpack_params returns them) only, so they can move to C unchanged.

VEC_MAX_D_CHOICES = (64, 128, 256)
VEC_MAX_ROWS = 4  # query rows (simdgroups) per threadgroup


def vec_max_d(p):
    """The MF_MAX_D define for a problem: smallest choice covering both head dims."""
    need = max(p["head_dim"], p["head_dim_v"])
    for d in VEC_MAX_D_CHOICES:
        if need <= d:
            return d
    raise ValueError(f"[vec] head dim {need} > {VEC_MAX_D_CHOICES[-1]}")


def vec_scratch_floats(p):
    """fp32 scratch the split pair needs (0 without splits)."""
    if p["num_splits"] <= 1:
        return 0
    return p["batch"] * p["heads_q"] * p["seqlen_q"] * p["num_splits"] * (p["head_dim_v"] + 2)


def vec_launch(p, rows=None):
    """[(kernel name, grid in threadgroups, threadgroup size)] in launch order for a problem.
    rows = (head, query row) pairs, one per simdgroup, per threadgroup; the kernels accept any
    value in 1..32."""
    pairs = p["heads_q"] * p["seqlen_q"]
    if rows is None:
        rows = max(1, min(VEC_MAX_ROWS, pairs))
    tg = (32 * rows, 1, 1)
    gx = (pairs + rows - 1) // rows
    if p["num_splits"] <= 1:
        return [("mf_attn_vec", (gx, 1, p["batch"]), tg)]
    return [
        ("mf_attn_vec_split", (gx, p["num_splits"], p["batch"]), tg),
        ("mf_attn_vec_merge", (gx, 1, p["batch"]), tg),
    ]


# --------------------------------------------------------------------------------------------
# Emulator plumbing

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_LIBS = {}


def vec_library(dtype, max_d):
    key = (dtype, max_d)
    if key not in _LIBS:
        _LIBS[key] = emu.build(KERNEL, {"MF_DTYPE": DTYPE_CODE[dtype], "MF_MAX_D": max_d})
    return _LIBS[key]


def run_vec(q, k, v, out, lse, *, schedule, seed=0, num_splits=1, rows=None, **options):
    """Launch the vec kernels on existing tensors (out / lse written in place)."""
    raw = mtlflash.metal_params(q, k, v, out, lse, num_splits=num_splits, **options)
    p = emu.unpack_params(raw)
    lib = vec_library(q.dtype, vec_max_d(p))
    buffers = {emu.SLOT_Q: buffer_of(q), emu.SLOT_K: buffer_of(k), emu.SLOT_V: buffer_of(v),
               emu.SLOT_O: buffer_of(out), emu.SLOT_PARAMS: raw}
    if lse is not None:
        buffers[emu.SLOT_LSE] = buffer_of(lse)
    if options.get("cu_seqlens_q") is not None:
        buffers[emu.SLOT_CU_Q] = options["cu_seqlens_q"].numpy()
        buffers[emu.SLOT_CU_K] = options["cu_seqlens_k"].numpy()
    if options.get("alibi_slopes") is not None:
        buffers[emu.SLOT_ALIBI] = buffer_of(options["alibi_slopes"])
    nscratch = vec_scratch_floats(p)
    if nscratch:
        buffers[emu.SLOT_SCRATCH] = np.full(nscratch, np.nan, dtype=np.float32)
    for name, grid, tg in vec_launch(p, rows):
        lib.launch(name, grid=grid, threadgroup=tg, buffers=buffers, schedule=schedule, seed=seed)
    return p


# --------------------------------------------------------------------------------------------
# Cases

SCHEDULES = (("forward", 0), ("reverse", 0), ("random", 11), ("random", 12345))


@dataclass(frozen=True)
class Case(cases.Case):
    num_splits: int = 1
    rows: int = None  # rows per threadgroup, None = vec_launch's choice

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

CASES = [
    # lengths, incl. 1 and both orders of Sq != Sk
    Case("len1", sq=1, sk=1, d=32),
    Case("len2", sq=2, sk=2, d=40, dtype=F16),
    Case("len17_63", sq=17, sk=63, d=59, dtype=BF16),
    Case("len63_17", sq=63, sk=17, d=64),
    Case("len64", b=2, sq=64, sk=64, d=80, dtype=F16),
    Case("len65_130", sq=65, sk=130, d=96, dtype=BF16, hq=1, hk=1),
    Case("len130_65", sq=130, sk=65, d=111, hq=1, hk=1),
    # causal, incl. Sq > Sk (leading rows see nothing)
    Case("causal_sq_gt_sk", sq=65, sk=17, d=128, causal=True),
    Case("causal_sq_lt_sk", b=2, sq=17, sk=130, d=160, causal=True, dtype=F16),
    Case("causal_square", sq=64, sk=64, d=192, causal=True, dtype=BF16, hq=1, hk=1),
    Case("causal_len2", sq=2, sk=2, d=256, causal=True),
    # head dims, Dv != D
    Case("dv_lt_d", sq=17, sk=63, d=192, dv=128, dtype=F16),
    Case("dv_gt_d", sq=17, sk=65, d=40, dv=111, causal=True),
    Case("dv_256", sq=2, sk=130, d=64, dv=256, dtype=BF16),
    Case("d32", sq=63, sk=2, d=32, dv=59),
    # GQA / MQA
    Case("gqa", sq=17, sk=63, hq=6, hk=2, d=64, causal=True, dtype=F16),
    Case("mqa", b=2, sq=2, sk=130, hq=4, hk=1, d=128, dtype=BF16),
    # windows
    Case("win_-1_0", sq=63, sk=63, d=64, window=(-1, 0)),
    Case("win_0_0", sq=17, sk=65, d=80, window=(0, 0), dtype=F16),
    Case("win_5_-1", sq=65, sk=64, d=96, window=(5, -1)),
    Case("win_-1_3", sq=64, sk=65, d=111, window=(-1, 3), dtype=BF16),
    Case("win_4_7_sq_gt_sk", sq=130, sk=17, d=40, window=(4, 7), hq=1, hk=1),
    # softcap, ALiBi
    Case("softcap", sq=17, sk=130, d=64, softcap=3.0, dtype=F16),
    Case("softcap_causal", sq=65, sk=65, d=128, softcap=10.0, causal=True),
    Case("alibi_h", sq=17, sk=63, hq=4, hk=2, d=64, alibi="H"),
    Case("alibi_h_causal", sq=63, sk=64, d=96, alibi="H", causal=True, dtype=BF16),
    Case("alibi_bh", b=2, sq=17, sk=65, d=59, alibi="BH", dtype=F16),
    Case("alibi_bh_causal_cap", b=2, sq=64, sk=17, d=80, alibi="BH", causal=True, softcap=5.0),
    # varlen: an empty sequence, a length-1 sequence, queries without keys
    Case("varlen", varlen=((5, 7), (0, 0), (1, 1), (17, 63), (3, 2)), d=64, hq=4, hk=2),
    Case("varlen_causal", varlen=((1, 17), (0, 3), (65, 64), (2, 0)), d=111, causal=True,
         dtype=F16),
    Case("varlen_window_alibi", varlen=((17, 17), (1, 1), (0, 5), (30, 41)), d=40,
         window=(3, 2), alibi="BH", dtype=BF16),
    Case("varlen_cap", varlen=((9, 3), (4, 30)), d=256, dv=64, softcap=2.0, hq=2, hk=1),
    # non-contiguous views
    Case("transposed", b=2, sq=17, sk=63, d=64, layout="transposed"),
    Case("transposed_gqa_causal", sq=65, sk=64, hq=4, hk=2, d=128, causal=True,
         layout="transposed", dtype=F16),
    Case("sliced", b=2, sq=17, sk=65, hq=3, hk=3, d=40, layout="sliced", dtype=BF16),
    Case("sliced_varlen", varlen=((5, 6), (0, 2), (12, 12)), hq=2, hk=1, d=59,
         layout="sliced"),
    Case("qkvpacked_causal", b=2, sq=63, sk=63, hq=3, hk=3, d=80, causal=True,
         layout="qkvpacked", dtype=F16),
    Case("qkvpacked_varlen", varlen=((7, 7), (0, 0), (1, 1), (20, 20)), d=96,
         layout="qkvpacked", window=(4, 0), dtype=BF16),
    # no lse requested
    Case("no_lse", sq=17, sk=17, d=64, lse=False, dtype=F16),
    # split-KV decode path
    Case("split_decode", sq=1, sk=2000, hq=4, hk=1, d=128, num_splits=4, dtype=F16),
    Case("split_decode_causal", b=2, sq=4, sk=1200, hq=2, hk=2, d=64, causal=True,
         num_splits=7),
    Case("split_masked_split", sq=2, sk=1999, d=96, window=(100, 0), num_splits=5,
         dtype=BF16),  # all but the last split see nothing
    Case("split_alibi_cap", sq=3, sk=900, hq=4, hk=2, d=80, alibi="BH", softcap=4.0,
         num_splits=3),
    Case("split_varlen", varlen=((1, 700), (0, 9), (3, 0), (2, 301)), d=64, dv=40,
         num_splits=6, causal=True, dtype=F16),
    Case("split_more_than_keys", sq=2, sk=5, d=32, num_splits=8),
    Case("split_no_keys_at_all", varlen=((2, 0), (1, 0)), d=64, num_splits=3),
    Case("split_transposed", sq=4, sk=513, hq=2, hk=1, d=59, num_splits=2,
         layout="transposed", dtype=BF16),
    Case("split_decode_long", b=2, sq=1, sk=2048, hq=8, hk=2, d=128, dv=96, num_splits=16,
         window=(-1, 0), dtype=BF16),
    Case("split_sliced_cap", sq=2, sk=1000, hq=3, hk=1, d=111, num_splits=9, softcap=1.5,
         layout="sliced", alibi="H", dtype=F16),
    # other threadgroup shapes (the kernels take any number of rows per threadgroup)
    Case("rows1", sq=5, sk=33, d=64, rows=1, causal=True),
    Case("rows3", sq=17, sk=20, d=96, rows=3, window=(2, 1), dtype=F16),
    Case("rows8_split", sq=9, sk=400, d=64, rows=8, num_splits=3),
    Case("rows32", sq=70, sk=9, d=32, rows=32, causal=True, dtype=BF16),
    # explicit scale, peaked rows (the running max moves a lot)
    Case("scale", sq=17, sk=63, d=64, scale=0.3),
    Case("peaked", sq=33, sk=130, d=64, q_gain=8.0, dtype=F16),
    Case("peaked_split", sq=3, sk=900, d=128, q_gain=8.0, num_splits=4),
]


def _sweep(n, seed=2024):
    """Deterministic random mix of the options, on top of the hand-picked cases."""
    rng = np.random.default_rng(seed)
    dims = (32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 256)
    lens = (1, 2, 17, 63, 64, 65, 130)
    windows = ((-1, -1), (-1, 0), (0, 0), (7, -1), (-1, 9), (16, 4))
    cases = []
    for n_ in range(n):
        d = int(rng.choice(dims))
        dv = int(rng.choice(dims)) if rng.random() < 0.3 else None
        hk = int(rng.choice((1, 2)))
        varlen = None
        if rng.random() < 0.25:
            varlen = tuple((int(rng.choice(lens[:5])), int(rng.choice(lens[:5])))
                           for _ in range(int(rng.integers(1, 4))))
        cases.append(Case(
            f"sweep{n_}", b=int(rng.integers(1, 3)), sq=int(rng.choice(lens)),
            sk=int(rng.choice(lens)), hq=hk * int(rng.choice((1, 2, 3))), hk=hk, d=d, dv=dv,
            dtype=(F32, F16, BF16)[n_ % 3], window=windows[int(rng.integers(len(windows)))],
            softcap=float(rng.choice((0.0, 0.0, 4.0))),
            alibi=(None, None, "H", "BH")[int(rng.integers(4))], varlen=varlen,
            layout=("contiguous", "transposed", "sliced")[int(rng.integers(3))],
            num_splits=int(rng.choice((1, 1, 1, 2, 5))), lse=bool(rng.random() < 0.8)))
    return cases


CASES += _sweep(24)


def run_case(case, schedule, seed):
    """Run a case's kernels under one schedule; checks what needs no reference."""
    q, k, v, out, lse, options = make_problem(case)
    run_vec(q, k, v, out, lse, schedule=schedule, seed=seed, num_splits=case.num_splits,
            rows=case.rows, **options)
    assert not torch.isnan(out).any(), "NaN left in out (row not written, or NaN produced)"
    assert padding_untouched(out), "the kernel wrote outside the output view"
    if lse is not None:
        assert not torch.isnan(lse).any(), "NaN left in lse"
        assert padding_untouched(lse), "the kernel wrote outside the lse view"
    return q, k, v, out, lse, reference_options(options)


def check_fp32_math(out, lse, q, k, v, options):
    """Tighter than the acceptance rule, for this tier's design: all math is fp32, so out must be
    the fp64 result rounded once to the storage type (within one unit of its precision; fp16 or
    bf16 rounding of q * scale or of the probabilities fails this), and lse fp32-accurate."""
    ref_out, ref_lse = reference.attention(q, k, v, compute_dtype=torch.float64, **options)
    rel = torch.finfo(q.dtype).eps if q.dtype != torch.float32 else 1e-5
    excess = (out.double() - ref_out).abs() - (rel * ref_out.abs() + 2e-6)
    assert excess.numel() == 0 or excess.max().item() <= 0, \
        f"out is not fp32-accurate: worst excess {excess.max().item():.3g} over the bound"
    if lse is not None:
        seen = torch.isfinite(ref_lse)
        err = (lse.double()[seen] - ref_lse[seen]).abs() - 4e-6 * (1 + ref_lse[seen].abs())
        assert err.numel() == 0 or err.max().item() <= 0, "lse is not fp32-accurate"


@pytest.fixture
def emulator():
    emu.require()  # skips without a suitable clang, fails instead under $CI


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_vec(emulator, case):
    """Correct under the first schedule, and bit-identical to it under the others (no result
    may depend on the order threads run in; the split merge runs in a fixed order)."""
    (schedule, seed), *others = SCHEDULES
    q, k, v, out, lse, options = run_case(case, schedule, seed)
    check_against_reference(out, lse, q, k, v, **options)
    check_fp32_math(out, lse, q, k, v, options)
    for schedule, seed in others:
        _, _, _, out2, lse2, _ = run_case(case, schedule, seed)
        assert torch.equal(out2, out), f"out differs under schedule {schedule}/{seed}"
        if lse is not None:
            assert torch.equal(lse2, lse), f"lse differs under schedule {schedule}/{seed}"


def test_vec_launch_geometry():
    p = dict(batch=3, heads_q=8, seqlen_q=1, num_splits=1, head_dim=40, head_dim_v=40)
    assert vec_launch(p) == [("mf_attn_vec", (2, 1, 3), (128, 1, 1))]
    assert vec_max_d(p) == 64 and vec_scratch_floats(p) == 0
    p.update(heads_q=1)
    assert vec_launch(p) == [("mf_attn_vec", (1, 1, 3), (32, 1, 1))]
    p.update(heads_q=8, seqlen_q=130, num_splits=5, head_dim_v=256)
    assert vec_launch(p) == [("mf_attn_vec_split", (260, 5, 3), (128, 1, 1)),
                             ("mf_attn_vec_merge", (260, 1, 3), (128, 1, 1))]
    assert vec_scratch_floats(p) == 3 * 8 * 130 * 5 * 258
    assert vec_max_d(p) == 256
    p.update(head_dim=257)
    with pytest.raises(ValueError):
        vec_max_d(p)


# The emulator erases address spaces (device / constant / thread are plain C++). Compiling the
# Metal side of the file as OpenCL C++ (which has the same address-space rules for pointers and
# references) catches a helper that takes `constant` data through a plain reference, a device
# pointer passed where another space is expected, and the like. A stand-in <metal_stdlib>
# supplies what OpenCL lacks; the math functions are OpenCL's own.
METAL_STDLIB_STANDIN = """
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private
#define kernel __kernel
namespace metal {
struct bfloat { float f; bfloat(float x) : f(x) {} operator float() const { return f; } };
float simd_sum(float);
}
"""


@pytest.mark.parametrize("dtype", (0, 1, 2))
def test_vec_address_spaces(emulator, tmp_path, dtype):
    exe = emu.find_compiler()[0]
    (tmp_path / "metal_stdlib").write_text(METAL_STDLIB_STANDIN)
    cmd = [exe, "-x", "clcpp", "-cl-std=clc++2021", "-fsyntax-only",
           "-Xclang", "-finclude-default-header", "-D__METAL_VERSION__=310",
           f"-DMF_DTYPE={dtype}", "-DMF_MAX_D=256", "-I", str(tmp_path),
           "-I", os.path.join(ROOT, "metal"), "-Wno-unknown-attributes", "-Wno-comment",
           "-Werror", KERNEL]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
