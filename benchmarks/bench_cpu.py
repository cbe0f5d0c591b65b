"""CPU benchmark: mtlflash against torch's scaled_dot_product_attention and a naive attention.

    python benchmarks/bench_cpu.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick    # the target shapes only

Measures, in one run and side by side:
  * the machine's ceilings: a plain FMA loop (fp32 FLOP/s) and a streaming read (GB/s), both from
    benchmarks/peak.c, compiled here with the system C compiler;
  * prefill forward GFLOP/s (4*B*H*Sq*Sk*D, halved for causal) against sequence length, per dtype,
    for mtlflash, torch SDPA and a naive matmul-softmax-matmul, timed alternately;
  * decode (one query row, long KV cache, grouped-query heads) bandwidth against the streaming read;
  * extra resident memory beyond inputs and outputs (each case in a fresh process);
  * per-call time for a tiny shape;
  * a kernel profile (benchmarks/profile.c, built against csrc/cpu, one thread): the time of a
    prefill tile's Q.K^T, softmax and P.V in cache, and of a decode key's, in cache and from
    memory; every missed target is printed with what this profile says stands in its way.
Writes cpu.json, cpu.md (tables) and PNG plots (needs matplotlib) to benchmarks/out/ (git-ignored),
so a run never overwrites the committed results in benchmarks/results/; to refresh those, pass
--out benchmarks/results.
Wall-clock times are the best of several runs; on a shared machine also compare the CPU-time
column (FLOPs per CPU-second), which other processes disturb less.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# ceilings


def build_peak(tmp, simd):
    """The ceilings' program, with FMAs as wide as the library's SIMD path (`simd`) uses."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise SystemExit("bench_cpu: a C compiler is needed to measure the FMA peak (set CC)")
    exe = os.path.join(tmp, "peak")
    flags = ["-O2"]
    if platform.machine() in ("x86_64", "AMD64", "amd64"):
        flags += ["-mavx2", "-mfma"]
        if simd == "avx512":
            flags += ["-mavx512f", "-DPEAK_W=16"]
    subprocess.check_call([cc, *flags, os.path.join(HERE, "peak.c"), "-o", exe, "-lpthread"])
    return exe


