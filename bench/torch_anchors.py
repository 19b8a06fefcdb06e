#!/usr/bin/env python3
"""PyTorch reference timings ("anchors") for LoRA on MoE expert layers.

For every MoE expert-layer shape below, LoRA rank r and routing distribution
("uniform" or "zipf" tokens per expert), this script times on one CUDA GPU:

  base_fwd_ms      base forward  y = x . W_e^T  as one torch._grouped_mm
  base_dgrad_ms    base input gradient  dx = dy . W_e  as one torch._grouped_mm
  loop_fwd_ms      LoRA delta only, added in place to an existing y, with a
                   per-expert Python loop  y[s:t] += scale * ((x[s:t] @ A[e].T) @ B[e].T)
  gmm_fwd_ms       LoRA delta only, added in place to y, with two grouped GEMMs
  gmm_layer_fwd_ms the whole layer's forward: base grouped GEMM plus the delta (two grouped GEMMs)
  base_fwdbwd_ms   base forward + backward (input grad only; W is frozen)
  loop_fwdbwd_ms   base fwd + LoRA fwd (loop) + backward (grads of x, A, B)
  gmm_fwdbwd_ms    base fwd + LoRA fwd (grouped GEMMs) + backward (grads of x, A, B)

plus once the device-to-device copy bandwidth (copy_GBps, read + write bytes).

Every time is the median, in milliseconds, over timed iterations (after
untimed warm-up runs lasting at least 0.1 s, so that the GPU's clocks are
those of sustained load), each bracketed by CUDA events with a synchronize
before and after.
The Python-loop fwd+bwd variant uses at most 5 timed iterations (1 warm-up)
when E >= 128, recorded per record as "loop_fwdbwd_iters". A measurement that raises (e.g. an
unsupported torch._grouped_mm configuration or out of memory) is recorded as
null and the run continues.

Data: bf16 on cuda; x ~ N(0,1), W ~ N(0, 0.02^2), A ~ U(+-sqrt(6/in)),
B ~ N(0, 0.02^2) (non-zero), scale = 1.0. Rows are grouped by expert and the
token counts per expert are computed exactly as the C++ benchmark does.

Needs PyTorch with torch._grouped_mm (2.8+) and a Hopper-class GPU.

Usage:
  python3 bench/torch_anchors.py --out torch.json
  python3 bench/torch_anchors.py --shapes mixtral_8x7b.fc1 --ranks 16 --counts zipf --iters 10
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch

# name, E experts, in features, out features, T routed rows
SHAPES = [
    ("qwen3_30b_a3b.fc1", 128, 2048, 1536, 65536),
    ("qwen3_30b_a3b.fc2", 128, 768, 2048, 65536),
    ("mixtral_8x7b.fc1", 8, 4096, 28672, 16384),
    ("mixtral_8x7b.fc2", 8, 14336, 4096, 16384),
    ("nemotron3_nano.fc1", 128, 2688, 1856, 49152),
    ("nemotron3_nano.fc2", 128, 1856, 2688, 49152),
    ("deepseek_v3.fc1", 256, 7168, 4096, 65536),
    ("deepseek_v3.fc2", 256, 2048, 7168, 65536),
    ("gpt_oss_20b.fc1", 32, 2880, 5760, 32768),
    ("gpt_oss_20b.fc2", 32, 2880, 2880, 32768),
]

SCALE = 1.0
WARMUP = 3
STEADY_WARMUP_S = 0.1  # untimed runs before each measurement last at least this long
LOOP_MAX_ITERS_LARGE_E = 5  # the Python-loop fwd+bwd is slow for many experts
LARGE_E = 128


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def expert_counts(kind, E, T):
    """Tokens per expert (sum = T), identical to the C++ benchmark."""
    if kind == "uniform":
        counts = [T // E] * E
    elif kind == "zipf":
        w = [(e + 1) ** -1.2 for e in range(E)]  # Python floats are doubles
        total = 0.0
        for v in w:  # plain left-to-right sum, like a C++ loop
            total += v
        counts = [int(math.floor(T * v / total)) for v in w]
    else:
        raise ValueError(f"unknown counts kind {kind!r}")
    for e in range(T - sum(counts)):  # remainder to the first experts
        counts[e] += 1
    assert sum(counts) == T and min(counts) >= 0
    return counts


def time_ms(fn, iters, warmup=WARMUP, before=None):
    """Median GPU time of fn() in ms after at least `warmup` untimed runs lasting at least
    STEADY_WARMUP_S (the GPU's clocks settle under sustained load, as in bench/timing.cuh);
    before() runs outside the timed region."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    steady = time.perf_counter() + STEADY_WARMUP_S
    i = 0
    while i < warmup or time.perf_counter() < steady:
        if before is not None:
            before()
        fn()
        torch.cuda.synchronize()
        i += 1
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def try_time(label, fn, iters, warmup=WARMUP, before=None):
    """time_ms, but returns None (and logs why) if the measurement raises."""
    try:
        return time_ms(fn, iters, warmup, before)
    except RuntimeError as exc:  # includes torch.OutOfMemoryError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log(f"    {label}: FAILED ({first}) -> null")
        torch.cuda.empty_cache()
        return None


def copy_bandwidth_gbps(iters):
    """Device-to-device copy of a 2 GiB bf16 tensor; counts read + write bytes."""
    n = (2 << 30) // 2  # bf16 elements in 2 GiB
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    nbytes = src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def lora_loop_(y, x, A, B, bounds, scale):
    """Reference per-expert loop: adds the LoRA delta into y in place."""
    for e, s, t in bounds:
        y[s:t] += scale * ((x[s:t] @ A[e].T) @ B[e].T)


def lora_gmm(x, A, B, offs):
    """LoRA delta (without scale) as two grouped GEMMs."""
    h = torch._grouped_mm(x, A.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, B.transpose(-2, -1), offs=offs)


def bench_shape(name, E, d_in, d_out, T, ranks, count_kinds, iters):
    """Yields one record per (counts, rank) for one layer shape."""
    dev = "cuda"
    bf16 = torch.bfloat16
    loop_iters = min(iters, LOOP_MAX_ITERS_LARGE_E) if E >= LARGE_E else iters
    loop_warmup = 1 if E >= LARGE_E else WARMUP
    if loop_iters != iters:
        log(f"  note: E={E} >= {LARGE_E}: loop fwd+bwd uses {loop_iters} timed "
            f"iterations ({loop_warmup} warm-up) instead of {iters}")

    # Frozen base weight and fixed inputs, shared by all configs of this shape.
    W = torch.empty(E, d_out, d_in, dtype=bf16, device=dev).normal_(0.0, 0.02)
    x = torch.randn(T, d_in, dtype=bf16, device=dev).requires_grad_(True)
    dy = torch.randn(T, d_out, dtype=bf16, device=dev)
    Wt = W.transpose(-2, -1)  # [E, in, out], column-major view as grouped_mm wants

    for kind in count_kinds:
        counts = expert_counts(kind, E, T)
        offs = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
        offs = offs.to(torch.int32).to(dev)
        bounds, s = [], 0  # (expert, first row, end row) of non-empty experts
        for e, c in enumerate(counts):
            if c > 0:
                bounds.append((e, s, s + c))
            s += c

        # Base timings do not depend on the rank: measure once per counts kind.
        with torch.no_grad():
            base_fwd = try_time(
                "base_fwd", lambda: torch._grouped_mm(x, Wt, offs=offs), iters)
            base_dgrad = try_time(
                "base_dgrad", lambda: torch._grouped_mm(dy, W, offs=offs), iters)
            # The existing base output that the LoRA deltas are added to.
            y = torch.randn(T, d_out, dtype=bf16, device=dev)

        def clear_x_grad():
            x.grad = None

        def base_fwdbwd_step():
            torch._grouped_mm(x, Wt, offs=offs).backward(dy)

        base_fwdbwd = try_time("base_fwdbwd", base_fwdbwd_step, iters,
                               before=clear_x_grad)

        for r in ranks:
            bound = math.sqrt(6.0 / d_in)
            A = torch.empty(E, r, d_in, dtype=bf16, device=dev).uniform_(-bound, bound)
            B = torch.empty(E, d_out, r, dtype=bf16, device=dev).normal_(0.0, 0.02)
            A.requires_grad_(True)
            B.requires_grad_(True)

            with torch.no_grad():
                loop_fwd = try_time(
                    "loop_fwd", lambda: lora_loop_(y, x, A, B, bounds, SCALE),
                    iters)
                gmm_fwd = try_time(
                    "gmm_fwd", lambda: y.add_(lora_gmm(x, A, B, offs), alpha=SCALE),
                    iters)
                gmm_layer_fwd = try_time(
                    "gmm_layer_fwd",
                    lambda: torch._grouped_mm(x, Wt, offs=offs).add_(lora_gmm(x, A, B, offs), alpha=SCALE),
                    iters)

            def clear_grads():
                x.grad = None
                A.grad = None
                B.grad = None

            def loop_fwdbwd_step():
                out = torch._grouped_mm(x, Wt, offs=offs)
                lora_loop_(out, x, A, B, bounds, SCALE)
                out.backward(dy)

            def gmm_fwdbwd_step():
                out = torch._grouped_mm(x, Wt, offs=offs)
                out = out.add(lora_gmm(x, A, B, offs), alpha=SCALE)
                out.backward(dy)

            def gmm_branch_fwdbwd_step():  # the LoRA branch alone: delta, then dA, dB, dx
                (lora_gmm(x, A, B, offs) * SCALE).backward(dy)

            loop_fwdbwd = try_time("loop_fwdbwd", loop_fwdbwd_step, loop_iters,
                                   warmup=loop_warmup, before=clear_grads)
            gmm_fwdbwd = try_time("gmm_fwdbwd", gmm_fwdbwd_step, iters,
                                  before=clear_grads)
            gmm_branch_fwdbwd = try_time("gmm_branch_fwdbwd", gmm_branch_fwdbwd_step, iters,
                                         before=clear_grads)
            clear_grads()

            rec = {
                "shape": name, "E": E, "in": d_in, "out": d_out, "T": T,
                "rank": r, "counts": kind,
                "base_fwd_ms": base_fwd,
                "base_dgrad_ms": base_dgrad,
                "gmm_layer_fwd_ms": gmm_layer_fwd,
                "loop_fwd_ms": loop_fwd,
                "gmm_fwd_ms": gmm_fwd,
                "base_fwdbwd_ms": base_fwdbwd,
                "loop_fwdbwd_ms": loop_fwdbwd,
                "gmm_fwdbwd_ms": gmm_fwdbwd,
                "gmm_branch_fwdbwd_ms": gmm_branch_fwdbwd,
                "iters": iters,
                "loop_fwdbwd_iters": loop_iters,
            }
            log(f"  {name} r={r} {kind}: base {fmt(base_fwd)} dx {fmt(base_dgrad)} | fwd loop "
                f"{fmt(loop_fwd)} gmm {fmt(gmm_fwd)} | f+b base {fmt(base_fwdbwd)} "
                f"loop {fmt(loop_fwdbwd)} gmm {fmt(gmm_fwdbwd)} ms")
            yield rec
            del A, B
        del y, offs
        x.grad = None
    del W, x, dy, Wt
    torch.cuda.empty_cache()


def fmt(v):
    return "null" if v is None else f"{v:.3f}"


def csv_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON document to this file")
    ap.add_argument("--shapes", default="", help="comma list of shape names (default all)")
    ap.add_argument("--ranks", default="16,64", help="comma list of LoRA ranks")
    ap.add_argument("--counts", default="uniform,zipf", help="comma list: uniform, zipf")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("torch_anchors.py needs a CUDA GPU")
    if not hasattr(torch, "_grouped_mm"):
        sys.exit(f"torch {torch.__version__} has no torch._grouped_mm")

    wanted = csv_list(args.shapes)
    known = {s[0] for s in SHAPES}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        sys.exit(f"unknown shape(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    shapes = [s for s in SHAPES if not wanted or s[0] in wanted]
    ranks = [int(r) for r in csv_list(args.ranks)]
    count_kinds = csv_list(args.counts)
    for kind in count_kinds:
        if kind not in ("uniform", "zipf"):
            sys.exit(f"unknown counts kind {kind!r}")

    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    log(f"device: {device}, torch {torch.__version__}")

    copy_gbps = copy_bandwidth_gbps(args.iters)
    log(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write)")

    records = []
    for name, E, d_in, d_out, T in shapes:
        log(f"{name}: E={E} in={d_in} out={d_out} T={T}")
        records.extend(bench_shape(name, E, d_in, d_out, T, ranks, count_kinds, args.iters))

    doc = {"device": device, "torch": torch.__version__,
           "copy_GBps": copy_gbps, "records": records}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        log(f"wrote {args.out} ({len(records)} records)")
    else:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
