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


def _have_torch() -> bool:
    from .info import torch_installed

    return torch_installed()


TORCH_ADDS = ("torch is not installed: this ran on NumPy arrays (float32, float16); with torch "
              "(pip install torch) it also runs bfloat16, torch tensors, the reference tier and "
              "the timing against torch's SDPA.")


def _device():
    import torch

    return "mps" if torch.backends.mps.is_available() else "cpu"


def _sync(device):
    import torch

    if device == "mps":
        torch.mps.synchronize()


def numpy_attention(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    softmax_scale=None, chunk=256):
    """fp64 attention on NumPy arrays (B, Sq, Hq, D) with mtlflash's semantics (bottom-right causal
    alignment, windows, softcap, ALiBi, GQA, Dv != D): the reference when torch is absent.
    Returns (out fp64 (B, Sq, Hq, Dv), lse fp64 (B, Hq, Sq)); rows that see no key get 0 / +inf.
    Never holds more than ``chunk`` rows of scores per head."""
    import numpy as np

    B, Sq, Hq, D = q.shape
    Sk, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    left, right = window_size
    if causal:
        right = 0
    out = np.zeros((B, Sq, Hq, Dv))
    lse = np.full((B, Hq, Sq), np.inf)
    cols = np.arange(Sk)
    slopes = None if alibi_slopes is None else np.broadcast_to(np.asarray(alibi_slopes, np.float64), (B, Hq))
    for b in range(B):
        for h in range(Hq):
            kh = k[b, :, h // (Hq // Hk), :].astype(np.float64)
            vh = v[b, :, h // (Hq // Hk), :].astype(np.float64)
            for r0 in range(0, Sq, chunk):
                rows = np.arange(r0, min(Sq, r0 + chunk))
                s = (q[b, rows, h, :].astype(np.float64) @ kh.T) * scale
                if softcap > 0:
                    s = softcap * np.tanh(s / softcap)
                diag = rows[:, None] + (Sk - Sq)  # bottom-right alignment
                if slopes is not None:
                    s = s - slopes[b, h] * np.abs(diag - cols[None, :])
                mask = np.zeros(s.shape, bool)
                if right >= 0:
                    mask |= cols[None, :] > diag + right
                if left >= 0:
                    mask |= cols[None, :] < diag - left
                s[mask] = -np.inf
                m = s.max(axis=1, keepdims=True) if Sk else np.full((len(rows), 1), -np.inf)
                seen = np.isfinite(m[:, 0])
                p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
                p[~seen] = 0.0
                l = p.sum(axis=1)
                o = p @ vh
                o[seen] /= l[seen, None]
                out[b, rows, h, :] = o
                lse[b, h, rows[seen]] = (m[seen, 0] + np.log(l[seen]))
    return out, lse


def _busy_probe():
    """Measures the machine's in-cache attention rate on one thread and on all of mtlflash's
    threads (a small problem that stays in cache, so it runs near the FMA peak). On an idle
    machine all threads reach close to threads x one thread; when much less, other work shares the
    cores. Returns (gflops_1, gflops_all, threads, load average or None)."""
    import numpy as np

    import mtlflash
    from . import _C

    threads = _C.num_threads()
    h = max(2, threads) * 2
    q = np.random.default_rng(0).standard_normal((1, 256, h, 64)).astype(np.float32)
    flops = 4.0 * h * 256 * 256 * 64
    old = os.environ.get("MTLFLASH_NUM_THREADS")
    try:
        os.environ["MTLFLASH_NUM_THREADS"] = "1"
        t1 = _timed(lambda: mtlflash.flash_attn_func(q, q, q), 3)
        os.environ["MTLFLASH_NUM_THREADS"] = str(threads)
        tn = _timed(lambda: mtlflash.flash_attn_func(q, q, q), 3)
    finally:
        if old is None:
            os.environ.pop("MTLFLASH_NUM_THREADS", None)
        else:
            os.environ["MTLFLASH_NUM_THREADS"] = old
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    return flops / t1 / 1e9, flops / tn / 1e9, threads, load


def _print_busy_note():
    g1, gn, n, load = _busy_probe()
    share = gn / (g1 * n) if n > 1 else 1.0
    load_txt = f", load average {load:.1f}" if load is not None else ""
    _line(f"machine: in-cache attention {g1:.1f} GFLOP/s on 1 thread, {gn:.1f} on {n} "
          f"({share:.0%} of {n} x 1 thread){load_txt}")
    if n > 1 and share < 0.7 or (load is not None and load > 0.75 * (os.cpu_count() or 1)):
        _line("NOTE: the machine looks busy (the threads together reach well below their sum, or the "
              "load average is high): the timings below understate both libraries.")


def _check_args(seqlen, heads, head_dim, repeats):
    """Refuses what would only end in a traceback, with the reason."""
    from . import _C

    max_d = _C.build_info().get("max_head_dim", 576)
    if seqlen < 1:
        return f"--seqlen must be at least 1, got {seqlen}"
    if heads < 1:
        return f"--heads must be at least 1, got {heads}"
    if not 1 <= head_dim <= max_d:
        return f"--head-dim must be between 1 and {max_d}, got {head_dim}"
    if repeats < 1:
        return f"--repeats must be at least 1, got {repeats}"
    return None


def _verdict_header():
    return (f"  {'dtype':<9}{'causal':<8}{'tier':<11}{'max err':>10}{'bound':>9}{'result':>8}"
            f"{'mtlflash':>12}{'GFLOP/s':>9}")


def run_demo(seqlen, heads, head_dim, repeats) -> int:
    """Real attention at a realistic shape on the best tier, checked against the reference (each
    row: the error, the bound it must stay under, PASS/FAIL) and timed against torch's SDPA. Without
    torch: the same on NumPy arrays against a NumPy fp64 reference, without the SDPA timing."""
    problem = _check_args(seqlen, heads, head_dim, repeats)
    if problem:
        print(f"python -m mtlflash run: {problem}", file=sys.stderr)
        return 2
    _print_busy_note()
    if not _have_torch():
        return _run_demo_numpy(seqlen, heads, head_dim, repeats)
    import torch
    import torch.nn.functional as F

    import mtlflash
    from mtlflash import reference

    device = _device()
    _line()
    _line(f"attention B=1 H={heads} L={seqlen} D={head_dim} on {device}, best of {repeats} runs")
    _line(_verdict_header() + f"{'torch sdpa':>12}{'GFLOP/s':>9}{'speed-up':>10}")
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
            bound = 5e-5 if dtype == torch.float32 else 2e-2
            ok = err <= bound
            failures += not ok
            _line(f"  {str(dtype).replace('torch.', ''):<9}{str(causal):<8}{tier:<11}{err:>10.2e}{bound:>9.0e}"
                  f"{'PASS' if ok else 'FAIL':>8}{t_ours * 1e3:>10.1f}ms{flops / t_ours / 1e9:>9.1f}"
                  f"{t_stock * 1e3:>10.1f}ms{flops / t_stock / 1e9:>9.1f}{t_stock / t_ours:>9.2f}x")
    failures += _kv_demo(device, seqlen, heads, head_dim, repeats)
    _line()
    _line("GFLOP/s counts 4*B*H*L*L*D (halved for causal). 'max err' is max|out - ref| against "
          "mtlflash.reference (fp32); PASS when it is at most 'bound' (5e-5 for float32; 2e-2 for bfloat16, "
          "whose outputs carry 8 significant bits).")
    _line(f"result: {'PASS' if failures == 0 else f'FAIL ({failures} rows above their bound)'}")
    return 1 if failures else 0


def _kv_case(g, dtype, device, B, L, hq, hk, d, dv, page, s_new=1, rotary=True, leftpad=False):
    """The arguments of one flash_attn_with_kvcache call: a paged cache (page > 0, blocks shuffled)
    or a dense one holding L - s_new rows per sequence, s_new rows appended (rotated)."""
    import torch

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    args = {"q": rnd(B, s_new, hq, d), "k": rnd(B, s_new, hk, d), "v": rnd(B, s_new, hk, dv),
            "cache_seqlens": torch.full((B,), L - s_new, dtype=torch.int32).to(device), "causal": True}
    if page:
        nblk = -(-L // page)
        args["k_cache"], args["v_cache"] = rnd(B * nblk, page, hk, d), rnd(B * nblk, page, hk, dv)
        args["block_table"] = torch.randperm(B * nblk, generator=g).reshape(B, nblk).to(torch.int32).to(device)
    else:
        args["k_cache"], args["v_cache"] = rnd(B, L, hk, d), rnd(B, L, hk, dv)
    if rotary:
        ang = torch.rand(L, d // 4, generator=g) * 6
        args["rotary_cos"], args["rotary_sin"] = ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)
        args["rotary_interleaved"] = False
    if leftpad:
        args["cache_leftpad"] = torch.full((B,), (L - s_new) // 3, dtype=torch.int32).to(device)
    return args


def _kv_check(args, tier=None):
    """Runs flash_attn_with_kvcache (on `tier` when given) and checks out/lse by the acceptance rule
    and the new v rows bitwise; returns (Comparison, seconds of the call)."""
    import mtlflash
    from mtlflash import reference

    cpu = {k: (v.cpu().clone() if hasattr(v, "cpu") else v) for k, v in args.items()}
    old = os.environ.get("MTLFLASH_KERNEL")
    if tier is not None:
        os.environ["MTLFLASH_KERNEL"] = tier
    try:
        t0 = time.perf_counter()
        out, lse = mtlflash.flash_attn_with_kvcache(**args, return_softmax_lse=True)
        _sync(out.device.type)
        dt = time.perf_counter() - t0
    finally:
        if tier is not None:
            if old is None:
                os.environ.pop("MTLFLASH_KERNEL", None)
            else:
                os.environ["MTLFLASH_KERNEL"] = old
    ref_args = {k: v for k, v in cpu.items() if k not in ("q", "k_cache", "v_cache")}
    res = reference.compare_kvcache(out, lse, cpu["q"], cpu["k_cache"], cpu["v_cache"], factor=3.0, **ref_args)
    _, _, _, v_ref = reference.kvcache_attention(cpu["q"], cpu["k_cache"], cpu["v_cache"], update_cache=False,
                                                 **ref_args)
    if not (args["v_cache"].cpu() == v_ref).all():
        res.problems.append("the cache after the call differs from the reference's")
    return res, dt


def _kv_demo(device, seqlen, heads, head_dim, repeats) -> int:
    """One decode step of generation through flash_attn_with_kvcache: bf16, paged cache (page 16),
    one token appended with rotary, checked against the reference and timed against SDPA over the
    same keys gathered. Returns the number of failures."""
    import torch
    import torch.nn.functional as F

    hk = max(1, heads // 4) if heads % 4 == 0 else heads
    g = torch.Generator().manual_seed(1)
    B, L = 4, seqlen
    args = _kv_case(g, torch.bfloat16, device, B, L, heads, hk, head_dim, head_dim, 16)
    res, _ = _kv_check(dict(args))
    tier = "cpu" if device == "cpu" else ("vec" if backend_info()["tiers"]["vec"]["available"] else "reference")
    t_ours = _timed(lambda: _kv_check_free(args, device), repeats)
    from mtlflash import reference

    keys = torch.stack([reference._paged_keys(args["k_cache"], row, L) for row in args["block_table"]]).transpose(1, 2)
    vals = torch.stack([reference._paged_keys(args["v_cache"], row, L) for row in args["block_table"]]).transpose(1, 2)
    qt = args["q"].transpose(1, 2)

    def stock():
        F.scaled_dot_product_attention(qt, keys, vals, enable_gqa=heads != hk)
        _sync(device)

    t_stock = _timed(stock, repeats)
    gbs = B * L * hk * 2 * head_dim * 2 / t_ours / 1e9
    _line()
    _line(f"kv-cache decode step (flash_attn_with_kvcache): B={B} Hq={heads} Hk={hk} D={head_dim} bfloat16, "
          f"paged cache (page 16, shuffled blocks) of L={L}, one token appended with rotary")
    _line(f"  {'bfloat16':<9}{'True':<8}{tier:<11}{res.err_out:>10.2e}"
          f"{res.bound_out:>9.1e}{'PASS' if res.ok else 'FAIL':>8}{t_ours * 1e3:>10.2f}ms{gbs:>7.1f}GB/s"
          f"{t_stock * 1e3:>10.2f}ms{'':>9}{t_stock / t_ours:>9.2f}x")
    if not res.ok:
        _line("  " + "; ".join(res.problems))
    _line("  (bound: FA2's kv-cache rule, 3x the error of the same attention computed in bfloat16 against "
          "fp64; GB/s: bytes of K and V attended per second; SDPA reads the same keys gathered)")
    return 0 if res.ok else 1


def _kv_check_free(args, device):
    import mtlflash

    mtlflash.flash_attn_with_kvcache(**args)
    _sync(device)


def _run_demo_numpy(seqlen, heads, head_dim, repeats) -> int:
    import numpy as np

    import mtlflash

    _line()
    _line(TORCH_ADDS)
    _line(f"attention B=1 H={heads} L={seqlen} D={head_dim} on NumPy arrays (cpu), best of {repeats} runs")
    _line(_verdict_header())
    failures = 0
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((1, seqlen, heads, head_dim)).astype(np.float32) for _ in range(3)]
    for dtype in (np.float32, np.float16):
        q, k, v = (x.astype(dtype) for x in base)
        for causal in (False, True):
            flops = 4 * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
            out = mtlflash.flash_attn_func(q, k, v, causal=causal)
            ref, _ = numpy_attention(q, k, v, causal=causal)
            err = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
            t = _timed(lambda: mtlflash.flash_attn_func(q, k, v, causal=causal), repeats)
            # relative to the largest output: float16 rounds it to 11 significant bits
            bound = (5e-5 if dtype == np.float32 else 1e-3) * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
            ok = err <= bound
            failures += not ok
            _line(f"  {np.dtype(dtype).name:<9}{str(causal):<8}{'cpu':<11}{err:>10.2e}{bound:>9.1e}"
                  f"{'PASS' if ok else 'FAIL':>8}{t * 1e3:>10.1f}ms{flops / t / 1e9:>9.1f}")
    _line()
    _line("GFLOP/s counts 4*B*H*L*L*D (halved for causal). 'max err' is max|out - ref| against an fp64 "
          "NumPy reference; PASS when it is at most 'bound' (5e-5 for float32, 1e-3 for float16, times "
          "max(1, max|ref|)).")
    _line(f"result: {'PASS' if failures == 0 else f'FAIL ({failures} rows above their bound)'}")
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


def _kv_check_tiers(plans, quick) -> int:
    """flash_attn_with_kvcache on every tier that serves it: dense and paged caches (page sizes 1,
    16), leftpad, rotary, GQA, MLA 576/512; out/lse by FA2's kv-cache rule and the cache after the
    call. Returns the number of failures."""
    import torch

    cases = [("dense rotary", 2, 300, 8, 2, 64, 64, 0, 3, True, False),
             ("paged 16 leftpad", 2, 500, 8, 2, 128, 128, 16, 1, True, True),
             ("paged 1", 1, 70, 4, 4, 32, 32, 1, 2, False, False),
             ("mla 576/512 paged 64", 1, 300, 16, 1, 576, 512, 64, 1, False, False)]
    failures = 0
    for tier, device in plans:
        if tier not in ("cpu", "reference", "vec"):
            continue
        n_ok, n = 0, 0
        for name, B, L, hq, hk, d, dv, page, s_new, rotary, leftpad in (cases[:2] if quick else cases):
            for dtype in (torch.float32, torch.bfloat16):
                n += 1
                g = torch.Generator().manual_seed(L + d)
                try:
                    args = _kv_case(g, dtype, device, B, L, hq, hk, d, dv, page, s_new, rotary, leftpad)
                    res, _ = _kv_check(args, tier)
                except Exception as e:  # reported, never hidden
                    _line(f"  FAIL kv-cache {tier}/{device} {name} {dtype}: {type(e).__name__}: {e}")
                    failures += 1
                    continue
                if res.ok:
                    n_ok += 1
                else:
                    failures += 1
                    _line(f"  FAIL kv-cache {tier}/{device} {name} {dtype}: {'; '.join(res.problems)}")
        _line(f"kv cache  {tier:<10} on {device:<4}: {'pass' if n_ok == n else 'FAIL'} {n_ok}/{n} cases")
    return failures


def check(quick=False) -> int:
    """Runs every available tier over the numerics grid and times it against stock SDPA;
    prints a report for pasting into an issue. Exit status 1 if any check failed. Without torch,
    the CPU tier on NumPy arrays against a NumPy fp64 reference."""
    if not _have_torch():
        return _check_numpy(quick)
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
    failures += _kv_check_tiers(plans, quick)

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


def _check_numpy(quick) -> int:
    """The self-check without torch: the CPU tier on NumPy arrays (float32, float16) over the same
    grid, against :func:`numpy_attention` in fp64."""
    import numpy as np

    import mtlflash

    info = backend_info()
    _line("```")
    _line("mtlflash self-check report")
    _line(f"mtlflash  : {mtlflash.__version__} (cpu simd {info['cpu_simd']}; metal: {info['metal']})")
    _line(f"machine   : {platform.platform()} {platform.machine()} {platform.processor()}")
    if sys.platform == "darwin":
        _line(f"macOS     : {platform.mac_ver()[0]}")
    _line(f"python    : {platform.python_version()}  torch not installed  numpy {np.__version__}")
    _line(TORCH_ADDS)
    failures, n_ok, n, worst = 0, 0, 0, 0.0
    for dtype in (np.float32, np.float16):
        for name, B, sq, sk, hq, hk, d, dv, opts in _grid(quick):
            n += 1
            rng = np.random.default_rng(sq * 31 + sk)
            q = rng.standard_normal((B, sq, hq, d)).astype(dtype)
            k = rng.standard_normal((B, sk, hk, d)).astype(dtype)
            v = rng.standard_normal((B, sk, hk, dv)).astype(dtype)
            opts = dict(opts)
            if opts.get("alibi_slopes") == "BH":
                opts["alibi_slopes"] = rng.random((B, hq)).astype(np.float32)
            try:
                out, lse, _ = mtlflash.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
            except Exception as e:  # reported, never hidden
                _line(f"  FAIL cpu/numpy {name} {np.dtype(dtype).name}: {type(e).__name__}: {e}")
                failures += 1
                continue
            ref, ref_lse = numpy_attention(q, k, v, **opts)
            scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
            err = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
            bound = (5e-5 if dtype == np.float32 else 1e-3) * scale
            empty = np.isinf(ref_lse)
            lse_ok = bool(np.array_equal(np.isinf(lse) & (lse > 0), empty)) and bool(
                np.all(np.abs(lse[~empty] - ref_lse[~empty]) <= 5e-5 * np.maximum(1.0, np.abs(ref_lse[~empty]))))
            worst = max(worst, err)
            if err <= bound and lse_ok:
                n_ok += 1
            else:
                failures += 1
                _line(f"  FAIL cpu/numpy {name} {np.dtype(dtype).name}: max|out - ref| {err:.2e} "
                      f"(bound {bound:.1e}){'' if lse_ok else '; lse differs'}")
    _line(f"tier cpu        on numpy: {'pass' if n_ok == n else 'FAIL'} {n_ok}/{n} cases, max |out - ref| {worst:.2e}")
    for tier in ("reference", "vec", "simdgroup", "tensorops"):
        reason = info["tiers"][tier]["reason"] if not info["tiers"][tier]["available"] else "needs torch (MPS tensors)"
        _line(f"tier {tier:<10}        : skipped ({reason})")
    _line(f"result    : {'PASS' if failures == 0 else f'FAIL ({failures} failures)'}")
    _line("```")
    return 0 if failures == 0 else 1
