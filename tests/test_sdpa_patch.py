"""mtlflash.sdpa: the opt-in patch of torch.nn.functional.scaled_dot_product_attention.

Routing is forced onto the CPU with ``install(devices=("cpu",), min_seqlen=0)``; every
result is compared with the stock function saved before the patch. A spy on
``mtlflash.flash_attn_func`` tells which calls were routed.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mtlflash
from mtlflash import sdpa, trace

STOCK = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def restore(monkeypatch):
    monkeypatch.delenv("MTLFLASH_SDPA", raising=False)
    sdpa.uninstall()
    yield
    sdpa.uninstall()
    assert F.scaled_dot_product_attention is STOCK


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = mtlflash.flash_attn_func

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mtlflash, "flash_attn_func", counting)
    return calls


@pytest.fixture
def forced():
    assert sdpa.install(devices=("cpu",), min_seqlen=0)


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def qkv(b=2, hq=4, hk=4, lq=33, lk=33, d=32, dv=None, dtype=torch.float32, seed=0):
    return (
        rand(b, hq, lq, d, dtype=dtype, seed=seed),
        rand(b, hk, lk, d, dtype=dtype, seed=seed + 1),
        rand(b, hk, lk, dv or d, dtype=dtype, seed=seed + 2),
    )


def close(a, b, dtype=torch.float32):
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert a.shape == b.shape and a.dtype == b.dtype
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol, err


# -- eligible calls: routed, and equal to stock ---------------------------------------------------

ELIGIBLE = [
    dict(),
    dict(lq=17, lk=50),
    dict(lq=50, lk=17),
    dict(lq=1, lk=77),
    dict(d=64, dv=48),
    dict(d=16, dv=128, lq=9, lk=40),
    dict(hq=8, hk=2, gqa=True),
    dict(hq=6, hk=1, gqa=True, lq=5, lk=70),
    dict(causal=True),
    dict(causal=True, hq=4, hk=2, gqa=True, d=64, dv=32),
    dict(scale=0.05),
    dict(scale=2.0, causal=True),
    dict(dtype=torch.float16),
    dict(dtype=torch.bfloat16, causal=True),
]


@pytest.mark.parametrize("case", ELIGIBLE, ids=lambda c: ",".join("%s=%s" % kv for kv in c.items()) or "plain")
def test_eligible_calls_are_routed_and_match_stock(case, forced, spy):
    case = dict(case)
    causal = case.pop("causal", False)
    gqa = case.pop("gqa", False)
    scale = case.pop("scale", None)
    dtype = case.get("dtype", torch.float32)
    q, k, v = qkv(**case)
    kwargs = dict(is_causal=causal, scale=scale)
    if gqa:
        kwargs["enable_gqa"] = True
    got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    ref = STOCK(q, k, v, **kwargs)
    assert len(spy) == 1, "call was not routed to mtlflash"
    close(got, ref, dtype)
    assert got.is_contiguous()


def test_transposed_views_are_routed_without_copy_requirements(forced, spy):
    # the common model layout: (B, L, H, D) projections viewed as (B, H, L, D)
    x = rand(2, 40, 4, 32)
    q = k = v = x.transpose(1, 2)
    close(F.scaled_dot_product_attention(q, k, v, is_causal=True), STOCK(q, k, v, is_causal=True))
    assert len(spy) == 1


def test_keyword_and_positional_forms(forced, spy):
    q, k, v = qkv()
    ref = STOCK(q, k, v, None, 0.0, True)
    close(F.scaled_dot_product_attention(q, k, v, None, 0.0, True), ref)
    close(F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True), ref)
    assert len(spy) == 2
    # scale is keyword-only, exactly as in stock
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.5)
    with pytest.raises(TypeError):
        STOCK(q, k, v, None, 0.0, False, 0.5)


# -- ineligible calls: not routed, identical to stock ----------------------------------------------


def _bool_mask(lq, lk, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(lq, lk, generator=g) > 0.3


INELIGIBLE = {
    "bool_mask": lambda: (qkv(), dict(attn_mask=_bool_mask(33, 33))),
    "float_mask": lambda: (qkv(), dict(attn_mask=rand(2, 1, 33, 33, seed=9))),
    "fully_masked_rows": lambda: (
        qkv(lq=6, lk=6),
        dict(attn_mask=torch.tensor([[True] * 6, [False] * 6] * 3)),
    ),
    "causal_lq_lt_lk": lambda: (qkv(lq=5, lk=12), dict(is_causal=True)),
    "causal_lq_gt_lk": lambda: (qkv(lq=12, lk=5), dict(is_causal=True)),
    "dropout": lambda: (qkv(), dict(dropout_p=0.0 + 1e-12)),
    "rank3": lambda: ((rand(4, 10, 16), rand(4, 12, 16, seed=1), rand(4, 12, 16, seed=2)), {}),
    "rank5": lambda: (tuple(rand(2, 2, 3, 10, 16, seed=s) for s in range(3)), {}),
    "float64": lambda: (qkv(dtype=torch.float64), {}),
    "head_dim_over_256": lambda: (qkv(d=272, lq=4, lk=4), {}),
    "non_unit_last_stride": lambda: (tuple(t[..., ::2] for t in qkv(d=64)), {}),
    "scale_tensor": lambda: (qkv(), dict(scale=0.5)),  # sanity: this one IS eligible (checked below)
}


@pytest.mark.parametrize("name", sorted(INELIGIBLE))
def test_ineligible_calls_go_to_stock(name, forced, spy):
    (q, k, v), kwargs = INELIGIBLE[name]()
    if name == "dropout":
        torch.manual_seed(0)
    got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    if name == "dropout":
        torch.manual_seed(0)
    ref = STOCK(q, k, v, **kwargs)
    if name == "scale_tensor":
        assert len(spy) == 1
        close(got, ref)
        return
    assert spy == [], "%s must not be routed" % name
    assert torch.equal(got, ref) or torch.allclose(got, ref, equal_nan=True)
    if name == "fully_masked_rows":
        assert torch.equal(got[:, :, 1::2], torch.zeros_like(got[:, :, 1::2]))


def test_gqa_without_enable_gqa_raises_stocks_error(forced, spy):
    q, k, v = qkv(hq=8, hk=2)
    with pytest.raises(RuntimeError) as ours:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError) as theirs:
        STOCK(q, k, v)
    assert str(ours.value) == str(theirs.value)
    assert spy == []


def test_mixed_dtypes_raise_stocks_error(forced, spy):
    q, k, v = qkv()
    with pytest.raises(RuntimeError) as ours:
        F.scaled_dot_product_attention(q, k.half(), v.half())
    with pytest.raises(RuntimeError) as theirs:
        STOCK(q, k.half(), v.half())
    assert str(ours.value) == str(theirs.value)
    assert spy == []


def test_inputs_needing_grad_are_routed_and_differentiable(forced, spy):
    q, k, v = qkv(hq=4, hk=2, dv=16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    assert len(spy) == 1 and out.requires_grad
    dout = rand(*out.shape, seed=9)
    out.backward(dout)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = STOCK(*ref_leaves, is_causal=True, enable_gqa=True)
    ref.backward(dout)
    close(out.detach(), ref.detach())
    for a, b in zip(leaves, ref_leaves):
        close(a.grad, b.grad)
    with torch.no_grad():
        close(F.scaled_dot_product_attention(q, k, v, enable_gqa=True), STOCK(q, k, v, enable_gqa=True))
    assert len(spy) == 2
    with torch.inference_mode():
        close(F.scaled_dot_product_attention(q, k, v, enable_gqa=True), STOCK(q, k, v, enable_gqa=True))
    assert len(spy) == 3

def test_tensor_subclasses_go_to_stock(forced, spy):
    class Tagged(torch.Tensor):
        pass

    q, k, v = qkv()
    got = F.scaled_dot_product_attention(q.as_subclass(Tagged), k, v)
    assert spy == []
    assert torch.equal(got, STOCK(q.as_subclass(Tagged), k, v))
    p = torch.nn.Parameter(q.clone(), requires_grad=False)
    F.scaled_dot_product_attention(p, k, v)
    assert spy == []


def test_autocast_goes_to_stock(forced, spy):
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = F.scaled_dot_product_attention(q, k, v)
        ref = STOCK(q, k, v)
    assert spy == []
    assert got.dtype == ref.dtype and torch.equal(got, ref)


def test_multihead_attention_module_still_matches(forced):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = rand(2, 20, 32)
    with torch.no_grad():
        got, _ = mha(x, x, x, need_weights=False)
        sdpa.uninstall()
        ref, _ = mha(x, x, x, need_weights=False)
    close(got, ref)


# -- fall-back on kernel errors ------------------------------------------------------------------


def test_kernel_error_falls_back_to_stock_and_is_traced(forced, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected kernel failure")

    monkeypatch.setattr(mtlflash, "flash_attn_func", broken)
    monkeypatch.setattr(trace, "ENABLED", True)
    trace.reset()
    q, k, v = qkv()
    got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(got, STOCK(q, k, v, is_causal=True))
    rows = trace.summary()
    assert [(r["entry"], r["tier"], r["calls"]) for r in rows] == [("sdpa", "fallback:RuntimeError", 1)]
    trace.reset()


def test_delegations_are_traced_with_reason(forced, monkeypatch):
    monkeypatch.setattr(trace, "ENABLED", True)
    trace.reset()
    q, k, v = qkv()
    F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask(33, 33))
    F.scaled_dot_product_attention(q[:, :, :5], k, v, is_causal=True)
    tiers = sorted(r["tier"] for r in trace.summary() if r["entry"] == "sdpa")
    assert tiers == ["stock:causal_lq_ne_lk", "stock:mask"]
    trace.reset()


# -- gates ------------------------------------------------------------------------------------------


def test_default_gates_leave_cpu_calls_alone(spy):
    assert sdpa.install()
    assert sdpa.config() == {"devices": ("mps",), "min_seqlen": 4096, "route_dv_mismatch": True}
    q, k, v = qkv(d=32, dv=16)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), STOCK(q, k, v))
    assert spy == []


def test_min_seqlen_gate(spy):
    sdpa.install(devices=("cpu",), min_seqlen=64, route_dv_mismatch=False)
    q, k, v = qkv(lq=8, lk=63)
    F.scaled_dot_product_attention(q, k, v)
    assert spy == []
    q, k, v = qkv(lq=8, lk=64)
    close(F.scaled_dot_product_attention(q, k, v), STOCK(q, k, v))
    assert len(spy) == 1


def test_dv_mismatch_gate(spy):
    sdpa.install(devices="cpu", min_seqlen=10**9)
    q, k, v = qkv(d=32, dv=32)
    F.scaled_dot_product_attention(q, k, v)
    assert spy == []
    q, k, v = qkv(d=32, dv=64)
    close(F.scaled_dot_product_attention(q, k, v), STOCK(q, k, v))
    assert len(spy) == 1
    sdpa.install(route_dv_mismatch=False)  # updates only this gate
    assert sdpa.config()["devices"] == ("cpu",)
    F.scaled_dot_product_attention(q, k, v)
    assert len(spy) == 1


# -- install / uninstall / switches ------------------------------------------------------------------


def test_install_uninstall_idempotent():
    assert not sdpa.is_installed()
    assert sdpa.install() and sdpa.install()
    patched = F.scaled_dot_product_attention
    assert patched is not STOCK and sdpa.is_installed()
    assert patched.__wrapped__ is STOCK
    assert sdpa.install(min_seqlen=5) and F.scaled_dot_product_attention is patched
    assert sdpa.uninstall() is True
    assert F.scaled_dot_product_attention is STOCK
    assert sdpa.uninstall() is False
    assert sdpa.config()["min_seqlen"] == 4096


def test_uninstall_under_another_wrapper_becomes_pass_through(spy):
    sdpa.install(devices=("cpu",), min_seqlen=0)
    ours = F.scaled_dot_product_attention

    def theirs(*args, **kwargs):
        return ours(*args, **kwargs)

    F.scaled_dot_product_attention = theirs
    try:
        sdpa.uninstall()
        assert F.scaled_dot_product_attention is theirs  # not clobbered
        q, k, v = qkv()
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), STOCK(q, k, v))
        assert spy == []
        # installing again wraps the current function and reactivates
        sdpa.install(devices=("cpu",), min_seqlen=0)
        close(F.scaled_dot_product_attention(q, k, v), STOCK(q, k, v))
        assert len(spy) == 1
    finally:
        sdpa.uninstall()
        F.scaled_dot_product_attention = STOCK


def test_kill_switch_blocks_install(monkeypatch):
    monkeypatch.setenv("MTLFLASH_SDPA", "off")
    assert sdpa.install(devices=("cpu",), min_seqlen=0) is False
    assert F.scaled_dot_product_attention is STOCK


def test_kill_switch_set_after_install(forced, spy, monkeypatch):
    monkeypatch.setenv("MTLFLASH_SDPA", "0")
    q, k, v = qkv()
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), STOCK(q, k, v))
    assert spy == []
    monkeypatch.setenv("MTLFLASH_SDPA", "on")
    F.scaled_dot_product_attention(q, k, v)
    assert len(spy) == 1


def test_unknown_switch_value_warns(monkeypatch):
    monkeypatch.setenv("MTLFLASH_SDPA", "sometimes")
    with pytest.warns(RuntimeWarning, match="MTLFLASH_SDPA"):
        assert sdpa.install() is True


def test_patch_is_opt_in():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTLFLASH_")}
    code = (
        "import torch.nn.functional as F, torch\n"
        "stock = F.scaled_dot_product_attention\n"
        "import mtlflash, mtlflash.sdpa\n"
        "print(F.scaled_dot_product_attention is stock, mtlflash.sdpa.is_installed())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False"]


def test_torch_compile_traces_through_the_patch(forced):
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    q, k, v = qkv(lq=16, lk=16)
    close(compiled(q, k, v), STOCK(q, k, v, is_causal=True) * 2)


def test_vmap_matches_stock(forced):
    x = rand(3, 2, 16, 8)
    got = torch.vmap(lambda t: F.scaled_dot_product_attention(t, t, t))(x)
    ref = torch.stack([STOCK(t, t, t) for t in x])
    close(got, ref)
