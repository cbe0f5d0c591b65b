"""The guarded ``flash_attn`` import shim.

An installed mtlflash puts ``mtlflash_shim.pth`` (and, for Python >= 3.15,
``mtlflash_shim.start``) at the root of site-packages. At interpreter start-up they call
``_mtlflash_shim_boot.boot()``, which appends a finder to the END of ``sys.meta_path``
and imports nothing else. ``import flash_attn`` then reaches the finder only when no
real flash_attn is installed, and it serves mtlflash's FlashAttention-2 compatible package
(``mtlflash/_flash_attn_compat/``) only when it can:

========================  ================================================================
``MTLFLASH_SHIM``         ``import flash_attn`` without a real flash_attn installed
========================  ================================================================
unset / ``auto``          served on macOS when ``torch.backends.mps.is_available()``;
                          ImportError elsewhere (CUDA machines, plain Linux)
``on``                    always served (e.g. CPU-only Linux, tests)
``off``                   ImportError: the shim is not even installed at start-up
anything else             RuntimeWarning at import time, then treated as ``auto``
========================  ================================================================

Served modules: ``flash_attn``, ``flash_attn.flash_attn_interface``,
``flash_attn.bert_padding``, ``flash_attn.layers``, ``flash_attn.layers.rotary``
(``flash_attn.__version__ == "2.8.3"``). No ``flash_attn``/``flash-attn`` distribution
metadata exists, so pip and ``importlib.metadata.version("flash_attn")`` never see one.

For embedded interpreters (``python -S``, PyInstaller, ...) where site-packages' ``.pth``
files do not run, call :func:`install` explicitly; :func:`uninstall` removes the finder
and forgets any served ``flash_attn`` modules.
"""

from __future__ import annotations

import os
import sys

from . import _shim_boot
from ._shim_boot import ENV, MARKER, FlashAttnShimFinder, find_shim_finder, shim_mode

__all__ = ["install", "uninstall", "status", "is_served", "FlashAttnShimFinder", "ENV"]

COMPAT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), _shim_boot.COMPAT_DIR)


def _finders():
    return [f for f in sys.meta_path if getattr(f, MARKER, False)]


def install(force: bool = False):
    """Append the shim finder to the end of ``sys.meta_path`` (idempotent).

    A finder already installed at start-up keeps its place and is swapped for this
    package's own copy of the finder.

    With ``force=True`` the finder serves ``flash_attn`` as if ``MTLFLASH_SHIM=on``,
    whatever the platform. ``MTLFLASH_SHIM=off`` in the environment still wins (kill
    switch): then nothing is installed and None is returned. Returns the finder.
    """
    if shim_mode()[0] == "off":
        return None
    finder = find_shim_finder()
    if finder is None:
        finder = FlashAttnShimFinder()
        sys.meta_path.append(finder)
    elif not isinstance(finder, FlashAttnShimFinder):
        # the start-up copy (_mtlflash_shim_boot, installed next to the .pth) may be older
        # than this package, e.g. in an editable install: use this package's finder in its place
        replacement = FlashAttnShimFinder()
        replacement.forced = bool(getattr(finder, "forced", False))
        sys.meta_path[sys.meta_path.index(finder)] = replacement
        finder = replacement
    if force:
        finder.forced = True
    return finder


def uninstall() -> bool:
    """Remove every shim finder from ``sys.meta_path`` and drop served ``flash_attn`` modules.

    A real flash_attn in ``sys.modules`` is left alone. Returns True if anything changed.
    """
    changed = False
    for finder in _finders():
        sys.meta_path.remove(finder)
        changed = True
    for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
        if is_served(sys.modules[name]):
            del sys.modules[name]
            changed = True
    return changed


def is_served(module=None) -> bool:
    """True if ``module`` (default: the imported ``flash_attn``) is the one mtlflash serves."""
    if module is None:
        module = sys.modules.get("flash_attn")
        if module is None:
            return False
    origin = getattr(getattr(module, "__spec__", None), "origin", None) or getattr(
        module, "__file__", None
    )
    if not origin:
        return False
    origin = os.path.abspath(origin)
    if origin.startswith(COMPAT_DIR + os.sep):
        return True
    # another copy of the compat folder (e.g. an editable install next to a wheel)
    parts = origin.split(os.sep)
    return _shim_boot.COMPAT_DIR in parts and "mtlflash" in parts


def status() -> dict:
    """What the shim would do right now, without importing flash_attn.

    Keys: ``mode`` (on/off/auto/unknown), ``env`` (raw MTLFLASH_SHIM), ``finder_installed``,
    ``real_flash_attn`` (path of a real install found on sys.path, or None), ``served``
    (a shim-served flash_attn is already imported).
    """
    import importlib.machinery

    mode, raw = shim_mode()
    real = None
    try:
        spec = importlib.machinery.PathFinder.find_spec("flash_attn")
        if spec is not None:
            real = spec.origin or (list(spec.submodule_search_locations or []) or [None])[0]
    except Exception:
        real = None
    return {
        "mode": mode,
        "env": raw,
        "finder_installed": find_shim_finder() is not None,
        "real_flash_attn": real,
        "served": is_served(),
    }
