"""Stream mode's encoding, checked without a Mac: the launches, grid in threads, argument slots
and the compiled source it hands to torch.mps.compile_shader (a recording stand-in here)."""
from __future__ import annotations

import struct

import pytest
import torch

from mtlflash import _C, metal_stream
from metal_emu import host


class Recorder:
    def __init__(self):
        self.sources = []
        self.calls = []

    def compile(self, source):
        self.sources.append(source)
        rec = self

        class Lib:
            def __getattr__(self, name):
                return lambda *args, **kw: rec.calls.append((name, args, kw))

        return Lib()


def decode_plan():
    q = torch.zeros(1, 1, 8, 128, dtype=torch.float16)
    k = torch.zeros(1, 2048, 2, 128, dtype=torch.float16)
    out = torch.empty(1, 1, 8, 128, dtype=torch.float16)
    plan = _C.metal_plan("vec", host.caps(), "t", q, k, k, None, None, 0, 0, None, True, -1, -1, 0.0, None,
                         False, out, None)
    return plan, q, k, out


def reset():
    metal_stream._libraries.clear()
    metal_stream._kernels.clear()


def test_stream_mode_encodes_the_plan():
    reset()
    plan, q, k, out = decode_plan()
    rec = Recorder()
    metal_stream.run(plan, {0: q, 1: k, 2: k, 3: out}, device="cpu", compile_shader=rec.compile)
    assert len(rec.sources) == 1
    assert rec.sources[0].startswith("#define MF_DTYPE 1\n#define MF_MAX_D 128\n")
    assert rec.sources[0].endswith(_C.metal_source("attn_vec.metal"))
    assert [c[0] for c in rec.calls] == ["mf_attn_vec_split", "mf_attn_vec_merge"]
    for (name, args, kw), (kernel, grid, tg) in zip(rec.calls, plan["launches"]):
        assert kw["threads"] == [g * t for g, t in zip(grid, tg)]
        assert kw["group_size"] == list(tg)
        assert len(args) == 13  # slots 0..8, the params at 9, the kv-layout slots 10..12
        assert args[0] is q and args[1] is k and args[2] is k and args[3] is out
        assert args[4].dtype == torch.uint8 and args[4].numel() == 16  # no lse: dummy
        assert args[8].dtype == torch.float32 and args[8].numel() == plan["scratch_floats"]
        assert struct.pack(f"<{len(args[9])}q", *args[9]) == plan["params"]
        assert all(args[s].dtype == torch.uint8 and args[s].numel() == 16 for s in (10, 11, 12))  # dense
    # the split and the merge launch see the same scratch buffer
    assert rec.calls[0][1][8] is rec.calls[1][1][8]


def test_stream_mode_compiles_once_per_variant():
    reset()
    plan, q, k, out = decode_plan()
    rec = Recorder()
    for _ in range(3):
        metal_stream.run(plan, {0: q, 1: k, 2: k, 3: out}, device="cpu", compile_shader=rec.compile)
    assert len(rec.sources) == 1 and len(rec.calls) == 6


def test_stream_mode_reports_torch_errors_as_runtime_errors():
    reset()
    plan, q, k, out = decode_plan()

    def broken(source):
        raise SyntaxError("program_source:1:1: error: unknown type name")

    with pytest.raises(RuntimeError, match="stream mode: SyntaxError"):
        metal_stream.run(plan, {0: q, 1: k, 2: k, 3: out}, device="cpu", compile_shader=broken)


def test_metal_sources_are_ascii_without_pragma_once():
    # torch.mps.compile_shader reads sources as ASCII and rewrites `#pragma once` itself
    for name in _C.metal_files():
        text = _C.metal_source(name) if name.endswith(".metal") else None
        if text is not None:
            assert text.isascii(), name
            assert not any(line.strip().startswith("#pragma once") for line in text.splitlines()), name
