"""What a newcomer ran into: environment variables that ignored typos, a benchmark that overwrote
the committed results, a header pointing outside the repository, package metadata."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mtlflash

ROOT = Path(__file__).resolve().parents[1]


def qkv():
    q = np.ones((1, 4, 2, 8), np.float32)
    return q, q, q


def test_unknown_cpu_isa_raises_listing_the_valid_values(monkeypatch):
    monkeypatch.setenv("MTLFLASH_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match=r"MTLFLASH_CPU_ISA: unknown value 'avx9000'; valid values: generic, avx2, best"):
        mtlflash.flash_attn_func(*qkv())
    # the path is chosen once per process, at the first call: only values that leave the choice
    # alone run here, the caps run in fresh processes below
    for value in ("best", ""):
        monkeypatch.setenv("MTLFLASH_CPU_ISA", value)
        assert mtlflash.flash_attn_func(*qkv()).shape == (1, 4, 2, 8)


@pytest.mark.parametrize("value", ["generic", "avx2", "best"])
def test_cpu_isa_values_in_a_fresh_process(value):
    code = ("import mtlflash, numpy as np; q = np.ones((1, 4, 2, 8), np.float32); "
            "mtlflash.flash_attn_func(q, q, q); print(mtlflash.backend_info()['cpu_simd'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, MTLFLASH_CPU_ISA=value))
    path = res.stdout.strip()
    if value == "generic":
        assert path == "generic"
    elif value == "avx2":
        assert path in ("avx2+fma", "generic")


def test_benchmark_writes_to_an_ignored_directory_by_default():
    src = (ROOT / "benchmarks/bench_cpu.py").read_text()
    assert 'default=os.path.join(HERE, "out")' in src
    assert "benchmarks/out/" in (ROOT / ".gitignore").read_text().split()
    assert "target met" in src and "target not met" in src
    assert "'MISS'" not in src and "'MET '" not in src


def _repo_text_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and "build" not in p.parts]
    for n in names:
        p = ROOT / n
        if p.suffix in {".h", ".c", ".m", ".metal", ".py", ".md", ".cpp", ".cmake", ".txt", ".toml", ".sh", ".inc"}:
            yield n, p.read_text(errors="replace")


def test_no_file_points_outside_the_repository():
    bad = [n for n, text in _repo_text_files() if re.search(r"/work/shared|/work/main|\.\./shared/design", text)]
    bad = [n for n in bad if n != "tests/test_newcomer.py"]
    assert not bad, f"these files point at paths a user's clone does not have: {bad}"
    assert "tests/metal_emu/README.md" in (ROOT / "metal/mf_msl.h").read_text()
    assert "The rules of the dual-compile subset" in (ROOT / "tests/metal_emu/README.md").read_text()


def test_package_metadata():
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli")
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert proj["license-files"] == ["LICENSE"] and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert proj["authors"]
    for c in ("Development Status :: 3 - Alpha", "Typing :: Typed", "Programming Language :: Python :: 3.11"):
        assert c in proj["classifiers"]
    assert (ROOT / "python/mtlflash/py.typed").is_file()
    import importlib.metadata as md

    meta = md.metadata("mtlflash")
    if "Typing :: Typed" in meta.get_all("Classifier", []):  # an install of this version of the project
        assert "LICENSE" in (meta.get_all("License-File") or [])


@pytest.mark.parametrize("name", ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
                                  "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
                                  "flash_attn_varlen_kvpacked_func"])
def test_public_docstrings(name):
    doc = getattr(mtlflash, name).__doc__
    assert doc and "NumPy in gives NumPy out" in " ".join(doc.split())
    assert re.search(r"\(B, S\w*, \w*H|\(total", doc), "shapes"
    full = mtlflash.flash_attn_func.__doc__
    for phrase in ("bottom-right", "(B, H, L, D)", "q.transpose(1, 2)", "silently gives", "h // (Hq // Hk)",
                   "window_size", "NumPy float16", "Raises:", "NotImplementedError", "top-left"):
        assert phrase in full, phrase
