#!/usr/bin/env bash
# The `moelora` command on small files: every subcommand's output and exit code, and the errors
# (exit code 1, one line on stderr). Usage: test_cli.sh MOELORA MAKE_TEST_CHECKPOINT WORKDIR
set -u
moelora=$(realpath "$1") make_checkpoint=$(realpath "$2") work=$3  # absolute: the script changes directory
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# run WANT_CODE CMD...: runs CMD, keeps stdout in out.txt and stderr in err.txt, checks the exit code.
run() {
  local want=$1; shift
  "$@" >out.txt 2>err.txt
  local code=$?
  [ "$code" -eq "$want" ] || { fail "exit code $code, want $want: $*"; cat out.txt err.txt; }
}
# has FILE TEXT: FILE contains TEXT.
has() { grep -qF -- "$2" "$1" || { fail "$1 lacks \"$2\""; cat "$1"; }; }
# has_shape FILE KEY SHAPE: the line of tensor KEY in FILE (inspect's listing) shows SHAPE.
has_shape() { grep -F -- " $2 " "$1" | grep -qF -- "$3" || { fail "$1: $2 is not $3"; cat "$1"; }; }
# one_error TEXT: exactly one line on stderr, naming TEXT.
one_error() { [ "$(wc -l <err.txt)" -eq 1 ] || { fail "stderr is not one line"; cat err.txt; }; has err.txt "$1"; }

"$make_checkpoint" "$work" || exit 1
pattern='model.layers.{L}.mlp.experts.{e}.down_proj.weight'

# --help: the command and every subcommand, with an example.
run 0 "$moelora" --help
for sub in inspect init reshard export-peft; do has out.txt "$sub"; done
for sub in inspect init reshard export-peft; do
  run 0 "$moelora" "$sub" --help
  has out.txt "Example:"
done
run 2 "$moelora"
run 2 "$moelora" init --weights model.safetensors

# init: svdquant on NVFP4, loftq on MXFP4 (with the requantized base's state), stacked key pattern rejected shape.
run 0 "$moelora" init --weights model.safetensors --pattern "$pattern" --layer 1 --format nvfp4 --method svdquant \
  --rank 8 --adapter qad --output adapter.safetensors
has out.txt "read 4 experts of [32, 64]"
has out.txt "quantized only"
has out.txt "after svdquant"
has out.txt "rms"
[ -f adapter.safetensors ] || fail "init wrote no adapter.safetensors"
run 0 "$moelora" init --weights . --pattern "$pattern" --layer 0 --experts 3 --format mxfp4 --method loftq \
  --iterations 2 --rank 4 --scale 0.5 --lora-dtype fp32 --adapter lq --output loftq.safetensors
has out.txt "read 3 experts"
has out.txt "kept iterate"

# inspect: an adapter state dict, a plain checkpoint, a sharded checkpoint.
run 0 "$moelora" inspect adapter.safetensors
has out.txt "kind: moelora adapter state dict"
has out.txt "base.weight_quantizer.codes"
has out.txt "base.weight_quantizer.scales"
has out.txt "base quantizer state: nvfp4"
has out.txt "svdquant"
has out.txt '"experts": 4'
run 0 "$moelora" inspect loftq.safetensors
has out.txt "F8_E8M0"
has out.txt "base quantizer state: mxfp4"
run 0 "$moelora" inspect model.safetensors
has out.txt "kind: plain safetensors checkpoint"
has out.txt "model.layers.1.mlp.experts.3.down_proj.weight"
has out.txt "BF16"
run 0 "$moelora" inspect sharded
has out.txt "sharded moelora adapter checkpoint"
has out.txt "layout: tp 1, ep 1, column parallel"
has out.txt "adapter-tp0-ep0.safetensors"
has out.txt "optimizer state: optimizer/"

# inspect: optimizer state, one file and sharded.
run 0 "$moelora" inspect optimizer.safetensors
has out.txt "kind: moelora optimizer state"
has out.txt "lora_a_a.weight.exp_avg_sq"
has out.txt "adamw: lr 0.001, betas (0.9, 0.999)"
has out.txt "clip the global gradient norm: 1.000000; skip non-finite steps: yes"
has out.txt "schedule: cosine, warm-up 10 steps, total 100, floor 0.1"
has out.txt "counters: 1 updates, 0 skipped, loss scale 1.0"
grep -qE "^  a +4 +bf16 +yes +1 +1$" out.txt || { fail "inspect lacks the adapter's state row"; cat out.txt; }
run 0 "$moelora" inspect sharded/optimizer
has out.txt "sharded moelora optimizer state"
has out.txt "layout: tp 1, ep 1, column parallel"
run 0 "$moelora" inspect sharded/optimizer/adapter-tp0-ep0.safetensors
has out.txt "one rank file of a sharded optimizer state"
has out.txt "lora_b_a.weight3.master"

