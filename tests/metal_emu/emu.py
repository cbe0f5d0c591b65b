"""Build and run Metal kernel files on the CPU through the emulator (see README.md here).

    lib = emu.build("metal/attn_vec.metal", defines={"MF_DTYPE": 1})
    lib.launch("attn_vec_fwd", grid=(gx, gy, gz), threadgroup=(tx, ty, tz),
               buffers={emu.SLOT_Q: q, ..., emu.SLOT_PARAMS: emu.pack_params(...)},
               schedule="random", seed=0)

Every failed check raises EmuError with the runtime's message.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

EMU_DIR = Path(__file__).resolve().parent
REPO_ROOT = EMU_DIR.parent.parent
METAL_DIR = REPO_ROOT / "metal"
BUILD_DIR = Path(os.environ.get("MFEMU_BUILD_DIR") or EMU_DIR / "build")
HEADER = EMU_DIR / "mfemu.h"
RUNTIME = EMU_DIR / "mfemu_runtime.cpp"
PARAMS_HEADER = METAL_DIR / "mf_params.h"

SCHEDULES = ("forward", "reverse", "random")
SLOT_Q, SLOT_K, SLOT_V, SLOT_O, SLOT_LSE = 0, 1, 2, 3, 4
SLOT_CU_Q, SLOT_CU_K, SLOT_ALIBI, SLOT_SCRATCH, SLOT_PARAMS = 5, 6, 7, 8, 9
SLOT_KV_INDEX, SLOT_SEQUSED_K, SLOT_LEFTPAD_K = 10, 11, 12
NUM_SLOTS = 13
# the append kernel's own slots (MF_APPEND_KERNEL; 9, 10, 11 as above)
APP_SLOT_Q_SRC, APP_SLOT_K_CACHE, APP_SLOT_V_CACHE, APP_SLOT_Q_ROT = 0, 1, 2, 3
APP_SLOT_K_NEW, APP_SLOT_V_NEW, APP_SLOT_COS, APP_SLOT_SIN, APP_SLOT_APP_PARAMS = 4, 5, 6, 7, 8
MAX_THREADS = 1024
MAX_THREADGROUP_BYTES = 32768

# Flags shared by the runtime and every kernel library. Frame pointers and no sibling calls
# keep the call path of each barrier visible (divergence checks); -ffloat16-excess-precision
# =none rounds every half operation to half, as the GPU does.
COMMON_FLAGS = [
    "-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-fno-exceptions", "-fno-rtti",
    "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer", "-fno-optimize-sibling-calls",
    "-ffp-contract=off", "-Xclang", "-ffloat16-excess-precision=none",
    # keep the calls of two branches apart (divergent barriers in identical branches)
    "-mllvm", "-simplifycfg-sink-common=false", "-mllvm", "-simplifycfg-hoist-common=false",
    "-mllvm", "-enable-tail-merge=false",
]
RUNTIME_FLAGS = ["-g0", "-Wall", "-Wextra"]


def _cpu_flags():
    """-mf16c where the CPU has it: half conversions in hardware (same rounding, much faster)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return []
    m = re.search(r"^flags\s*:(.*)$", info, re.M)
    return ["-mf16c"] if m and " f16c " in m.group(1) + " " else []


COMMON_FLAGS += _cpu_flags()
# array-bounds traps: an index out of range of a fixed-size private array fails the launch
KERNEL_FLAGS = ["-gline-tables-only", "-Wall", "-Wno-unused-function", "-Wno-comment",
                "-fsanitize=array-bounds", "-fsanitize-trap=array-bounds",
                # probe every page of a big stack frame: an overflow hits the guard page
                # instead of silently writing into the next fiber's stack
                "-fstack-clash-protection"]


class EmuError(Exception):
    """A kernel launch failed one of the emulator's checks (or could not start)."""


class BuildError(EmuError):
    """clang could not compile a kernel file under the emulator."""


# ----------------------------------------------------------------------------- compiler


