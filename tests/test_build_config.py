"""The build's configuration: CPU paths chosen by the target, the macOS deployment target, and a
Metal bridge that can never fail an install (MTLFLASH_METAL=AUTO falls back to the stub)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")


def _required():
    return bool(os.environ.get("CI") or os.environ.get("MTLFLASH_EMU_REQUIRED"))


def _clang():
    for c in ("clang-16", "clang-19", "clang-18", "clang-17", "clang-15", "clang"):
        if shutil.which(c):
            return c
    if _required():
        pytest.fail("clang is needed for this test in CI")
    pytest.skip("clang is not installed")


@needs_cmake
@pytest.mark.parametrize(
    "defines, archs, x86",
    [
        ({"CMAKE_SYSTEM_PROCESSOR": "x86_64"}, "x86_64", "yes"),
        ({"CMAKE_SYSTEM_PROCESSOR": "aarch64"}, "arm64", "no"),
        # an arm64 build on an Intel Mac: the target decides, not the machine running CMake
        ({"APPLE": "1", "CMAKE_SYSTEM_PROCESSOR": "x86_64", "CMAKE_OSX_ARCHITECTURES": "arm64"}, "arm64", "no"),
        ({"APPLE": "1", "CMAKE_SYSTEM_PROCESSOR": "arm64", "CMAKE_OSX_ARCHITECTURES": "x86_64"}, "x86_64", "yes"),
        ({"APPLE": "1", "CMAKE_SYSTEM_PROCESSOR": "x86_64", "CMAKE_OSX_ARCHITECTURES": "arm64;x86_64"},
         "arm64;x86_64", "x86_64 slice only"),
        ({"APPLE": "1", "CMAKE_SYSTEM_PROCESSOR": "arm64"}, "arm64", "no"),
    ],
)
def test_simd_units_follow_the_target(defines, archs, x86):
    args = [CMAKE] + [f"-D{k}={v}" for k, v in defines.items()] + ["-P", str(ROOT / "cmake/target_arch.cmake")]
    r = subprocess.run(args, capture_output=True, text=True, check=True)
    assert f"target archs: {archs}; x86 SIMD units: {x86}" in r.stderr + r.stdout


def test_universal2_flags_reach_the_x86_slice_only():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "SHELL:-Xarch_x86_64 " in text
    for f in ("kernel_avx2.c", "kernel_avx512.c"):
        src = (ROOT / "csrc/cpu" / f).read_text()
        assert "#if defined(__x86_64__)" in src, f"{f} must compile to nothing in an arm64 slice"


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_macos_deployment_target_13(monkeypatch):
    cfg = _pyproject()
    overrides = cfg["tool"]["scikit-build"].get("overrides", [])
    darwin = [o for o in overrides if o.get("if", {}).get("platform-system") == "darwin"]
    assert darwin and darwin[0]["cmake"]["define"]["CMAKE_OSX_DEPLOYMENT_TARGET"] == "13.0"
    assert cfg["tool"]["cibuildwheel"]["macos"]["environment"]["MACOSX_DEPLOYMENT_TARGET"] == "13.0"
    assert 'set(CMAKE_OSX_DEPLOYMENT_TARGET "13.0"' in (ROOT / "CMakeLists.txt").read_text()
    # scikit-build-core tags the wheel from that define: macosx_13_0_arm64
    macos = pytest.importorskip("scikit_build_core.builder.macos")
    import platform

    monkeypatch.setattr(platform, "mac_ver", lambda: ("15.2", ("", "", ""), "arm64"))  # a newer Mac builds it
    try:
        ver = macos.get_macosx_deployment_target(arm=True, cmake_defines={"CMAKE_OSX_DEPLOYMENT_TARGET": "13.0"})
    except TypeError:
        pytest.skip("this scikit-build-core reads only MACOSX_DEPLOYMENT_TARGET (cibuildwheel sets it)")
    assert (ver.major, ver.minor) == (13, 0)


# --- the Metal bridge: a compile error in bridge.m must not fail the build ----------------------

def _build(tmp_path, bridge_source, extra=()):
    """Configures and builds the extension with the AUTO probe run on this host against
    tests/macos_decls; returns (configure output, package dir holding the built extension)."""
    clang = _clang()
    decls = ROOT / "tests/macos_decls"
    probe_flags = ";".join(["--target=arm64-apple-macos13", "-fblocks", "-nostdlibinc", "-fsyntax-only",
                            f"-I{decls}", f"-I{decls / 'libc'}"])
    build = tmp_path / "build"
    cfg = subprocess.run(
        [CMAKE, "-S", str(ROOT), "-B", str(build), "-DMTLFLASH_INSTALL_SHIM=OFF", f"-DPython_EXECUTABLE={sys.executable}",
         f"-DCMAKE_OBJC_COMPILER={shutil.which(clang)}", "-DMTLFLASH_METAL=AUTO",
         f"-DMTLFLASH_METAL_BRIDGE_SOURCE={bridge_source}", *extra]
        + ([] if sys.platform == "darwin" else ["-DMTLFLASH_METAL_PROBE_ON_HOST=ON", f"-DMTLFLASH_METAL_PROBE_FLAGS={probe_flags}"]),
        capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run([CMAKE, "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout + b.stderr
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "python/mtlflash", pkg / "mtlflash", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    so = next(build.glob("_C*.so"))
    shutil.copy(so, pkg / "mtlflash" / so.name)
    # an editable install's finder would map `mtlflash` to the checkout whatever sys.path says
    (pkg / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path
                            if not (type(f).__name__.startswith("ScikitBuild") and "mtlflash" in getattr(f, "pkgs", ()))]
    """))
    return cfg.stdout + cfg.stderr, pkg


