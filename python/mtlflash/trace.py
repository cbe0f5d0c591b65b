"""Call tracing: which attention entry points ran, with which shapes, on which tier.

Turn it on with ``MTLFLASH_TRACE=1`` in the environment (read once, when this module is
imported) or at run time with :func:`enable`. While it is on, every attention call is
counted per ``(entry point, dtype, head dim, Lq, Lk, causal, tier)``; at interpreter exit a
summary table is printed to stderr. :func:`summary` returns the same table as data and
:func:`reset` clears it.

Callers test ``trace.ENABLED`` themselves before calling :func:`record`, so tracing costs
one attribute read per call when it is off::

    from mtlflash import trace
    if trace.ENABLED:
        trace.record("flash_attn_func", "float16", 128, 4096, 4096, True, "simdgroup")

The ``tier`` column names where the call ran (``cpu``, ``vec``, ``simdgroup``,
``tensorops``, ``reference``). The SDPA patch records the calls it leaves to PyTorch under
the entry ``sdpa`` with tier ``stock:<reason>``, and a call it routed to mtlflash that
failed and was served by PyTorch instead as ``fallback:<ExceptionType>``.
"""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
import warnings

__all__ = ["ENABLED", "record", "summary", "reset", "enable", "format_summary"]

_TRUE = ("1", "on", "true", "yes")
_FALSE = ("", "0", "off", "false", "no")

_FIELDS = ("entry", "dtype", "head_dim", "seqlen_q", "seqlen_k", "causal", "tier")


def _read_env() -> bool:
    raw = os.environ.get("MTLFLASH_TRACE", "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value not in _FALSE:
        warnings.warn(
            f"MTLFLASH_TRACE={raw!r} is not understood (use 1/on or 0/off); tracing stays off",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


ENABLED: bool = _read_env()

_lock = threading.Lock()
_counts: "collections.Counter[tuple]" = collections.Counter()
_atexit_registered = False


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_print_at_exit)


def _as_int(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return x


def _as_dtype_name(dtype) -> str:
    # accept "float16", torch.float16, numpy dtypes; always store the short name
    name = str(dtype)
    for prefix in ("torch.", "<class 'numpy.", "numpy."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.rstrip("'>")


def record(entry, dtype, head_dim, seqlen_q, seqlen_k, causal, tier) -> None:
    """Count one attention call. Cheap, thread-safe; call only when ``ENABLED``."""
    key = (
        str(entry),
        _as_dtype_name(dtype),
        _as_int(head_dim),
        _as_int(seqlen_q),
        _as_int(seqlen_k),
        bool(causal),
        str(tier),
    )
    with _lock:
        _counts[key] += 1
    if not _atexit_registered:
        _register_atexit()


def summary() -> list:
    """The recorded calls as a list of dicts (one per distinct key, most frequent first).

    Each dict has the keys ``entry, dtype, head_dim, seqlen_q, seqlen_k, causal, tier, calls``.
    """
    with _lock:
        items = list(_counts.items())
    items.sort(key=lambda kv: (-kv[1], tuple(str(x) for x in kv[0])))
    return [dict(zip(_FIELDS, key), calls=n) for key, n in items]


def reset() -> None:
    """Forget every recorded call."""
    with _lock:
        _counts.clear()


def enable(on: bool = True) -> None:
    """Turn tracing on or off at run time (the summary still prints at exit when on)."""
    global ENABLED
    ENABLED = bool(on)
    if ENABLED:
        _register_atexit()


def format_summary(rows=None) -> str:
    """The summary as a plain-text table."""
    if rows is None:
        rows = summary()
    if not rows:
        return "mtlflash trace: no attention calls recorded\n"
    header = ("entry", "dtype", "D", "Lq", "Lk", "causal", "tier", "calls")
    table = [header]
    for r in rows:
        table.append(
            (
                r["entry"],
                r["dtype"],
                str(r["head_dim"]),
                str(r["seqlen_q"]),
                str(r["seqlen_k"]),
                "yes" if r["causal"] else "no",
                r["tier"],
                str(r["calls"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = {2, 3, 4, 7}
    lines = []
    for j, row in enumerate(table):
        cells = [
            row[i].rjust(widths[i]) if (i in numeric and j > 0) else row[i].ljust(widths[i])
            for i in range(len(header))
        ]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    total = sum(r["calls"] for r in rows)
    return "mtlflash trace: %d attention call(s)\n%s\n" % (total, "\n".join(lines))


def _print_at_exit() -> None:
    if not ENABLED:
        return
    try:
        sys.stderr.write(format_summary())
        sys.stderr.flush()
    except Exception:  # stderr may already be closed at shutdown
        pass


if ENABLED:
    _register_atexit()
