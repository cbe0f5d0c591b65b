"""Start-up hook of the guarded ``flash_attn`` shim. Standard library only.

This file is installed twice: as ``mtlflash/_shim_boot.py`` and, for interpreter start-up, as
the top-level module ``_mtlflash_shim_boot`` at the root of site-packages, where
``mtlflash_shim.pth`` (``import`` line) and ``mtlflash_shim.start`` (PEP 829 entry point)
call :func:`boot`. Importing ``mtlflash`` itself at start-up would import torch in every
Python process; this module imports nothing but the standard library, and its finder
looks at nothing but the name ``flash_attn``.

:func:`boot` appends :class:`FlashAttnShimFinder` to the END of ``sys.meta_path``. The
import system asks it about ``flash_attn`` only after every other finder, the ordinary
``sys.path`` search included, has found nothing: a real flash_attn install always wins.
It then serves ``flash_attn`` from ``mtlflash/_flash_attn_compat/`` when

* ``MTLFLASH_SHIM`` is ``on`` (also ``1``/``true``/``yes``/``force``), or
* ``MTLFLASH_SHIM`` is ``auto`` or unset, the platform is macOS and
  ``torch.backends.mps.is_available()`` (torch is imported only at that moment, never at
  start-up, and never on other platforms).

``MTLFLASH_SHIM=off`` (also ``0``/``false``/``no``) disables it, both at start-up and at
import time. Any other value gives a ``RuntimeWarning`` when ``flash_attn`` is imported and
is treated as ``auto``. Otherwise ``import flash_attn`` raises ImportError exactly as if the
shim did not exist, so libraries that ``try: import flash_attn`` keep their own fallback.
"""

import os
import sys

__all__ = ["FlashAttnShimFinder", "boot", "shim_mode", "find_shim_finder", "MARKER"]

ENV = "MTLFLASH_SHIM"
MARKER = "_mtlflash_flash_attn_shim"
SERVED_NAME = "flash_attn"
COMPAT_DIR = "_flash_attn_compat"

_ON = ("on", "1", "true", "yes", "force")
_OFF = ("off", "0", "false", "no")
_AUTO = ("", "auto")


def shim_mode():
    """Return ``(mode, raw)``: mode is "on", "off", "auto", or "unknown" (treated as auto)."""
    raw = os.environ.get(ENV, "")
    value = raw.strip().lower()
    if value in _ON:
        return "on", raw
    if value in _OFF:
        return "off", raw
    if value in _AUTO:
        return "auto", raw
    return "unknown", raw


def _mps_available():
    if sys.platform != "darwin":
        return False
    try:
        import torch  # only here: the user is importing flash_attn on a Mac

        return bool(torch.backends.mps.is_available())
    except Exception:
        return False


def _compat_spec():
    """The ModuleSpec serving ``flash_attn`` from mtlflash's compat package, or None.

    ``importlib.util.find_spec("mtlflash")`` locates the package without executing it;
    the served module imports mtlflash (and torch) when it runs.
    """
    import importlib.util

    pkg = importlib.util.find_spec("mtlflash")
    if pkg is None or not pkg.submodule_search_locations:
        return None
    for location in pkg.submodule_search_locations:
        compat = os.path.join(location, COMPAT_DIR)
        init = os.path.join(compat, "__init__.py")
        if os.path.isfile(init):
            spec = importlib.util.spec_from_file_location(
                SERVED_NAME, init, submodule_search_locations=[compat]
            )
            # submodules (flash_attn.bert_padding, ...) are found by the ordinary path
            # search inside this package's __path__, i.e. in the compat folder
            return spec
    return None


class FlashAttnShimFinder:
    """Meta-path finder serving ``flash_attn`` from mtlflash when no real install exists."""

    _mtlflash_flash_attn_shim = True  # MARKER: identifies the finder across module copies

    def __init__(self):
        self.forced = False  # mtlflash.shim.install(force=True): serve as if MTLFLASH_SHIM=on

    def __repr__(self):
        return "<mtlflash flash_attn shim finder%s>" % (" (forced)" if self.forced else "")

    def _found_later(self, fullname, path, target):
        # finders appended after this one (e.g. another package's editable-install finder)
        # still get their turn first: a real flash_attn always wins
        meta_path = list(sys.meta_path)
        try:
            later = meta_path[meta_path.index(self) + 1 :]
        except ValueError:
            return False
        for finder in later:
            if getattr(finder, MARKER, False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            try:
                if find_spec(fullname, path, target) is not None:
                    return True
            except Exception:
                continue
        return False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != SERVED_NAME:
            return None
        mode, raw = shim_mode()
        if mode == "off":
            return None
        if getattr(self, "forced", False):
            mode = "on"
        if self._found_later(fullname, path, target):
            return None
        if mode == "unknown":
            import warnings

            warnings.warn(
                "%s=%r is not understood (use on, off or auto); treating it as auto" % (ENV, raw),
                RuntimeWarning,
                stacklevel=2,
            )
            mode = "auto"
        if mode == "auto" and not self._mps_available():
            return None
        try:
            spec = _compat_spec()
        except Exception as exc:
            if mode == "on":
                raise ImportError(
                    "%s=on but mtlflash cannot serve flash_attn: %s" % (ENV, exc), name=fullname
                ) from exc
            return None
        if spec is None and mode == "on":
            raise ImportError(
                "%s=on but the mtlflash package (with %s/) was not found on sys.path"
                % (ENV, COMPAT_DIR),
                name=fullname,
            )
        return spec

    @staticmethod
    def _mps_available():
        return _mps_available()

    def invalidate_caches(self):
        pass


def find_shim_finder(meta_path=None):
    """The shim finder currently on ``sys.meta_path`` (from any copy of this module), or None."""
    for finder in sys.meta_path if meta_path is None else meta_path:
        if getattr(finder, MARKER, False):
            return finder
    return None


def boot():
    """Append the finder to ``sys.meta_path`` unless ``MTLFLASH_SHIM=off`` or already there.

    Runs during interpreter start-up: never raises, never imports anything heavy.
    """
    try:
        if shim_mode()[0] == "off":
            return None
        finder = find_shim_finder()
        if finder is None:
            finder = FlashAttnShimFinder()
            sys.meta_path.append(finder)
        return finder
    except Exception:
        return None
