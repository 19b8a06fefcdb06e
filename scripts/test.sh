#!/usr/bin/env bash
# Builds everything and runs the test suites. GPU suites skip (exit 77) where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
[[ -x /usr/local/cuda/bin/nvcc ]] && export PATH="/usr/local/cuda/bin:$PATH"
ninja -C build
status=0
meson test -C build --print-errorlogs "$@" | tee build/test-summary.txt || status=$?
ok=$(sed -n 's/^Ok:[[:space:]]*\([0-9]*\).*/\1/p' build/test-summary.txt)
fail=$(sed -n 's/^Fail:[[:space:]]*\([0-9]*\).*/\1/p' build/test-summary.txt)
skipped=$(sed -n 's/^Skipped:[[:space:]]*\([0-9]*\).*/\1/p' build/test-summary.txt)
echo "${ok:-0} passed, ${fail:-0} failed, ${skipped:-0} skipped"
exit "$status"
