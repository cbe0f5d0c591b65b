"""KV-cache decode benchmark: flash_attn_with_kvcache as a generation loop calls it.

    python benchmarks/bench_kvcache.py            # full run (about a minute on 2 cores)
    python benchmarks/bench_kvcache.py --quick    # 32k only, fewer repetitions

Each timed call is one decode step of the real loop: one new token's k/v (rotary applied in the
call, GPT-NeoX layout) is appended at cache_seqlens = L - 1 and the single query row attends over
the L cached keys. Shapes: bf16, Hq=32, Hk=8, D=128, batch 1 and 8, L = 4k..32k, the cache dense
(B, L, Hk, D) or paged with page size 16 and 256 (blocks shuffled); and DeepSeek-style MLA decode
(q/k head dim 576, v 512, one kv head, 16 query heads, paged 64, V the first 512 dims of the cached
latent as DeepSeek's absorbed attention reads it: v_cache is a view of k_cache).

Measured side by side in one run:
  * the streaming read of this machine (benchmarks/peak.c, all threads), the ceiling for decode;
  * mtlflash: time per call, GB/s = bytes of K and V attended / time, and that as a fraction of
    the streaming read;
  * torch's scaled_dot_product_attention over the same keys (gathered once into (B, Hk, L, D)
    outside the timing; enable_gqa), time and GB/s.
Calls are timed alternately (best of the repetitions, a short idle gap before each) and the
streaming read is measured again at the end; each row is compared with the better of the two.
Writes kvcache.json, kvcache.md and kvcache.png to --out (default benchmarks/results; --quick
defaults to benchmarks/out, which git ignores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cpu  # noqa: E402  (the ceilings: peak.c, and the alternating timer)

TARGETS = {"dense_32k": 0.75, "paged16_vs_dense": 0.90, "mla": 0.70}


def log(msg):
    print(msg, flush=True)


def make_case(torch, B, L, hq, hk, d, dv, layout, seed=0):
    """Arguments of one decode step (the cache holds L - 1 rows; one is appended) and the keys
    gathered for torch."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    q = torch.randn(B, 1, hq, d, generator=g).to(dt)
    k_new = torch.randn(B, 1, hk, d, generator=g).to(dt)
    v_new = torch.randn(B, 1, hk, dv, generator=g).to(dt)
    args = {"q": q, "k": k_new, "v": v_new, "cache_seqlens": torch.full((B,), L - 1, dtype=torch.int32)}
    if layout == "dense":
        args["k_cache"] = torch.randn(B, L, hk, d, generator=g).to(dt)
        args["v_cache"] = torch.randn(B, L, hk, dv, generator=g).to(dt)
    else:
        page = int(layout.split("-")[1])
        nblk = -(-L // page)
        args["k_cache"] = torch.randn(B * nblk, page, hk, d, generator=g).to(dt)
        args["v_cache"] = torch.randn(B * nblk, page, hk, dv, generator=g).to(dt)
        args["block_table"] = torch.randperm(B * nblk, generator=g).reshape(B, nblk).to(torch.int32)
    if dv < d:  # MLA: the values are the first dv dims of the cached latent (one buffer)
        args["v_cache"] = args["k_cache"][..., :dv]
        args["v"] = args["k"][..., :dv]
    if d == dv:  # rotary on the new k and on q, as Llama-style models call it
        ang = torch.rand(L, 32, generator=g) * 6
        args["rotary_cos"], args["rotary_sin"] = ang.cos().to(dt), ang.sin().to(dt)
        args["rotary_interleaved"] = False
    return args


def gathered(torch, args, L):
    """(B, Hk, L, D) copies of the keys and values, for torch SDPA."""
    from mtlflash import reference

    kc, vc = args["k_cache"], args["v_cache"]
    if "block_table" in args:
        ks = torch.stack([reference._paged_keys(kc, row, L) for row in args["block_table"]])
        vs = torch.stack([reference._paged_keys(vc, row, L) for row in args["block_table"]])
    else:
        ks, vs = kc[:, :L], vc[:, :L]
    return ks.transpose(1, 2).contiguous(), vs.transpose(1, 2).contiguous()


def measure(torch, mf, B, L, hq, hk, d, dv, layout, reps, with_torch):
    args = make_case(torch, B, L, hq, hk, d, dv, layout)
    nbytes = B * L * hk * (d + (dv if dv == d else 0)) * 2  # bytes of K and V (MLA: one latent) in bf16
    fns = {"mtlflash": lambda: mf.flash_attn_with_kvcache(**args)}
    if with_torch:
        kt, vt = gathered(torch, args, L)
        qt = args["q"].transpose(1, 2)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if dv < d:  # MLA: torch's math path expands K per query head in fp32; one sequence at a time
            fns["torch_sdpa"] = lambda: [sdpa(qt[b:b + 1], kt[b:b + 1], vt[b:b + 1], enable_gqa=True)
                                         for b in range(B)]
        else:
            fns["torch_sdpa"] = lambda: sdpa(qt, kt, vt, enable_gqa=hq != hk)
    times = bench_cpu.race(fns, reps)
    row = {"batch": B, "L": L, "heads_q": hq, "heads_k": hk, "head_dim": d, "head_dim_v": dv, "layout": layout,
           "bytes": nbytes}
    for name, t in times.items():
        row[name] = {"best_ms": t["best_s"] * 1e3, "median_ms": t["median_s"] * 1e3,
                     "gbs": nbytes / t["best_s"] / 1e9}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="L = 32k only, fewer repetitions (written to benchmarks/out)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None, help="output directory")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args()
    out = a.out or (os.path.join(HERE, "out") if a.quick else os.path.join(HERE, "results"))
    os.makedirs(out, exist_ok=True)

    import torch

    import mtlflash as mf

    torch.set_num_threads(a.threads)
    os.environ["MTLFLASH_NUM_THREADS"] = str(a.threads)
    simd = mf._C.build_info()["cpu_simd"]
    with tempfile.TemporaryDirectory() as tmp:
        exe = bench_cpu.build_peak(tmp, "avx512" if simd == "avx512" else "avx2")
        read0 = bench_cpu.read_bw(exe, a.threads)
        fma = bench_cpu.fma_peak(exe, a.threads)
        log(f"streaming read, {a.threads} threads: {read0:.1f} GB/s; fp32 FMA peak {fma:.0f} GFLOP/s")
        lengths = [32768] if a.quick else [4096, 8192, 16384, 32768]
        reps = 3 if a.quick else 5
        rows = []
        plan = [(B, L, layout) for B in (1, 8) for L in lengths for layout in ("dense", "paged-16", "paged-256")]
        mla_plan = [(B, L) for B in (1, 8) for L in ([32768] if a.quick else [8192, 32768])]
        total = len(plan) + len(mla_plan)
        for i, (B, L, layout) in enumerate(plan):
            row = measure(torch, mf, B, L, 32, 8, 128, 128, layout, reps, with_torch=True)
            rows.append(row)
            log(f"[{i + 1:2d}/{total}] decode B={B} L={L:5d} {layout:9s}: mtlflash {row['mtlflash']['best_ms']:7.2f} ms "
                f"{row['mtlflash']['gbs']:5.1f} GB/s | torch SDPA {row['torch_sdpa']['best_ms']:7.2f} ms "
                f"{row['torch_sdpa']['gbs']:5.1f} GB/s")
        for j, (B, L) in enumerate(mla_plan):
            # torch's math path for D=576 takes seconds per call at batch 8: compared at batch 1 only
            row = measure(torch, mf, B, L, 16, 1, 576, 512, "paged-64", reps, with_torch=B == 1)
            row["mla"] = True
            rows.append(row)
            log(f"[{len(plan) + j + 1:2d}/{total}] MLA decode B={B} L={L:5d} paged-64: mtlflash "
                f"{row['mtlflash']['best_ms']:7.2f} ms {row['mtlflash']['gbs']:5.1f} GB/s" +
                (f" | torch SDPA {row['torch_sdpa']['best_ms']:7.2f} ms {row['torch_sdpa']['gbs']:5.1f} GB/s"
                 if "torch_sdpa" in row else ""))
        read1 = bench_cpu.read_bw(exe, a.threads)
        log(f"streaming read at the end: {read1:.1f} GB/s")
    read = max(read0, read1)
    for r in rows:
        r["fraction_of_read"] = r["mtlflash"]["gbs"] / read
        if "torch_sdpa" in r:
            r["speedup_vs_torch"] = r["torch_sdpa"]["best_ms"] / r["mtlflash"]["best_ms"]
    for r in rows:  # the floor the arithmetic sets: FLOPs at the FMA peak, as a fraction of the read
        flops = 2 * r["batch"] * r["heads_q"] * r["L"] * (r["head_dim"] + r["head_dim_v"])
        r["flops"] = flops
        r["gflops"] = flops / (r["mtlflash"]["best_ms"] * 1e-3) / 1e9
        r["arith_bound_fraction"] = (r["bytes"] / (flops / (fma * 1e9))) / 1e9 / read
    res = {"machine": {"cpu": bench_cpu._cpu_name(), "arch": platform.machine(), "threads": a.threads,
                       "simd": simd, "read_gbs": read, "read_gbs_start": read0, "read_gbs_end": read1,
                       "fma_gflops": fma},
           "versions": {"torch": torch.__version__, "mtlflash": mf.__version__},
           "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "verdicts": verdicts(rows)}
    for v in res["verdicts"]:
        log(f"target {v['what']}: {v['value'] * 100:.0f}% (target {v['target'] * 100:.0f}%): "
            f"{'target met' if v['met'] else 'target not met'}" + (f" ({v['note']})" if v.get("note") else ""))
    with open(os.path.join(out, "kvcache.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "kvcache.md"), "w") as f:
        f.write(markdown(res))
    if not a.no_plots:
        plot(res, os.path.join(out, "kvcache.png"))
    log(f"wrote {out}/kvcache.json, kvcache.md" + ("" if a.no_plots else ", kvcache.png"))


def _row(rows, B, L, layout):
    for r in rows:
        if r["batch"] == B and r["L"] == L and r["layout"] == layout and not r.get("mla"):
            return r
    return None


def verdicts(rows):
    out = []
    for B in (1, 8):
        dense = _row(rows, B, 32768, "dense")
        paged = _row(rows, B, 32768, "paged-16")
        if dense:
            out.append({"what": f"dense decode B={B} L=32k, fraction of the streaming read",
                        "value": dense["fraction_of_read"], "target": TARGETS["dense_32k"],
                        "met": dense["fraction_of_read"] >= TARGETS["dense_32k"]})
        if dense and paged:
            ratio = dense["mtlflash"]["best_ms"] / paged["mtlflash"]["best_ms"]
            out.append({"what": f"paged (page 16) vs dense speed B={B} L=32k", "value": ratio,
                        "target": TARGETS["paged16_vs_dense"], "met": ratio >= TARGETS["paged16_vs_dense"]})
    for r in rows:
        if r.get("mla") and r["L"] == 32768:
            note = (f"the arithmetic alone ({r['flops'] / r['bytes']:.0f} FLOP per byte read) caps it at "
                    f"{r['arith_bound_fraction'] * 100:.0f}% of the read at this machine's fp32 FMA peak; "
                    f"measured {r['gflops']:.0f} GFLOP/s")
            out.append({"what": f"MLA 576/512 decode B={r['batch']} L=32k, fraction of the streaming read",
                        "value": r["fraction_of_read"], "target": TARGETS["mla"],
                        "met": r["fraction_of_read"] >= TARGETS["mla"], "note": note})
    return out


def markdown(res):
    m = res["machine"]
    lines = [f"# KV-cache decode ({m['cpu']}, {m['threads']} threads, {m['simd']}; {res['date']})", "",
             f"Streaming read {m['read_gbs_start']:.1f} GB/s at the start, {m['read_gbs_end']:.1f} at the end; "
             "rows are compared with the better one. bf16; one token appended per call (rotary in the call "
             "where D = Dv).", "",
             "| B | L | Hq/Hk | D/Dv | layout | mtlflash ms | GB/s | % of read | torch SDPA ms | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['L']} | {r['heads_q']}/{r['heads_k']} | {r['head_dim']}/{r['head_dim_v']} | "
                     f"{r['layout']} | {r['mtlflash']['best_ms']:.2f} | {r['mtlflash']['gbs']:.1f} | "
                     f"{r['fraction_of_read'] * 100:.0f}% | "
                     + (f"{r['torch_sdpa']['best_ms']:.2f} | {r['speedup_vs_torch']:.2f}x |" if "torch_sdpa" in r
                        else "not run | |"))
    lines += ["", f"fp32 FMA peak measured in the same run: {m['fma_gflops']:.0f} GFLOP/s.", "",
              "| target | measured | target | verdict | note |", "|---|---|---|---|---|"]
    for v in res["verdicts"]:
        lines.append(f"| {v['what']} | {v['value'] * 100:.0f}% | {v['target'] * 100:.0f}% | "
                     f"{'target met' if v['met'] else 'target not met'} | {v.get('note', '')} |")
    return "\n".join(lines) + "\n"


def plot(res, path):
    plt = bench_cpu.pyplot()
    if plt is None:
        return
    rows = res["rows"]
    read = res["machine"]["read_gbs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, B in zip(axes, (1, 8)):
        for layout, style in (("dense", "o-"), ("paged-16", "s-"), ("paged-256", "^-")):
            pts = sorted((r["L"], r["mtlflash"]["gbs"]) for r in rows
                         if r["batch"] == B and r["layout"] == layout and not r.get("mla"))
            if pts:
                ax.plot(*zip(*pts), style, label=f"mtlflash {layout}")
        pts = sorted((r["L"], r["torch_sdpa"]["gbs"]) for r in rows
                     if r["batch"] == B and r["layout"] == "dense" and not r.get("mla"))
        if pts:
            ax.plot(*zip(*pts), "x--", color="gray", label="torch SDPA (gathered)")
        pts = sorted((r["L"], r["mtlflash"]["gbs"]) for r in rows if r["batch"] == B and r.get("mla"))
        if pts:
            ax.plot(*zip(*pts), "D:", label="mtlflash MLA 576/512 paged-64")
        ax.axhline(read, color="k", lw=0.8, ls=":", label=f"streaming read {read:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cached keys L")
        ax.set_title(f"decode bf16 Hq=32 Hk=8 D=128, batch {B}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s of K/V attended")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"flash_attn_with_kvcache, one token appended per call ({res['machine']['cpu']}, "
                 f"{res['machine']['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
