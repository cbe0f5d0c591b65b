"""CPU benchmark of the backward pass: mtlflash against torch's scaled_dot_product_attention backward.

    python benchmarks/bench_backward.py            # the whole grid (several minutes on 2 cores)
    python benchmarks/bench_backward.py --quick    # L = 1024 and 4096 only, fewer repetitions

Measures, in one run:
  * the FMA-loop peak (benchmarks/peak.c, compiled here, as bench_cpu.py does), at the start and
    the end of the run;
  * backward GFLOP/s for fp32/bf16/fp16, B=1, H=16, L = 1024, 2048, 4096, D = 64 and 128, causal
    and not. FLOPs by FlashAttention-2's convention: backward = 2.5 x the forward's
    4*B*H*L^2*D (halved for causal). mtlflash is timed through ``mtlflash._C.backward`` (dq, dk, dv
    and softmax_d from dout, q, k, v, out, lse); torch through ``torch.autograd.grad`` of
    ``scaled_dot_product_attention`` over the same inputs (its forward done once, outside the
    timing), the same number of threads, alternately in the same run;
  * extra resident memory of one backward call beyond inputs, outputs and gradients at L = 16384
    (a fresh process per case).
Writes benchmarks/results/backward.json, backward.md and PNG plots (needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_cpu  # noqa: E402  (the peak program and the timing helpers)

log = bench_cpu.log

MEM_CHILD = r"""
import os, resource, sys, threading, time, torch, mtlflash
from mtlflash import _C
L, H, D, causal = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
q, k, v = (torch.randn(1, L, H, D) for _ in range(3))
out, lse, _ = mtlflash.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
dout = torch.randn_like(out)
grads = [torch.empty_like(x) for x in (q, k, v)] + [torch.empty_like(lse)]
for g in grads:
    g.zero_()  # touched: resident before the measurement
