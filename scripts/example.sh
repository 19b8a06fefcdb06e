#!/usr/bin/env bash
# Builds and runs the main example (QAD of a MoE expert layer: NVFP4 base + LoRA trained to match a
# bf16 teacher): on the GPU when one is present and nvcc built it, else on the CPU reference backend.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
[[ -x /usr/local/cuda/bin/nvcc ]] && export PATH="/usr/local/cuda/bin:$PATH"
ninja -C build examples/qad_finetune >/dev/null
build/examples/qad_finetune "$@"
