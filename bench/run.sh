#!/usr/bin/env bash
# The benchmark of record, on a GPU machine: our LoRA kernels and the PyTorch anchors on the same
# shapes in one run, then the joined table. Usage: bench/run.sh BIN_DIR OUT_DIR [bench_lora args...]
# BIN_DIR holds bench_lora (built by `ninja -C build bench/bench_lora`); OUT_DIR receives
# ours.json, torch.json and report.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin_dir="$1"
out_dir="$2"
shift 2
mkdir -p "$out_dir"
"$bin_dir/bench_lora" --out "$out_dir/ours.json" "$@"
PYTHONUNBUFFERED=1 python3 "$here/torch_anchors.py" --out "$out_dir/torch.json"
python3 "$here/report.py" --ours "$out_dir/ours.json" --torch "$out_dir/torch.json" --markdown-out "$out_dir/report.md"
