"""`python -m mtlflash` in a fresh interpreter: info, the demo run and the self-check."""
from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "mtlflash", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=600)


def test_info():
    res = run("info")
    assert res.returncode == 0, res.stderr
    assert "CPU SIMD path" in res.stdout
    for tier in ("cpu", "vec", "simdgroup", "tensorops", "reference"):
        assert f"    {tier}" in res.stdout


def test_info_flags_an_invalid_kernel_value():
    res = run("info", env={"MTLFLASH_KERNEL": "bogus"})
    assert res.returncode == 0 and "not a valid tier" in res.stdout


def test_demo_run_small():
    res = run("run", "--seqlen", "256", "--heads", "2", "--repeats", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.strip().startswith(("float32", "bfloat16"))]
    assert len(rows) == 5 and all(" cpu " in r for r in rows)  # 4 prefill rows and the kv-cache decode step
    assert "kv-cache decode step (flash_attn_with_kvcache)" in res.stdout


@pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac the Metal part runs")
def test_check_quick_reports_and_passes():
    res = run("check", "--quick")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "tier cpu        on cpu : pass" in out
    assert "kv cache  cpu        on cpu : pass" in out
    assert "tier reference  on cpu : pass" in out
    assert "Metal part skipped" in out and "skipped (Metal backend not built" in out
    assert "result    : PASS" in out


@pytest.mark.parametrize("args, msg", [
    (("run", "--seqlen", "0"), "--seqlen must be at least 1, got 0"),
    (("run", "--head-dim", "600"), "--head-dim must be between 1 and 576, got 600"),
    (("run", "--heads", "0"), "--heads must be at least 1"),
])
def test_run_refuses_bad_sizes_without_a_traceback(args, msg):
    res = run(*args)
    assert res.returncode == 2
    assert msg in res.stderr and "Traceback" not in res.stderr + res.stdout


def test_demo_rows_show_bound_and_verdict():
    res = run("run", "--seqlen", "128", "--heads", "2", "--repeats", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bound" in res.stdout and "result: PASS" in res.stdout
    assert "machine: in-cache attention" in res.stdout
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith(("float32", "bfloat16"))]
    assert len(rows) == 5 and all(r[5] == "PASS" for r in rows)  # 4 prefill rows and the kv-cache decode step


# A Python where `import torch` fails as it does when torch is not installed.
NO_TORCH = """
import importlib.abc, runpy, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoTorch())
sys.argv = ["mtlflash"] + sys.argv[1:]
runpy.run_module("mtlflash", run_name="__main__", alter_sys=True)
"""


def run_without_torch(*args):
    import os

    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


def test_main_job_without_torch_runs_on_numpy():
    res = run_without_torch("run", "--seqlen", "256", "--heads", "2", "--repeats", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "torch is not installed: this ran on NumPy arrays" in res.stdout
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith(("float32", "float16"))]
    assert len(rows) == 4 and all(r[5] == "PASS" for r in rows), res.stdout
    assert "result: PASS" in res.stdout


def test_check_without_torch_runs_on_numpy():
    res = run_without_torch("check", "--quick")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tier cpu        on numpy: pass 12/12" in res.stdout
    assert "result    : PASS" in res.stdout


def test_numpy_reference_matches_torch_reference():
    import numpy as np
    import torch

    from mtlflash import reference
    from mtlflash.cli import numpy_attention

    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 37, 4, 24))
    k = rng.standard_normal((2, 20, 2, 24))
    v = rng.standard_normal((2, 20, 2, 16))
    slopes = rng.random((2, 4)).astype(np.float32)
    for opts in ({"causal": True}, {"window_size": (3, 1), "softcap": 2.0}, {"alibi_slopes": slopes, "causal": True}):
        out, lse = numpy_attention(q, k, v, **opts)
        topts = {key: torch.from_numpy(val) if isinstance(val, np.ndarray) else val for key, val in opts.items()}
        ref, ref_lse = reference.attention(*(torch.from_numpy(x) for x in (q, k, v)), compute_dtype=torch.float64, **topts)
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-12)
        np.testing.assert_allclose(lse, ref_lse.numpy(), atol=1e-12)
