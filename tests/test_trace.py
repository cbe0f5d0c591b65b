"""mtlflash.trace: recording, summary, reset, the MTLFLASH_TRACE switch and the exit table."""

import os
import subprocess
import sys

import pytest

from mtlflash import trace


def _run(code, **env_changes):
    env = dict(os.environ)
    env.pop("MTLFLASH_TRACE", None)
    env.update(env_changes)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def clean_trace():
    was = trace.ENABLED
    trace.reset()
    yield
    trace.reset()
    trace.ENABLED = was


def test_record_summary_reset(clean_trace):
    trace.record("flash_attn_func", "float16", 128, 4096, 4096, True, "simdgroup")
    trace.record("flash_attn_func", "torch.float16", 128, 4096, 4096, 1, "simdgroup")
    trace.record("flash_attn_varlen_func", "float32", 64, 7, 9, False, "cpu")
    rows = trace.summary()
    assert rows[0] == {
        "entry": "flash_attn_func",
        "dtype": "float16",
        "head_dim": 128,
        "seqlen_q": 4096,
        "seqlen_k": 4096,
        "causal": True,
        "tier": "simdgroup",
        "calls": 2,
    }
    assert rows[1]["entry"] == "flash_attn_varlen_func" and rows[1]["calls"] == 1
    assert len(rows) == 2
    text = trace.format_summary()
    assert "flash_attn_func" in text and "simdgroup" in text and "3 attention call(s)" in text
    trace.reset()
    assert trace.summary() == []
    assert "no attention calls" in trace.format_summary()


def test_distinct_keys_are_counted_separately(clean_trace):
    for causal in (True, False):
        for tier in ("cpu", "reference"):
            trace.record("flash_attn_func", "float32", 64, 16, 32, causal, tier)
    assert len(trace.summary()) == 4
    assert sum(r["calls"] for r in trace.summary()) == 4


def test_record_is_thread_safe(clean_trace):
    import threading

    def work():
        for _ in range(2000):
            trace.record("flash_attn_func", "float32", 64, 1, 1, False, "cpu")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trace.summary()[0]["calls"] == 8000


def test_enable_at_run_time(clean_trace):
    trace.enable(True)
    assert trace.ENABLED is True
    trace.enable(False)
    assert trace.ENABLED is False


@pytest.mark.parametrize("value,expected", [("1", True), ("on", True), ("0", False), ("off", False), ("", False)])
def test_env_switch(value, expected):
    r = _run("from mtlflash import trace; print(trace.ENABLED)", MTLFLASH_TRACE=value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(expected)


def test_unknown_env_value_warns_and_stays_off():
    r = _run(
        "import warnings; warnings.simplefilter('always')\n"
        "from mtlflash import trace; print(trace.ENABLED)",
        MTLFLASH_TRACE="verbose",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    assert "MTLFLASH_TRACE" in r.stderr and "RuntimeWarning" in r.stderr


def test_summary_printed_at_exit():
    code = (
        "from mtlflash import trace\n"
        "trace.record('flash_attn_func', 'bfloat16', 96, 1000, 2000, True, 'cpu')\n"
        "trace.record('flash_attn_func', 'bfloat16', 96, 1000, 2000, True, 'cpu')\n"
    )
    r = _run(code, MTLFLASH_TRACE="1")
    assert r.returncode == 0, r.stderr
    assert "mtlflash trace: 2 attention call(s)" in r.stderr
    line = [l for l in r.stderr.splitlines() if l.startswith("flash_attn_func")][0].split()
    assert line == ["flash_attn_func", "bfloat16", "96", "1000", "2000", "yes", "cpu", "2"]


def test_nothing_printed_when_off():
    code = "from mtlflash import trace\n"
    r = _run(code)
    assert r.returncode == 0 and r.stderr == ""
    r = _run(code, MTLFLASH_TRACE="1")
    assert "no attention calls recorded" in r.stderr


def test_core_records_its_calls():
    """The core calls trace.record on every call when tracing is on."""
    code = (
        "import torch, mtlflash\n"
        "from mtlflash import trace\n"
        "q = torch.randn(1, 5, 2, 16)\n"
        "mtlflash.flash_attn_func(q, q, q, causal=True)\n"
        "rows = [r for r in trace.summary() if r['entry'] == 'flash_attn_func']\n"
        "assert rows, trace.summary()\n"
        "r = rows[0]\n"
        "print(r['dtype'], r['head_dim'], r['seqlen_q'], r['seqlen_k'], r['causal'], r['calls'])\n"
    )
    r = _run(code, MTLFLASH_TRACE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["float32", "16", "5", "5", "True", "1"]
    assert "mtlflash trace" in r.stderr


def test_kvcache_calls_are_traced(clean_trace):
    import torch

    import mtlflash

    trace.ENABLED = True
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(6, 8, 2, 16), torch.randn(6, 8, 2, 16)
    table = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    mtlflash.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([5, 9], dtype=torch.int32),
                                     block_table=table, causal=True)
    rows = trace.summary()
    assert rows == [{"entry": "flash_attn_with_kvcache", "dtype": "float32", "head_dim": 16, "seqlen_q": 1,
                     "seqlen_k": 24, "causal": True, "tier": "cpu", "calls": 1}]