_compiler_lock = threading.Lock()
_compiler_cache: list = []  # [(path, version_text, major)] or [None]


def _clang_major(exe: str):
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None, ""
    m = re.search(r"clang version (\d+)", out)
    return (int(m.group(1)) if m else None), out.strip().splitlines()[0] if out.strip() else ""


def find_compiler():
    """(path, version line, major) of the clang to use, or None."""
    with _compiler_lock:
        if _compiler_cache:
            return _compiler_cache[0]
        found = None
        env = os.environ.get("MTLFLASH_EMU_CXX")
        names = [env] if env else []
        names += ["clang++-19", "clang-19", "clang++-18", "clang-18", "clang++-17", "clang-17",
                  "clang++-16", "clang-16", "clang++-15", "clang-15", "clang++", "clang"]
        for name in names:
            exe = shutil.which(name) if name else None
            if not exe:
                continue
            major, line = _clang_major(exe)
            if major is not None and major >= 15:
                found = (exe, line, major)
                break
            if env and name == env:
                break  # an explicit choice that does not work is not silently replaced
        _compiler_cache.append(found)
        return found


def unavailable_reason():
    """None when the emulator can run here, else why not."""
    if os.name != "posix":
        return "the Metal emulator needs a POSIX system"
    if find_compiler() is None:
        env = os.environ.get("MTLFLASH_EMU_CXX")
        if env:
            return f"MTLFLASH_EMU_CXX={env!r} is not a clang >= 15"
        return "no clang >= 15 found (clang++-19, clang++-16, clang++ ...; CI: apt-get install -y clang-16)"
    return None


def available() -> bool:
    return unavailable_reason() is None


def require():
    """In a pytest test: skip when the emulator cannot run, but fail in CI
    ($CI or $MTLFLASH_EMU_REQUIRED set), where the tests must run."""
    import pytest

    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") or os.environ.get("MTLFLASH_EMU_REQUIRED"):
        pytest.fail("Metal emulator required but unavailable: " + reason)
    pytest.skip("Metal emulator unavailable: " + reason)


# ----------------------------------------------------------------------------- params


def _parse_params_header(path: Path = PARAMS_HEADER, struct_name="mf_params", size_macro="MF_PARAMS_SIZE"):
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    m = re.search(r"typedef\s+struct\s+" + struct_name + r"\s*\{(.*?)\}\s*" + struct_name + r"\s*;", text, re.S)
    if not m:
        raise EmuError(f"cannot find struct {struct_name} in {path}")
    kinds = {"mf_i64": ("q", 8), "mf_i32": ("i", 4), "float": ("f", 4), "int": ("i", 4)}
    fields, off = [], 0
    for decl in m.group(1).split(";"):
        decl = decl.strip()
        if not decl:
            continue
        typ, _, names = decl.partition(" ")
        if typ not in kinds:
            raise EmuError(f"mf_params.h: unsupported field type {typ!r}")
        code, size = kinds[typ]
        for name in names.split(","):
            name = name.strip()
            off = (off + size - 1) // size * size
            fields.append((name, code, off))
            off += size
    off = (off + 7) // 8 * 8
    sm = re.search(r"#define\s+" + size_macro + r"\s+(\d+)", text)
    if sm and int(sm.group(1)) != off:
        raise EmuError(f"mf_params.h: {struct_name} fields add up to {off} bytes, {size_macro} says {sm.group(1)}")
    return fields, off


PARAMS_FIELDS, PARAMS_SIZE = _parse_params_header()
APPEND_PARAMS_FIELDS, APPEND_PARAMS_SIZE = _parse_params_header(struct_name="mf_append_params",
                                                                size_macro="MF_APPEND_PARAMS_SIZE")


def _pack(struct_name, field_list, size, fields) -> bytes:
    buf = bytearray(size)
    known = {name: (code, off) for name, code, off in field_list}
    for name, value in fields.items():
        if name not in known:
            raise KeyError(f"{struct_name} has no field {name!r} (fields: {', '.join(known)})")
        code, off = known[name]
        struct.pack_into("<" + code, buf, off, float(value) if code == "f" else int(value))
    return bytes(buf)


