"""Types of the public API: py.typed + stubs (python/mtlflash/*.pyi) with overloads on
return_attn_probs / return_softmax_lse. mypy --strict must accept a newcomer's usage file, reject
misuse, and stubtest must find the stubs in line with the functions."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")
ROOT = Path(__file__).resolve().parents[1]
TYPING = ROOT / "tests/typing"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One mypy cache for the module: torch's types are analysed once, not three times."""
    return tmp_path_factory.mktemp("mypy-cache")


def mypy(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mypy", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_usage_file_type_checks_strict(tmp_path, cache):
    r = mypy("--strict", "--cache-dir", str(cache), str(TYPING / "usage.py"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_misuse_is_caught(tmp_path, cache):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import numpy as np, torch\nfrom mtlflash import flash_attn_func\n"
        "q = torch.randn(1, 4, 2, 8)\n"
        "s = flash_attn_func(q, q, q, return_attn_probs=True).shape\n"  # a tuple has no .shape
        "n = np.ones((1, 4, 2, 8), np.float32)\n"
        "t: torch.Tensor = flash_attn_func(n, n, n)\n"  # NumPy in gives NumPy out
    )
    r = mypy("--strict", "--cache-dir", str(cache), str(bad), cwd=tmp_path)
    assert r.returncode == 1
    assert 'has no attribute "shape"' in r.stdout and "Incompatible types in assignment" in r.stdout


def test_stubtest(tmp_path, cache):
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "mtlflash", "--mypy-config-file", str(TYPING / "stubtest.ini"),
         "--allowlist", str(TYPING / "stubtest_allowlist.txt"), "--ignore-unused-allowlist"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, env=dict(os.environ, MYPY_CACHE_DIR=str(cache)))
    assert r.returncode == 0, r.stdout + r.stderr
