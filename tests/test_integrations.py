"""mtlflash.integrations.transformers on the CPU with a tiny randomly initialised Llama.

Logits with the registered implementation must match transformers' own "sdpa" within fp32
tolerance, with and without padding, and spies on mtlflash's functions show which calls
mtlflash served (the rest must have gone to sdpa).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mtlflash  # noqa: E402
from mtlflash import trace  # noqa: E402
from mtlflash.integrations import transformers as mtf  # noqa: E402

NAME = mtf.DEFAULT_NAME
TOL = 2e-5


@pytest.fixture(scope="module")
def registered():
    assert mtf.register() == NAME
    yield NAME
    mtf.unregister()


def tiny_llama(kv_heads=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(registered):
    return tiny_llama()


@pytest.fixture
def spy(monkeypatch):
    calls = {"dense": 0, "varlen": 0}
    dense, varlen = mtlflash.flash_attn_func, mtlflash.flash_attn_varlen_func

    def count_dense(*a, **k):
        calls["dense"] += 1
        return dense(*a, **k)

    def count_varlen(*a, **k):
        calls["varlen"] += 1
        return varlen(*a, **k)

    monkeypatch.setattr(mtlflash, "flash_attn_func", count_dense)
    monkeypatch.setattr(mtlflash, "flash_attn_varlen_func", count_varlen)
    return calls


def logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


def ids(b, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 96, (b, s), generator=g)


def assert_close(a, b):
    err = (a - b).abs().max().item()
    assert err <= TOL, err


def test_no_padding(model, spy):
    x = ids(2, 19)
    ref = logits(model, "sdpa", input_ids=x)
    got = logits(model, NAME, input_ids=x)
    assert_close(got, ref)
    assert spy == {"dense": 2, "varlen": 0}  # one call per layer, no mask needed


@pytest.mark.parametrize("side", ["left", "right", "both_sides_mixed"])
def test_padding_masks(model, spy, side):
    x = ids(4, 13, seed=2)
    mask = torch.ones_like(x)
    if side == "left":
        mask[1, :5] = 0
        mask[2, :12] = 0
    elif side == "right":
        mask[1, 9:] = 0
        mask[3, 1:] = 0
    else:
        mask[0, :3] = 0
        mask[2, 10:] = 0
    ref = logits(model, "sdpa", input_ids=x, attention_mask=mask)
    got = logits(model, NAME, input_ids=x, attention_mask=mask)
    assert_close(got, ref)
    assert spy["varlen"] >= 2 and spy["dense"] == 0


def test_all_keys_present_mask_is_skipped(model, spy):
    x = ids(2, 9, seed=3)
    ref = logits(model, "sdpa", input_ids=x, attention_mask=torch.ones_like(x))
    got = logits(model, NAME, input_ids=x, attention_mask=torch.ones_like(x))
    assert_close(got, ref)
    assert spy["dense"] == 2


def test_mha_model_without_gqa(registered, spy):
    m = tiny_llama(kv_heads=4, seed=4)
    x = ids(2, 11, seed=4)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    assert_close(logits(m, NAME, input_ids=x, attention_mask=mask), logits(m, "sdpa", input_ids=x, attention_mask=mask))
    assert spy["varlen"] == 2


def test_generate_with_cache_and_left_padding(model, spy):
    x = ids(3, 8, seed=5)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, :1] = 0
    outs = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = model.generate(
                input_ids=x,
                attention_mask=mask,
                max_new_tokens=6,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
    assert torch.equal(outs["sdpa"].sequences, outs[NAME].sequences)
    for a, b in zip(outs["sdpa"].scores, outs[NAME].scores):
        assert_close(b, a)
    assert spy["varlen"] >= 2 * 6  # prefill and every decoding step ran on mtlflash


def test_unsupported_masks_go_to_sdpa(model, spy, monkeypatch):
    monkeypatch.setattr(trace, "ENABLED", True)
    trace.reset()
    x = ids(1, 10, seed=6)
    # a prepared 4-D mask with a hole in the middle of the keys (packed sequences)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    allowed[6:, :6] = False
    mask4 = allowed[None, None]
    ref = logits(model, "sdpa", input_ids=x, attention_mask=mask4)
    got = logits(model, NAME, input_ids=x, attention_mask=mask4)
    assert_close(got, ref)
    assert spy == {"dense": 0, "varlen": 0}
    tiers = {r["tier"] for r in trace.summary() if r["entry"] == "transformers"}
    assert tiers == {"stock:mask"}
    trace.reset()


def test_kernel_error_falls_back_to_sdpa(model, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(mtlflash, "flash_attn_func", broken)
    x = ids(2, 7, seed=7)
    assert_close(logits(model, NAME, input_ids=x), logits(model, "sdpa", input_ids=x))


def test_grad_calls_run_on_mtlflash(model, spy):
    # training is served too (tests/test_training.py trains a model); here: routed and differentiable
    x = ids(1, 6, seed=8)
    model.set_attn_implementation(NAME)
    out = model(input_ids=x).logits  # grad enabled, parameters require grad
    assert out.requires_grad and spy == {"dense": 2, "varlen": 0}
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_attention_function_direct_layout(registered):
    # (B, H, L, D) in, (B, L, H, Dv) contiguous out, like transformers' sdpa_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    torch.manual_seed(9)
    q = torch.randn(2, 4, 9, 16)
    k = torch.randn(2, 2, 9, 16)
    v = torch.randn(2, 2, 9, 24)
    got, w = mtf.attention_forward(Module(), q, k, v, None, scaling=0.2)
    ref, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.2)
    assert w is None and got.shape == (2, 9, 4, 24) and got.is_contiguous()
    assert_close(got, ref)


def test_register_rejects_flash_names():
    with pytest.raises(ValueError, match="flash"):
        mtf.register("mtlflash")


def test_registration_is_global_and_removable():
    from transformers import AttentionInterface

    mtf.register("mtl_attention_tmp")
    assert "mtl_attention_tmp" in AttentionInterface()
    mtf.unregister("mtl_attention_tmp")
    assert "mtl_attention_tmp" not in AttentionInterface()


def test_softcap_runs_on_mtlflash_and_matches_reference(spy):
    from mtlflash import reference

    class Module(torch.nn.Module):
        is_causal = True

    torch.manual_seed(10)
    q, k, v = (torch.randn(1, 2, 8, 16) * 3 for _ in range(3))
    got, _ = mtf.attention_forward(Module(), q, k, v, None, scaling=0.25, softcap=5.0)
    ref, _ = reference.attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=0.25, causal=True, softcap=5.0
    )
    assert_close(got, ref)
    assert spy["dense"] == 1
    # a softcap call with a mask mtlflash cannot serve: transformers' sdpa has no softcap
    odd = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    odd[..., 3] = False
    odd[..., 0, :] = False
    odd[..., 0, 5] = True
    with pytest.raises(ValueError, match="softcap"):
        mtf.attention_forward(Module(), q, k, v, odd, scaling=0.25, softcap=5.0)
