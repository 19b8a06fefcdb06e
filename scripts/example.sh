#!/usr/bin/env bash
# Builds and runs the main example (a MoE expert layer with two LoRA adapters, trained for a few
# steps): on the GPU when one is present and nvcc built it, else on the CPU reference backend.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
[[ -x /usr/local/cuda/bin/nvcc ]] && export PATH="/usr/local/cuda/bin:$PATH"
ninja -C build examples/two_adapters >/dev/null
build/examples/two_adapters "$@"
