"""The numerics grid on every CPU SIMD path this machine has, not only the one chosen by default.

The default run of the suite exercises the best path (AVX-512, AVX2+FMA or the baseline); here the
grid of test_numerics.py runs again, in a child pytest, with MTLFLASH_CPU_ISA capping the choice
to each lesser path. A path that is the same as the default one is skipped (nothing new to run).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mtlflash

HERE = os.path.dirname(os.path.abspath(__file__))


def _path_name(isa):
    code = "import mtlflash; print(mtlflash.backend_info()['cpu_simd'])"
    env = dict(os.environ, MTLFLASH_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_numerics_grid_on_capped_path(isa):
    best = mtlflash.backend_info()["cpu_simd"]
    name = _path_name(isa)
    if name == best:
        pytest.skip(f"MTLFLASH_CPU_ISA={isa} selects {name}, the default path on this CPU")
    env = dict(os.environ, MTLFLASH_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          os.path.join(HERE, "test_numerics.py")], env=env, capture_output=True, text=True,
                         cwd=HERE)
    tail = "\n".join(res.stdout.strip().splitlines()[-15:])
    assert res.returncode == 0, f"numerics grid on {name} (MTLFLASH_CPU_ISA={isa}) failed:\n{tail}\n{res.stderr[-2000:]}"
    assert " passed" in tail, tail
