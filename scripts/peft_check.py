#!/usr/bin/env python3
"""Checks moelora's PEFT export against Hugging Face PEFT itself (offline, CPU is enough).

Builds a tiny transformers MoE model whose experts hold stacked 3-D parameters (`gate_up_proj`,
`down_proj`), runs moelora's `peft_export` program for exactly those parameters (in the module's
registration order, each as `--param name:in:out` with the module's semantic in/out features),
loads the export with `peft.PeftModel.from_pretrained`, and checks:
  1. every LoRA weight PEFT loaded equals the tensor in adapter_model.safetensors (so every key
     mapped onto the module PEFT built for it, `.base_layer` nesting included);
  2. per parameter and expert, PEFT's delta (`ParamWrapper.get_delta_weight`) equals moelora's
     scale * B_e A_e (from expected_delta.safetensors, [E, out, in]). moelora writes one layout
     (lora_A [E*r, in], lora_B [out, r*E]) whatever the storage; PEFT (checked with 0.21.0 and
     transformers 5.17.0: Qwen3-MoE stores [E, out, in], GPT-OSS [E, in, out]) transposes
     internally for a parameter stored [E, in, out], and its delta then has the stored shape, so
     the script detects how the model stores each parameter only to transpose the expected delta;
  3. after `merge_and_unload`, merged parameter - original parameter equals the same delta.
Tolerance: relative Frobenius error <= 1e-2 (bf16 factors; the model runs in fp32, so the
observed error is near fp32 rounding). Prints one summary line; any failure exits non-zero.

Usage: python3 scripts/peft_check.py --export-bin build/examples/peft_export [--model auto]
Needs: torch, transformers, peft (>= 0.19 for this layout on both storages; checked with 0.21.0),
safetensors.
"""
import argparse
import os
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TOLERANCE = 1e-2
HIDDEN, INTER, EXPERTS, RANK, SCALE = 64, 48, 4, 4, 0.5


def fail(message):
    print(f"peft_check FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def candidates():
    """(name, config factory) of tiny MoE models, most likely stacked-expert first."""
    common = dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64)

    def qwen3_moe():
        return transformers.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=INTER,
                                           num_experts=EXPERTS, num_experts_per_tok=2, decoder_sparse_step=1,
                                           mlp_only_layers=[])

    def gpt_oss():
        return transformers.GptOssConfig(**common, intermediate_size=INTER, num_local_experts=EXPERTS,
                                         num_experts_per_tok=2, layer_types=["full_attention"])

    def mixtral():
        return transformers.MixtralConfig(**common, intermediate_size=INTER, num_local_experts=EXPERTS,
                                          num_experts_per_tok=2)

    return [("qwen3_moe", qwen3_moe), ("gpt_oss", gpt_oss), ("mixtral", mixtral)]


def find_experts(model):
    """(module path, [(param name, 3-D parameter)] in registration order) of the first module that
    directly holds 3-D gate_up_proj and down_proj parameters, or None."""
    for path, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False)
                  if n in ("gate_up_proj", "down_proj") and p.dim() == 3]
        if len(params) == 2:
            return path, params
    return None


def storage(name, shape):
    """(transposed, in, out): the module's semantic in/out features and whether the model stores the
    parameter [E, in, out] (transposed, e.g. GPT-OSS) rather than [E, out, in] (nn.Linear, e.g.
    Qwen3-MoE). The export does not depend on it; only the expected delta is transposed."""
    in_f, out_f = (HIDDEN, 2 * INTER) if name == "gate_up_proj" else (INTER, HIDDEN)
    if tuple(shape[1:]) == (in_f, out_f):
        return True, in_f, out_f
    if tuple(shape[1:]) == (out_f, in_f):
        return False, in_f, out_f
    fail(f"{name} has shape {tuple(shape)}, neither [E, {in_f}, {out_f}] nor [E, {out_f}, {in_f}]")


