"""The Metal kv-cache path run in the MSL emulator: the host planner (mtlflash._C.kvcache_metal_plan
and metal_plan), the append + rotary kernel (metal/kv_append.metal) and the vec tier reading
keys through every kv layout (metal/attn_vec.metal with MF_PAGED, cache_batch_idx, seqused_k,
leftpad), against mtlflash.reference.

Caches are filled so that a wrong address shows: every slot that holds no valid key before the
call (unused blocks, unpicked cache rows, positions past cache_seqlens, positions before
cache_leftpad) is NaN. The kernels must never read one (a NaN in out fails the acceptance
rule) except where the append pass writes it first. The reference gets the same caches with the
NaN replaced by 0 (invisible keys do not change its result). After the call: every slot the
append pass does not write is bitwise unchanged (NaN payloads included), new v rows are bitwise
the given ones, new k rows equal the reference's (rotated) rows within 1e-3 relative (bitwise
without rotary). Every case runs under the forward schedule and is bit-identical under reverse
and seeded random schedules.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mtlflash import _C, metal_stream, reference
from metal_emu import emu, host
from metal_emu.cases import padding_untouched
from numerics import check_against_reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SCHEDULES = (("forward", 0), ("reverse", 0), ("random", 7))


@dataclass(frozen=True)
class KvCase:
    name: str
    b: int = 2
    sq: int = 1
    hq: int = 4
    hk: int = 2
    d: int = 64
    dv: int = None
    dtype: torch.dtype = F16
    lens: tuple = (5, 20)      # cache_seqlens before the call; None: no cache_seqlens (whole cache)
    s_new: int = 0             # new k/v rows (0 with append=True: k/v of zero rows)
    append: bool = None        # pass k/v (default: s_new > 0)
    cap: int = None            # dense capacity (default max(lens) + s_new + 3)
    page: int = None           # paged: page size
    batch_idx: bool = False    # dense rows picked by cache_batch_idx (two spare rows)
    leftpad: tuple = None
    rotary: int = 0            # rotary_dim (0: none)
    interleaved: bool = True
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str = None          # None | "H" | "BH"
    lse: bool = True
    num_splits: int = 0        # 0: the planner's choice
    expect_splits: int = None  # check the plan split the keys this many ways
    sliced: bool = False       # q, caches and new rows as views into larger NaN buffers


CASES = [
    KvCase("dense_decode", lens=(5, 33), s_new=1),
    KvCase("dense_append_rot_interleaved", sq=3, s_new=3, causal=True, rotary=32, dtype=BF16, lens=(4, 17)),
    KvCase("dense_rot_neox_noncausal", sq=2, s_new=2, rotary=16, interleaved=False, dtype=F32, lens=(7, 1)),
    KvCase("dense_local_rot_rows", sq=4, s_new=4, window=(4, 2), rotary=24, interleaved=False, lens=(9, 12)),
    KvCase("paged_page1", page=1, lens=(0, 7), s_new=1, causal=True),
    KvCase("paged_page16_gqa", page=16, lens=(17, 40), s_new=2, sq=2, rotary=32, hq=6, hk=2, dtype=BF16,
           window=(8, 0)),
    KvCase("paged_page256_softcap", page=256, lens=(3, 300), sq=2, softcap=3.0, hq=2, hk=1),
    KvCase("paged_page16_leftpad", page=16, lens=(20, 33), leftpad=(5, 17), s_new=1, causal=True, alibi="H"),
    KvCase("batch_idx_alibi", batch_idx=True, lens=(9, 20), s_new=1, dtype=F32, alibi="BH"),
    KvCase("batch_idx_rot", batch_idx=True, lens=(2, 11), s_new=3, sq=3, causal=True, rotary=64, dtype=BF16),
    KvCase("leftpad_rot_neox", leftpad=(2, 10), lens=(6, 30), s_new=2, sq=2, causal=True, alibi="H",
           rotary=16, interleaved=False),
    KvCase("seqused_zero_no_new", lens=(0, 0), append=False, sq=2),  # no key at all: zero rows, lse +inf
    # k/v with zero new rows (rotary left out: with S_new == 0 the C core still rotates q, the
    # reference does not; the two disagree there, see the report of issue 13)
    KvCase("new_rows_zero", lens=(0, 6), s_new=0, append=True, causal=True, sq=2),
    KvCase("full_capacity", cap=20, lens=(18, 5), s_new=2, sq=2, causal=True),
    KvCase("paged_full_capacity", page=4, lens=(10, 7), s_new=2, causal=True),  # 3 blocks of 4: 12 keys
    KvCase("mqa_dv_lt_d", hq=8, hk=1, d=96, dv=64, lens=(30, 12), s_new=1),
    KvCase("dv_gt_d_softcap", d=40, dv=72, lens=(10, 3), s_new=2, sq=2, softcap=5.0, dtype=BF16),
    KvCase("no_seqlens_leftpad", lens=None, cap=19, leftpad=(3, 0), sq=2, causal=True),
    KvCase("no_lse", lens=(4, 8), s_new=1, lse=False),
    KvCase("mla_576_512", b=1, hq=16, hk=1, d=576, dv=512, lens=(40,), s_new=1, page=16, dtype=BF16,
           rotary=64, interleaved=False),
    KvCase("mla_576_512_split", b=2, hq=16, hk=1, d=576, dv=512, lens=(50, 9), s_new=1, num_splits=3,
           expect_splits=3, causal=True),
    KvCase("split_decode_paged", lens=(100, 37), s_new=1, page=16, num_splits=4, expect_splits=4, causal=True),
    KvCase("split_spec_12_rows", sq=12, lens=(100, 150), s_new=4, page=16, num_splits=4, expect_splits=4,
           causal=True, hq=4, hk=1, rotary=32),
    KvCase("split_64_rows", b=1, sq=64, hq=2, hk=1, lens=(136,), s_new=0, page=1, num_splits=5,
           expect_splits=5, causal=True),
    KvCase("split_9_rows_leftpad_window", sq=9, lens=(60, 80), leftpad=(11, 0), s_new=2, num_splits=3,
           expect_splits=3, window=(20, 0), alibi="BH", batch_idx=True),
    KvCase("split_forced_off", lens=(60, 90), s_new=1, num_splits=1, expect_splits=1),
    KvCase("sliced_dense_rot", sliced=True, lens=(3, 12), s_new=2, sq=2, causal=True, rotary=32, dtype=BF16),
    KvCase("sliced_paged_rot_neox", sliced=True, page=8, lens=(9, 2), s_new=3, sq=3, rotary=16,
           interleaved=False, hq=6, hk=3, dv=48),
]


def _loc(case, table, batch_idx, b, pos):
    """(storage row, slot) of key position pos of sequence b: (block, pos % page) or (row, pos)."""
    if case.page:
        return int(table[b, pos // case.page]), pos % case.page
    return (int(batch_idx[b]) if batch_idx is not None else b), pos


def view_of(data, sliced):
    """data itself, or a view holding data's values inside a larger NaN buffer (two extra heads,
    five extra dims, non-zero offset): strides that differ from the shape's."""
    if not sliced:
        return data
    base = torch.full(data.shape[:-2] + (data.shape[-2] + 2, data.shape[-1] + 5), float("nan"), dtype=data.dtype)
    view = base[..., 1:1 + data.shape[-2], 3:3 + data.shape[-1]]
    view.copy_(data)
    return view


