#!/usr/bin/env bash
# Builds mtlflash._C with AddressSanitizer + UndefinedBehaviorSanitizer into a scratch directory
# and runs the tests that exercise the C core against it. Any sanitizer report or test failure
# makes the script exit non-zero. The normal (editable) install is never touched: the sanitized
# package lives in its own directory and is put first on the import path for these runs only.
#
#   .ci/sanitize.sh              build + canaries + tests
#   SANITIZE_KEEP=1              keep the scratch directory (printed at the end)
#   SANITIZE_DIR=/path           use (and reuse) this scratch directory
#   SANITIZE_TESTS="tests/x.py"  run these test files instead of the default list
#   SANITIZE_SRC=/path           build the C core from this source tree (default: this checkout)
#
# Why each runtime setting is there:
#   LD_PRELOAD=libasan.so       python itself is not instrumented, so the ASan runtime must be the
#                               first library loaded to interpose malloc/free for every allocation.
#   LD_PRELOAD+=libstdc++.so.6  ASan looks up the real __cxa_throw when it starts; python does not
#                               link libstdc++, so without this the first C++ exception thrown by
#                               torch (e.g. an error raised inside autograd) hits an ASan CHECK.
#   PYTHONMALLOC=malloc         bypass pymalloc's arenas so ASan sees (and guards) every Python
#                               object allocation, including the buffers numpy and torch hand us.
#   detect_leaks=0              the interpreter and torch keep global state alive until exit on
#                               purpose; LeakSanitizer would report those. Leaks of our own objects
#                               are checked by tests/test_leaks.py (refcounts and RSS) instead.
#   halt_on_error=1             (ASan and UBSan) the first report aborts the process.
#   -fno-sanitize-recover=all   UBSan findings (misaligned loads, signed overflow, shifts, bounds)
#                               are fatal, not warnings that scroll past.
#   ASAN_OPTIONS=log_path       every ASan report (also from test subprocesses, whose stderr a
#                               test may capture) lands in a file; any such file fails the run.
#                               UBSan (GCC's libubsan next to libasan) ignores log_path and writes
#                               to stderr, so pytest runs with --capture=sys (C-level writes to
#                               fd 2 stay visible) and the log is searched for "runtime error".
# torch 2.x CPU wheels needed none of protect_shadow_gap=0, detect_odr_violation=0 or
# alloc_dealloc_mismatch=0 here; they are left out so that nothing is masked.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
CC_BIN="${CC:-gcc}"
START=$(date +%s)

if [[ -n "${SANITIZE_DIR:-}" ]]; then
  WORK="$SANITIZE_DIR"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d -t mtlflash-sanitize.XXXXXX)"