def _backend(pkg):
    code = ("import json, mtlflash, numpy as np; i = mtlflash.backend_info(); "
            "q = np.ones((1, 4, 2, 8), np.float32); o = mtlflash.flash_attn_func(q, q, q); "
            "print(json.dumps([mtlflash.__file__, i['metal'], i['tiers']['vec']['reason'], float(o.sum())]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=pkg,
                       env={**os.environ, "PYTHONPATH": str(pkg)})
    assert r.returncode == 0, r.stderr
    import json

    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_cmake
def test_broken_bridge_falls_back_to_the_stub(tmp_path):
    broken = tmp_path / "bridge.m"
    text = (ROOT / "csrc/metal/bridge.m").read_text()
    broken.write_text(text.replace("[cb commit];", "[cb commit] /* injected: missing semicolon */"))
    log, pkg = _build(tmp_path, broken)
    assert "the Metal bridge does not compile; building without Metal" in log
    where, metal, reason, total = _backend(pkg)
    assert where.startswith(str(pkg))
    assert metal.startswith("not built: bridge.m failed to compile at build time:")
    assert reason.startswith("Metal backend not built: bridge.m failed to compile at build time:")
    assert "expected ';'" in reason
    assert total == pytest.approx(64.0)  # the CPU backend works in that build


@needs_cmake
def test_good_bridge_passes_the_probe(tmp_path):
    log, pkg = _build(tmp_path, ROOT / "csrc/metal/bridge.m")
    assert "does not compile" not in log
    if sys.platform != "darwin":
        _, metal, reason, _ = _backend(pkg)
        assert reason == "Metal backend not built: this build is not for macOS (the bridge probe compiled)"


@needs_cmake
def test_metal_on_outside_macos_and_bad_values_fail_configure(tmp_path):
    if sys.platform == "darwin":
        pytest.skip("ON is legal on macOS")
    for value, msg in (("ON", "builds only for macOS"), ("MAYBE", "must be ON, OFF or AUTO")):
        r = subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(tmp_path / value), f"-DMTLFLASH_METAL={value}",
                            f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True)
        assert r.returncode != 0 and msg in r.stderr


def test_installed_build_reports_why_metal_is_missing():
    import mtlflash

    info = mtlflash.backend_info()
    if info["metal"].startswith("built"):
        pytest.skip("this build has the Metal bridge")
    assert re.match(r"Metal backend not built: .+", info["tiers"]["vec"]["reason"])
