#!/usr/bin/env bash
# The MoE block benchmark of record, on a GPU machine: the training step of examples/moe_block
# (--bench: forward + backward + AdamW, base frozen, LoRA r = 16 on fc1 and fc2) and the same block
# in PyTorch (bench/torch_moe_block.py) on the Qwen3-30B-A3B block shape, in one run, then the
# joined row. Usage: bench/moe_block.sh BUILD_DIR OUT_DIR [moe_block args...]
# BUILD_DIR holds examples/moe_block (built by `ninja -C build examples/moe_block`); OUT_DIR
# receives ours.json, torch.json and report.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build_dir="$1"
out_dir="$2"
shift 2
mkdir -p "$out_dir"
shape=(--hidden 2048 --ffn 768 --experts 128 --top-k 8 --tokens 8192 --rank 16)
"$build_dir/examples/moe_block" --bench "${shape[@]}" --graph auto --json "$out_dir/ours.json" "$@"
PYTHONUNBUFFERED=1 python3 "$here/torch_moe_block.py" "${shape[@]}" --out "$out_dir/torch.json" \
  --compare "$out_dir/ours.json" | tee "$out_dir/report.md"