fi
cleanup() {
  if [[ -z "${SANITIZE_KEEP:-}" && -z "${SANITIZE_DIR:-}" ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

say() { printf '[sanitize] %s\n' "$*"; }
fail() {
  say "FAILED: $*"
  say "scratch directory: $WORK (kept)"
  SANITIZE_KEEP=1
  exit 1
}

# --- 1. build ------------------------------------------------------------------------------
say "building mtlflash._C with -fsanitize=address,undefined in $WORK/build"
"$PY" - <<'PYEOF' || fail "python with numpy is needed to configure the build"
import numpy, sys
PYEOF
SRC="${SANITIZE_SRC:-$ROOT}"
if ! cmake -S "$SRC" -B "$WORK/build" \
      -DCMAKE_C_COMPILER="$CC_BIN" \
      -DCMAKE_BUILD_TYPE=Debug \
      -DMTLFLASH_SANITIZE=ON \
      -DMTLFLASH_INSTALL_SHIM=OFF \
      -DCMAKE_C_FLAGS="-fno-sanitize-recover=all" \
      -DPython_EXECUTABLE="$(command -v "$PY")" >"$WORK/cmake.log" 2>&1; then
  cat "$WORK/cmake.log"
  fail "cmake configure"
fi
if ! cmake --build "$WORK/build" -j "$(nproc 2>/dev/null || echo 2)" >"$WORK/build.log" 2>&1; then
  cat "$WORK/build.log"
  fail "cmake build"
fi
SO="$(ls "$WORK"/build/_C*.so 2>/dev/null | head -n1)"
[[ -n "$SO" ]] || fail "no _C*.so produced"

# The package: the Python sources of this checkout plus the sanitized extension.
rm -rf "$WORK/pkg"
mkdir -p "$WORK/pkg"
cp -r "$SRC/python/mtlflash" "$WORK/pkg/mtlflash"
find "$WORK/pkg/mtlflash" -name '*.so' -delete
cp "$SO" "$WORK/pkg/mtlflash/"
# An editable install puts a finder at the front of sys.meta_path that maps `mtlflash` to the
# checkout whatever sys.path says; drop it in these processes so the package above is imported.
cat >"$WORK/pkg/sitecustomize.py" <<'PYEOF'
import sys

sys.meta_path[:] = [f for f in sys.meta_path
                    if not (type(f).__name__.startswith("ScikitBuild") and "mtlflash" in getattr(f, "pkgs", ()))]
PYEOF

ASAN_RT="$("$CC_BIN" -print-file-name=libasan.so)"
STDCXX="$("$CC_BIN" -print-file-name=libstdc++.so.6)"
[[ -f "$ASAN_RT" ]] || fail "ASan runtime not found ($ASAN_RT)"
LOGS="$WORK/logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"

sanitized() {
  env LD_PRELOAD="$ASAN_RT $STDCXX" \
      PYTHONMALLOC=malloc \
      PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}" \
      ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$LOGS/asan" \
      UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
      MTLFLASH_SANITIZED=1 \
      "$@"
}

# --- 2. the right extension, and the sanitizers really report ---------------------------------
where="$(cd "$WORK" && sanitized "$PY" -c 'import mtlflash._C as c; print(c.__file__)' 2>&1)" \
  || fail "importing the sanitized package: $where"
[[ "$where" == "$WORK/pkg/mtlflash/"* ]] || fail "imported $where instead of the sanitized build"
say "extension under test: $where"

# Canaries: a heap overflow and a signed overflow built with the same flags must each be caught,
# so that "zero reports" below means something.
cat >"$WORK/canary.c" <<'CEOF'
#include <stdlib.h>
int heap_overflow(int n) { volatile char *p = malloc(n); int r = p[n]; free((void *)p); return r; }
int signed_overflow(int x) { return x + 0x7fffffff; }
CEOF
"$CC_BIN" -shared -fPIC -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all \
  -o "$WORK/canary.so" "$WORK/canary.c" || fail "building the canary"
for probe in heap_overflow signed_overflow; do
  clog="$WORK/canary-$probe"
  rm -f "$clog".*
  env LD_PRELOAD="$ASAN_RT $STDCXX" PYTHONMALLOC=malloc \
      ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$clog" \
      UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
      "$PY" -c "import ctypes; ctypes.CDLL('$WORK/canary.so').$probe(16)" >"$clog.out" 2>&1
  rc=$?
  if [[ $rc -eq 0 ]] || ! cat "$clog".* | grep -qE 'ERROR: AddressSanitizer|runtime error:'; then
    fail "canary $probe was not reported (rc=$rc): the sanitizer setup is broken"
  fi
done
say "canaries: heap overflow and signed overflow are both reported"

# --- 3. the tests ------------------------------------------------------------------------------
DEFAULT_TESTS="tests/test_api.py tests/test_numerics.py tests/test_bad_input_more.py \
tests/test_adversarial.py tests/test_fuzz.py tests/test_threads.py tests/test_leaks.py tests/test_kvcache.py \
tests/test_kvcache_bad_input.py tests/test_backward.py tests/test_fuzz_backward.py tests/test_leaks_backward.py \
tests/test_dropout.py"
TESTS=()
for t in ${SANITIZE_TESTS:-$DEFAULT_TESTS}; do
  [[ -f "$ROOT/$t" ]] && TESTS+=("$t") || say "note: $t not found, skipped"
done
say "running ${#TESTS[@]} test files under ASan+UBSan"
T0=$(date +%s)
(cd "$ROOT" && sanitized env MTLFLASH_FUZZ="${MTLFLASH_FUZZ:-sanitize}" \
   "$PY" -m pytest -q -p no:cacheprovider --capture=sys -m "not slow and not mac" "${TESTS[@]}") 2>&1 | tee "$WORK/pytest.log" | tail -n 25
rc=${PIPESTATUS[0]}
T1=$(date +%s)

# --- 4. verdict --------------------------------------------------------------------------------
ub=$(grep -cE 'runtime error:|UndefinedBehaviorSanitizer' "$WORK/pytest.log")
reports=$(( $(ls "$LOGS" 2>/dev/null | wc -l) + ub ))
if [[ $ub -gt 0 ]]; then
  say "UBSan reports in the test output:"
  grep -E -A 12 'runtime error:' "$WORK/pytest.log" | head -n 80
fi
if [[ $reports -gt 0 ]]; then
  for f in "$LOGS"/*; do
    say "report in $f:"
    head -n 60 "$f"
  done
fi
summary="$(grep -E '[0-9]+ (passed|failed|errors?)( |,|$)' "$WORK/pytest.log" | tail -n 1)"
say "summary: build ok; tests: ${summary:-no pytest summary} ($((T1 - T0)) s); sanitizer reports: $reports; total $(( $(date +%s) - START )) s"
if [[ $rc -ne 0 ]]; then
  if grep -qE 'AddressSanitizer|runtime error|UndefinedBehaviorSanitizer' "$WORK/pytest.log"; then
    fail "a sanitizer aborted the test run (see the report above)"
  fi
  fail "pytest exited with status $rc"
fi
[[ $reports -eq 0 ]] || fail "$reports sanitizer report(s)"
say "OK: zero AddressSanitizer/UndefinedBehaviorSanitizer reports"
