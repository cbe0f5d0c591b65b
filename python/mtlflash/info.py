"""What this build and this machine offer: tiers, reasons, SIMD path, threads."""
from __future__ import annotations

import importlib.util
import os
import platform

from . import _C

TIER_NAMES = ("auto", "cpu", "vec", "simdgroup", "tensorops", "reference")


def torch_installed() -> bool:
    """Whether torch can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def backend_info() -> dict:
    """A dict describing the build and every tier: ``{"tiers": {name: {"available": bool,
    "reason": str}}, "cpu_simd": ..., "metal": ..., "num_threads": ..., ...}``."""
    import mtlflash

    tiers = {}
    for name, ok, reason in _C.tiers():
        if name == "reference" and not torch_installed():
            ok, reason = False, "torch is not installed"
        tiers[name] = {"available": bool(ok), "reason": reason}
    build = _C.build_info()
    forced = os.environ.get("MTLFLASH_KERNEL", "") or "auto"
    try:
        threads = _C.num_threads()
    except ValueError as e:
        threads = f"invalid: {e}"
    return {
        "version": mtlflash.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_simd": build["cpu_simd"],
        "metal": build["metal"],
        "num_threads": threads,
        "kernel": forced,
        "kernel_valid": forced in TIER_NAMES,
        "max_head_dim": build["max_head_dim"],
        "tiers": tiers,
    }


def which_tier(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
               softmax_scale=None) -> str:
    """The tier that would run ``flash_attn_func(q, k, v, ...)`` here, honouring
    MTLFLASH_KERNEL; validates like a real call and computes nothing."""
    left, right = window_size
    return _C.plan("which_tier", q, k, v, None, None, 0, 0, softmax_scale, bool(causal), int(left), int(right),
                   float(softcap), alibi_slopes)
