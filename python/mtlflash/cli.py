"""What `python -m mtlflash` prints and does: build facts, a demo run, and the self-check."""
from __future__ import annotations

import os
import platform
import sys
import time

from .info import backend_info, which_tier


def _line(text=""):
    print(text, flush=True)


def print_info():
    import mtlflash

    info = backend_info()
    _line(f"mtlflash {mtlflash.__version__}  ({info['platform']}, Python {platform.python_version()})")
    _line(f"  CPU SIMD path : {info['cpu_simd']}")
    _line(f"  CPU threads   : {info['num_threads']}  (MTLFLASH_NUM_THREADS)")
    _line(f"  Metal bridge  : {info['metal']}")
    kernel = info["kernel"] + ("" if info["kernel_valid"] else "  <- not a valid tier")
    _line(f"  MTLFLASH_KERNEL: {kernel}")
    _line("  tiers:")
    for name, t in info["tiers"].items():
        _line(f"    {name:<10} {'yes' if t['available'] else 'no ':<4} {t['reason']}")


def _timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _device():
    import torch

    return "mps" if torch.backends.mps.is_available() else "cpu"


def _sync(device):
    import torch

    if device == "mps":
        torch.mps.synchronize()


def run_demo(seqlen, heads, head_dim, repeats) -> int:
    """Real attention at a realistic shape on the best tier, timed against torch's SDPA."""
    import torch
    import torch.nn.functional as F

    import mtlflash
    from mtlflash import reference

    device = _device()
    _line()
    _line(f"attention B=1 H={heads} L={seqlen} D={head_dim} on {device}, best of {repeats} runs")
    _line(f"  {'dtype':<9}{'causal':<8}{'tier':<11}{'max err':>10}{'mtlflash':>12}{'GFLOP/s':>9}"
          f"{'torch sdpa':>12}{'GFLOP/s':>9}{'speed-up':>10}")
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, generator=g).to(dtype).to(device) for _ in range(3))
        for causal in (False, True):
            flops = 4 * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
            out, lse, _ = mtlflash.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
            tier = which_tier(q, k, v, causal=causal)
            ref, _ = reference.attention(q.cpu(), k.cpu(), v.cpu(), causal=causal)
            err = (out.cpu().float() - ref).abs().max().item()

            def ours():
                mtlflash.flash_attn_func(q, k, v, causal=causal)
                _sync(device)

            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

            def stock():
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                _sync(device)

            t_ours, t_stock = _timed(ours, repeats), _timed(stock, repeats)
            _line(f"  {str(dtype).replace('torch.', ''):<9}{str(causal):<8}{tier:<11}{err:>10.2e}"
                  f"{t_ours * 1e3:>10.1f}ms{flops / t_ours / 1e9:>9.1f}{t_stock * 1e3:>10.1f}ms"
                  f"{flops / t_stock / 1e9:>9.1f}{t_stock / t_ours:>9.2f}x")
            bound = 5e-5 if dtype == torch.float32 else 2e-2
            if not err <= bound:
                failures += 1
                _line(f"  ^ error {err:.3g} is above {bound:g}")
    _line()
    _line("GFLOP/s counts 4*B*H*L*L*D (halved for causal). 'max err' is against mtlflash.reference in fp32.")
    return 1 if failures else 0


# --- the self-check ---------------------------------------------------------------------------------

def _grid(quick):
    """(name, B, Sq, Sk, Hq, Hk, D, Dv, options) covering every option."""
    cases = [
        ("plain", 2, 65, 65, 4, 4, 64, 64, {}),
        ("causal Sq<Sk", 1, 63, 130, 4, 2, 128, 128, {"causal": True}),
        ("causal Sq>Sk", 1, 130, 63, 4, 2, 64, 64, {"causal": True}),
        ("window", 1, 97, 97, 2, 1, 80, 80, {"window_size": (16, 8)}),
        ("window (0,0)", 1, 40, 60, 2, 2, 32, 32, {"window_size": (0, 0)}),
        ("softcap", 1, 64, 64, 2, 2, 96, 96, {"softcap": 10.0, "causal": True}),
        ("alibi (B,H)", 2, 50, 70, 4, 4, 64, 64, {"alibi_slopes": "BH", "causal": True}),
        ("mqa Dv!=D", 1, 33, 200, 8, 1, 192, 128, {}),
        ("odd D", 1, 17, 17, 2, 2, 59, 59, {"causal": True}),
        ("D=256", 1, 40, 40, 2, 2, 256, 256, {}),
        ("decode", 2, 1, 1025, 8, 2, 128, 128, {"causal": True}),
    ]
    return cases[:6] if quick else cases


