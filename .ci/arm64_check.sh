#!/usr/bin/env bash
# The CPU backend's arm64 path, checked on an x86-64 Linux machine: the code a Mac's CPU runs
# for CPU tensors and NumPy arrays (the baseline NEON path) is compiled only for x86 otherwise.
#
#   1. cross-compile the C core (problem + CPU backend) and tests/native/cpu_numerics.c for
#      aarch64 with Debian's cross compiler, -Wall -Wextra -Werror;
#   2. run it under qemu user-mode emulation: every case of the option grid against an fp64
#      reference, 1 and 3 threads bitwise equal;
#   3. configure + build the whole extension with the aarch64 toolchain file: the target (not this
#      x86 machine) must pick the CPU paths, so no AVX file may be compiled.
# Needs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user (.ci/run installs them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CC="${AARCH64_CC:-aarch64-linux-gnu-gcc}"
QEMU="${QEMU_AARCH64:-qemu-aarch64}"
SYSROOT="${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}"
WORK="$(mktemp -d -t mtlflash-arm64.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
say() { printf '[arm64] %s\n' "$*"; }
for tool in "$CC" "$QEMU"; do
  command -v "$tool" >/dev/null || { say "FAILED: $tool not found"; exit 1; }
done
t0=$(date +%s)

say "1. cross-compiling the C core and the numerics driver with $("$CC" --version | head -n1)"
cd "$ROOT"
SRCS="tests/native/cpu_numerics.c csrc/common.c csrc/problem.c csrc/cpu/pool.c csrc/cpu/attn.c csrc/cpu/kernel_generic.c"
# shellcheck disable=SC2086
"$CC" -O2 -std=gnu11 -Wall -Wextra -Werror -Icsrc -I. $SRCS -lm -lpthread -o "$WORK/cpu_numerics"
file "$WORK/cpu_numerics" 2>/dev/null | sed 's/^/[arm64]   /' || true

say "2. running it under $QEMU (user-mode emulation)"
"$QEMU" -L "$SYSROOT" "$WORK/cpu_numerics" | tee "$WORK/numerics.log" | grep -v '^ok ' || true
status=${PIPESTATUS[0]}
grep -q "SIMD path 'generic" "$WORK/numerics.log" || { say "FAILED: not the baseline path"; exit 1; }
[[ $status -eq 0 ]] && grep -q '^PASS' "$WORK/numerics.log" || { say "FAILED: numerics (exit $status)"; exit 1; }
say "   $(grep -c '^ok ' "$WORK/numerics.log") cases ok under emulation"

say "3. the extension configured and built for aarch64 (toolchain file; no x86 file may compile)"
PY="${PYTHON:-python}"
INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NPINC="$("$PY" -c 'import numpy; print(numpy.get_include())')"
cmake -S "$ROOT" -B "$WORK/build" -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/toolchains/aarch64-linux-gnu.cmake" \
  -DPython_EXECUTABLE="$(command -v "$PY")" -DPython_INCLUDE_DIR="$INC" -DPython_NumPy_INCLUDE_DIR="$NPINC" \
  -DMTLFLASH_INSTALL_SHIM=OFF -DCMAKE_C_FLAGS="-Werror" >"$WORK/cmake.log" 2>&1 || { cat "$WORK/cmake.log"; exit 1; }
grep 'mtlflash:' "$WORK/cmake.log" | sed 's/^/[arm64]   /'
grep -q 'target architectures: arm64; x86 SIMD units: none' "$WORK/cmake.log" \
  || { say "FAILED: the aarch64 configuration chose x86 files"; exit 1; }
cmake --build "$WORK/build" -j "$(nproc 2>/dev/null || echo 2)" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
if grep -q 'kernel_avx' "$WORK/build.log"; then say "FAILED: an AVX file was compiled for aarch64"; exit 1; fi
so="$(ls "$WORK"/build/_C*.so)"
file "$so" | grep -q 'aarch64' || { say "FAILED: $so is not an aarch64 object"; exit 1; }
say "   built $(basename "$so") for aarch64, without kernel_avx2.c/kernel_avx512.c"
say "OK ($(( $(date +%s) - t0 )) s)"
