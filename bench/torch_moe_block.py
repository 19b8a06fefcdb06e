#!/usr/bin/env python3
"""The MoE block of examples/moe_block.cpp in PyTorch: the reference its training step is timed against.

One training step of a Qwen3-MoE-like block with LoRA on both expert projections, as a careful
PyTorch user writes it (eager, bf16, no host synchronisation):

  router   logits = x G^T (bf16), softmax in fp32, top-k, weights renormalised over the k
  permute  stable argsort of the routed rows' experts, bincount -> offsets, x gathered per row
  fc1      torch._grouped_mm(x_rows, W1^T) + scale * grouped_mm(grouped_mm(x_rows, A1^T), B1^T)
           (W1 [E, 2*ffn, hidden], output [gate; up])
  SwiGLU   silu(gate) * up
  fc2      the same with W2 [E, hidden, ffn], A2, B2
  combine  rows un-permuted and summed per token with the router weights
  loss     1e4 * MSE against a target (fp32), backward (LoRA factors only: the base, the gate and
           the input are frozen), then torch.optim.AdamW(fused=True) on the four factors

Times the step (forward + backward + AdamW) with CUDA events, median of --iters after warm-up,
and reports tokens per second. Data: x ~ N(0, 1), G ~ N(0, (1.5/sqrt(hidden))^2), W1 ~ N(0, 1/hidden),
W2 ~ N(0, 1/ffn), A Kaiming-uniform, B ~ N(0, 0.02^2) (non-zero), scale = 1, as the C++ program's
distributions (whose weights are uniform with the same variances).

Usage:
  python3 bench/torch_moe_block.py --out torch.json [--compare ours.json]
  python3 bench/torch_moe_block.py --hidden 256 --ffn 128 --experts 16 --top-k 4 --tokens 512 --rank 8
"""

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from torch_anchors import time_ms  # median of CUDA-event-timed runs after warm-up

LOSS_SCALE = 1e4


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def grouped_lora(x, A, B, offs):
    """scale-free LoRA delta of a grouped layer as two grouped GEMMs: (x A_e^T) B_e^T per row group."""
    h = torch._grouped_mm(x, A.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, B.transpose(-2, -1), offs=offs)


class Block:
    """Frozen router and expert bases, trainable LoRA factors on fc1 and fc2."""

    def __init__(self, hidden, ffn, experts, top_k, rank, scale=1.0):
        dev, bf16 = "cuda", torch.bfloat16
        self.hidden, self.ffn, self.experts, self.top_k, self.scale = hidden, ffn, experts, top_k, scale
        self.gate = torch.randn(experts, hidden, dtype=bf16, device=dev) * (1.5 / math.sqrt(hidden))
        w1 = torch.randn(experts, 2 * ffn, hidden, dtype=bf16, device=dev) / math.sqrt(hidden)
        w2 = torch.randn(experts, hidden, ffn, dtype=bf16, device=dev) / math.sqrt(ffn)
        self.w1t = w1.transpose(-2, -1)  # [E, hidden, 2*ffn], column-major as grouped_mm wants
        self.w2t = w2.transpose(-2, -1)  # [E, ffn, hidden]

        def factor(shape, bound=None, std=None):
            t = torch.empty(*shape, dtype=bf16, device=dev)
            t.uniform_(-bound, bound) if bound is not None else t.normal_(0.0, std)
            return t.requires_grad_(True)

        self.a1 = factor((experts, rank, hidden), bound=math.sqrt(6.0 / hidden))
        self.b1 = factor((experts, 2 * ffn, rank), std=0.02)
        self.a2 = factor((experts, rank, ffn), bound=math.sqrt(6.0 / ffn))
        self.b2 = factor((experts, hidden, rank), std=0.02)
        self.params = [self.a1, self.b1, self.a2, self.b2]

    def forward(self, x):
        T, k = x.shape[0], self.top_k
        with torch.no_grad():  # the router is frozen and x is data: no gradient flows here
            logits = x @ self.gate.t()
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights, chosen = torch.topk(probs, k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            flat = chosen.reshape(-1)
            order = torch.argsort(flat, stable=True)
            offs = torch.cumsum(torch.bincount(flat, minlength=self.experts), 0).to(torch.int32)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            rows = x[order // k]
        h1 = torch._grouped_mm(rows, self.w1t, offs=offs) + self.scale * grouped_lora(rows, self.a1, self.b1, offs)
        gate, up = h1.chunk(2, dim=-1)
        act = F.silu(gate) * up
        out = torch._grouped_mm(act, self.w2t, offs=offs) + self.scale * grouped_lora(act, self.a2, self.b2, offs)
        per_token = out[inverse].view(T, k, self.hidden)
        return (per_token * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20, help="timed steps")
    ap.add_argument("--out", help="write the result as JSON to this file")
    ap.add_argument("--compare", help="JSON of moe_block --bench: print both and the ratio")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("torch_moe_block.py needs a CUDA GPU")
    if not hasattr(torch, "_grouped_mm"):
        sys.exit(f"torch {torch.__version__} has no torch._grouped_mm")
    if not 1 <= args.top_k <= args.experts:
        sys.exit(f"--top-k must be in [1, --experts = {args.experts}], got {args.top_k}")

    torch.manual_seed(0)
    block = Block(args.hidden, args.ffn, args.experts, args.top_k, args.rank)
    x = torch.randn(args.tokens, args.hidden, dtype=torch.bfloat16, device="cuda")
    target = torch.randn(args.tokens, args.hidden, dtype=torch.bfloat16, device="cuda")
    optimizer = torch.optim.AdamW(block.params, lr=1e-4, weight_decay=0.0, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        y = block.forward(x)
        loss = LOSS_SCALE * torch.mean((y.float() - target.float()) ** 2)
        loss.backward()
        optimizer.step()

    ms = time_ms(step, args.iters)
    tokens_per_s = args.tokens / (ms * 1e-3)
    device = torch.cuda.get_device_name()
    log(f"device: {device}, torch {torch.__version__}")
    log(f"torch block: hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, top-{args.top_k}, "
        f"{args.tokens} tokens, rank {args.rank}: {ms:.3f} ms per step (median of {args.iters}), "
        f"{tokens_per_s:.0f} tokens/s")
    result = {"device": device, "torch": torch.__version__, "hidden": args.hidden, "ffn": args.ffn,
              "experts": args.experts, "top_k": args.top_k, "tokens": args.tokens, "rank": args.rank,
              "iters": args.iters, "step_ms": ms, "tokens_per_s": tokens_per_s}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if args.compare:
        with open(args.compare) as f:
            ours = json.load(f)
        shape = ("hidden", "ffn", "experts", "top_k", "tokens", "rank")
        if any(ours[key] != result[key] for key in shape):
            sys.exit(f"--compare: {args.compare} timed another shape: {[ours[key] for key in shape]}")
        ratio = ours["tokens_per_s"] / tokens_per_s
        print("| block (hidden, ffn, E, top-k, tokens, r) | moelora tokens/s | torch tokens/s | ratio |")
        print("|---|---|---|---|")
        print(f"| {args.hidden}, {args.ffn}, {args.experts}, top-{args.top_k}, {args.tokens}, r {args.rank} "
              f"| {ours['tokens_per_s']:.0f} ({ours['step_ms']:.3f} ms{', graphs' if ours.get('graphed') else ''}) "
              f"| {tokens_per_s:.0f} ({ms:.3f} ms) | {ratio:.2f}x |")
    elif not args.out:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