def _run_case(case, dtype, device, tier):
    import torch

    import mtlflash
    from mtlflash import reference

    name, B, sq, sk, hq, hk, d, dv, opts = case
    opts = dict(opts)
    g = torch.Generator().manual_seed(sq * 31 + sk)
    q = torch.randn(B, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(B, sk, hk, d, generator=g).to(dtype)
    v = torch.randn(B, sk, hk, dv, generator=g).to(dtype)
    if opts.get("alibi_slopes") == "BH":
        opts["alibi_slopes"] = torch.rand(B, hq, generator=g).to(device)
    old = os.environ.get("MTLFLASH_KERNEL")
    os.environ["MTLFLASH_KERNEL"] = tier
    try:
        out, lse, _ = mtlflash.flash_attn_func(q.to(device), k.to(device), v.to(device), return_attn_probs=True, **opts)
    finally:
        if old is None:
            os.environ.pop("MTLFLASH_KERNEL", None)
        else:
            os.environ["MTLFLASH_KERNEL"] = old
    return reference.compare(out, lse, q, k, v, **opts)


def check(quick=False) -> int:
    """Runs every available tier over the numerics grid and times it against stock SDPA;
    prints a report for pasting into an issue. Exit status 1 if any check failed."""
    import numpy
    import torch

    import mtlflash

    info = backend_info()
    has_mps = torch.backends.mps.is_available()
    _line("```")
    _line("mtlflash self-check report")
    _line(f"mtlflash  : {mtlflash.__version__} (cpu simd {info['cpu_simd']}; metal: {info['metal']})")
    _line(f"machine   : {platform.platform()} {platform.machine()} {platform.processor()}")
    if sys.platform == "darwin":
        _line(f"macOS     : {platform.mac_ver()[0]}")
    _line(f"python    : {platform.python_version()}  torch {torch.__version__}  numpy {numpy.__version__}")
    _line(f"MPS       : {'available' if has_mps else 'not available'}")
    plans = [("cpu", "cpu")]
    if info["tiers"]["reference"]["available"]:
        plans.append(("reference", "mps" if has_mps else "cpu"))
    skipped = []
    for tier in ("vec", "simdgroup", "tensorops"):
        t = info["tiers"][tier]
        if t["available"] and has_mps:
            plans.append((tier, "mps"))
        else:
            skipped.append((tier, t["reason"] if not t["available"] else "MPS is not available"))

    failures = 0
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for tier, device in plans:
        worst, n_ok, n = 0.0, 0, 0
        for dtype in dtypes:
            for case in _grid(quick):
                n += 1
                try:
                    res = _run_case(case, dtype, device, tier)
                except Exception as e:  # reported, never hidden
                    _line(f"  FAIL {tier}/{device} {case[0]} {dtype}: {type(e).__name__}: {e}")
                    failures += 1
                    continue
                worst = max(worst, res.err_out)
                if res.ok:
                    n_ok += 1
                else:
                    failures += 1
                    _line(f"  FAIL {tier}/{device} {case[0]} {dtype}: {'; '.join(res.problems)}")
        status = "pass" if n_ok == n else "FAIL"
        _line(f"tier {tier:<10} on {device:<4}: {status} {n_ok}/{n} cases, max |out - ref| {worst:.2e}")
    for tier, reason in skipped:
        _line(f"tier {tier:<10}        : skipped ({reason})")

    _line("timing against stock torch.nn.functional.scaled_dot_product_attention (best of 3):")
    import torch.nn.functional as F

    shapes = [(2048, 64)] if quick else [(2048, 64), (4096, 64), (4096, 128)]
    for tier, device in plans:
        if tier == "reference":
            continue
        dtype = torch.float16 if device == "mps" else torch.float32
        for L, D in shapes:
            q = torch.randn(1, L, 16, D, dtype=dtype, device=device)
            os.environ["MTLFLASH_KERNEL"] = tier
            try:
                t_ours = _timed(lambda: (mtlflash.flash_attn_func(q, q, q, causal=True), _sync(device)), 3)
            finally:
                os.environ.pop("MTLFLASH_KERNEL", None)
            qt = q.transpose(1, 2)
            t_stock = _timed(lambda: (F.scaled_dot_product_attention(qt, qt, qt, is_causal=True), _sync(device)), 3)
            _line(f"  {tier:<10} {device:<4} {str(dtype).replace('torch.', ''):<8} B1 H16 L{L} D{D} causal: "
                  f"{t_ours * 1e3:8.1f} ms vs stock {t_stock * 1e3:8.1f} ms  ({t_stock / t_ours:.2f}x)")
    if not has_mps:
        _line("Metal part skipped: no Apple GPU (MPS) on this machine.")
    _line(f"result    : {'PASS' if failures == 0 else f'FAIL ({failures} failures)'}")
    _line("```")
    return 0 if failures == 0 else 1
