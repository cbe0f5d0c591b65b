#!/usr/bin/env bash
# Compile check of the Objective-C Metal bridge on Linux: clang compiles csrc/metal/bridge.m for
# arm64-apple-macos13 with ARC, -fsyntax-only -Wall -Wextra -Werror, against the declarations of
# exactly the Foundation/Metal subset the bridge uses (tests/macos_decls/, each declaration citing
# its Apple documentation page), once as the macOS 14 SDK and once as the macOS 15 SDK declares
# them (bridge.m has an SDK-15-only branch). It catches syntax, ARC and type errors, unknown
# methods and unguarded use of newer API; it cannot catch what only the real SDK or a GPU knows.
#
# First it proves it can fail: four broken copies of the bridge (a syntax error, an ARC error, a
# type error, an unguarded macOS-15 API) must each be rejected.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLANG="${CLANG:-}"
if [[ -z "$CLANG" ]]; then
  for c in clang-16 clang-19 clang-18 clang-17 clang-15 clang; do
    command -v "$c" >/dev/null && { CLANG="$c"; break; }
  done
fi
[[ -n "$CLANG" ]] || { echo "[objc] FAILED: no clang found" >&2; exit 1; }
say() { printf '[objc] %s\n' "$*"; }
WORK="$(mktemp -d -t mtlflash-objc.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

check() { # check <file> <sdk>
  "$CLANG" --target=arm64-apple-macos13 -x objective-c -fobjc-arc -fblocks -fsyntax-only \
    -Wall -Wextra -Werror -nostdlibinc -DMF_DECLS_SDK="$2" \
    -I"$ROOT/tests/macos_decls" -I"$ROOT/tests/macos_decls/libc" -I"$ROOT/csrc" -I"$ROOT" "$1"
}

say "$("$CLANG" --version | head -n1)"
BRIDGE="$ROOT/csrc/metal/bridge.m"
mutate() { # mutate <name> <perl substitution>
  cp "$BRIDGE" "$WORK/$1.m"
  perl -0pi -e "$2" "$WORK/$1.m"
  cmp -s "$BRIDGE" "$WORK/$1.m" && { say "FAILED: mutation $1 did not apply"; exit 1; }
  if check "$WORK/$1.m" 150000 >"$WORK/$1.log" 2>&1; then
    say "FAILED: the broken copy '$1' compiled: the check cannot see such errors"; exit 1
  fi
  say "  rejects $1: $(grep -m1 'error:' "$WORK/$1.log" | sed 's/.*error: //')"
}
say "self-test: broken copies of bridge.m must be rejected"
mutate syntax 's/\[cb commit\];/[cb commit]/'
mutate arc 's/return \(__bridge id<MTLBuffer>\)\(void \*\)\(uintptr_t\)handle;/void *p = (void *)(uintptr_t)handle; id<MTLBuffer> b = (id<MTLBuffer>)p; return b;/'
mutate type 's/\[enc setBytes:&plan->params length:sizeof\(mf_params\) atIndex:MF_SLOT_PARAMS\];/[enc setBytes:&plan->params length:sizeof(mf_params) atIndex:\@"params"];/'
mutate unguarded 's/if \(\@available\(macOS 15.0, \*\)\) \{\n(\s*)opt.mathMode/if (1) {\n$1opt.mathMode/'

for sdk in 140000 150000; do
  check "$BRIDGE" "$sdk" || { say "FAILED: csrc/metal/bridge.m (declarations of SDK $sdk)"; exit 1; }
  say "csrc/metal/bridge.m compiles for arm64-apple-macos13 against the macOS ${sdk:0:2} SDK subset: no error, no warning"
done
say "OK"