def fresh(t):
    """A copy of t with t's layout (a view into a copy of its base buffer)."""
    base = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0).clone()
    return torch.as_strided(base, t.shape, t.stride(), t.storage_offset())


def make(case, seed=0):
    """Tensors of one case: (q, k_cache, v_cache, options, masks) with NaN in every cache slot that
    holds no valid key; masks = (valid, written) booleans over (storage row, slot)."""
    g = torch.Generator().manual_seed(seed)
    dt, B, dv = case.dtype, case.b, case.dv or case.d
    append = case.s_new > 0 if case.append is None else case.append
    lens = list(case.lens) if case.lens is not None else None
    need = [(l + case.s_new) for l in lens] if lens is not None else [case.cap] * B
    table = batch_idx = None
    if case.page:
        max_blocks = max(1, -(-max(need) // case.page))
        n_blocks = B * max_blocks + 2
        table = torch.randperm(n_blocks, generator=g)[:B * max_blocks].reshape(B, max_blocks).to(torch.int32)
        shape_k, shape_v = (n_blocks, case.page, case.hk, case.d), (n_blocks, case.page, case.hk, dv)
        capacity = max_blocks * case.page
    else:
        capacity = case.cap or max(need) + 3
        rows = B + 2 if case.batch_idx else B
        if case.batch_idx:  # never the identity: row b of the cache is NaN for sequence b
            batch_idx = torch.tensor([rows - 1 - b for b in range(B)], dtype=torch.int32)
        shape_k, shape_v = (rows, capacity, case.hk, case.d), (rows, capacity, case.hk, dv)
    k_cache = torch.randn(shape_k, generator=g).to(dt)
    v_cache = torch.randn(shape_v, generator=g).to(dt)
    valid = torch.zeros(shape_k[:2], dtype=torch.bool)
    written = torch.zeros(shape_k[:2], dtype=torch.bool)
    for b in range(B):
        lo = case.leftpad[b] if case.leftpad else 0
        hi = lens[b] if lens is not None else capacity
        for pos in range(lo, hi):
            valid[_loc(case, table, batch_idx, b, pos)] = True
        for t in range(case.s_new if append else 0):
            written[_loc(case, table, batch_idx, b, lens[b] + t)] = True
    k_cache[~valid] = float("nan")
    v_cache[~valid] = float("nan")
    k_cache, v_cache = view_of(k_cache, case.sliced), view_of(v_cache, case.sliced)
    q = view_of(torch.randn(B, case.sq, case.hq, case.d, generator=g).to(dt), case.sliced)
    opts = dict(causal=case.causal, window_size=case.window, softcap=case.softcap,
                rotary_interleaved=case.interleaved)
    if lens is not None:
        opts["cache_seqlens"] = torch.tensor(lens, dtype=torch.int32)
    if append:
        opts["k"] = view_of(torch.randn(B, case.s_new, case.hk, case.d, generator=g).to(dt), case.sliced)
        opts["v"] = view_of(torch.randn(B, case.s_new, case.hk, dv, generator=g).to(dt), case.sliced)
    if case.rotary:
        n_pos = capacity + case.sq
        inv = 1.0 / (10000.0 ** (torch.arange(case.rotary // 2, dtype=torch.float64) / (case.rotary // 2)))
        ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None]
        opts["rotary_cos"], opts["rotary_sin"] = ang.cos().to(dt), ang.sin().to(dt)
    if table is not None:
        opts["block_table"] = table
    if batch_idx is not None:
        opts["cache_batch_idx"] = batch_idx
    if case.leftpad:
        opts["cache_leftpad"] = torch.tensor(case.leftpad, dtype=torch.int32)
    if case.alibi == "H":
        opts["alibi_slopes"] = torch.rand(case.hq, generator=g) * 0.5 + 0.05
    elif case.alibi == "BH":
        opts["alibi_slopes"] = torch.rand(B, case.hq, generator=g) * 0.5 + 0.05
    return q, k_cache, v_cache, opts, (valid, written)


def run(case, q, k_cache, v_cache, opts, schedule, seed):
    return host.run_kvcache("vec", q, k_cache, v_cache, opts.get("k"), opts.get("v"), opts.get("rotary_cos"),
                            opts.get("rotary_sin"), cache_seqlens=opts.get("cache_seqlens"),
                            cache_batch_idx=opts.get("cache_batch_idx"), cache_leftpad=opts.get("cache_leftpad"),
                            block_table=opts.get("block_table"), causal=case.causal, window_size=case.window,
                            softcap=case.softcap, rotary_interleaved=case.interleaved,
                            alibi_slopes=opts.get("alibi_slopes"), num_splits=case.num_splits, lse=case.lse,
                            schedule=schedule, seed=seed)


def bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def ref_options(opts):
    return {k: v for k, v in opts.items() if k not in ("k", "v", "rotary_cos", "rotary_sin")}


@pytest.fixture(scope="module", autouse=True)
def _need_emulator():
    emu.require()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kvcache_vec(case):
    q, k0, v0, opts, (valid, written) = make(case)
    results = []
    for schedule, seed in SCHEDULES:
        k_cache, v_cache = fresh(k0), fresh(v0)
        out, lse, plan = run(case, q, k_cache, v_cache, opts, schedule, seed)
        results.append((out, lse, k_cache, v_cache))
    out, lse, k_cache, v_cache = results[0]
    p = emu.unpack_params(plan["params"])
    if case.expect_splits is not None:
        assert p["num_splits"] == case.expect_splits
        assert [name for name, _, _ in plan["launches"]] == (
            ["mf_attn_vec"] if case.expect_splits == 1 else ["mf_attn_vec_split", "mf_attn_vec_merge"])
    assert plan["defines"]["MF_PAGED"] == (1 if case.page else 0)
    assert (plan["append"] is not None) == ("k" in opts and (case.s_new > 0 or case.rotary > 0))

    # attention: the acceptance rule (FA2's kv-cache factor: 3, 5 with ALiBi) against the reference
    # on the caches before the call, sentinels as zeros
    k_ref, v_ref = k0.nan_to_num(0.0), v0.nan_to_num(0.0)
    factor = 5.0 if case.alibi else 3.0
    res = reference.compare_kvcache(out, lse if case.lse else None, q, k_ref, v_ref, factor=factor,
                                    k=opts.get("k"), v=opts.get("v"), rotary_cos=opts.get("rotary_cos"),
                                    rotary_sin=opts.get("rotary_sin"), **ref_options(opts))
    assert res.ok, "; ".join(res.problems)
    if not case.lse:
        assert lse is None
    # tighter, for this tier's design (all math fp32, see test_metal_vec.check_fp32_math): out is
    # the fp64 result rounded once to the storage type, lse fp32-accurate
    ref_out, ref_lse, _, _ = reference.kvcache_attention(
        q, k_ref, v_ref, opts.get("k"), opts.get("v"), opts.get("rotary_cos"), opts.get("rotary_sin"),
        compute_dtype=torch.float64, update_cache=False, **ref_options(opts))
    rel = torch.finfo(q.dtype).eps if q.dtype != torch.float32 else 1e-5
    excess = (out.double() - ref_out).abs() - (rel * ref_out.abs() + 2e-6)
    assert excess.max().item() <= 0, f"out is not fp32-accurate: worst excess {excess.max().item():.3g}"
    if case.lse:
        seen = torch.isfinite(ref_lse)
        assert torch.equal(torch.isinf(lse), ~seen)
        err = (lse.double()[seen] - ref_lse[seen]).abs() - 4e-6 * (1 + ref_lse[seen].abs())
        assert err.numel() == 0 or err.max().item() <= 0, "lse is not fp32-accurate"

    # the caches: untouched slots bitwise unchanged, new v bitwise, new k (rotated) within 1e-3
    _, _, k_exp, v_exp = reference.kvcache_attention(q, k_ref.clone(), v_ref.clone(), opts.get("k"), opts.get("v"),
                                                     opts.get("rotary_cos"), opts.get("rotary_sin"),
                                                     **ref_options(opts))
    assert torch.equal(bits(k_cache)[~written], bits(k0)[~written]), "k_cache changed outside the new rows"
    assert torch.equal(bits(v_cache)[~written], bits(v0)[~written]), "v_cache changed outside the new rows"
    if case.sliced:
        assert padding_untouched(k_cache) and padding_untouched(v_cache), "a write outside the cache views"
    if case.rotary:  # the rotated q the attention read (q_rot, written by the append pass)
        q_rot = plan["q_rot"]
        local = case.causal or case.window != (-1, -1)
        for b in range(case.b):
            pos = torch.arange(case.sq) * int(local) + int(opts["cache_seqlens"][b])
            exp = reference.apply_rotary(q[b], opts["rotary_cos"], opts["rotary_sin"], pos, case.interleaved)
            assert torch.allclose(q_rot[b].float(), exp.float(), rtol=1e-3, atol=1e-3), "q_rot is off"
    assert torch.equal(bits(v_cache)[written], bits(v_exp)[written]), "new v rows are not bitwise copies"
    if case.rotary:
        got, exp = k_cache[written].float(), k_exp[written].float()
        assert torch.allclose(got, exp, rtol=1e-3, atol=1e-3), f"rotated k off by {(got - exp).abs().max()}"
    else:
        assert torch.equal(bits(k_cache)[written], bits(k_exp)[written]), "new k rows are not bitwise copies"

    # no result may depend on the order threads run in
    for (schedule, seed), (o2, l2, k2, v2) in zip(SCHEDULES[1:], results[1:]):
        assert torch.equal(bits(o2), bits(out)), f"out differs under {schedule}/{seed}"
        if case.lse:
            assert torch.equal(l2, lse), f"lse differs under {schedule}/{seed}"
        assert torch.equal(bits(k2), bits(k_cache)) and torch.equal(bits(v2), bits(v_cache))


def test_sentinels_catch_a_wrong_address():
    """The harness itself: a cache slot the kernel must not read, made visible by shifting
    cache_seqlens by one past the data, turns into NaN in out (so address bugs cannot pass)."""
    case = KvCase("probe", lens=(5, 9), append=False)
    q, k0, v0, opts, _ = make(case)
    opts["cache_seqlens"] = opts["cache_seqlens"] + 1  # one sentinel (NaN) key becomes visible
    out, _, _ = run(case, q, fresh(k0), fresh(v0), opts, "forward", 0)
    assert torch.isnan(out.float()).all(dim=-1).any()


# --- varlen + paged K/V through forward (flash_attn_varlen_func(..., block_table=...)) -------------

@pytest.mark.parametrize("page", [1, 16, 256])
@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_varlen_paged_vec(page, schedule, seed):
    g = torch.Generator().manual_seed(page + seed)
    lens_q, lens_k = [3, 0, 1, 5], [7, 4, 0, 19]
    max_blocks = max(1, -(-max(lens_k) // page))
    n_blocks = 4 * max_blocks + 1
    table = torch.randperm(n_blocks, generator=g)[:4 * max_blocks].reshape(4, max_blocks).to(torch.int32)
    k = torch.full((n_blocks, page, 1, 40), float("nan")).half()
    v = torch.full((n_blocks, page, 1, 40), float("nan")).half()
    for b, n in enumerate(lens_k):  # valid keys only; the rest stays NaN
        for pos in range(n):
            k[table[b, pos // page], pos % page] = torch.randn(1, 40, generator=g).half()
            v[table[b, pos // page], pos % page] = torch.randn(1, 40, generator=g).half()
    cu_q = torch.tensor([0] + list(np.cumsum(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(np.cumsum(lens_k)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), 2, 40, generator=g).half()
    out, lse, plan = host.run("vec", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=19,
                              causal=True, block_table=table, schedule=schedule, seed=seed)
    assert plan["defines"]["MF_PAGED"] == 1
    check_against_reference(out, lse, q, k.nan_to_num(0.0), v.nan_to_num(0.0), cu_seqlens_q=cu_q,
                            cu_seqlens_k=cu_k, causal=True, block_table=table)


# --- plans -----------------------------------------------------------------------------------------

def kv_plan(tier="vec", B=2, sq=1, hq=8, hk=2, d=128, dv=None, cap=4096, page=None, s_new=1, rotary=0,
            dtype=torch.float16, device_caps=None, num_splits=0, causal=True, lens=None):
    dv = dv or d
    q = torch.zeros(B, sq, hq, d, dtype=dtype)
    table = None
    if page:
        table = torch.arange(B * (cap // page), dtype=torch.int32).reshape(B, cap // page)
        kc = torch.zeros(B * (cap // page), page, hk, d, dtype=dtype)
        vc = torch.zeros(B * (cap // page), page, hk, dv, dtype=dtype)
    else:
        kc = torch.zeros(B, cap, hk, d, dtype=dtype)
        vc = torch.zeros(B, cap, hk, dv, dtype=dtype)
    k = torch.zeros(B, s_new, hk, d, dtype=dtype) if s_new else None
    v = torch.zeros(B, s_new, hk, dv, dtype=dtype) if s_new else None
    cos = torch.zeros(cap + sq, rotary // 2, dtype=dtype) if rotary else None
    seqlens = torch.full((B,), cap - s_new if lens is None else lens, dtype=torch.int32)
    return _C.kvcache_metal_plan(tier, device_caps or host.caps(), "plan", q, kc, vc, k, v, cos, cos, seqlens,
                                 None, None, table, None, causal, -1, -1, 0.0, True, None, num_splits, False)


def test_kvcache_plan_shape():
    p = kv_plan(page=16, rotary=64, sq=2, s_new=2)
    assert p["tier"] == "vec" and p["source"] == "attn_vec.metal"
    assert p["defines"] == {"MF_DTYPE": 1, "MF_MAX_D": 128, "MF_MAX_DV": 128, "MF_PAGED": 1}
    ap = p["append"]
    assert ap["source"] == "kv_append.metal" and ap["defines"] == {"MF_DTYPE": 1}
    # grid: (max(heads_k, heads_q when q is rotated), B * S_new + B * Sq)
    assert ap["launch"] == ("mf_kv_append", (8, 2 * 2 + 2 * 2, 1), (32, 1, 1))
    a = emu.unpack_append_params(ap["params"])
    assert (a["seqlen_new"], a["rotary_dim"], a["interleaved"], a["q_per_row"], a["rotate_q"]) == (2, 64, 1, 1, 1)
    assert p["q_rot"] is not None and p["q_rot"].shape == (2, 2, 8, 128)
    f = emu.unpack_params(p["params"])
    assert f["page_size"] == 16 and f["block_table_stride_b"] == 4096 // 16 and f["seqlen_new"] == 2
    # without rotary the append pass only copies k/v, and q is not rotated (grid over kv heads)
    p = kv_plan(s_new=3)
    assert p["append"]["launch"] == ("mf_kv_append", (2, 2 * 3, 1), (32, 1, 1)) and p["q_rot"] is None
    assert kv_plan(s_new=0)["append"] is None


@pytest.mark.parametrize("d,dv,max_d,max_dv", [(64, 64, 64, 64), (576, 512, 576, 512), (192, 128, 256, 128),
                                               (320, 320, 384, 384), (40, 512, 64, 512)])
def test_vec_head_dim_bounds(d, dv, max_d, max_dv):
    p = kv_plan(d=d, dv=dv, hq=16, hk=1, cap=64)
    assert (p["defines"]["MF_MAX_D"], p["defines"]["MF_MAX_DV"]) == (max_d, max_dv)


def test_mla_decode_plan_splits():
    p = kv_plan("auto", B=1, hq=128, hk=1, d=576, dv=512, cap=8192, page=64, dtype=torch.bfloat16)
    f = emu.unpack_params(p["params"])
    assert p["tier"] == "vec" and f["num_splits"] == 16
    assert p["scratch_floats"] == 128 * 16 * (512 + 2)


@pytest.mark.parametrize("tier", ["simdgroup", "auto"])
def test_other_tiers_refuse_kv_and_big_heads(tier):
    if tier == "simdgroup":
        with pytest.raises(RuntimeError, match="served by the vec tier only"):
            kv_plan("simdgroup", sq=64)
        with pytest.raises(RuntimeError, match="head dims above 256"):
            q = torch.zeros(1, 64, 2, 320, dtype=torch.float16)
            _C.metal_plan("simdgroup", host.caps(), "t", q, q, q, None, None, 0, 0, None, False, -1, -1, 0.0,
                          None, False, torch.empty_like(q), None)
    else:  # the automatic choice takes vec for a kv cache, even for prefill
        assert kv_plan("auto", sq=128)["tier"] == "vec"


def test_num_splits_is_honoured():
    assert emu.unpack_params(kv_plan(num_splits=1)["params"])["num_splits"] == 1
    assert emu.unpack_params(kv_plan(num_splits=7)["params"])["num_splits"] == 7
    assert emu.unpack_params(kv_plan(num_splits=0)["params"])["num_splits"] == 8  # 4096 keys / 512


@pytest.mark.parametrize("sq,expected", [(1, "vec"), (9, "vec"), (64, "vec"), (65, "simdgroup")])
def test_few_rows_long_keys_go_to_vec_split(sq, expected):
    q = torch.zeros(1, sq, 4, 64, dtype=torch.float16)
    k = torch.zeros(1, 4096, 1, 64, dtype=torch.float16)
    p = _C.metal_plan("auto", host.caps(), "t", q, k, k, None, None, 0, 0, None, True, -1, -1, 0.0, None, False,
                      torch.empty_like(q), None)
    assert p["tier"] == expected
    if expected == "vec":
        assert emu.unpack_params(p["params"])["num_splits"] == 8


def test_auto_split_plan_runs_16_rows():
    """The automatic choice for 16 query rows over 1100 keys: vec, split, correct."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 16, 2, 32, generator=g).half()
    k = torch.randn(1, 1100, 1, 32, generator=g).half()
    v = torch.randn(1, 1100, 1, 32, generator=g).half()
    out, lse, p = host.run("auto", q, k, v, causal=True, schedule="random", seed=5)
    assert p["tier"] == "vec" and emu.unpack_params(p["params"])["num_splits"] == 3
    check_against_reference(out, lse, q, k, v, causal=True)


# --- stream mode -----------------------------------------------------------------------------------

def test_stream_mode_run_kvcache_binds_both_passes():
    calls = []

    class Lib:
        def __getattr__(self, name):
            return lambda *args, **kw: calls.append((name, args, kw))

    metal_stream._libraries.clear()
    metal_stream._kernels.clear()
    p = kv_plan(page=16, rotary=64, sq=2, s_new=2, cap=64)
    q = torch.zeros(2, 2, 8, 128, dtype=torch.float16)
    kc, vc = torch.zeros(8, 16, 2, 128).half(), torch.zeros(8, 16, 2, 128).half()
    kn, vn = torch.zeros(2, 2, 2, 128).half(), torch.zeros(2, 2, 2, 128).half()
    cos = torch.zeros(66, 32).half()
    out = torch.zeros(2, 2, 8, 128).half()
    dev = {"kv_index_device": torch.zeros(2, 4, dtype=torch.int32),
           "cache_seqlens_device": torch.zeros(2, dtype=torch.int32), "cache_leftpad_device": None}
    metal_stream.run_kvcache(p, q, kc, vc, kn, vn, cos, cos, out, None, None, dev, device="cpu",
                             compile_shader=lambda src: Lib())
    assert [c[0] for c in calls] == ["mf_kv_append", "mf_attn_vec"]
    app, attn = calls[0][1], calls[1][1]
    assert len(app) == 13 and len(attn) == 13
    assert app[0] is q and app[1] is kc and app[2] is vc and app[3] is p["q_rot"] and app[4] is kn
    assert app[5] is vn and app[6] is cos and app[7] is cos and app[10] is dev["kv_index_device"]
    assert app[11] is dev["cache_seqlens_device"]
    assert metal_stream.params_bytes(app[8]) == p["append"]["params"]
    assert metal_stream.params_bytes(app[9]) == p["params"] == metal_stream.params_bytes(attn[9])
    assert attn[0] is p["q_rot"] and attn[1] is kc and attn[3] is out and attn[10] is dev["kv_index_device"]
    assert attn[12].dtype == torch.uint8  # no leftpad: dummy


# --- the Metal side's address spaces (see test_metal_vec.py) ----------------------------------------

@pytest.mark.parametrize("source,defines", [("kv_append.metal", ""), ("attn_vec.metal",
                                            "-DMF_MAX_D=576 -DMF_MAX_DV=512 -DMF_PAGED=1")])
@pytest.mark.parametrize("dtype", (0, 1, 2))
def test_address_spaces(tmp_path, source, defines, dtype):
    from test_metal_vec import METAL_STDLIB_STANDIN

    exe = emu.find_compiler()[0]
    (tmp_path / "metal_stdlib").write_text(METAL_STDLIB_STANDIN)
    cmd = [exe, "-x", "clcpp", "-cl-std=clc++2021", "-fsyntax-only", "-Xclang", "-finclude-default-header",
           "-D__METAL_VERSION__=310", f"-DMF_DTYPE={dtype}", *defines.split(), "-I", str(tmp_path),
           "-I", os.path.join(ROOT, "metal"), "-Wno-unknown-attributes", "-Wno-comment", "-Werror",
           os.path.join(ROOT, "metal", source)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
