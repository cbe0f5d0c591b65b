"""Worker for tests/test_ring_attention.py: ring-flash-attn (from PyPI, unmodified) over
torch.distributed with the gloo backend, in `world` CPU processes on localhost, through mtlflash's
flash_attn shim. Every rank compares its chunk of the output and of the q/k/v gradients with
single-process attention on the whole sequence.

    python tests/ring_attention_worker.py WORLD PORT {causal|full} {ring|zigzag|stripe|varlen}

Inputs are bf16 (RING_DTYPE=fp16 for fp16), as FlashAttention-2 on CUDA takes them: with fp32
inputs ring-flash-attn's own backward is wrong, because it accumulates into
``block_dq_buffer.to(torch.float32)``, which is the buffer itself (not a copy) when the inputs are
fp32, so the next block's gradient overwrites the running sum. (It also returns dq in bf16
whatever the input dtype.)

What is not exercised, and why: ring_flash_attn.adapters (the Hugging Face adapter) imports
``is_flash_attn_greater_or_equal_2_10`` from transformers, which transformers 5 no longer has, so
it cannot be imported next to transformers 5.23; it is replaced by an empty module before the
import. ring_flash_attn.triton_utils (Triton kernels for the varlen lse layout) needs Triton, a
CUDA-side package; ring-flash-attn itself falls back to its torch helpers when the import fails.
"""
from __future__ import annotations

import os
import sys
import types


def main(rank, world, port, causal, kind):
    os.environ.setdefault("MTLFLASH_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    import mtlflash
    from mtlflash import shim

    shim.install(force=True)  # serve flash_attn (no real flash_attn here; CPU-only Linux)
    sys.modules.setdefault("ring_flash_attn.adapters", types.ModuleType("ring_flash_attn.adapters"))
    sys.modules["ring_flash_attn.adapters"].substitute_hf_flash_attn = None
    sys.modules["ring_flash_attn.adapters"].update_ring_flash_attn_params = None
    import flash_attn
    import ring_flash_attn

    assert getattr(flash_attn, "__mtlflash_shim__", False), "flash_attn is not served by mtlflash"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    B, S, Hq, Hk, D = 2, 48 * world, 4, 2, 32
    dtype = torch.bfloat16 if os.environ.get("RING_DTYPE", "bf16") == "bf16" else torch.float16
    q = torch.randn(B, S, Hq, D, dtype=dtype)
    k = torch.randn(B, S, Hk, D, dtype=dtype)
    v = torch.randn(B, S, Hk, D, dtype=dtype)
    dout = torch.randn(B, S, Hq, D, dtype=dtype)

    # single process, whole sequence
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    if kind == "varlen":
        lens = [16 * world, 32 * world]  # two sequences packed along one axis, each split across ranks
        cu = torch.tensor([0, lens[0], S], dtype=torch.int32)
        flat = [x[0] for x in full]
        out_ref = mtlflash.flash_attn_varlen_func(*flat, cu, cu, max(lens), max(lens), causal=causal)
        out_ref.backward(dout[0])
    else:
        out_ref = mtlflash.flash_attn_func(*full, causal=causal)
        out_ref.backward(dout)

    # this rank's part of the sequence, as each ring variant lays it out
    if kind == "zigzag":  # chunks r and 2*world-1-r
        c = S // (2 * world)
        idx = torch.cat([torch.arange(rank * c, (rank + 1) * c),
                         torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])
    elif kind == "varlen":  # this rank's piece of every sequence
        idx = torch.cat([torch.arange(s0 + rank * n // world, s0 + (rank + 1) * n // world)
                         for s0, n in zip((0, lens[0]), lens)])
    elif kind == "stripe":  # every world-th position
        idx = torch.arange(rank, S, world)
    else:
        c = S // world
        idx = torch.arange(rank * c, (rank + 1) * c)
    local = [x[:, idx].clone().requires_grad_() for x in (q, k, v)]
    if kind == "ring":
        out = ring_flash_attn.ring_flash_attn_func(*local, causal=causal)
    elif kind == "zigzag":
        out = ring_flash_attn.zigzag_ring_flash_attn_func(*local, causal=causal)
    elif kind == "stripe":
        out = ring_flash_attn.stripe_flash_attn_func(*local, causal=causal)
    else:
        local = [x[0].detach().clone().requires_grad_() for x in local]
        cu_local = (cu // world).to(torch.int32)  # each sequence's piece on every rank
        out = ring_flash_attn.ring_flash_attn_varlen_func(*local, cu_local, max(lens) // world, causal=causal)
    out.backward(dout[:, idx] if kind != "varlen" else dout[0, idx])

    # gather every rank's chunk on rank 0 and check the whole sequence, by the acceptance rule
    # (the same rule single-process attention passes), and against single-process mtlflash
    mine = [out.detach()] + [x.grad for x in local]
    gathered = [[torch.empty_like(t, dtype=torch.float32) for _ in range(world)] for t in mine]
    idx_all = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(idx_all, idx)
    for t, g in zip(mine, gathered):
        dist.all_gather(g, t.float().contiguous())
    if rank == 0:
        from mtlflash import reference

        axis = 0 if kind == "varlen" else 1
        if kind == "varlen":
            single = [out_ref.detach()] + [x.grad[0] for x in full]
        else:
            single = [out_ref.detach()] + [x.grad for x in full]
        whole = []
        for g, like in zip(gathered, single):
            w = torch.empty(like.shape, dtype=torch.float32)
            for r in range(world):
                w.index_copy_(axis, idx_all[r], g[r])
            whole.append(w.to(dtype))
        opts = {"causal": causal}
        if kind == "varlen":
            opts.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
            args = (q[0], k[0], v[0])
            d = dout[0]
        else:
            args = (q, k, v)
            d = dout
        res = reference.compare(whole[0], None, *args, **opts)
        assert res.ok, f"{kind} world={world} causal={causal}: out {res!r}"
        res = reference.compare_backward(whole[1:], d, *args, **opts)
        assert res.ok, f"{kind} world={world} causal={causal}: gradients {res!r}"
        diffs = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(("out", "dq", "dk", "dv"), whole, single)}
        print(f"rank 0: {kind} world={world} causal={causal} {dtype}: acceptance rule ok; max |ring - single process| "
              + ", ".join(f"{n} {e:.3g}" for n, e in diffs.items()), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    world, port, mode, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    mp.spawn(main, args=(world, port, mode == "causal", kind), nprocs=world, join=True)
    print(f"ring attention {kind} world={world} {mode}: ok")
