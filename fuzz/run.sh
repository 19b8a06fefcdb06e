#!/usr/bin/env bash
# Fuzzes the safetensors reader: builds fuzz/safetensors_fuzz.cpp with clang++ (libFuzzer, ASan,
# UBSan) into OUT_DIR when it is out of date, then runs it for SECONDS (default 60) from the seed
# corpus fuzz/corpus. New inputs go to OUT_DIR/fuzz-corpus, crashing ones to OUT_DIR/fuzz-artifacts.
# Exits 77 (skipped, for meson test) when clang++ or its fuzzer runtime is missing.
# Usage: fuzz/run.sh OUT_DIR [SECONDS]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mkdir -p "$1" && cd "$1" && pwd)"
seconds="${2:-60}"
cxx="${CLANGXX:-clang++}"
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)

binary="$out/safetensors_fuzz"
if [[ ! -x $binary || -n $(find "$here/safetensors_fuzz.cpp" "$here/../include" -newer "$binary" -print -quit) ]]; then
  if ! command -v "$cxx" >/dev/null; then
    echo "no $cxx: the fuzz run is skipped (Debian: clang libclang-rt-dev)"
    exit 77
  fi
  if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
      "$cxx" "${flags[@]}" -x c++ - -o "$out/fuzz-probe" 2>/dev/null; then
    echo "$cxx cannot link -fsanitize=fuzzer: the fuzz run is skipped (Debian: libclang-rt-dev)"
    exit 77
  fi
  rm -f "$out/fuzz-probe"
  "$cxx" "${flags[@]}" -I"$here/../include" "$here/safetensors_fuzz.cpp" -o "$binary"
fi
mkdir -p "$out/fuzz-corpus" "$out/fuzz-artifacts"
exec "$binary" -max_total_time="$seconds" -print_final_stats=1 -dict="$here/safetensors.dict" \
  -artifact_prefix="$out/fuzz-artifacts/" \
  "$out/fuzz-corpus" "$here/corpus"
