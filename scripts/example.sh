#!/usr/bin/env bash
# Builds and runs an example on the GPU when one is present and nvcc built it, else on the CPU
# reference backend. Without a name: the main example (QAD of a MoE expert layer: NVFP4 base + LoRA
# trained to match a bf16 teacher). `scripts/example.sh moe_block [options]`: the second example, a
# Qwen3-MoE-like block with LoRA on both expert projections (`--tp N --ep M` for N × M ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
example=qad_finetune
if [[ "${1:-}" == moe_block ]]; then
  example=moe_block
  shift
fi
scripts/setup.sh build
[[ -x /usr/local/cuda/bin/nvcc ]] && export PATH="/usr/local/cuda/bin:$PATH"
ninja -C build "examples/$example" >/dev/null
"build/examples/$example" "$@"
