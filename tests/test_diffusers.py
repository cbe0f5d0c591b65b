"""mtlflash as diffusers' "flash" attention backend (mtlflash.integrations.diffusers), on a tiny
randomly initialised Flux transformer built from a config (no download)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.models import attention_dispatch as ad  # noqa: E402

import mtlflash.integrations.diffusers as mfd  # noqa: E402
from mtlflash import reference, trace  # noqa: E402


@pytest.fixture
def registered():
    mfd.register()
    yield
    mfd.unregister()


@pytest.fixture
def traced():
    was = trace.ENABLED
    trace.enable(True)
    trace.reset()
    yield trace
    trace.reset()
    trace.enable(was)


def tiny_flux(dtype):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    L, T = 16, 8
    inputs = dict(hidden_states=torch.randn(1, L, 4, generator=g).to(dtype),
                  encoder_hidden_states=torch.randn(1, T, 32, generator=g).to(dtype),
                  pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
                  timestep=torch.tensor([0.5]).to(dtype), img_ids=torch.rand(L, 3, generator=g) * 8,
                  txt_ids=torch.zeros(T, 3), return_dict=False)
    return model, inputs


def run(model, inputs, backend):
    model.set_attention_backend(backend)
    try:
        with torch.no_grad():
            return model(**inputs)[0]
    finally:
        model.reset_attention_backend()


def test_flash_backend_is_off_without_the_integration():
    model, _ = tiny_flux(torch.float32)
    with pytest.raises(RuntimeError, match="flash-attn"):
        model.set_attention_backend("flash")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_tiny_flux_matches_native_attention_and_mtlflash_serves_it(registered, traced, dtype, tol):
    model, inputs = tiny_flux(dtype)
    native = run(model, inputs, "native")
    assert trace.summary() == []  # native SDPA calls do not reach mtlflash
    ours = run(model, inputs, "flash")
    scale = max(1.0, native.float().abs().max().item())
    assert (ours.float() - native.float()).abs().max().item() <= tol * scale
    rows = trace.summary()
    # 2 joint blocks + 2 single blocks, each one attention call over 8 text + 16 image tokens
    assert [(r["entry"], r["tier"], r["seqlen_q"], r["calls"]) for r in rows] == [("flash_attn_func", "cpu", 24, 4)]
    assert rows[0]["dtype"] == str(dtype).replace("torch.", "")


def test_direct_calls_gqa_lse_and_mask_fallback(registered, traced):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 10, 4, 32, generator=g)
    k = torch.randn(2, 14, 2, 32, generator=g)
    v = torch.randn(2, 14, 2, 32, generator=g)
    out, lse = ad.dispatch_attention_fn(q, k, v, is_causal=True, enable_gqa=True, backend="flash",
                                         attention_kwargs={"return_lse": True})
    res = reference.compare(out, lse, q, k, v, causal=True)
    assert res.ok, res.problems
    mask = torch.ones(2, 1, 10, 14, dtype=torch.bool)
    mask[1, :, :, 10:] = False
    masked = ad.dispatch_attention_fn(q, k, v, attn_mask=mask, enable_gqa=True, backend="flash")
    native = ad.dispatch_attention_fn(q, k, v, attn_mask=mask, enable_gqa=True, backend="native")
    assert torch.equal(masked, native)
    entries = {(r["entry"], r["tier"]) for r in trace.summary()}
    assert entries == {("flash_attn_func", "cpu"), ("diffusers", "stock:attn_mask")}


def test_unregister_restores_diffusers_backend():
    before = ad._AttentionBackendRegistry._backends[ad.AttentionBackendName.FLASH]
    assert mfd.register() == "flash"
    assert ad._AttentionBackendRegistry._backends[ad.AttentionBackendName.FLASH] is mfd.attention
    mfd.register()  # idempotent
    mfd.unregister()
    assert ad._AttentionBackendRegistry._backends[ad.AttentionBackendName.FLASH] is before
    assert ad._CAN_USE_FLASH_ATTN is False
