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
    assert len(rows) == 4 and all(" cpu " in r for r in rows)


@pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac the Metal part runs")
def test_check_quick_reports_and_passes():
    res = run("check", "--quick")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "tier cpu        on cpu : pass" in out
    assert "tier reference  on cpu : pass" in out
    assert "Metal part skipped" in out and "skipped (Metal backend not built" in out
    assert "result    : PASS" in out
