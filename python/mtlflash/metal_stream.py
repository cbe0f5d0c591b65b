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

Arguments are passed by position, which compile_shader binds to buffer indices 0, 1, ...: the
attention kernels' slots 0..8, the params at 9, then the kv-layout slots 10..12 (mf_params.h).
A kv cache call (:func:`run_kvcache`) first encodes the append + rotary pass with its own slot
layout (mf_params.h, "append pass"; its mf_append_params at 8 as int64 words), then attention.
"""
from __future__ import annotations

import struct
import threading

from . import _C

SLOT_SCRATCH, SLOT_PARAMS, NUM_SLOTS = 8, 9, 13
SLOT_KV_INDEX, SLOT_SEQUSED_K, SLOT_LEFTPAD_K = 10, 11, 12

_lock = threading.Lock()
_libraries = {}  # (source, defines) -> compiled library
_kernels = {}  # (source, defines, kernel) -> kernel object
_dummies = {}  # device -> small tensor bound to unused slots


def _source_with_defines(plan) -> str:
    lines = [f"#define {name} {value}\n" for name, value in sorted(plan["defines"].items())]
    return "".join(lines) + _C.metal_source(plan["source"])


def library(plan, compile_shader=None):
    """The compiled library for a plan's (source, defines), compiled once per process (``plan``
    may also be a plan's "append" entry, which has its own source and defines)."""
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


def params_bytes(words) -> bytes:
    """The inverse of :func:`params_words`."""
    return struct.pack(f"<{len(words)}q", *words)


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


def _dummy(device):
    import torch

    dummy = _dummies.get(str(device))
    if dummy is None:
        dummy = _dummies.setdefault(str(device), torch.empty(16, dtype=torch.uint8, device=device))
    return dummy


def _args(slots, plan_params, dummy):
    """Positional arguments for slots 0..12: tensors (dummy where absent) or, for the params
    slots, int64 word lists."""
    args = []
    for slot in range(NUM_SLOTS):
        if slot == SLOT_PARAMS:
            args.append(params_words(plan_params))
        else:
            t = slots.get(slot)
            args.append(t if t is not None else dummy)
    return args


def _encode(program, launches, args, compile_shader):
    for kernel, grid, threadgroup in launches:
        if not all(grid):
            continue
        threads = [g * t for g, t in zip(grid, threadgroup)]
        _kernel(program, kernel, compile_shader)(*args, threads=threads, group_size=list(threadgroup))


def run(plan, buffers, device="mps", compile_shader=None):
    """Encodes the plan's launches on torch's current MPS stream.

    ``buffers`` maps slot numbers 0..7 and 10..12 to tensors on ``device`` (q, k, v, o, lse,
    cu_seqlens_q, cu_seqlens_k, alibi; block table or kv batch index, cache lengths, leftpad);
    missing slots get a dummy tensor. Returns nothing: the outputs are written in place when
    torch's stream reaches the work.
    """
    import torch

    launches = [launch for launch in plan["launches"] if all(launch[1])]
    if not launches:
        return
    try:
        dummy = _dummy(device)
        slots = dict(buffers)
        slots.pop(SLOT_PARAMS, None)
        slots[SLOT_SCRATCH] = None
        if plan["scratch_floats"]:
            slots[SLOT_SCRATCH] = torch.empty(plan["scratch_floats"], dtype=torch.float32, device=device)
        _encode(plan, launches, _args(slots, plan["params"], dummy), compile_shader)
    except (SyntaxError, ValueError, TypeError) as e:
        raise RuntimeError(f"stream mode: {type(e).__name__}: {e}") from e


def run_kvcache(plan, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, out, lse, alibi, device_tensors,
                device="mps", compile_shader=None):
    """Encodes a kv cache call's plan (from mtlflash._C.kvcache) on torch's current MPS stream:
    the append + rotary pass (when the plan has one) writing the new rows into k_cache/v_cache and
    the rotated q into ``plan["q_rot"]``, then the attention launches reading them, in stream
    order. ``device_tensors`` holds the device copies of the index tensors (kv_index_device,
    cache_seqlens_device, cache_leftpad_device), as interface.flash_attn_with_kvcache passes them
    to the C core."""
    q_rot = plan.get("q_rot")
    kv_index = device_tensors.get("kv_index_device")
    seqused = device_tensors.get("cache_seqlens_device")
    leftpad = device_tensors.get("cache_leftpad_device")
    ap = plan.get("append")
    if ap is not None and all(ap["launch"][1]):
        try:
            dummy = _dummy(device)
            slots = {0: q if q_rot is not None else None, 1: k_cache, 2: v_cache, 3: q_rot, 4: k, 5: v,
                     6: rotary_cos if q_rot is not None else None, 7: rotary_sin if q_rot is not None else None,
                     SLOT_KV_INDEX: kv_index, SLOT_SEQUSED_K: seqused}
            args = _args(slots, plan["params"], dummy)
            args[SLOT_SCRATCH] = params_words(ap["params"])  # the append pass's own params (setBytes)
            _encode(ap, [ap["launch"]], args, compile_shader)
        except (SyntaxError, ValueError, TypeError) as e:
            raise RuntimeError(f"stream mode: {type(e).__name__}: {e}") from e
    run(plan, {0: q_rot if q_rot is not None else q, 1: k_cache, 2: v_cache, 3: out, 4: lse, 7: alibi,
               SLOT_KV_INDEX: kv_index, SLOT_SEQUSED_K: seqused, SLOT_LEFTPAD_K: leftpad},
        device=device, compile_shader=compile_shader)
