#!/usr/bin/env bash
# Resume equivalence in fresh processes: qad_finetune run straight for 12 steps, and resumed from
# that run's step-5 checkpoint, with clipping, warm-up and cosine decay, and a NaN batch before and
# one after the checkpoint. The final adapters and the step-10 checkpoints (adapter and optimizer
# state) must be equal byte for byte. A resume with other optimizer settings must fail naming the
# difference, write no adapter, and leave the checkpoint untouched.
#
# Usage: test_resume.sh QAD_FINETUNE WORK_DIR [--cpu | --gpu]   (--gpu: exit 77, skipped, without a GPU)
set -euo pipefail
bin=$1 work=$2 device=${3:---cpu}
device_flag=(--cpu)
if [[ $device == --gpu ]]; then
  if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no GPU: skipped"
    exit 77
  fi
  device_flag=()
fi
rm -rf "$work"
mkdir -p "$work"
common=("${device_flag[@]}" --experts 4 --in 128 --out 64 --rows 256 --batches 3 --steps 12 --rank 8 --clip 0.05
        --warmup 2 --schedule cosine --log-every 4 --save-every 5 --inject-nan 3,8)

"$bin" "${common[@]}" --checkpoint "$work/straight" --output "$work/straight.safetensors" >"$work/straight.log"
"$bin" "${common[@]}" --checkpoint "$work/resumed" --resume "$work/straight/step-000005" \
  --output "$work/resumed.safetensors" >"$work/resumed.log"
grep -q "resumed from .*step-000005 at step 5" "$work/resumed.log"
grep -q "10 updates, 2 steps skipped" "$work/straight.log"
grep -q "10 updates, 2 steps skipped" "$work/resumed.log"
cmp "$work/straight.safetensors" "$work/resumed.safetensors"
cmp "$work/straight/step-000010/adapter.safetensors" "$work/resumed/step-000010/adapter.safetensors"
cmp "$work/straight/step-000010/optimizer.safetensors" "$work/resumed/step-000010/optimizer.safetensors"

cp -r "$work/straight/step-000005" "$work/untouched"
if "$bin" "${common[@]}" --lr 1e-3 --checkpoint "$work/other" --resume "$work/straight/step-000005" \
  --output "$work/other.safetensors" >"$work/other.log" 2>&1; then
  echo "a resume with another learning rate succeeded"
  exit 1
fi
grep -q "optimizer settings differ (/lr = " "$work/other.log"
[[ ! -e $work/other.safetensors ]]
diff -r "$work/untouched" "$work/straight/step-000005"
echo "resume: the final adapter and the step-10 checkpoint are equal byte for byte"
