"""Stream mode (MTLFLASH_DISPATCH=stream, torch >= 2.7): the Metal launch plan executed through
``torch.mps.compile_shader``, so the kernels are encoded on torch's own MPS stream, asynchronously
and in order with torch's work, with no synchronisation.

The plan (tier, source, defines, launches, scratch, params) comes from the C core exactly as in
queue mode; only the encoding differs. Differences from queue mode, imposed by compile_shader:
defines are prepended to the source as ``#define`` lines (no MTLCompileOptions: torch picks
the language version and precise math), the params block is passed as a list of 24 int64 values
(torch binds a list with setBytes, so no host-to-device copy waits on the stream), and the grid is
given in threads (``threads = grid * threadgroup``, always a whole number of groups).
Failures inside torch (a compile error is a SyntaxError, a bad group size a ValueError) are
raised as RuntimeError, like queue mode's.
"""
from __future__ import annotations

import struct
import threading

from . import _C

SLOT_SCRATCH, SLOT_PARAMS = 8, 9

_lock = threading.Lock()
_libraries = {}  # (source, defines) -> compiled library
_kernels = {}  # (source, defines, kernel) -> kernel object
_dummies = {}  # device -> small tensor bound to unused slots


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


def params_words(raw: bytes):
    """The params block as int64 words (torch binds a list of ints with setBytes)."""
    if len(raw) % 8:
        raise ValueError("the params block must be a whole number of 8-byte words")
    return list(struct.unpack(f"<{len(raw) // 8}q", raw))


def _kernel(plan, name, compile_shader):
    key = (plan["source"], tuple(sorted(plan["defines"].items())), name)
    fn = _kernels.get(key)
    if fn is None:
        fn = getattr(library(plan, compile_shader), name)
        width = getattr(fn, "thread_execution_width", 32)
        if width != 32:
            raise RuntimeError(f"{name}: the GPU's simdgroup width is {width}; the kernels need 32")
        _kernels[key] = fn
    return fn


def run(plan, buffers, device="mps", compile_shader=None):
    """Encodes the plan's launches on torch's current MPS stream.

    ``buffers`` maps slot numbers 0..7 to tensors on ``device`` (q, k, v, o, lse, cu_seqlens_q,
    cu_seqlens_k, alibi); missing slots get a dummy tensor. Returns nothing: the outputs are
    written in place when torch's stream reaches the work.
    """
    import torch

    launches = [launch for launch in plan["launches"] if all(launch[1])]
    if not launches:
        return
    try:
        dummy = _dummies.get(str(device))
        if dummy is None:
            dummy = _dummies.setdefault(str(device), torch.empty(16, dtype=torch.uint8, device=device))
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
        args.append(params_words(plan["params"]))
        for kernel, grid, threadgroup in launches:
            threads = [g * t for g, t in zip(grid, threadgroup)]
            _kernel(plan, kernel, compile_shader)(*args, threads=threads, group_size=list(threadgroup))
    except (SyntaxError, ValueError, TypeError) as e:
        raise RuntimeError(f"stream mode: {type(e).__name__}: {e}") from e
