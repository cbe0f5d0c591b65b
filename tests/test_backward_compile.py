"""torch.compile: the mtlflash:: custom ops (fake implementations, registered autograd) let
torch.compile(fullgraph=True) trace a model that calls mtlflash, forward and backward, with the
inductor backend on CPU tensors and no graph break."""
from __future__ import annotations

import pytest
import torch

import mtlflash
from mtlflash import autograd  # noqa: F401  (registers the ops)


def make(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def test_opcheck_forward_and_backward_ops():
    q, k, v = make((1, 20, 4, 32), seed=1), make((1, 24, 2, 32), seed=2), make((1, 24, 2, 16), seed=3)
    q.requires_grad_()
    fwd_args = (q, k, v, None, None, 0, 0, 0.0, None, True, -1, -1, 0.0, None, None)
    torch.library.opcheck(torch.ops.mtlflash.attention_forward.default, fwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse, rng = torch.ops.mtlflash.attention_forward(*fwd_args)
    assert out.shape == (1, 20, 4, 16) and lse.shape == (1, 4, 20) and rng.shape == (2,)
    bwd_args = (torch.randn_like(out), q.detach(), k, v, out.detach(), lse, None, None, 0, 0, 0.0, None, True, -1, -1,
                0.0, None, rng)
    torch.library.opcheck(torch.ops.mtlflash.attention_backward.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    vq, vk = make((20, 4, 32), seed=4), make((20, 2, 32), seed=5)
    torch.library.opcheck(torch.ops.mtlflash.attention_forward.default,
                          (vq, vk, vk, cu, cu, 13, 13, 0.0, 0.2, False, 4, 4, 3.0, None, None),
                          test_utils=("test_schema", "test_faketensor"))


class Block(torch.nn.Module):
    """A tiny attention block: packed qkv projection, mtlflash, output projection."""

    def __init__(self, dim=64, heads=4, dtype=torch.float32, fn="qkvpacked"):
        super().__init__()
        self.heads, self.fn = heads, fn
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=dtype)
        self.proj = torch.nn.Linear(dim, dim, dtype=dtype)

    def forward(self, x):
        B, S, C = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.heads, C // self.heads)
        if self.fn == "qkvpacked":
            o = mtlflash.flash_attn_qkvpacked_func(qkv, causal=True)
        else:  # grouped-query attention through flash_attn_func with two kv heads
            q, k, v = qkv.unbind(2)
            o = mtlflash.flash_attn_func(q, k[:, :, :2].contiguous(), v[:, :, :2].contiguous(), causal=True,
                                         softcap=5.0)
        return self.proj(o.reshape(B, S, C))


def _train_step(model, x):
    model.zero_grad()
    y = model(x)
    (y * y).mean().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("fn", ["qkvpacked", pytest.param("gqa", marks=pytest.mark.slow)])
def test_compile_fullgraph_forward_and_backward_inductor(fn):
    torch.manual_seed(0)
    model = Block(fn=fn)
    x = make((2, 50, 64), seed=7)
    y_eager, g_eager = _train_step(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")  # a graph break raises
    y_c, g_c = _train_step(compiled, x)
    assert torch.allclose(y_c, y_eager, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_c, g_eager):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