def build_profile(tmp):
    """Compiles profile.c against the library's own kernel sources (a source checkout is needed);
    returns the executable, or None when the sources or a compiler are missing."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    csrc = os.path.normpath(os.path.join(HERE, "..", "csrc"))
    if cc is None or not os.path.isfile(os.path.join(csrc, "cpu", "kernel_impl.inc")):
        return None
    exe = os.path.join(tmp, "profile")
    base = [cc, "-O2", "-std=gnu11", "-I", csrc]
    objs = []
    try:
        if platform.machine() in ("x86_64", "AMD64", "amd64"):
            obj = os.path.join(tmp, "kernel_avx2.o")
            subprocess.run([*base, "-mavx2", "-mfma", "-mf16c", "-c", os.path.join(csrc, "cpu", "kernel_avx2.c"),
                            "-o", obj], check=True, capture_output=True, text=True)
            objs.append(obj)
            base.append("-DMF_HAVE_AVX2_TU=1")
            obj = os.path.join(tmp, "kernel_avx512.o")
            r = subprocess.run([*base, "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-c",
                                os.path.join(csrc, "cpu", "kernel_avx512.c"), "-o", obj], capture_output=True, text=True)
            if r.returncode == 0:  # the compiler has AVX-512: the profile picks its path as the library does
                objs.append(obj)
                base.append("-DMF_HAVE_AVX512_TU=1")
        subprocess.run([*base, os.path.join(HERE, "profile.c"), os.path.join(csrc, "cpu", "kernel_generic.c"),
                        *objs, "-o", exe, "-lm"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        log(f"profile: could not build benchmarks/profile.c; no kernel profile in this run:\n{e.stderr}")
        return None
    except OSError as e:
        log(f"profile: could not build benchmarks/profile.c ({e}); no kernel profile in this run")
        return None
    return exe


def kernel_profile(exe, read_gbs_1thread, fma_1thread, reps=5):
    """Where a prefill tile's and a decode key's time goes, one thread, the library's kernels.
    Each measurement is repeated `reps` times, interleaved, and the fastest kept per field (a
    shared machine only ever adds time)."""
    cases = [("prefill", "64"), ("prefill", "128"), ("decode", "960"), ("decode", "262144")]
    best = {}
    for _ in range(reps):
        for c in cases:
            vals = [float(x) for x in subprocess.check_output([exe, *c]).split()]
            best[c] = vals if c not in best else [min(a, b) for a, b in zip(best[c], vals)]
    prof = {"prefill": [], "decode": {}}
    for D in (64, 128):
        qk, sm, pv, flops = best[("prefill", str(D))]
        tot = qk + sm + pv
        prof["prefill"].append({"D": D, "qk_us": qk, "softmax_us": sm, "pv_us": pv,
                                "gemm_gflops": flops / (qk + pv) / 1e3, "tile_gflops": flops / tot / 1e3,
                                "tile_fraction_of_1core_peak": flops / tot / 1e3 / fma_1thread,
                                "softmax_share": sm / tot})
    for where, sk in (("cache", 960), ("memory", 262144)):
        qk, sm, pv, tot = best[("decode", str(sk))]
        prof["decode"][where] = {"Sk": sk, "qk_ns": qk, "softmax_ns": sm, "pv_ns": pv, "total_ns": tot}
    # one key of one kv head: K and V rows of 128 bf16 each
    prof["decode"]["read_ns_per_key"] = 512 / read_gbs_1thread
    prof["decode"]["read_gbs_1thread"] = read_gbs_1thread
    return prof


def fma_peak(exe, threads, seconds=1.0, reps=3):
    return max(float(subprocess.check_output([exe, "fma", str(threads), str(seconds)])) for _ in range(reps))


def read_bw(exe, threads, mib=1024):
    return float(subprocess.check_output([exe, "read", str(threads), str(mib)]))


# ---------------------------------------------------------------------------------------------
# attention implementations (inputs in the FlashAttention layout (B, S, H, D))


def impls(torch, mf):
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run_mf(q, k, v, causal):
        return mf.flash_attn_func(q, k, v, causal=causal)

    def run_torch(q, k, v, causal):
        gqa = q.shape[2] != k.shape[2]
        return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=gqa)

    def run_naive(q, k, v, causal):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        s = (qt @ kt.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if causal:
            lq, lk = s.shape[-2], s.shape[-1]
            s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), float("-inf"))
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ vt

    return {"mtlflash": run_mf, "torch_sdpa": run_torch, "naive": run_naive}


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


# Idle time before every timed call. torch's OpenMP workers keep spinning for a few milliseconds
# after a parallel region; a call timed right after a torch call shares the cores with them
# (decode at Sk=32768 measured 14.6 ms right after torch SDPA, 11.0 ms after a 10 ms pause).
GAP_S = 0.02


def race(fns, reps):
    """Runs the functions alternately `reps` times after one warm-up each, each timed call after
    GAP_S of idle time; returns per name the best and median wall time and the best CPU time."""
    for f in fns.values():
        f()
    wall = {n: [] for n in fns}
    cpu = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            time.sleep(GAP_S)
            w, c = timed(f)
            wall[n].append(w)
            cpu[n].append(c)
    return {n: {"best_s": min(wall[n]), "median_s": statistics.median(wall[n]), "cpu_s": min(cpu[n])} for n in fns}


# ---------------------------------------------------------------------------------------------
# memory: one case per fresh process

MEM_CHILD = r"""
import os, resource, sys, threading, time, torch, mtlflash
impl, L, H, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
q, k, v = (torch.randn(1, L, H, D) for _ in range(3))
sdpa = torch.nn.functional.scaled_dot_product_attention
if impl == "naive":
    f = lambda: torch.softmax((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * D ** -0.5, -1) @ v.transpose(1, 2)
elif impl == "torch_sdpa":
    f = lambda: sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
else:
    f = lambda: mtlflash.flash_attn_func(q, k, v)
small = [torch.randn(1, 64, H, D) for _ in range(3)]  # warm up code paths and pools on a small shape
if impl == "mtlflash":
    mtlflash.flash_attn_func(*small)
else:
    sdpa(*(x.transpose(1, 2) for x in small))
peak, done = [0], [False]
def watch():  # samples the resident set while the call runs (the GIL is released inside it)
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
base = rss()
max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
th = threading.Thread(target=watch)
th.start()
out = f()
done[0] = True
th.join()
max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
high = max(peak[0], base + (max1 - max0) if max1 > max0 else 0)
extra = high - base - out.numel() * out.element_size()
print(max(extra, 0) / 2**20)
"""


def measure_memory(impl, L, H, D, threads):
    r = subprocess.run([sys.executable, "-c", MEM_CHILD, impl, str(L), str(H), str(D), str(threads)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return None
    return float(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="target shapes only, fewer repetitions")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every library")
    ap.add_argument("--out", default=os.path.join(HERE, "out"),
                    help="output directory (default benchmarks/out/, git-ignored; the committed results "
                         "are in benchmarks/results/)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="recompute the summary, cpu.md and the plots from an existing cpu.json")
    args = ap.parse_args()
    if args.report_only:
        with open(os.path.join(args.out, "cpu.json")) as f:
            res = json.load(f)
        finish(res, args.out, not args.no_plots)
        return

    nt = args.threads
    os.environ["MTLFLASH_NUM_THREADS"] = str(nt)
    import numpy as np  # noqa: F401  (torch wants it for some conversions)
    import torch

    import mtlflash
    from mtlflash import _C

    torch.set_num_threads(nt)
    os.makedirs(args.out, exist_ok=True)
    run = impls(torch, mtlflash)
    quick = args.quick
    reps = 3 if quick else 4

    res = {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "threads": nt,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "mtlflash_simd": _C.build_info().get("cpu_simd"),
            "load_average_start": os.getloadavg(),
        },
        "quick": quick,
    }

    tmp = tempfile.mkdtemp(prefix="mtlflash-bench-")
    exe = build_peak(tmp, res["machine"]["mtlflash_simd"])
    peak = fma_peak(exe, nt)
    peak1 = fma_peak(exe, 1)
    bw = read_bw(exe, nt)
    res["peak"] = {"fma_gflops": peak, "fma_gflops_1thread": peak1, "read_gbs": bw}
    log(f"peak: FMA loop {peak:.1f} GFLOP/s on {nt} threads ({peak1:.1f} on one), streaming read {bw:.1f} GB/s")

    # ---- prefill ------------------------------------------------------------------------------
    dtypes = ["float32", "bfloat16", "float16"]
    lengths = [1024, 4096] if quick else [1024, 2048, 4096]
    naive_max = 4096
    H = 16
    prefill = []
    for dname in dtypes:
        dt = getattr(torch, dname)
        for D in (64, 128):
            for causal in (False, True):
                for L in lengths:
                    g = torch.Generator().manual_seed(0)
                    q, k, v = (torch.randn(1, L, H, D, generator=g).to(dt) for _ in range(3))
                    flops = 4.0 * H * L * L * D / (2 if causal else 1)
                    names = ["mtlflash", "torch_sdpa"]
                    # naive: fp32 only (torch's bf16/fp16 CPU matmuls run at ~1 GFLOP/s and would take
                    # minutes per point)
                    if dname == "float32" and L <= (1024 if quick else naive_max):
                        names.append("naive")
                    fns = {n: (lambda f=run[n]: f(q, k, v, causal)) for n in names}
                    with torch.no_grad():
                        t = race(fns, reps if flops < 5e10 else max(2, reps - 2))
                    row = {"dtype": dname, "B": 1, "H": H, "L": L, "D": D, "causal": causal, "flops": flops}
                    for n, r in t.items():
                        row[n] = dict(r, gflops=flops / r["best_s"] / 1e9, gflops_per_cpu_s=flops / r["cpu_s"] / 1e9)
                    row["speedup_vs_sdpa"] = t["torch_sdpa"]["best_s"] / t["mtlflash"]["best_s"]
                    row["speedup_vs_sdpa_median"] = t["torch_sdpa"]["median_s"] / t["mtlflash"]["median_s"]
                    row["fraction_of_peak"] = row["mtlflash"]["gflops"] / peak
                    prefill.append(row)
                    extra = f" naive {row['naive']['gflops']:6.1f}" if "naive" in row else ""
                    log(f"prefill {dname:8s} D={D:3d} L={L:5d} causal={int(causal)}: mtlflash "
                        f"{row['mtlflash']['gflops']:6.1f} GFLOP/s ({row['fraction_of_peak']*100:4.1f}% of peak, "
                        f"{row['mtlflash']['gflops_per_cpu_s']:5.1f} per CPU-s)  sdpa {row['torch_sdpa']['gflops']:6.1f}"
                        f"{extra}  speedup x{row['speedup_vs_sdpa']:.2f}")
                    del q, k, v
    res["prefill"] = prefill
    peak_after = fma_peak(exe, nt)
    res["peak"]["fma_gflops_after_prefill"] = peak_after
    log(f"peak again after the prefill runs: {peak_after:.1f} GFLOP/s")

    # ---- decode -------------------------------------------------------------------------------
    decode = []
    sks = [32768] if quick else [4096, 8192, 16384, 32768]
    Hq, Hk, D = 32, 8, 128
    for Sk in sks:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 1, Hq, D, generator=g).to(torch.bfloat16)
        k = torch.randn(1, Sk, Hk, D, generator=g).to(torch.bfloat16)
        v = torch.randn(1, Sk, Hk, D, generator=g).to(torch.bfloat16)
        nbytes = (k.numel() + v.numel()) * 2
        bw_now = read_bw(exe, nt)
        with torch.no_grad():
            t = race({"mtlflash": lambda: run["mtlflash"](q, k, v, False),
                      "torch_sdpa": lambda: run["torch_sdpa"](q, k, v, False)}, 5 if quick else 7)
        bw_after = read_bw(exe, nt)
        read = max(bw_now, bw_after)
        row = {"Sq": 1, "Sk": Sk, "Hq": Hq, "Hk": Hk, "D": D, "dtype": "bfloat16", "kv_bytes": nbytes,
               "read_gbs": read}
        for n, r in t.items():
            row[n] = dict(r, gbs=nbytes / r["best_s"] / 1e9)
        row["fraction_of_read"] = row["mtlflash"]["gbs"] / read
        decode.append(row)
        log(f"decode Sk={Sk:6d}: mtlflash {row['mtlflash']['gbs']:5.1f} GB/s ({row['fraction_of_read']*100:4.1f}% of "
            f"the {read:.1f} GB/s streaming read, {row['mtlflash']['best_s']*1e3:.2f} ms)  sdpa "
            f"{row['torch_sdpa']['gbs']:5.1f} GB/s ({row['torch_sdpa']['best_s']*1e3:.2f} ms)")
        del q, k, v
    res["decode"] = decode

    # ---- memory -------------------------------------------------------------------------------
    memory = []
    mem_L = [4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384]
    for L in mem_L:
        row = {"L": L, "H": H, "D": 64, "dtype": "float32",
               "inputs_mib": 3 * L * H * 64 * 4 / 2**20, "output_mib": L * H * 64 * 4 / 2**20}
        for impl in ("mtlflash", "torch_sdpa", "naive"):
            if impl == "naive" and L > 4096:
                continue  # L^2 scores: 16 GiB at L=16384
            row[impl + "_extra_mib"] = measure_memory(impl, L, H, 64, nt)
        memory.append(row)
        log(f"memory L={L:5d}: extra resident MiB beyond inputs/outputs: mtlflash {row['mtlflash_extra_mib']:.1f}  "
            f"sdpa {row['torch_sdpa_extra_mib']:.1f}"
            + (f"  naive {row['naive_extra_mib']:.1f}" if "naive_extra_mib" in row else ""))
    res["memory"] = memory

    # ---- tiny shape ---------------------------------------------------------------------------
    q, k, v = (torch.randn(1, 16, 1, 64) for _ in range(3))
    per = {}
    with torch.no_grad():
        for n in ("mtlflash", "torch_sdpa"):
            f = run[n]
            for _ in range(200):
                f(q, k, v, False)
    calls = 2000
    with torch.no_grad():
        best = {n: 1e9 for n in ("mtlflash", "torch_sdpa")}
        for _ in range(5):
            for n in best:
                f = run[n]
                time.sleep(GAP_S)
                t0 = time.perf_counter()
                for _ in range(calls):
                    f(q, k, v, False)
                best[n] = min(best[n], (time.perf_counter() - t0) / calls)
    per = {n + "_us": t * 1e6 for n, t in best.items()}
    per["ratio_mtlflash_over_sdpa"] = best["mtlflash"] / best["torch_sdpa"]
    res["tiny"] = dict(per, B=1, H=1, L=16, D=64, dtype="float32")
    log(f"tiny B=1 H=1 L=16 D=64: mtlflash {per['mtlflash_us']:.1f} us, sdpa {per['torch_sdpa_us']:.1f} us "
        f"(ratio {per['ratio_mtlflash_over_sdpa']:.2f})")
    # ---- kernel profile (one thread) ----------------------------------------------------------
    prof_exe = build_profile(tmp)
    if prof_exe is not None:
        log("profile: the kernels alone, one thread ...")
        prof = kernel_profile(prof_exe, max(read_bw(exe, 1) for _ in range(3)), peak1)
        res["profile"] = prof
        for r in prof["prefill"]:
            log(f"profile prefill tile fp32 D={r['D']:3d} (96 keys x 48 rows, in cache): Q.K^T {r['qk_us']:.2f} us, "
                f"softmax {r['softmax_us']:.2f} us, P.V {r['pv_us']:.2f} us; GEMMs alone {r['gemm_gflops']:.1f} "
                f"GFLOP/s, whole tile {r['tile_gflops']:.1f} ({r['tile_fraction_of_1core_peak']*100:.0f}% of one core)")
        d = prof["decode"]
        for where in ("cache", "memory"):
            x = d[where]
            log(f"profile decode per key, D=128 bf16, 4 query heads per kv head, K/V in {where:6s}: Q.K^T "
                f"{x['qk_ns']:.1f} ns, softmax {x['softmax_ns']:.1f} ns, P.V {x['pv_ns']:.1f} ns, total {x['total_ns']:.1f} ns")
        log(f"profile decode: reading one key's 512 bytes at the one-thread streaming rate "
            f"({d['read_gbs_1thread']:.1f} GB/s) takes {d['read_ns_per_key']:.1f} ns")
    res["machine"]["load_average_end"] = os.getloadavg()
    res["peak"]["fma_gflops_end"] = fma_peak(exe, nt)
    shutil.rmtree(tmp, ignore_errors=True)
    finish(res, args.out, not args.no_plots)


def finish(res, out, draw):
    # The FMA peak is a ceiling of the hardware: other processes can only lower a measurement of
    # it, so every fraction is taken against the best one of the run (start, middle, end).
    p = res["peak"]
    best = max(p[k] for k in ("fma_gflops", "fma_gflops_after_prefill", "fma_gflops_end") if k in p)
    p["fma_gflops_best"] = best
    for r in res["prefill"]:
        r["fraction_of_peak"] = r["mtlflash"]["gflops"] / best
    res["targets"] = targets(res)
    log("")
    for t in res["targets"]:
        log(f"{'target met:    ' if t['met'] else 'target not met:'} {t['what']}: {t['value']} (target {t['target']})"
            + (f"\n     in the way: {t['note']}" if t.get("note") else ""))
    with open(os.path.join(out, "cpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "cpu.md"), "w") as f:
        f.write(markdown(res))
    log(f"wrote {os.path.join(out, 'cpu.json')} and cpu.md")
    if draw:
        plots(res, out)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _at(res, dtype, D, causal, L=4096):
    for r in res["prefill"]:
        if r["dtype"] == dtype and r["D"] == D and r["causal"] == causal and r["L"] == L:
            return r
    return None


def _notes(res):
    """What the kernel profile says stands in the way of each kind of target."""
    p = res["peak"]
    notes = {}
    prof = res.get("profile")
    if prof:
        for r in prof["prefill"]:
            notes[("gflops", r["D"])] = (
                f"one in-cache tile (96 keys x 48 rows) runs at {r['tile_gflops']:.0f} GFLOP/s on one core "
                f"({r['tile_fraction_of_1core_peak']*100:.0f}% of its {p['fma_gflops_1thread']:.0f}): the GEMMs alone at "
                f"{r['gemm_gflops']:.0f}, the softmax {r['softmax_share']*100:.0f}% of the tile time; the whole call "
                f"loses the rest outside the tile's kernels (packing, loading Q, writing O)")
        d = prof["decode"]
        c, m = d["cache"], d["memory"]
        both = c["total_ns"] + d["read_ns_per_key"]
        if m["total_ns"] >= 0.9 * both:
            why = f"the loads and the arithmetic do not overlap (compute + read = {both:.0f} ns)"
        elif c["total_ns"] >= d["read_ns_per_key"]:
            why = "the arithmetic alone takes longer than streaming the bytes: decode is bound by the arithmetic here"
        else:
            why = f"the loads and the arithmetic overlap only in part (compute + read = {both:.0f} ns)"
        notes["decode"] = (f"per key of one kv head on one thread: {c['total_ns']:.0f} ns of arithmetic with K/V in "
                           f"cache (Q.K^T {c['qk_ns']:.0f}, softmax {c['softmax_ns']:.0f}, P.V {c['pv_ns']:.0f}), "
                           f"{d['read_ns_per_key']:.0f} ns to stream its 512 bytes, {m['total_ns']:.0f} ns measured "
                           f"from memory: {why}")
    return notes


def targets(res):
    out = []
    notes = _notes(res)
    best = res["peak"].get("fma_gflops_best", res["peak"]["fma_gflops"])
    for dtype in ("float32", "bfloat16", "float16"):
        for D in (64, 128):
            for causal in (False, True):
                r = _at(res, dtype, D, causal)
                if r is None:
                    continue
                goal = (160 if not causal else 150) if dtype == "float32" else 140
                g = r["mtlflash"]["gflops"]
                out.append({"what": f"{dtype} L=4096 D={D} {'causal' if causal else 'non-causal'} GFLOP/s",
                            "value": f"{g:.1f} ({r['fraction_of_peak']*100:.0f}% of the measured peak)",
                            "target": f">= {goal}", "met": g >= goal,
                            "note": "" if g >= goal else notes.get(("gflops", D), "")})
                s = r["speedup_vs_sdpa"]
                need = 1.5 * r["torch_sdpa"]["gflops"]
                out.append({"what": f"{dtype} L=4096 D={D} {'causal' if causal else 'non-causal'} speed-up vs torch SDPA",
                            "value": f"x{s:.2f}", "target": ">= x1.5", "met": s >= 1.5,
                            "note": "" if s >= 1.5 else
                            f"torch SDPA ran at {r['torch_sdpa']['gflops']:.0f} GFLOP/s; 1.5x that is {need:.0f} GFLOP/s, "
                            f"{need / best * 100:.0f}% of the measured FMA peak"})
    for d in res["decode"]:
        if d["Sk"] == 32768:
            out.append({"what": "decode Sk=32768 Hq=32 Hk=8 D=128 bf16, fraction of streaming read",
                        "value": f"{d['fraction_of_read']*100:.0f}% ({d['mtlflash']['gbs']:.1f} of {d['read_gbs']:.1f} GB/s)",
                        "target": ">= 70%", "met": d["fraction_of_read"] >= 0.7,
                        "note": "" if d["fraction_of_read"] >= 0.7 else notes.get("decode", "")})
    for m in res["memory"]:
        if m["L"] == 16384 and m.get("mtlflash_extra_mib") is not None:
            out.append({"what": "extra resident memory at L=16384 (H=16, D=64, fp32)",
                        "value": f"{m['mtlflash_extra_mib']:.1f} MiB", "target": "<= 64 MiB",
                        "met": m["mtlflash_extra_mib"] <= 64})
    t = res["tiny"]
    out.append({"what": "tiny shape per-call time / torch SDPA's", "value": f"{t['ratio_mtlflash_over_sdpa']:.2f} "
                f"({t['mtlflash_us']:.1f} vs {t['torch_sdpa_us']:.1f} us)", "target": "<= 1.5",
                "met": t["ratio_mtlflash_over_sdpa"] <= 1.5})
    return out


def markdown(res):
    m, p = res["machine"], res["peak"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, SIMD path `{m['mtlflash_simd']}`, "
             f"torch {m['torch']}, Python {m['python']}. FMA-loop peak measured at the start / after the prefill "
             f"runs / at the end: {p['fma_gflops']:.1f} / {p.get('fma_gflops_after_prefill', 0):.1f} / "
             f"{p.get('fma_gflops_end', 0):.1f} GFLOP/s (fractions use the best, {p['fma_gflops_best']:.1f}); "
             f"streaming read at the start {p['read_gbs']:.1f} GB/s (each decode row is compared with the best of "
             f"two reads taken just before and after it). Load average at start {m['load_average_start'][0]:.1f}, "
             f"at the end {m.get('load_average_end', [0])[0]:.1f}.", "",
             "| dtype | D | causal | L | mtlflash GFLOP/s | % of peak | per CPU-s | torch SDPA GFLOP/s | naive GFLOP/s | speed-up vs SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["prefill"]:
        naive = f"{r['naive']['gflops']:.1f}" if "naive" in r else "-"
        lines.append(f"| {r['dtype']} | {r['D']} | {'yes' if r['causal'] else 'no'} | {r['L']} | "
                     f"{r['mtlflash']['gflops']:.1f} | {r['fraction_of_peak']*100:.0f}% | "
                     f"{r['mtlflash']['gflops_per_cpu_s']:.1f} | {r['torch_sdpa']['gflops']:.1f} | {naive} | "
                     f"x{r['speedup_vs_sdpa']:.2f} |")
    lines += ["", "| decode Sk | mtlflash GB/s | streaming read GB/s | % of streaming read | mtlflash ms | torch SDPA ms |",
              "|---|---|---|---|---|---|"]
    for d in res["decode"]:
        lines.append(f"| {d['Sk']} | {d['mtlflash']['gbs']:.1f} | {d['read_gbs']:.1f} | {d['fraction_of_read']*100:.0f}% | "
                     f"{d['mtlflash']['best_s']*1e3:.2f} | {d['torch_sdpa']['best_s']*1e3:.2f} |")
    lines += ["", "| L | mtlflash extra MiB | torch SDPA extra MiB | naive extra MiB |", "|---|---|---|---|"]
    for mm in res["memory"]:
        def f(key):
            v = mm.get(key)
            return "-" if v is None else f"{v:.1f}"
        lines.append(f"| {mm['L']} | {f('mtlflash_extra_mib')} | {f('torch_sdpa_extra_mib')} | {f('naive_extra_mib')} |")
    t = res["tiny"]
    lines += ["", f"Tiny shape (B=1, H=1, L=16, D=64, fp32): mtlflash {t['mtlflash_us']:.1f} us per call, "
              f"torch SDPA {t['torch_sdpa_us']:.1f} us."]
    prof = res.get("profile")
    if prof:
        lines += ["", "Kernel profile (one thread, the library's own kernels called as the backend calls them; "
                  "`benchmarks/profile.c`):", "",
                  "| prefill tile, fp32, 96 keys x 48 rows | Q.K^T us | softmax us | P.V us | GEMMs GFLOP/s | tile GFLOP/s | % of one core |",
                  "|---|---|---|---|---|---|---|"]
        for r in prof["prefill"]:
            lines.append(f"| D={r['D']} | {r['qk_us']:.2f} | {r['softmax_us']:.2f} | {r['pv_us']:.2f} | "
                         f"{r['gemm_gflops']:.1f} | {r['tile_gflops']:.1f} | {r['tile_fraction_of_1core_peak']*100:.0f}% |")
        d = prof["decode"]
        lines += ["", "| decode, per key of one kv head (D=128 bf16, 4 query heads) | Q.K^T ns | softmax ns | P.V ns | total ns |",
                  "|---|---|---|---|---|"]
        for where in ("cache", "memory"):
            x = d[where]
            lines.append(f"| K/V in {where} (Sk={x['Sk']}) | {x['qk_ns']:.1f} | {x['softmax_ns']:.1f} | "
                         f"{x['pv_ns']:.1f} | {x['total_ns']:.1f} |")
        lines.append(f"| streaming read of 512 bytes at {d['read_gbs_1thread']:.1f} GB/s (one thread) | | | | "
                     f"{d['read_ns_per_key']:.1f} |")
    lines += ["", "| target | measured | goal | met | what stands in the way |", "|---|---|---|---|---|"]
    for tg in res["targets"]:
        lines.append(f"| {tg['what']} | {tg['value']} | {tg['target']} | {'yes' if tg['met'] else 'no'} | "
                     f"{tg.get('note', '')} |")
    return "\n".join(lines) + "\n"


def _length_axis(ax, values):
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values])
    ax.minorticks_off()


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return None
    return plt


def gflops_figures(plt, rows, colors, labels, peak, target, ylabel, title, path_fmt, ncol):
    """One figure per dtype (D=64 and D=128 side by side) of GFLOP/s against sequence length for
    the implementations in colors (rows: dicts with dtype, D, causal, L and per implementation
    {"gflops"}), with the FMA peak and `target` x peak drawn; saved to path_fmt.format(dtype=...)."""
    for dtype in ("float32", "bfloat16", "float16"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 5.0), sharey=True)
        for ax, D in zip(axes, (64, 128)):
            sel = [r for r in rows if r["dtype"] == dtype and r["D"] == D]
            for causal, style in ((False, "-"), (True, "--")):
                for impl in colors:
                    pts = [(r["L"], r[impl]["gflops"]) for r in sel if r["causal"] == causal and impl in r]
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", color=colors[impl],
                                label=f"{labels[impl]}{', causal' if causal else ''}")
            ax.axhline(peak, color="black", lw=0.8)
            ax.axhline(target * peak, color="black", lw=0.8, ls=":")
            tr = ax.get_yaxis_transform()
            ax.text(0.01, peak * 0.98, f"FMA peak {peak:.0f}", va="top", fontsize=8, transform=tr)
            ax.text(0.01, target * peak * 0.98, f"{target * 100:.0f}% of peak", va="top", fontsize=8, transform=tr)
            _length_axis(ax, sorted({r["L"] for r in rows}))
            ax.set_title(f"{dtype}, B=1, H=16, D={D}")
            ax.set_xlabel("sequence length")
            ax.set_ylim(0, peak * 1.08)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ylabel)
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, fontsize=8, loc="lower center", ncol=ncol, frameon=False)
        fig.suptitle(f"{title} (solid: non-causal, dashed: causal)", fontsize=10)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = path_fmt.format(dtype=dtype)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        log(f"wrote {path}")


def plots(res, out):
    plt = pyplot()
    if plt is None:
        return
    peak = res["peak"].get("fma_gflops_best", res["peak"]["fma_gflops"])
    colors = {"mtlflash": "tab:blue", "torch_sdpa": "tab:orange", "naive": "tab:gray"}
    labels = {"mtlflash": "mtlflash", "torch_sdpa": "torch SDPA", "naive": "naive (matmul-softmax-matmul)"}
    gflops_figures(plt, res["prefill"], colors, labels, peak, 0.8, "GFLOP/s (4·B·H·L²·D, halved for causal)",
                   f"CPU forward, {res['machine']['threads']} threads, {res['machine']['cpu']}",
                   os.path.join(out, "cpu_prefill_{dtype}.png"), ncol=3)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for impl in ("mtlflash", "torch_sdpa", "naive"):
        pts = [(m["L"], m[impl + "_extra_mib"]) for m in res["memory"] if m.get(impl + "_extra_mib") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=colors[impl], label=labels[impl])
        for x, y in pts:
            ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7, color=colors[impl])
    ax.axhline(64, color="black", lw=0.8, ls=":")
    ax.text(0.01, 64 * 1.15, "64 MiB", fontsize=8, transform=ax.get_yaxis_transform())
    _length_axis(ax, [m["L"] for m in res["memory"]])
    ax.set_yscale("symlog", linthresh=1)
    top = max([v for m in res["memory"] for k, v in m.items() if k.endswith("_extra_mib") and v is not None] + [64])
    ax.set_ylim(0, top * 4)
    ax.set_xlabel("sequence length (B=1, H=16, D=64, fp32)")
    ax.set_ylabel("extra resident memory (MiB)")
    ax.set_title("Memory beyond inputs and outputs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "cpu_memory.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")

    fig, ax = plt.subplots(figsize=(6, 4.2))
    d = res["decode"]
    ax.plot([r["Sk"] for r in d], [r["mtlflash"]["gbs"] for r in d], marker="o", color=colors["mtlflash"], label="mtlflash")
    ax.plot([r["Sk"] for r in d], [r["torch_sdpa"]["gbs"] for r in d], marker="o", color=colors["torch_sdpa"],
            label="torch SDPA")
    ax.plot([r["Sk"] for r in d], [r["read_gbs"] for r in d], color="black", lw=0.8, marker="_", label="streaming read (peak.c)")
    ax.plot([r["Sk"] for r in d], [0.7 * r["read_gbs"] for r in d], color="black", lw=0.8, ls=":", label="70% of it")
    _length_axis(ax, [r["Sk"] for r in d])
    ax.set_ylim(0, max(r["read_gbs"] for r in d) * 1.1)
    ax.set_xlabel("KV length (Sq=1, Hq=32, Hk=8, D=128, bf16)")
    ax.set_ylabel("K+V bytes read per second (GB/s)")
    ax.set_title("Decode bandwidth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "cpu_decode.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
