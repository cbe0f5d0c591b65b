"""README's Python examples run as written (on the CPU, in a fresh interpreter)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(section):
    """The ```python blocks of one `## section` of README.md."""
    start = README.index(f"\n## {section}\n")
    end = README.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", README[start:end if end > 0 else None], re.S)


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_usage_examples_run():
    code = blocks("Usage")
    assert len(code) == 2
    r = run("\n".join(code))
    assert r.returncode == 0, r.stderr


def test_transformers_example_runs_on_cpu_as_written():
    pytest.importorskip("transformers")
    (code,) = blocks("transformers")
    assert "torch_dtype" not in code  # deprecated in transformers 5; dtype= is the name
    r = run(code)
    assert r.returncode == 0, r.stderr
    assert "tensor([[" in r.stdout
    assert "deprecated" not in r.stderr.lower()


def test_readme_says_where_things_are_verified_and_how_to_report():
    setup = README[README.index("## Set up"):README.index("## Usage")]
    assert "never yet on a Mac" in setup and "python -m mtlflash check" in setup
    assert "(B, H, L, D)" in README and "(B, L, H, D)" in README
    perf = README[README.index("## Performance"):README.index("## Reliability")]
    assert len(perf.splitlines()) < 20 and "benchmarks/README.md" in perf