# reshard, then inspect the result.
run 0 "$moelora" reshard sharded resharded --tp 2 --ep 2
run 0 "$moelora" inspect resharded
has out.txt "layout: tp 2, ep 2, column parallel"
has out.txt "adapter-tp1-ep1.safetensors"
run 0 "$moelora" inspect resharded/adapter-tp1-ep0.safetensors
has out.txt "one rank file of a sharded adapter checkpoint"
run 1 "$moelora" reshard sharded uneven --tp 3 --ep 1
one_error "cannot load"
run 1 "$moelora" reshard model.safetensors out --tp 1 --ep 1
one_error "not a sharded adapter checkpoint"

# export-peft: one target, then two, then inspect.
module=base_model.model.model.layers.0.mlp.experts
run 0 "$moelora" export-peft adapter.safetensors peft --module "$module" --parameter down_proj
[ -f peft/adapter_config.json ] && [ -f peft/adapter_model.safetensors ] || fail "export-peft wrote no PEFT files"
run 0 "$moelora" inspect peft
has out.txt "Hugging Face PEFT adapter"
has out.txt "r 8, lora_alpha 8"
has out.txt "model.layers.0.mlp.experts.down_proj"
has out.txt "$module.lora_A.weight"
# The adapter is [E, out, in] = [4, 32, 64], r 8: lora_A [E·r, in], lora_B [out, r·E].
has_shape out.txt "$module.lora_A.weight" "[32, 64]"
has_shape out.txt "$module.lora_B.weight" "[32, 32]"
run 0 "$moelora" init --weights model.safetensors --pattern "$pattern" --layer 1 --method svdquant --rank 8 \
  --adapter qad --output adapter2.safetensors
run 0 "$moelora" export-peft adapter.safetensors adapter2.safetensors peft2 --module "$module" \
  --parameter gate_up_proj --parameter down_proj
run 0 "$moelora" inspect peft2
# The same one layout for both targets, the first-registered one nested under .base_layer.
has_shape out.txt "$module.base_layer.lora_A.weight" "[32, 64]"
has_shape out.txt "$module.base_layer.lora_B.weight" "[32, 32]"
has_shape out.txt "$module.lora_A.weight" "[32, 64]"
has_shape out.txt "$module.lora_B.weight" "[32, 32]"
has out.txt "target_parameters: model.layers.0.mlp.experts.gate_up_proj model.layers.0.mlp.experts.down_proj"

# Errors: one line on stderr, exit code 1.
run 1 "$moelora" inspect missing.safetensors
one_error "no such file or directory: missing.safetensors"
printf 'not a safetensors file' >broken.safetensors
run 1 "$moelora" inspect broken.safetensors
one_error "is not a valid safetensors file"
run 1 "$moelora" init --weights missing.safetensors --pattern "$pattern" --layer 0 --adapter x --output x.safetensors
one_error "missing.safetensors"
run 1 "$moelora" init --weights model.safetensors --pattern 'model.layers.{layer}.experts.{e}' --adapter x --output x.safetensors
one_error "unknown placeholder"
run 1 "$moelora" init --weights model.safetensors --pattern "$pattern" --adapter x --output x.safetensors
one_error "give the layer index"
run 1 "$moelora" init --weights model.safetensors --pattern "$pattern" --layer 7 --adapter x --output x.safetensors
one_error "no tensor named model.layers.7.mlp.experts.0.down_proj.weight"
run 1 "$moelora" init --weights model.safetensors --pattern "$pattern" --layer 0 --format fp5 --adapter x --output x.safetensors
one_error "quantizer \"fp5\" is not a known format"
run 1 "$moelora" init --weights model.safetensors --pattern "$pattern" --layer 0 --method magic --adapter x --output x.safetensors
one_error "magic"
run 1 "$moelora" init --weights model.safetensors --pattern "$pattern" --layer 0 --lora-dtype int3 --adapter x --output x.safetensors
one_error "int3"
[ ! -e x.safetensors ] || fail "a failed init wrote its output"
run 1 "$moelora" export-peft adapter.safetensors peft3 --module "$module" --parameter down_proj --adapter other
one_error "holds no adapter \"other\""
run 1 "$moelora" export-peft adapter.safetensors peft3 --module "$module" --parameter a --parameter b
one_error "pairs each adapter file with one --parameter"
run 1 "$moelora" export-peft model.safetensors peft3 --module "$module" --parameter down_proj
one_error "does not hold exactly one adapter"
[ ! -e peft3 ] || fail "a failed export wrote its output"

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all CLI checks passed"