def pack_params(**fields) -> bytes:
    """The mf_params struct as bytes; unspecified fields are 0."""
    return _pack("mf_params", PARAMS_FIELDS, PARAMS_SIZE, fields)


def unpack_params(data: bytes) -> dict:
    return {name: struct.unpack_from("<" + code, data, off)[0] for name, code, off in PARAMS_FIELDS}


def pack_append_params(**fields) -> bytes:
    """The mf_append_params struct (slot 8 of the append kernel) as bytes; unspecified fields are 0.
    Bind the result as the buffer of slot emu.APP_SLOT_APP_PARAMS."""
    return _pack("mf_append_params", APPEND_PARAMS_FIELDS, APPEND_PARAMS_SIZE, fields)


def unpack_append_params(data: bytes) -> dict:
    return {name: struct.unpack_from("<" + code, data, off)[0] for name, code, off in APPEND_PARAMS_FIELDS}


# ----------------------------------------------------------------------------- build


def _hash_files(h, paths):
    for p in sorted(set(paths)):
        h.update(str(p).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")


def _run(cmd, what):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed:\n$ {' '.join(map(str, cmd))}\n{proc.stderr}")
    return proc.stderr


_flags_cache: dict = {}


def _accepted(cxx, flags) -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text("_Float16 f(_Float16 a, _Float16 b) { return a + b; }\n")
        proc = subprocess.run([cxx, "--driver-mode=g++", *flags, "-c", str(src), "-o", str(Path(d) / "p.o")],
                              capture_output=True, text=True)
        return proc.returncode == 0


def _common_flags(cxx):
    """COMMON_FLAGS minus the optional ones this clang does not know (older or newer LLVM)."""
    if cxx in _flags_cache:
        return _flags_cache[cxx]
    flags = list(COMMON_FLAGS)
    if not _accepted(cxx, flags):
        optional = [("-Xclang", "-ffloat16-excess-precision=none"),
                    ("-mllvm", "-simplifycfg-sink-common=false"),
                    ("-mllvm", "-simplifycfg-hoist-common=false"),
                    ("-mllvm", "-enable-tail-merge=false")]
        base = [f for f in flags]
        for pair in optional:
            i = next(i for i in range(len(base) - 1) if (base[i], base[i + 1]) == pair)
            del base[i:i + 2]
        flags = base
        for pair in optional:
            if _accepted(cxx, base + list(pair)):
                flags += list(pair)
    _flags_cache[cxx] = flags
    return flags


def _runtime_object(cxx, version) -> Path:
    h = hashlib.sha256()
    common = _common_flags(cxx)
    h.update((cxx + "\0" + version + "\0" + " ".join(common + RUNTIME_FLAGS)).encode())
    _hash_files(h, [HEADER, RUNTIME])
    out = BUILD_DIR / f"mfemu_runtime-{h.hexdigest()[:16]}.o"
    if not out.exists():
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".o", dir=BUILD_DIR)
        os.close(fd)
        try:
            _run([cxx, "--driver-mode=g++", *common, *RUNTIME_FLAGS, "-I", str(EMU_DIR),
                  "-c", str(RUNTIME), "-o", tmp], "compiling the emulator runtime")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


_libs: dict = {}
_libs_lock = threading.Lock()


def _resolve_source(path) -> Path:
    p = Path(path)
    if not p.is_absolute():
        p = (REPO_ROOT / p) if (REPO_ROOT / p).exists() else p.resolve()
    if not p.exists():
        raise BuildError(f"no such kernel file: {path}")
    return p.resolve()


