"""The host side of the Metal backend, tested without a Mac: embedded sources, tier choice by
device capability, launch plans (kernel, grid, threadgroup, scratch, params), and the plans
executed in the emulator against the reference."""
from __future__ import annotations

import struct

import pytest
import torch

from mtlflash import _C
from metal_emu import emu, host
from numerics import check_against_reference


def test_embedded_sources_listed():
    files = _C.metal_files()
    for name in ("attn_vec.metal", "mf_params.h", "mf_msl.h"):
        assert name in files


def test_expanded_source_is_self_contained():
    text = _C.metal_source("attn_vec.metal")
    lines = [line.strip() for line in text.splitlines()]
    assert not [line for line in lines if line.startswith('#include "')]
    assert "#include <metal_stdlib>" in text  # system includes stay
    assert "typedef struct mf_params" in text and "#ifndef MF_PARAMS_H" in text
    assert "MF_ATTN_KERNEL(mf_attn_vec)" in text


def test_unknown_source_name():
    with pytest.raises(RuntimeError, match="no Metal source named 'nope.metal'"):
        _C.metal_source("nope.metal")


def test_source_dir_override(tmp_path, monkeypatch):
    import os

    src = os.path.join(os.path.dirname(__file__), "..", "metal")
    for name in _C.metal_files():
        text = open(os.path.join(src, name)).read()
        if name == "attn_vec.metal":
            text = "/* from the override directory */\n" + text
        (tmp_path / name).write_text(text)
    monkeypatch.setenv("MTLFLASH_METAL_SOURCE_DIR", str(tmp_path))
    assert _C.metal_source("attn_vec.metal").startswith("/* from the override directory */")
    (tmp_path / "mf_msl.h").unlink()
    with pytest.raises(RuntimeError, match="MTLFLASH_METAL_SOURCE_DIR: cannot open"):
        _C.metal_source("attn_vec.metal")


def plan(tier="vec", B=1, sq=16, sk=16, hq=4, hk=2, d=64, dv=None, dtype=torch.float16, device_caps=None, **opts):
    dv = dv or d
    q = torch.zeros(B, sq, hq, d, dtype=dtype)
    k = torch.zeros(B, sk, hk, d, dtype=dtype)
    v = torch.zeros(B, sk, hk, dv, dtype=dtype)
    out = torch.empty(B, sq, hq, dv, dtype=dtype)
    return _C.metal_plan(tier, device_caps or host.caps(), "plan", q, k, v, None, None, 0, 0, None,
                         opts.get("causal", False), -1, -1, 0.0, None, False, out, None)


def params_of(p):
    ints = struct.unpack_from("<16i", p["params"], 128)
    return dict(zip(["batch", "heads_q", "heads_k", "group", "head_dim", "head_dim_v", "seqlen_q", "seqlen_k",
                     "window_left", "window_right", "flags", "num_splits", "split_size"], ints))


def test_vec_prefill_plan():
    p = plan(B=2, sq=100, hq=8, hk=2, d=80)
    assert p["source"] == "attn_vec.metal"
    assert p["defines"] == {"MF_DTYPE": 1, "MF_MAX_D": 128, "MF_MAX_DV": 128, "MF_PAGED": 0}
    assert p["append"] is None
    assert p["launches"] == [("mf_attn_vec", (200, 1, 2), (128, 1, 1))]
    assert p["scratch_floats"] == 0 and params_of(p)["num_splits"] == 1


@pytest.mark.parametrize("d,dv,max_d,max_dv", [(32, 32, 64, 64), (64, 64, 64, 64), (65, 16, 128, 64),
                                               (40, 200, 64, 256), (256, 256, 256, 256), (576, 512, 576, 512)])
def test_vec_head_dim_variants(d, dv, max_d, max_dv):
    defines = plan(d=d, dv=dv)["defines"]
    assert (defines["MF_MAX_D"], defines["MF_MAX_DV"]) == (max_d, max_dv)