small = [torch.randn(1, 64, H, D) for _ in range(3)]
o, l, _ = mtlflash.flash_attn_func(*small, return_attn_probs=True)
_C.backward("warmup", o, *small, o, l)
peak, done = [0], [False]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
base = rss()
max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
th = threading.Thread(target=watch)
th.start()
_C.backward("mem", dout, q, k, v, out, lse, causal=causal, dq=grads[0], dk=grads[1], dv=grads[2], softmax_d=grads[3])
done[0] = True
th.join()
max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
high = max(peak[0], base + (max1 - max0) if max1 > max0 else 0)
print(max(high - base, 0) / 2**20)
"""


def measure_memory(L, H, D, causal, threads):
    env = dict(os.environ, MTLFLASH_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", MEM_CHILD, str(L), str(H), str(D), "1" if causal else "0"],
                       capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode != 0:
        log(r.stderr[-2000:])
        return None
    return float(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="tables and plots from an existing backward.json")
    ap.add_argument("--from-log", metavar="FILE",
                    help="rebuild backward.json, the tables and plots from this script's printed progress (a run that "
                         "was stopped before the end; only what the log shows is kept)")
    args = ap.parse_args()
    if args.from_log:
        finish(from_log(args.from_log), args.out, not args.no_plots)
        return
    if args.report_only:
        with open(os.path.join(args.out, "backward.json")) as f:
            finish(json.load(f), args.out, not args.no_plots)
        return
    nt = args.threads
    os.environ["MTLFLASH_NUM_THREADS"] = str(nt)
    import torch

    import mtlflash
    from mtlflash import _C

    torch.set_num_threads(nt)
    os.makedirs(args.out, exist_ok=True)
    res = {"machine": {"cpu": bench_cpu._cpu_name(), "cores": os.cpu_count(), "threads": nt,
                       "python": platform.python_version(), "torch": torch.__version__,
                       "mtlflash_simd": _C.build_info().get("cpu_simd"), "load_average_start": os.getloadavg()},
           "quick": args.quick, "flops_convention": "2.5 * 4*B*H*L^2*D (halved for causal)"}
    exe = bench_cpu.build_peak(tempfile.mkdtemp(prefix="mtlflash-bench-bwd-"), res["machine"]["mtlflash_simd"])
    peak = bench_cpu.fma_peak(exe, nt)
    res["peak"] = {"fma_gflops": peak}
    log(f"peak: FMA loop {peak:.1f} GFLOP/s on {nt} threads")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    lengths = [1024, 4096] if args.quick else [1024, 2048, 4096]
    H, rows = 16, []
    cases = [(d, D, c, L) for d in ("float32", "bfloat16", "float16") for D in (64, 128) for c in (False, True)
             for L in lengths]
    t_start = time.time()
    for n, (dname, D, causal, L) in enumerate(cases, 1):
        dt = getattr(torch, dname)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, L, H, D, generator=g).to(dt) for _ in range(3))
        out, lse, _ = mtlflash.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
        dout = torch.randn(out.shape, generator=g).to(dt)
        grads = [torch.empty_like(x) for x in (q, k, v)] + [torch.empty_like(lse)]
        qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
        ot = sdpa(qt, kt, vt, is_causal=causal)
        dot = dout.transpose(1, 2)
        fns = {
            "mtlflash": lambda: _C.backward("bench", dout, q, k, v, out, lse, causal=causal, dq=grads[0],
                                            dk=grads[1], dv=grads[2], softmax_d=grads[3]),
            "torch_sdpa": lambda: torch.autograd.grad(ot, (qt, kt, vt), dot, retain_graph=True),
        }
        reps = 2 if (L >= 4096 or args.quick) else 3
        timing = bench_cpu.race(fns, reps)
        flops = 2.5 * 4.0 * H * L * L * D / (2 if causal else 1)
        row = {"dtype": dname, "D": D, "causal": causal, "L": L, "flops": flops}
        for name, t in timing.items():
            row[name] = {**t, "gflops": flops / t["best_s"] / 1e9, "gflops_per_cpu_s": flops / t["cpu_s"] / 1e9}
        row["speedup_vs_torch"] = timing["torch_sdpa"]["best_s"] / timing["mtlflash"]["best_s"]
        row["fraction_of_peak"] = row["mtlflash"]["gflops"] / peak
        rows.append(row)
        log(f"[{n}/{len(cases)} {time.time() - t_start:5.0f}s] {dname:8s} D={D:3d} {'causal' if causal else 'full  '} "
            f"L={L:5d}: mtlflash {row['mtlflash']['gflops']:6.1f} GFLOP/s ({row['fraction_of_peak'] * 100:4.1f}% of "
            f"peak), torch SDPA {row['torch_sdpa']['gflops']:6.1f} GFLOP/s, x{row['speedup_vs_torch']:.2f}")
        del qt, kt, vt, ot
    res["backward"] = rows
    res["peak"]["fma_gflops_end"] = bench_cpu.fma_peak(exe, nt)
    log(f"peak again at the end: {res['peak']['fma_gflops_end']:.1f} GFLOP/s")
    res["memory"] = []
    for D, causal in ((128, False), (128, True), (64, False)):
        log(f"memory: L=16384 H={H} D={D} {'causal' if causal else 'full'} (fresh process) ...")
        mib = measure_memory(16384, H, D, causal, nt)
        res["memory"].append({"L": 16384, "H": H, "D": D, "causal": causal, "dtype": "float32", "extra_mib": mib})
        log(f"  extra resident memory beyond inputs, outputs and gradients: {mib:.1f} MiB")
    res["machine"]["load_average_end"] = os.getloadavg()
    finish(res, args.out, not args.no_plots)


def from_log(path):
    import re

    res = {"machine": {"cpu": bench_cpu._cpu_name(), "threads": os.cpu_count(), "load_average_start": (0.0,),
                       "torch": "?"}, "from_log": path, "backward": [], "memory": [], "peak": {}}
    case = re.compile(r"\] (\w+)\s+D=\s*(\d+) (causal|full)\s+L=\s*(\d+): mtlflash\s+([\d.]+) GFLOP/s .*torch SDPA\s+"
                      r"([\d.]+) GFLOP/s, x([\d.]+)")
    with open(path) as f:
        for line in f:
            m = re.match(r"peak: FMA loop ([\d.]+) GFLOP/s on (\d+) threads", line)
            if m:
                res["peak"]["fma_gflops"], res["machine"]["threads"] = float(m.group(1)), int(m.group(2))
            m = re.match(r"peak again at the end: ([\d.]+)", line)
            if m:
                res["peak"]["fma_gflops_end"] = float(m.group(1))
            m = case.search(line)
            if m:
                dname, D, mode, L, g_mf, g_t, sp = m.groups()
                D, L = int(D), int(L)
                causal = mode == "causal"
                flops = 2.5 * 4.0 * 16 * L * L * D / (2 if causal else 1)
                res["backward"].append({"dtype": dname, "D": D, "causal": causal, "L": L, "flops": flops,
                                        "mtlflash": {"gflops": float(g_mf), "best_s": flops / float(g_mf) / 1e9},
                                        "torch_sdpa": {"gflops": float(g_t), "best_s": flops / float(g_t) / 1e9},
                                        "speedup_vs_torch": float(sp)})
    return res


def finish(res, out, draw):
    best = max(res["peak"]["fma_gflops"], res["peak"].get("fma_gflops_end", 0))
    res["peak"]["fma_gflops_best"] = best
    for r in res["backward"]:
        r["fraction_of_peak"] = r["mtlflash"]["gflops"] / best
    with open(os.path.join(out, "backward.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(out, "backward.md"), "w") as f:
        f.write(md)
    log(md)
    if draw:
        plots(res, out)


def markdown(res):
    m, p = res["machine"], res["peak"]
    lines = [f"Backward pass, {m['cpu']}, {m['threads']} threads (load average at the start "
             f"{m['load_average_start'][0]:.2f}), torch {m['torch']}. FMA-loop peak {p['fma_gflops']:.0f} GFLOP/s at the "
             f"start, {p.get('fma_gflops_end', 0):.0f} at the end; fractions use the higher. GFLOP/s by FA2's "
             "convention (2.5 x the forward's 4*B*H*L^2*D, halved for causal), B=1, H=16.", "",
             "| dtype | D | causal | L | mtlflash GFLOP/s | % of peak | torch SDPA backward GFLOP/s | speed-up vs torch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["backward"]:
        lines.append(f"| {r['dtype']} | {r['D']} | {'yes' if r['causal'] else 'no'} | {r['L']} | "
                     f"{r['mtlflash']['gflops']:.1f} | {r['fraction_of_peak'] * 100:.0f}% | "
                     f"{r['torch_sdpa']['gflops']:.1f} | {r['speedup_vs_torch']:.2f}x |")
    if res.get("memory"):
        lines += ["", "| L | H | D | causal | extra memory of one backward call (MiB) |", "|---|---|---|---|---|"]
        for mm in res["memory"]:
            v = "n/a" if mm["extra_mib"] is None else f"{mm['extra_mib']:.1f}"
            lines.append(f"| {mm['L']} | {mm['H']} | {mm['D']} | {'yes' if mm['causal'] else 'no'} | {v} |")
    return "\n".join(lines) + "\n"


def plots(res, out):
    plt = bench_cpu.pyplot()
    if plt is None:
        return
    peak = res["peak"]["fma_gflops_best"]
    colors = {"mtlflash": "tab:blue", "torch_sdpa": "tab:orange"}
    labels = {"mtlflash": "mtlflash backward", "torch_sdpa": "torch SDPA backward"}
    bench_cpu.gflops_figures(plt, res["backward"], colors, labels, peak, 0.6, "GFLOP/s (2.5 x forward FLOPs)",
                             f"CPU backward, {res['machine']['threads']} threads, {res['machine']['cpu']}",
                             os.path.join(out, "backward_{dtype}.png"), ncol=2)


if __name__ == "__main__":
    main()
