"""Stream mode (MTLFLASH_DISPATCH=stream, torch >= 2.7): the Metal launch plan executed through
``torch.mps.compile_shader``, so the kernels are encoded on torch's own MPS stream, asynchronously
and in order with torch's work, with no synchronisation.

The plan (tier, source, defines, launches, scratch, params) comes from the C core exactly as in
queue mode; only the encoding differs. Differences from queue mode, imposed by compile_shader:
defines are prepended to the source as ``#define`` lines (no MTLCompileOptions), the params
block is bound as a small uint8 MPS tensor at slot 9 (setBuffer instead of setBytes), and the
grid is given in threads (``threads = grid * threadgroup``, always a whole number of groups).
"""
from __future__ import annotations

import threading

from . import _C

SLOT_SCRATCH, SLOT_PARAMS = 8, 9

_lock = threading.Lock()
_libraries = {}


def _source_with_defines(plan) -> str:
    lines = [f"#define {name} {value}\n" for name, value in sorted(plan["defines"].items())]
    return "".join(lines) + _C.metal_source(plan["source"])


def library(plan, compile_shader=None):
    """The compiled library for a plan's (source, defines), compiled once per process."""
    key = (plan["source"], tuple(sorted(plan["defines"].items())))
    with _lock:
        lib = _libraries.get(key)
        if lib is None:
            if compile_shader is None:
                import torch

                compile_shader = torch.mps.compile_shader
            lib = compile_shader(_source_with_defines(plan))
            _libraries[key] = lib
    return lib


def run(plan, buffers, device="mps", compile_shader=None):
    """Encodes the plan's launches on torch's current MPS stream.

    ``buffers`` maps slot numbers 0..7 to tensors on ``device`` (q, k, v, o, lse, cu_seqlens_q,
    cu_seqlens_k, alibi); missing slots get a dummy tensor. Returns nothing: the outputs are
    written in place when torch's stream reaches the work.
    """
    import torch

    if not plan["launches"]:
        return
    lib = library(plan, compile_shader)
    dummy = torch.zeros(16, dtype=torch.uint8, device=device)
    params = torch.frombuffer(bytearray(plan["params"]), dtype=torch.uint8).to(device)
    scratch = None
    if plan["scratch_floats"]:
        scratch = torch.empty(plan["scratch_floats"], dtype=torch.float32, device=device)
    args = []
    for slot in range(SLOT_PARAMS):
        if slot == SLOT_SCRATCH:
            args.append(scratch if scratch is not None else dummy)
        else:
            t = buffers.get(slot)
            args.append(t if t is not None else dummy)
    args.append(params)
    for kernel, grid, threadgroup in plan["launches"]:
        threads = [g * t for g, t in zip(grid, threadgroup)]
        getattr(lib, kernel)(*args, threads=threads, group_size=list(threadgroup))
