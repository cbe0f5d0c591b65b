"""Bad input to flash_attn_with_kvcache: every case raises a TypeError/ValueError naming the
argument, and the caches are bitwise unchanged afterwards (validation happens before any write)."""
from __future__ import annotations

import pytest
import torch

import mtlflash
from kvcache_cases import KVCase, make_call

DENSE = KVCase(seqlen_new=2, seqlen_q=2, rotary_dim=16, lengths=(10, 20), opts={"causal": True})
PAGED = DENSE.with_(page_size=16, capacity=64)


def _edit(**changes):
    def apply(args):
        for key, value in changes.items():
            if value is None:
                args.pop(key, None)
            elif callable(value):
                args[key] = value(args)
            else:
                args[key] = value
    return apply


I32 = torch.int32

BAD = [
    # (id, case, edit, exception, message)
    ("seqlens past capacity", DENSE, _edit(cache_seqlens=torch.tensor([10, 99], dtype=I32)), ValueError,
     r"cache_seqlens: sequence 1 holds 99 rows, and 2 new ones do not fit the cache's capacity of 100"),
    ("paged seqlens past capacity", PAGED, _edit(cache_seqlens=torch.tensor([63, 0], dtype=I32)), ValueError,
     r"cache_seqlens: .* capacity of 64 \(max_blocks x page size\)"),
    ("negative seqlens", DENSE, _edit(cache_seqlens=torch.tensor([-1, 3], dtype=I32)), ValueError,
     r"cache_seqlens: entry 0 is -1; lengths must be >= 0"),
    ("int seqlens negative", DENSE, _edit(cache_seqlens=-3), ValueError, r"cache_seqlens: entry 0 is -3"),
    ("block table entry too big", PAGED, _edit(block_table=lambda a: torch.where(a["block_table"] == a["block_table"][0, 0],
                                                                                 torch.tensor(10 ** 6, dtype=I32),
                                                                                 a["block_table"])),
     ValueError, r"block_table: entry \(0, 0\) is 1000000, outside \[0, 11\)"),
    ("block table entry negative", PAGED, _edit(block_table=lambda a: a["block_table"] * 0 - 1), ValueError,
     r"block_table: entry \(0, 0\) is -1"),
    ("leftpad past seqlens", DENSE, _edit(cache_leftpad=torch.tensor([11, 0], dtype=I32)), ValueError,
     r"cache_leftpad: entry 0 is 11, outside \[0, 10\]"),
    ("leftpad negative", DENSE, _edit(cache_leftpad=torch.tensor([0, -2], dtype=I32)), ValueError,
     r"cache_leftpad: entry 1 is -2"),
    ("int64 block table", PAGED, _edit(block_table=lambda a: a["block_table"].long()), TypeError,
     r"block_table: expected dtype torch.int32 \(FlashAttention-2 requires int32\), got torch.int64"),
    ("int64 seqlens", DENSE, _edit(cache_seqlens=torch.tensor([10, 20])), TypeError,
     r"cache_seqlens: expected dtype torch.int32 \(FlashAttention-2 requires int32\), got torch.int64"),
    ("int64 batch idx", DENSE, _edit(cache_batch_idx=torch.tensor([1, 0])), TypeError,
     r"cache_batch_idx: expected dtype torch.int32"),
    ("int64 leftpad", DENSE, _edit(cache_leftpad=torch.tensor([1, 0])), TypeError, r"cache_leftpad: expected dtype torch.int32"),
    ("batch idx out of range", DENSE, _edit(cache_batch_idx=torch.tensor([0, 2], dtype=I32)), ValueError,
     r"cache_batch_idx: entry 1 is 2, outside \[0, 2\)"),
    ("batch idx wrong length", DENSE, _edit(cache_batch_idx=torch.tensor([0], dtype=I32)), ValueError,
     r"cache_batch_idx: expected shape \(2,\)"),
    ("paged with batch idx", PAGED, _edit(cache_batch_idx=torch.tensor([0, 1], dtype=I32)), ValueError,
     r"cache_batch_idx: cannot be combined with block_table"),
    ("k without v", DENSE, _edit(v=None), ValueError, r"v: k and v must be given together"),
    ("v without k", DENSE.with_(rotary_dim=0), _edit(k=None), ValueError, r"k: k and v must be given together"),
    ("k without seqlens", DENSE, _edit(cache_seqlens=None), ValueError, r"cache_seqlens: required when new k/v"),
    ("rotary without k", DENSE, _edit(k=None, v=None), ValueError, r"rotary_cos: .* k and v must be given too"),
    ("cos without sin", DENSE, _edit(rotary_sin=None), ValueError, r"rotary_sin: rotary_cos and rotary_sin must be given together"),
    ("rotary wrong dtype", DENSE, _edit(rotary_cos=lambda a: a["rotary_cos"].double()), TypeError,
     r"rotary_cos: dtype torch.float64 does not match q's dtype torch.float32"),
    ("rotary too wide", DENSE, _edit(rotary_cos=lambda a: torch.zeros(200, 40), rotary_sin=lambda a: torch.zeros(200, 40)),
     ValueError, r"rotary_cos: expected shape \(seqlen_ro, rotary_dim / 2\)"),
    ("rotary 1-D", DENSE, _edit(rotary_cos=lambda a: a["rotary_cos"][:, 0]), ValueError, r"rotary_cos: expected shape"),
    ("rotary shapes differ", DENSE, _edit(rotary_sin=lambda a: a["rotary_sin"][:, :4]), ValueError,
     r"rotary_sin: shape \(\d+, 4\) does not match rotary_cos's"),
    ("rotary too short", DENSE, _edit(rotary_cos=lambda a: a["rotary_cos"][:15], rotary_sin=lambda a: a["rotary_sin"][:15]),
     ValueError, r"rotary_cos: has 15 positions, but sequence 1 needs position 21"),
    ("cache dtype", DENSE, _edit(k_cache=lambda a: a["k_cache"].half()), TypeError,
     r"k_cache: dtype torch.float16 does not match q's dtype torch.float32"),
    ("v cache dtype", DENSE, _edit(v_cache=lambda a: a["v_cache"].half()), TypeError, r"v_cache: dtype torch.float16"),
    ("new k dtype", DENSE, _edit(k=lambda a: a["k"].half()), TypeError, r"k: dtype torch.float16 does not match"),
    ("new k heads", DENSE, _edit(k=lambda a: a["k"][:, :, :1]), ValueError, r"k: number of heads 1 does not match k_cache's 2"),
    ("new v rows", DENSE, _edit(v=lambda a: a["v"][:, :1]), ValueError, r"v: number of new rows 1 does not match k's 2"),
    ("new k batch", DENSE, _edit(k=lambda a: a["k"][:1]), ValueError, r"k: batch size 1 does not match q's 2"),
    ("cache heads", DENSE, _edit(v_cache=lambda a: a["v_cache"][:, :, :1]), ValueError, r"v_cache: number of heads 1"),
    ("cache too few rows", DENSE, _edit(k_cache=lambda a: a["k_cache"][:1], v_cache=lambda a: a["v_cache"][:1]), ValueError,
     r"k_cache: batch size 1 is smaller than q's 2"),
    ("cache 3-D", DENSE, _edit(k_cache=lambda a: a["k_cache"][0]), ValueError, r"k_cache: expected 4 dimensions"),
    ("paged page size differs", PAGED, _edit(v_cache=lambda a: a["v_cache"][:, :8]), ValueError, r"v_cache: page size 8"),
    ("block table 1-D", PAGED, _edit(block_table=lambda a: a["block_table"][0]), ValueError,
     r"block_table: expected shape \(batch=2, max_blocks\)"),
    ("negative num_splits", DENSE, _edit(num_splits=-1), ValueError, r"num_splits: expected 0"),
    ("num_splits float", DENSE, _edit(num_splits=1.5), TypeError, r"num_splits: expected an int"),
    ("seqlens bool", DENSE, _edit(cache_seqlens=True), TypeError, r"cache_seqlens: expected an int32 tensor or an int"),
    ("q 3-D", DENSE, _edit(q=lambda a: a["q"][0]), ValueError, r"q: expected 4 dimensions"),
    ("head dim too big", DENSE.with_(rotary_dim=0, seqlen_new=0), _edit(q=torch.zeros(2, 1, 4, 600),
                                                                     k_cache=torch.zeros(2, 100, 2, 600)),
     ValueError, r"q: head dim must be between 1 and 576"),
]


def _cache_state(args):
    return [args[k].clone() for k in ("k_cache", "v_cache")]


@pytest.mark.parametrize("case,edit,exc,msg", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_leaves_cache_untouched(case, edit, exc, msg):
    args, _ = make_call(case)
    edit(args)
    before = _cache_state(args)
    with pytest.raises(exc, match=r"\[flash_attn_with_kvcache\] " + msg):
        mtlflash.flash_attn_with_kvcache(**args)
    after = _cache_state(args)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a refused call wrote into the cache"


def test_good_call_still_writes():
    """Counterpart: the unedited cases do write (so the untouched check above can fail)."""
    for case in (DENSE, PAGED):
        args, _ = make_call(case)
        before = _cache_state(args)
        mtlflash.flash_attn_with_kvcache(**args)
        assert not torch.equal(before[1], args["v_cache"])