def build(path, defines=None, extra_flags=()) -> "Library":
    """Compile `path` (a .metal file) with `defines` for the emulator, or reuse the cache."""
    reason = unavailable_reason()
    if reason:
        raise EmuError("Metal emulator unavailable: " + reason)
    cxx, version, _ = find_compiler()
    src = _resolve_source(path)
    defs = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    flags = _common_flags(cxx) + KERNEL_FLAGS + list(extra_flags)
    rt = _runtime_object(cxx, version)
    h = hashlib.sha256()
    h.update("\0".join([cxx, version, *flags, *defs, str(src), rt.name]).encode())
    deps = [src, HEADER, RUNTIME, PARAMS_HEADER]
    for d in {src.parent, METAL_DIR}:
        deps += [p for p in d.iterdir() if p.suffix in (".h", ".metal") and p.is_file()]
    _hash_files(h, deps)
    key = h.hexdigest()[:20]
    with _libs_lock:
        if key in _libs:
            return _libs[key]
        out = BUILD_DIR / f"{src.stem}-{key}.so"
        build_log = ""
        if not out.exists():
            BUILD_DIR.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=BUILD_DIR)
            os.close(fd)
            fd, wrapper = tempfile.mkstemp(suffix=".cpp", prefix=f"{src.stem}-", dir=BUILD_DIR)
            with os.fdopen(fd, "w") as f:
                f.write(f'#include "mfemu.h"\n#include "{src}"\n')
            try:
                build_log = _run(
                    [cxx, "--driver-mode=g++", *flags, "-shared", "-I", str(EMU_DIR),
                     "-I", str(EMU_DIR / "include"), "-I", str(src.parent), "-I", str(METAL_DIR),
                     *defs, str(wrapper), str(rt), "-o", tmp, "-lpthread", "-Wl,-Bsymbolic"],
                    f"compiling {src.name} for the emulator")
                os.replace(tmp, out)
            finally:
                for p in (tmp, wrapper):
                    if os.path.exists(p):
                        os.unlink(p)
        lib = Library(out, src, dict(defines or {}), build_log)
        _libs[key] = lib
        return lib


# ----------------------------------------------------------------------------- launch