def relative_error(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-bin", required=True, help="moelora's peft_export program")
    parser.add_argument("--model", default="auto", help="auto, qwen3_moe, gpt_oss or mixtral")
    args = parser.parse_args()
    if not os.access(args.export_bin, os.X_OK):
        fail(f"{args.export_bin} is not an executable")

    torch.manual_seed(0)
    chosen = None
    tried = []
    for name, make_config in candidates():
        if args.model not in ("auto", name):
            continue
        try:
            model = transformers.AutoModelForCausalLM.from_config(make_config()).float().eval()
        except Exception as error:  # a model this transformers version does not have or configure so
            tried.append(f"{name}: {type(error).__name__}: {error}")
            continue
        found = find_experts(model)
        if found is None:
            tried.append(f"{name}: no module with stacked 3-D gate_up_proj and down_proj")
            continue
        chosen = (name, model, *found)
        break
    if chosen is None:
        fail("no tiny MoE model with stacked expert parameters in transformers "
             f"{transformers.__version__}: " + "; ".join(tried))
    model_name, model, module_path, params = chosen

    specs, transposed = [], {}
    for name, param in params:
        if param.shape[0] != EXPERTS:
            fail(f"{name} has {param.shape[0]} experts, expected {EXPERTS}")
        transposed[name], in_f, out_f = storage(name, param.shape)
        specs += ["--param", f"{name}:{in_f}:{out_f}"]
    originals = {name: param.detach().clone() for name, param in params}

    with tempfile.TemporaryDirectory(prefix="moelora-peft-") as out:
        command = [args.export_bin, "--out", out, "--prefix", f"base_model.model.{module_path}",
                   "--experts", str(EXPERTS), "--rank", str(RANK), "--scale", str(SCALE), "--dtype", "bf16"] + specs
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"{' '.join(command)} exited {run.returncode}: {run.stderr.strip()}")
        file_tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
        expected = load_file(os.path.join(out, "expected_delta.safetensors"))

        peft_model = peft.PeftModel.from_pretrained(model, out, is_trainable=False)
        wrappers = {m.parameter_name: (path, m) for path, m in peft_model.named_modules()
                    if type(m).__name__ == "ParamWrapper"}
        if set(wrappers) != set(transposed):
            fail(f"PEFT wrapped {sorted(wrappers)}, expected {sorted(transposed)}")

        used = set()
        worst = 0.0
        for name, (path, wrapper) in wrappers.items():
            for factor in ("lora_A", "lora_B"):
                key = f"{path}.{factor}.weight"
                if key not in file_tensors:
                    fail(f"PEFT's {factor} of {name} lives at {key}, which the export does not contain "
                         f"(it has {sorted(file_tensors)})")
                loaded = getattr(wrapper, factor)["default"].weight.detach().float()
                if not torch.equal(loaded, file_tensors[key].float()):
                    fail(f"PEFT's {factor} of {name} differs from {key} in the export")
                used.add(key)
            want = expected[name].double()  # [E, out, in]
            if transposed[name]:  # PEFT's delta has the stored shape [E, in, out]
                want = want.transpose(1, 2)
            delta = wrapper.get_delta_weight("default").detach()
            if tuple(delta.shape) != tuple(want.shape):
                fail(f"PEFT's delta of {name} has shape {tuple(delta.shape)}, ours {tuple(want.shape)}")
            for e in range(EXPERTS):
                error = relative_error(delta[e], want[e])
                worst = max(worst, error)
                if not error <= TOLERANCE:
                    fail(f"{name} expert {e}: PEFT's delta differs from moelora's (relative error {error:.3e})")
        if used != set(file_tensors):
            fail(f"the export holds tensors PEFT did not load: {sorted(set(file_tensors) - used)}")

        merged = peft_model.merge_and_unload()
        merged_params = dict(merged.named_parameters())
        for name, _ in params:
            after = merged_params[f"{module_path}.{name}"].detach()
            want = expected[name].double()
            if transposed[name]:
                want = want.transpose(1, 2)
            error = relative_error(after - originals[name], want)
            worst = max(worst, error)
            if not error <= TOLERANCE:
                fail(f"{name}: merged - original differs from moelora's delta (relative error {error:.3e})")

    described = ",".join(f"{name}=stored[E,{'in,out' if transposed[name] else 'out,in'}]" for name, _ in params)
    print(f"peft_check OK: model={model_name} transformers={transformers.__version__} peft={peft.__version__} "
          f"module={module_path} params={described} E={EXPERTS} r={RANK} scale={SCALE} "
          f"max_rel_err={worst:.2e} (tolerance {TOLERANCE})")


if __name__ == "__main__":
    main()
