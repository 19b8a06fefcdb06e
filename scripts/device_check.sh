#!/usr/bin/env bash
# The GPU check of record, on a lent GPU machine: the GPU suite, compute-sanitizer, the GPU examples
# and the benchmarks with their PyTorch anchors, from a folder packed by scripts/device_bundle.sh.
# Each step writes OUT/STEP.log under its own time limit; OUT/summary.txt collects one line per step.
# Usage: scripts/device_check.sh BUNDLE OUT [STEP...]
# STEPs (default: all, in this order): suite memcheck racecheck examples lora quant optim sweeps qad moe
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bundle="$(cd "$1" && pwd)"
out="$2"
shift 2
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(suite memcheck racecheck examples lora quant optim sweeps qad moe)
mkdir -p "$out"
export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
summary="$out/summary.txt"

# run STEP SECONDS COMMAND...: the command's output in OUT/STEP.log, its status and time in the summary.
run() {
  local step=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$out/$step.log" 2>&1
  local rc=$?
  echo "$step: rc=$rc $((SECONDS - start))s :: $*" >>"$summary"
}

# The GPU test cases small enough for the sanitizers (one of each kernel family, graphs included).
sanitized='*tensor-core forward*,*pass over dy*,*sm90 grouped GEMM*,*expand riding*,*GroupedLinear<CudaBackend>*,*layer step*,*device counts*,*token path*,*optimizer*,*tensor-parallel layer*'

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/device.txt" 2>&1
for step in "${steps[@]}"; do
  case $step in
    suite) run suite 300 "$bundle/moelora_gpu_tests" --duration=true ;;
    # NCCL's communicator set-up probes kernels with cudaFuncGetAttributes calls that fail on
    # purpose: API errors are not reported, memory errors are.
    memcheck) run memcheck 240 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
                "$bundle/moelora_gpu_tests" -tc="$sanitized" ;;
    racecheck) run racecheck 240 compute-sanitizer --tool racecheck --error-exitcode 1 \
                 "$bundle/moelora_gpu_tests" -tc="*tensor-core forward*,*pass over dy*,*QuantizedGroupedLinear<CudaBackend>*,*token path*,*optimizer*,*layer step*" ;;
    examples)
      run examples 120 bash "$here/tests/tools/test_resume.sh" "$bundle/qad_finetune" "$out/resume-gpu" --gpu
      run examples 60 "$bundle/moe_block" --gpu --hidden 128 --ffn 64 --experts 8 --top-k 2 --tokens 256 --rank 8 \
        --steps 60 --batches 16 --graph require ;;
    lora)
      mkdir -p "$out/lora"
      run lora 300 "$bundle/bench_lora" --out "$out/lora/ours.json"
      run lora 240 env PYTHONUNBUFFERED=1 python3 "$here/bench/torch_anchors.py" --out "$out/lora/torch.json"
      run lora 30 python3 "$here/bench/report.py" --ours "$out/lora/ours.json" --torch "$out/lora/torch.json" \
        --markdown-out "$out/lora/report.md" ;;
    quant) run quant 120 "$bundle/bench_quant" --out "$out/quant.jsonl" ;;
    optim) run optim 120 "$bundle/bench_optim" ;;
    sweeps)
      run sweeps 200 "$bundle/sweep_lora"
      run sweeps 120 "$bundle/sweep_quant" ;;
    qad) run qad 180 "$bundle/qad_finetune" --experts 128 --in 2048 --out 1536 --rows 65536 --format nvfp4 --rank 16 \
           --steps 20 --profile ;;
    moe)
      mkdir -p "$out/moe/examples"
      ln -sf "$bundle/moe_block" "$out/moe/examples/moe_block"
      run moe 200 bash "$here/bench/moe_block.sh" "$out/moe" "$out/moe" ;;
    *) echo "unknown step: $step" >&2; exit 2 ;;
  esac
done
cat "$summary"
