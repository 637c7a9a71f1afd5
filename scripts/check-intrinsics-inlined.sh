#!/usr/bin/env bash
# Fails when a release binary calls a SIMD intrinsic as a function.
#
# An intrinsic (`core::arch`'s `_mm512_loadu_ps`, ...) is one instruction only when it is
# inlined into a function compiled with its target features. A closure handed to a generic
# helper (`std::array::from_fn`, `Iterator::map(..).collect()`) inside a `#[target_feature]`
# function may be compiled out of line, without the features; then every intrinsic in it is a
# call. Which closures LLVM inlines changes with unrelated code: an added kernel elsewhere in
# `simd/src/distance.rs` once made the 4-bit table quantisation 2x slower and IVF search
# 1.6x slower this way, with the same results bit for bit, so no test saw it.
#
#   scripts/check-intrinsics-inlined.sh [BINARY...]   (default: the release pqcache binaries)
#
# Dependencies' own out-of-line intrinsics (faer's gemm, candle, feature detection) are theirs.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v objdump >/dev/null; then
  echo "skipped: objdump (binutils) not installed"
  exit 0
fi
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(target/release/pqcache target/release/pqcache-llm)
theirs='gemm|candle_core|std_detect|compiler_builtins|blake3'
status=0
for bin in "${bins[@]}"; do
  if [ ! -f "$bin" ]; then
    echo "missing: $bin (build it first: cargo build --release --workspace)"
    status=1
    continue
  fi
  calls=$(objdump -d --no-show-raw-insn "$bin" |
    awk '/^[0-9a-f]+ <.*>:$/ { fn = $2 } /call.*core_arch/ { print fn " -> " $NF }' |
    c++filt | grep -Ev "^<($theirs)|^<<($theirs)" | sort | uniq -c || true)
  if [ -n "$calls" ]; then
    echo "$bin calls intrinsics out of line (write the closure as a loop in the target-feature function):"
    echo "$calls"
    status=1
  else
    echo "$bin: every intrinsic inlined"
  fi
done
exit $status