def _as_array(x):
    """(numpy array sharing memory with x, writeable?)"""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        t = x.detach()
        if t.device.type != "cpu":
            raise EmuError("torch tensors must be on the CPU for the emulator")
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.numpy()
    if isinstance(x, (bytes, bytearray, memoryview)):
        return np.frombuffer(x, dtype=np.uint8)
    raise TypeError(f"cannot bind {type(x).__name__} as a buffer (use a NumPy array)")


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    raw = np.empty(a.nbytes + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    buf = raw[off:off + a.nbytes]
    if a.nbytes:
        buf[:] = a.reshape(-1).view(np.uint8)
    return buf


_symbolizer = None


def _find_symbolizer():
    global _symbolizer
    if _symbolizer is None:
        comp = find_compiler()
        names = []
        if comp:
            m = re.search(r"-(\d+)$", comp[0])
            if m:
                names.append(f"llvm-symbolizer-{m.group(1)}")
        names += ["llvm-symbolizer", "llvm-symbolizer-19", "llvm-symbolizer-16", "addr2line"]
        _symbolizer = next((shutil.which(n) for n in names if shutil.which(n)), "")
    return _symbolizer


def _symbolize(lib_path: Path, offset: int) -> str:
    """'file:line' of the first frame outside the emulator header, or ''."""
    tool = _find_symbolizer()
    if not tool:
        return ""
    try:
        if "addr2line" in os.path.basename(tool):
            cmd = [tool, "-i", "-e", str(lib_path), hex(offset)]
        else:
            cmd = [tool, "--inlining", f"--obj={lib_path}", hex(offset), "--no-demangle"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    locs = re.findall(r"^(/[^\n]*?):(\d+)(?::\d+)?$", out, re.M)
    for f, line in locs:
        if not f.endswith("mfemu.h"):
            return f"{os.path.basename(f)}:{line}"
    return ""


class Library:
    """One compiled kernel file (for one set of defines)."""

    def __init__(self, path: Path, source: Path, defines: dict, build_log: str):
        self.path = Path(path)
        self.source = source
        self.defines = defines
        self.build_log = build_log
        self._dll = ctypes.CDLL(str(self.path), mode=getattr(os, "RTLD_LOCAL", 0))
        f = self._dll.mfemu_launch
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                      ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t), ctypes.c_int,
                      ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_ulonglong,
                      ctypes.c_char_p, ctypes.c_size_t]
        self._dll.mfemu_kernel_count.restype = ctypes.c_int
        self._dll.mfemu_kernel_name.restype = ctypes.c_char_p
        self._dll.mfemu_kernel_name.argtypes = [ctypes.c_int]
        self._lock = threading.Lock()

    def kernels(self):
        return [self._dll.mfemu_kernel_name(i).decode() for i in range(self._dll.mfemu_kernel_count())]

    def __repr__(self):
        return f"<emu.Library {self.source.name} {self.defines}>"

    def launch(self, kernel, grid, threadgroup, buffers=None, schedule="forward", seed=0):
        """Run `kernel` over `grid` threadgroups of `threadgroup` threads. Raises EmuError."""
        grid = _dims(grid, "grid")
        tg = _dims(threadgroup, "threadgroup")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
        buffers = dict(buffers or {})
        params = buffers.pop(SLOT_PARAMS, None)
        if params is None:
            params = bytes(PARAMS_SIZE)
        if not isinstance(params, (bytes, bytearray)):
            params = _as_array(params).tobytes()
        if len(params) != PARAMS_SIZE:
            raise ValueError(f"params (slot 9) must be exactly {PARAMS_SIZE} bytes (sizeof(mf_params)), "
                             f"got {len(params)}")
        ptrs = (ctypes.c_void_p * NUM_SLOTS)()
        sizes = (ctypes.c_size_t * NUM_SLOTS)()
        staged = []
        for slot, obj in buffers.items():
            if not isinstance(slot, int) or not 0 <= slot < NUM_SLOTS or slot == SLOT_PARAMS:
                raise ValueError(f"buffer slot must be an int in 0..{NUM_SLOTS - 1} other than {SLOT_PARAMS} "
                                 f"(the params), got {slot!r}")
            arr = _as_array(obj)
            if not arr.flags.c_contiguous:
                raise ValueError(f"buffer for slot {slot} must be C-contiguous")
            copy = _aligned_copy(arr)
            staged.append((arr, copy))
            ptrs[slot] = copy.ctypes.data if arr.nbytes else 0
            sizes[slot] = arr.nbytes
        pbuf = ctypes.create_string_buffer(bytes(params), PARAMS_SIZE)
        err = ctypes.create_string_buffer(8192)
        g = (ctypes.c_uint * 3)(*grid)
        t = (ctypes.c_uint * 3)(*tg)
        with self._lock:
            rc = self._dll.mfemu_launch(kernel.encode(), g, t, ptrs, sizes, NUM_SLOTS,
                                        ctypes.cast(pbuf, ctypes.c_void_p), PARAMS_SIZE,
                                        SCHEDULES.index(schedule), int(seed) & (2**64 - 1),
                                        err, len(err))
        if rc != 0:
            msg = err.value.decode(errors="replace")

            def where(m):
                loc = _symbolize(self.path, int(m.group(1), 16))
                return f" at {loc}" if loc else f" at {self.path.name}+{m.group(1)}"

            msg = re.sub(r" @@PC:(0x[0-9a-fA-F]+)@@", where, msg)
            raise EmuError(f"{msg}\n  [{self.source.name} {self.defines}, schedule={schedule}, seed={seed}]")
        for arr, copy in staged:
            if arr.nbytes and arr.flags.writeable:
                arr.reshape(-1).view(np.uint8)[:] = copy


def _dims(d, what):
    if isinstance(d, int):
        d = (d,)
    d = tuple(int(x) for x in d)
    if not 1 <= len(d) <= 3 or any(x < 0 or x >= 2**32 for x in d):
        raise ValueError(f"{what} must be 1 to 3 non-negative sizes, got {d!r}")
    return d + (1,) * (3 - len(d))
