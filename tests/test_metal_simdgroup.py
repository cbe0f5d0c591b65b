"""The simdgroup tier (metal/attn_simdgroup.metal) run in the MSL emulator against mtlflash.reference.

Each case builds its tensors on the CPU, asks the C core for the exact mf_params a real Metal
call would bind (mtlflash.metal_params), launches mf_attn_simdgroup with the defines and
geometry of simdgroup_config() / simdgroup_launch(), and checks out and lse with the project's
acceptance rule (tests/numerics.py). Output buffers start as NaN (view and padding), so a row
the kernel forgets to write, or a write outside the view, fails. Every case runs under the
forward, reverse and two seeded random schedules, and the results must be bit-identical across
them (nothing may depend on the order threads run in between barriers).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KERNEL = os.path.join(ROOT, "metal", "attn_simdgroup.metal")
sys.path.insert(0, HERE)

import mtlflash  # noqa: E402
from numerics import check_against_reference  # noqa: E402
from metal_emu import cases, emu  # noqa: E402
from metal_emu.cases import buffer_of, make_problem, padding_untouched, reference_options  # noqa: E402,F401

# --------------------------------------------------------------------------------------------
# Host side of the simdgroup tier. Pure functions of the mf_params fields (a dict field ->
# value, as emu.unpack_params returns them) and the element size, written to move to
# csrc/plan unchanged: integers only, no torch.

SG_TG_BYTES_MAX = 32768  # threadgroup memory limit of every Apple GPU
SG_PAD = 4  # MF_PAD of the kernel: row padding of the staged tiles, in elements
SG_MAX_D = 256
SG_ELEM_BYTES = {0: 4, 1: 2, 2: 2}  # MF_DTYPE -> bytes


def _round8(n):
    return (n + 7) // 8 * 8


def simdgroup_tg_bytes(d8, dv8, sg, bk, elem_bytes):
    """Threadgroup memory of a variant: Q tile + the shared K^T / V buffer (see the kernel)."""
    q_elems = 8 * sg * (d8 + SG_PAD)
    kv_elems = max(d8 * (bk + SG_PAD), bk * (dv8 + SG_PAD))
    return (q_elems + kv_elems) * elem_bytes


def simdgroup_config(p, dtype_code):
    """Defines and tile sizes for a problem: dict with MF_DTYPE, MF_D, MF_DV, MF_SG, MF_BK and
    the derived rows per threadgroup (bq) and threadgroup bytes (tg_bytes). Tiles: the first of
    (4, bk0), (4, bk0/2), (2, bk0), (2, bk0/2), (1, 8) as (simdgroups, keys per block) that fits
    32 KiB with both head dims at max(MF_D, MF_DV), bk0 = 32 when that max is <= 96, else 16
    (so the tiles depend on the dtype and the larger padded head dim only)."""
    d, dv = p["head_dim"], p["head_dim_v"]
    if d < 1 or dv < 1 or d > SG_MAX_D or dv > SG_MAX_D:
        raise ValueError(f"[simdgroup] head dims ({d}, {dv}) outside 1..{SG_MAX_D}")
    if p["num_splits"] != 1:
        raise ValueError("[simdgroup] num_splits must be 1 (split-KV is the vec tier's)")
    eb = SG_ELEM_BYTES[dtype_code]
    d8, dv8 = _round8(d), _round8(dv)
    bk0 = 32 if max(d8, dv8) <= 96 else 16
    big = max(d8, dv8)
    for sg, bk in ((4, bk0), (4, bk0 // 2), (2, bk0), (2, bk0 // 2), (1, 8)):
        # chosen as if both head dims were `big` (a table by max head dim); the real use is less
        if simdgroup_tg_bytes(big, big, sg, bk, eb) <= SG_TG_BYTES_MAX:
            return {"MF_DTYPE": dtype_code, "MF_D": d8, "MF_DV": dv8, "MF_SG": sg, "MF_BK": bk,
                    "bq": 8 * sg, "tg_bytes": simdgroup_tg_bytes(d8, dv8, sg, bk, eb)}
    raise ValueError(f"[simdgroup] no tile fits 32 KiB for head dims ({d}, {dv})")


def simdgroup_defines(cfg):
    return {name: cfg[name] for name in ("MF_DTYPE", "MF_D", "MF_DV", "MF_SG", "MF_BK")}


def simdgroup_launch(p, cfg):
    """[(kernel name, grid in threadgroups, threadgroup size)] for a problem."""
    bq = cfg["bq"]
    gx = (p["seqlen_q"] + bq - 1) // bq
    return [("mf_attn_simdgroup", (gx, p["heads_q"], p["batch"]), (32 * cfg["MF_SG"], 1, 1))]


# --------------------------------------------------------------------------------------------
# Emulator plumbing

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_LIBS = {}


def simdgroup_library(cfg):
    defines = simdgroup_defines(cfg)
    key = tuple(sorted(defines.items()))
    if key not in _LIBS:
        _LIBS[key] = emu.build(KERNEL, defines)
    return _LIBS[key]


def run_simdgroup(q, k, v, out, lse, *, schedule, seed=0, **options):
    """Launch the simdgroup kernel on existing tensors (out / lse written in place)."""
    raw = mtlflash.metal_params(q, k, v, out, lse, **options)
    p = emu.unpack_params(raw)
    cfg = simdgroup_config(p, DTYPE_CODE[q.dtype])
    lib = simdgroup_library(cfg)
    buffers = {emu.SLOT_Q: buffer_of(q), emu.SLOT_K: buffer_of(k), emu.SLOT_V: buffer_of(v),
               emu.SLOT_O: buffer_of(out), emu.SLOT_PARAMS: raw}
    if lse is not None:
        buffers[emu.SLOT_LSE] = buffer_of(lse)
    if options.get("cu_seqlens_q") is not None:
        buffers[emu.SLOT_CU_Q] = options["cu_seqlens_q"].numpy()
        buffers[emu.SLOT_CU_K] = options["cu_seqlens_k"].numpy()
    if options.get("alibi_slopes") is not None:
        buffers[emu.SLOT_ALIBI] = buffer_of(options["alibi_slopes"])
    for name, grid, tg in simdgroup_launch(p, cfg):
        lib.launch(name, grid=grid, threadgroup=tg, buffers=buffers, schedule=schedule, seed=seed)
    return p, cfg


# --------------------------------------------------------------------------------------------
# Cases

SCHEDULES = (("forward", 0), ("reverse", 0), ("random", 11), ("random", 12345))


Case = cases.Case

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

CASES = [
    # lengths, incl. 1 and both orders of Sq != Sk; partial and several query tiles
    Case("len1", sq=1, sk=1, d=32),
    Case("len2", sq=2, sk=2, d=40, dtype=F16),
    Case("len17_63", sq=17, sk=63, d=59, dtype=BF16),
    Case("len63_17", sq=63, sk=17, d=64),
    Case("len64", b=2, sq=64, sk=64, d=80, dtype=F16),
    Case("len65_130", sq=65, sk=130, d=96, dtype=BF16, hq=1, hk=1),
    Case("len130_65", sq=130, sk=65, d=111, hq=1, hk=1),
    Case("len1_130", sq=1, sk=130, d=128, dtype=F16),
    Case("len130_1", sq=130, sk=1, d=64, hq=1, hk=1, dtype=BF16),
    Case("no_keys", sq=5, sk=0, d=64),  # every row sees nothing: zero rows, lse +inf
    # causal, incl. Sq > Sk (leading rows see nothing)
    Case("causal_sq_gt_sk", sq=65, sk=17, d=128, causal=True),
    Case("causal_sq_gt_sk_long", sq=130, sk=63, d=40, causal=True, dtype=F16, hq=1, hk=1),
    Case("causal_sq_lt_sk", b=2, sq=17, sk=130, d=160, causal=True, dtype=F16),
    Case("causal_square", sq=64, sk=64, d=192, causal=True, dtype=BF16, hq=1, hk=1),
    Case("causal_square_f32_256", sq=65, sk=65, d=256, causal=True, hq=1, hk=1),
    Case("causal_len2", sq=2, sk=2, d=256, causal=True),
    # head dims (fp32 big dims take the smaller tiles), Dv != D
    Case("d160_f32", sq=33, sk=63, d=160, hq=1, hk=1),
    Case("d192_f32", sq=40, sk=41, d=192, hq=1, hk=1, window=(9, 2)),
    Case("dv_lt_d", sq=17, sk=63, d=192, dv=128, dtype=F16),
    Case("dv_gt_d", sq=17, sk=65, d=40, dv=111, causal=True),
    Case("dv_256", sq=2, sk=130, d=64, dv=256, dtype=BF16),
    Case("dv_256_f32", sq=20, sk=33, d=80, dv=256, hq=1, hk=1),
    Case("d32_dv59", sq=63, sk=2, d=32, dv=59),
    Case("d8_dv3", sq=9, sk=11, d=8, dv=3, dtype=F16),
    # GQA / MQA
    Case("gqa", sq=17, sk=63, hq=6, hk=2, d=64, causal=True, dtype=F16),
    Case("mqa", b=2, sq=33, sk=130, hq=4, hk=1, d=128, dtype=BF16),
    Case("mqa_f32", sq=40, sk=17, hq=3, hk=1, d=59),
    # windows
    Case("win_-1_0", sq=63, sk=63, d=64, window=(-1, 0)),
    Case("win_0_0", sq=17, sk=65, d=80, window=(0, 0), dtype=F16),
    Case("win_0_0_sq_gt_sk", sq=65, sk=17, d=32, window=(0, 0), dtype=BF16, hq=1, hk=1),
    Case("win_5_-1", sq=65, sk=64, d=96, window=(5, -1)),
    Case("win_-1_3", sq=64, sk=65, d=111, window=(-1, 3), dtype=BF16),
    Case("win_4_7_sq_gt_sk", sq=130, sk=17, d=40, window=(4, 7), hq=1, hk=1),
    Case("win_40_-1_long", sq=130, sk=130, d=64, window=(40, -1), hq=1, hk=1, dtype=F16),
    Case("win_2_50_sq_lt_sk", sq=33, sk=130, d=64, window=(2, 50), hq=1, hk=1),
    # softcap, ALiBi
    Case("softcap", sq=17, sk=130, d=64, softcap=3.0, dtype=F16),
    Case("softcap_causal", sq=65, sk=65, d=128, softcap=10.0, causal=True),
    Case("alibi_h", sq=17, sk=63, hq=4, hk=2, d=64, alibi="H"),
    Case("alibi_h_causal", sq=63, sk=64, d=96, alibi="H", causal=True, dtype=BF16),
    Case("alibi_bh", b=2, sq=17, sk=65, d=59, alibi="BH", dtype=F16),
    Case("alibi_bh_causal_cap", b=2, sq=64, sk=17, d=80, alibi="BH", causal=True, softcap=5.0),
    Case("alibi_bh_causal", b=2, sq=33, sk=70, hq=2, hk=1, d=64, alibi="BH", causal=True,
         dtype=F16),
    # many key blocks: sliding window over a longer sequence (interior blocks unmasked,
    # blocks left of the window skipped), and a peaked causal one
    Case("long_window", sq=200, sk=300, hq=1, hk=1, d=64, window=(70, 10), dtype=BF16),
    Case("long_causal_peaked", sq=96, sk=260, hq=1, hk=1, d=32, causal=True, q_gain=6.0),
    # varlen: an empty sequence, a length-1 sequence, queries without keys
    Case("varlen", varlen=((5, 7), (0, 0), (1, 1), (17, 63), (3, 2)), d=64, hq=4, hk=2),
    Case("varlen_causal", varlen=((1, 17), (0, 3), (65, 64), (2, 0)), d=111, causal=True,
         dtype=F16),
    Case("varlen_window_alibi", varlen=((17, 17), (1, 1), (0, 5), (30, 41)), d=40,
         window=(3, 2), alibi="BH", dtype=BF16),
    Case("varlen_cap", varlen=((9, 3), (4, 30)), d=256, dv=64, softcap=2.0, hq=2, hk=1),
    Case("varlen_long", varlen=((70, 130), (1, 0), (40, 33)), d=128, hq=2, hk=1,
         window=(-1, 0), dtype=BF16),
    # non-contiguous views
    Case("transposed", b=2, sq=17, sk=63, d=64, layout="transposed"),
    Case("transposed_gqa_causal", sq=65, sk=64, hq=4, hk=2, d=128, causal=True,
         layout="transposed", dtype=F16),
    Case("sliced", b=2, sq=17, sk=65, hq=3, hk=3, d=40, layout="sliced", dtype=BF16),
    Case("sliced_varlen", varlen=((5, 6), (0, 2), (12, 12)), hq=2, hk=1, d=59,
         layout="sliced"),
    # no lse requested
    Case("no_lse", sq=17, sk=17, d=64, lse=False, dtype=F16),
    # explicit scale, peaked rows (the running max moves a lot between blocks)
    Case("scale", sq=17, sk=63, d=64, scale=0.3),
    Case("peaked", sq=33, sk=130, d=64, q_gain=8.0, dtype=F16),
    Case("peaked_f32_bk8", sq=33, sk=130, d=160, q_gain=8.0, hq=1, hk=1),
]


def _sweep(n, seed=4051):
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
            sk=int(rng.choice(lens)), hq=hk * int(rng.choice((1, 2))), hk=hk, d=d, dv=dv,
            dtype=(F32, F16, BF16)[n_ % 3], window=windows[int(rng.integers(len(windows)))],
            softcap=float(rng.choice((0.0, 0.0, 4.0))),
            alibi=(None, None, "H", "BH")[int(rng.integers(4))], varlen=varlen,
            layout=("contiguous", "transposed", "sliced")[int(rng.integers(3))],
            lse=bool(rng.random() < 0.8)))
    return cases


CASES += _sweep(24)


def check_case(case, schedule, seed):
    q, k, v, out, lse, options = make_problem(case)
    run_simdgroup(q, k, v, out, lse, schedule=schedule, seed=seed, **options)
    assert not torch.isnan(out).any(), "NaN left in out (row not written, or NaN produced)"
    if lse is not None:
        assert not torch.isnan(lse).any(), "NaN left in lse"
    assert padding_untouched(out), "the kernel wrote outside the output view"
    if lse is not None:
        assert padding_untouched(lse), "the kernel wrote outside the lse view"
    check_against_reference(out, lse, q, k, v, **reference_options(options))
    return out, lse


@pytest.fixture(autouse=True)
def _emulator():
    emu.require()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_simdgroup(case):
    """Correct under every schedule, and bit-identical across schedules."""
    first = None
    for schedule, seed in SCHEDULES:
        out, lse = check_case(case, schedule, seed)
        if first is None:
            first = (out, lse)
            continue
        assert torch.equal(out, first[0]), f"out differs under {schedule}/{seed}"
        if lse is not None:
            assert torch.equal(lse, first[1]), f"lse differs under {schedule}/{seed}"


# --------------------------------------------------------------------------------------------
# Host functions, variants, compile-time limits


def test_simdgroup_launch_geometry():
    p = dict(batch=3, heads_q=8, seqlen_q=65, num_splits=1, head_dim=40, head_dim_v=40)
    cfg = simdgroup_config(p, 1)
    assert simdgroup_defines(cfg) == {"MF_DTYPE": 1, "MF_D": 40, "MF_DV": 40, "MF_SG": 4,
                                      "MF_BK": 32}
    assert simdgroup_launch(p, cfg) == [("mf_attn_simdgroup", (3, 8, 3), (128, 1, 1))]
    p.update(seqlen_q=64, head_dim=256, head_dim_v=111)
    cfg = simdgroup_config(p, 0)  # fp32, D = 256: two simdgroups, 8 keys per block
    assert (cfg["MF_D"], cfg["MF_DV"], cfg["MF_SG"], cfg["MF_BK"], cfg["bq"]) == \
        (256, 112, 2, 8, 16)
    assert simdgroup_launch(p, cfg) == [("mf_attn_simdgroup", (4, 8, 3), (64, 1, 1))]
    p.update(seqlen_q=0)
    assert simdgroup_launch(p, cfg)[0][1] == (0, 8, 3)  # nothing to launch
    for bad in (dict(head_dim=257), dict(head_dim_v=300), dict(num_splits=2)):
        with pytest.raises(ValueError):
            simdgroup_config(dict(p, **bad), 1)


# (MF_SG, MF_BK, largest threadgroup bytes) per (dtype code, upper end of a range of
# m = max(MF_D, MF_DV)), as documented at the top of the kernel
DOCUMENTED_TILES = {
    (1, 96): (4, 32, 13312), (1, 256): (4, 16, 26880),
    (2, 96): (4, 32, 13312), (2, 256): (4, 16, 26880),
    (0, 96): (4, 32, 26624), (0, 152): (4, 16, 32128), (0, 176): (4, 8, 31488),
    (0, 224): (2, 16, 32512), (0, 256): (2, 8, 28928),
}


def test_simdgroup_tiles_table():
    """Every (D, Dv, dtype) gets a tile within 32 KiB, and the tiles are the documented ones."""
    largest = {}
    for code in (0, 1, 2):
        for d in range(8, 257, 8):
            for dv in range(8, 257, 8):
                cfg = simdgroup_config(dict(head_dim=d, head_dim_v=dv, num_splits=1), code)
                assert cfg["tg_bytes"] <= SG_TG_BYTES_MAX
                assert cfg["tg_bytes"] == simdgroup_tg_bytes(d, dv, cfg["MF_SG"], cfg["MF_BK"],
                                                             SG_ELEM_BYTES[code])
                m = max(d, dv)
                key = (code, min(x for (c, x) in DOCUMENTED_TILES if c == code and x >= m))
                assert (cfg["MF_SG"], cfg["MF_BK"]) == DOCUMENTED_TILES[key][:2], (d, dv, cfg)
                largest[key] = max(largest.get(key, 0), cfg["tg_bytes"])
    assert largest == {key: val[2] for key, val in DOCUMENTED_TILES.items()}


def test_simdgroup_over_budget_refused():
    """A variant over 32 KiB of threadgroup memory does not compile (and the host never asks)."""
    assert simdgroup_tg_bytes(256, 256, 4, 16, 4) > SG_TG_BYTES_MAX
    with pytest.raises(emu.BuildError, match="32 KiB"):
        emu.build(KERNEL, {"MF_DTYPE": 0, "MF_D": 256, "MF_DV": 256, "MF_SG": 4, "MF_BK": 16})


def test_simdgroup_tile_shapes_run():
    """Tile shapes the host picks only for fp32 big head dims, forced onto a small fp16
    problem (more simdgroups than query rows, 8-key blocks, a one-simdgroup threadgroup)."""
    case = Case("shapes", sq=19, sk=45, d=40, dv=24, dtype=F16, window=(6, 3), alibi="H")
    for sg, bk in ((1, 8), (2, 32), (4, 8)):
        q, k, v, out, lse, options = make_problem(case)
        raw = mtlflash.metal_params(q, k, v, out, lse, **options)
        p = emu.unpack_params(raw)
        cfg = dict(simdgroup_config(p, 1), MF_SG=sg, MF_BK=bk, bq=8 * sg)
        lib = simdgroup_library(cfg)
        buffers = {emu.SLOT_Q: buffer_of(q), emu.SLOT_K: buffer_of(k), emu.SLOT_V: buffer_of(v),
                   emu.SLOT_O: buffer_of(out), emu.SLOT_LSE: buffer_of(lse),
                   emu.SLOT_ALIBI: buffer_of(options["alibi_slopes"]), emu.SLOT_PARAMS: raw}
        for name, grid, tg in simdgroup_launch(p, cfg):
            lib.launch(name, grid=grid, threadgroup=tg, buffers=buffers, schedule="random",
                       seed=sg * 100 + bk)
        assert not torch.isnan(out).any()
        check_against_reference(out, lse, q, k, v, **reference_options(options))


# The emulator erases address spaces (device / constant / threadgroup / thread are plain C++).
# Compiling the Metal side of the file as OpenCL C++ (same address-space rules for pointers and
# references) catches a helper that takes `constant` data through a plain reference, a
# threadgroup pointer passed where a device pointer is expected, and the like. A stand-in
# <metal_stdlib> declares what OpenCL lacks; the math functions are OpenCL's own.
METAL_STDLIB_STANDIN = """
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private
#define kernel __kernel
namespace metal {
struct bfloat { float f; bfloat(float x) : f(x) {} operator float() const { return f; } };
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
void threadgroup_barrier(mem_flags);
template <class T> T simd_shuffle_xor(T, ushort);
template <class T, int C, int R> struct simdgroup_matrix {
    typedef T elements_t __attribute__((ext_vector_type(2)));
    elements_t e;
    elements_t &thread_elements() { return e; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
template <class T, int C, int R> simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T);
template <class T>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8> &, const simdgroup_matrix<T, 8, 8> &,
                                   const simdgroup_matrix<T, 8, 8> &,
                                   const simdgroup_matrix<T, 8, 8> &);
}
"""


@pytest.mark.parametrize("dtype", (0, 1, 2))
def test_simdgroup_address_spaces(tmp_path, dtype):
    exe = emu.find_compiler()[0]
    (tmp_path / "metal_stdlib").write_text(METAL_STDLIB_STANDIN)
    for d, dv in ((40, 256), (256, 8)):
        cfg = simdgroup_config(dict(head_dim=d, head_dim_v=dv, num_splits=1), dtype)
        defines = [f"-D{n}={x}" for n, x in simdgroup_defines(cfg).items()]
        cmd = [exe, "-x", "clcpp", "-cl-std=clc++2021", "-fsyntax-only",
               "-Xclang", "-finclude-default-header", "-D__METAL_VERSION__=310", *defines,
               "-I", str(tmp_path), "-I", os.path.join(ROOT, "metal"),
               "-Wno-unknown-attributes", "-Wno-comment", "-Werror", KERNEL]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