def test_vec_decode_splits_keys():
    p = plan(B=1, sq=1, sk=32768, hq=32, hk=8, d=128, dtype=torch.bfloat16)
    fields = params_of(p)
    assert fields["num_splits"] == 32 and fields["split_size"] == 1024
    assert [launch[0] for launch in p["launches"]] == ["mf_attn_vec_split", "mf_attn_vec_merge"]
    assert p["launches"][0][1] == (8, 32, 1)  # 32 (head, row) pairs, 4 per threadgroup; 32 splits
    assert p["scratch_floats"] == 1 * 32 * 1 * 32 * (128 + 2)


def test_vec_no_split_for_short_keys_or_many_rows():
    assert params_of(plan(sq=1, sk=1000))["num_splits"] == 1
    assert params_of(plan(B=8, sq=64, sk=4096, hq=8))["num_splits"] == 1


def test_bfloat_needs_metal_3_1():
    with pytest.raises(RuntimeError, match="bfloat16 needs Metal 3.1"):
        plan(dtype=torch.bfloat16, device_caps=host.caps(bfloat=0))
    assert plan(dtype=torch.float16, device_caps=host.caps(bfloat=0))["tier"] == "vec"


@pytest.mark.parametrize("tier,reason", [("tensorops", "not implemented"), ("cpu", "not a Metal tier")])
def test_tiers_that_do_not_serve(tier, reason):
    with pytest.raises(RuntimeError, match=reason):
        plan(tier=tier)


def test_unknown_tier():
    with pytest.raises(ValueError, match="unknown tier"):
        plan(tier="fast")


# --- plans executed in the emulator ---------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _need_emulator():
    emu.require()


SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 3), ("random", 77)]


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_vec_plan_prefill_runs(schedule, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 33, 4, 64, generator=g).half()
    k = torch.randn(2, 50, 2, 64, generator=g).half()
    v = torch.randn(2, 50, 2, 48, generator=g).half()
    out, lse, _ = host.run("vec", q, k, v, causal=True, schedule=schedule, seed=seed)
    check_against_reference(out, lse, q, k, v, causal=True)


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_vec_plan_decode_runs_split(schedule, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 8, 128, generator=g).bfloat16()
    k = torch.randn(1, 1500, 2, 128, generator=g).bfloat16()
    v = torch.randn(1, 1500, 2, 128, generator=g).bfloat16()
    out, lse, p = host.run("vec", q, k, v, causal=True, window_size=(700, 0), schedule=schedule, seed=seed)
    assert params_of(p)["num_splits"] == 3  # the split path ran, incl. a fully masked split
    check_against_reference(out, lse, q, k, v, causal=True, window_size=(700, 0))


def test_vec_plan_varlen_runs():
    cu_q = torch.tensor([0, 3, 3, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 10, 11, 40], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(20, 4, 40, generator=g)
    k = torch.randn(40, 1, 40, generator=g)
    v = torch.randn(40, 1, 40, generator=g)
    slopes = torch.rand(3, 4, generator=g)
    out, lse, _ = host.run("vec", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17, max_seqlen_k=29,
                           causal=True, alibi_slopes=slopes, softcap=4.0, schedule="random", seed=9)
    check_against_reference(out, lse, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True,
                            alibi_slopes=slopes, softcap=4.0)


# --- the automatic choice and the simdgroup tier's plans -------------------------------------------

@pytest.mark.parametrize("sq,sk,expected", [(1, 4096, "vec"), (8, 4096, "vec"), (9, 512, "simdgroup"),
                                            (9, 4096, "vec"), (64, 4096, "vec"), (65, 4096, "simdgroup"),
                                            (4096, 4096, "simdgroup")])
def test_auto_choice_decode_to_vec_prefill_to_simdgroup(sq, sk, expected):
    # 9-64 rows over long keys: vec's split-KV path (the simdgroup tier has no key splitting)
    assert plan("auto", sq=sq, sk=sk)["tier"] == expected


def test_auto_choice_many_short_rows_stay_on_simdgroup():
    # 64 rows but enough threadgroups for the simdgroup tier (B * Hq * 2 >= 64): no split needed
    assert plan("auto", B=8, sq=64, sk=4096, hq=8)["tier"] == "simdgroup"
    # 540 rows in 60 threadgroups of the simdgroup tier (one per head): too few, vec splits
    p = plan("auto", B=1, sq=9, sk=4096, hq=60, hk=2)
    assert p["tier"] == "vec" and params_of(p)["num_splits"] == 8
    assert plan("auto", B=1, sq=9, sk=4096, hq=64, hk=2)["tier"] == "simdgroup"


@pytest.mark.parametrize("tier", ["auto", "vec", "simdgroup"])
def test_metal_tiers_need_apple7(tier):
    # the kernels rely on 32-wide simdgroups (simd_sum, simdgroup_matrix): Intel/AMD Macs run the
    # reference tier
    with pytest.raises(RuntimeError, match="Apple7|no Metal tier serves"):
        plan(tier, sq=512, device_caps=host.caps(apple_family=6))


SG_TABLE = [  # (dtype, D, Dv) -> (MF_D, MF_DV, simdgroups, keys per block, threadgroup bytes)
    # bytes = (8 * simdgroups * (MF_D + 4) + max(MF_D * (keys + 4), keys * (MF_DV + 4))) * element size
    (torch.float16, 64, 64, (64, 64, 4, 32, 8960)),
    (torch.bfloat16, 128, 128, (128, 128, 4, 16, 13568)),
    (torch.float32, 96, 96, (96, 96, 4, 32, 26624)),
    (torch.float32, 128, 128, (128, 128, 4, 16, 27136)),
    (torch.float32, 160, 160, (160, 160, 4, 8, 28672)),
    (torch.float32, 192, 128, (192, 128, 2, 16, (8 * 2 * 196 + 192 * 20) * 4)),
    (torch.float32, 256, 256, (256, 256, 2, 8, 28928)),
    (torch.float16, 59, 40, (64, 40, 4, 32, (8 * 4 * 68 + 64 * 36) * 2)),
]


@pytest.mark.parametrize("dtype,d,dv,expected", SG_TABLE)
def test_simdgroup_tiles_within_32k(dtype, d, dv, expected):
    p = plan("simdgroup", B=2, sq=100, hq=4, hk=2, d=d, dv=dv, dtype=dtype)
    defs = p["defines"]
    got = (defs["MF_D"], defs["MF_DV"], defs["MF_SG"], defs["MF_BK"], p["threadgroup_memory"])
    assert got == expected
    assert p["threadgroup_memory"] <= 32768
    sg = defs["MF_SG"]
    assert p["launches"] == [("mf_attn_simdgroup", ((100 + 8 * sg - 1) // (8 * sg), 4, 2), (32 * sg, 1, 1))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_simdgroup_budget_for_every_head_dim(dtype):
    for d in range(8, 257, 8):
        p = plan("simdgroup", sq=16, d=d, dv=d, dtype=dtype)
        assert p["threadgroup_memory"] <= 32768, d


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_simdgroup_plan_runs(schedule, seed):
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(2, 41, 4, 80, generator=g).bfloat16()
    k = torch.randn(2, 70, 2, 80, generator=g).bfloat16()
    v = torch.randn(2, 70, 2, 40, generator=g).bfloat16()
    slopes = torch.rand(4, generator=g)
    out, lse, p = host.run("auto", q, k, v, causal=True, window_size=(30, -1), alibi_slopes=slopes,
                           schedule=schedule, seed=seed)
    assert p["tier"] == "simdgroup"
    check_against_reference(out, lse, q, k, v, causal=True, window_size=(30, -1), alibi_slopes=slopes)
