#!/usr/bin/env python3
"""Merge the moelora C++ benchmark JSON with torch_anchors.py JSON into Markdown.

Records are joined on (shape, rank, counts). Three Markdown tables are printed:
the forward (our LoRA delta against its byte floor and against the PyTorch
grouped-GEMM and Python-loop deltas), forward + backward (the LoRA branch
alone, and the whole layer with its base, ours against PyTorch), and the base
GEMMs with the LoRA overhead over them (ours and torch) and our training step,
eager and replayed from a CUDA graph. A short summary follows.

Usage:
  python3 bench/report.py --ours ours.json --torch torch.json [--date YYYY-MM-DD]
                          [--markdown-out report.md]
"""

import argparse
import datetime
import json
import sys

DASH = "—"

FORWARD_COLUMNS = [
    "shape", "r", "counts", "base fwd", "torch base fwd", "ours LoRA fwd", "floor", "% of floor",
    "gmm LoRA fwd", "loop LoRA fwd", "ours vs gmm fwd",
]
TRAINING_COLUMNS = [
    "shape", "r", "counts", "ours LoRA f+b", "gmm LoRA f+b", "ours vs gmm (LoRA)", "ours LoRA f+b (+=)", "base f+b",
    "torch base f+b", "ours layer f+b", "gmm layer f+b", "loop layer f+b", "ours vs gmm (layer)",
]
BASE_COLUMNS = [
    "shape", "r", "counts", "GEMM", "ours base fwd", "torch base fwd", "ours vs torch (fwd)", "ours base dx",
    "torch base dx", "ours vs torch (dx)", "LoRA fwd overhead (ours)", "LoRA fwd overhead (torch)",
    "LoRA f+b overhead (ours)", "LoRA f+b overhead (torch)", "LoRA fwd overhead (ours, expand apart)",
    "LoRA f+b overhead (ours, expand apart)", "ours step", "ours step (graph)",
]


def header(columns):
    return ["| " + " | ".join(columns) + " |",
            "|" + "|".join("---" if c in ("shape", "counts") else "---:" for c in columns) + "|"]


def load(path):
    with open(path) as f:
        return json.load(f)


def key(rec):
    return (rec["shape"], int(rec["rank"]), rec["counts"])


def num(rec, field):
    """A positive float from rec[field], or None when missing/null/invalid."""
    if rec is None:
        return None
    v = rec.get(field)
    if isinstance(v, (int, float)) and v > 0:
        return float(v)
    return None


def ratio(a, b):
    return None if a is None or b is None else a / b


def f_ms(v):
    return DASH if v is None else f"{v:.3f}"


def f_pct(v):
    return DASH if v is None else f"{v:.1f}%"


def overhead(layer, base):
    """(layer − base) / base in percent."""
    return None if layer is None or base is None else 100.0 * (layer - base) / base


def f_x(v):
    return DASH if v is None else f"{v:.2f}×"


def f_gbps(v):
    return "?" if not isinstance(v, (int, float)) else f"{v:.0f} GB/s"


def build(ours, torch_doc, date):
    ours_recs = {key(r): r for r in ours.get("records", [])}
    torch_recs = {key(r): r for r in torch_doc.get("records", [])}
    keys = list(ours_recs) + [k for k in torch_recs if k not in ours_recs]

    lines = [
        f"**Date:** {date}  ",
        f"**ours:** {ours.get('device', '?')}, copy {f_gbps(ours.get('copy_GBps'))}  ",
        f"**torch {torch_doc.get('torch', '?')}:** {torch_doc.get('device', '?')}, "
        f"copy {f_gbps(torch_doc.get('copy_GBps'))}",
        "",
        "Times in ms; ratios > 1× mean ours is faster.",
        "",
        "**Forward.** LoRA fwd is the LoRA delta alone, added in place to an existing base output "
        "(ours from device counts; torch: two `torch._grouped_mm`, or the per-expert loop). "
        "Floor: the delta's minimum bytes over our measured copy bandwidth.",
        "",
    ] + header(FORWARD_COLUMNS)

    training = [
        "",
        "**Forward + backward.** LoRA f+b is the LoRA branch alone: the delta forward and its "
        "backward (dA, dB and the LoRA part of dx), written into fresh y, dx and gradients as "
        "torch's grouped_mm branch writes them (ours: `WriteMode::overwrite` gradients over a base "
        "whose output is zero). LoRA f+b (+=) is ours adding into existing y, dx and fp32 "
        "gradients instead (gradient accumulation). Layer f+b is the whole training step, base "
        "included, fresh gradients on both sides (ours: the base's GEMM strategy of the base table; "
        "on the sm90 GEMM the base writes y and dx with the LoRA expand and `A_eᵀ u` riding in its K "
        "loop; torch: `torch._grouped_mm`).",
        "",
    ] + header(TRAINING_COLUMNS)

    base_table = [
        "",
        "**Base GEMMs and the LoRA overhead.** Base fwd: `y = x W_eᵀ`; base dx: `dx = dy W_e` (ours: "
        "the GEMM strategy named, from device counts; torch: one `torch._grouped_mm` each). LoRA "
        "overhead: the whole layer over its base alone, forward (ours: layer forward; torch: base "
        "grouped_mm plus the two-grouped-GEMM delta) and forward + backward (the layer f+b columns "
        "above over the base f+b); on the sm90 GEMM the LoRA expand (and the `A_eᵀ u` of dx) rides on "
        "the base GEMM as extra K tiles, and the expand-apart columns are the same layer with it in a "
        "pass of its own, measured in the same run. Step: forward, backward (fresh gradients) and the "
        "AdamW update, eagerly and replayed from one CUDA graph.",
        "",
    ] + header(BASE_COLUMNS)

    floor_pcts, fb_ratios, branch_ratios, accum_ratios = [], [], [], []  # (value, row label) for the summary
    base_fwd_ratios, base_dx_ratios = [], []
    for k in keys:
        o, t = ours_recs.get(k), torch_recs.get(k)
        label = f"{k[0]} r={k[1]} {k[2]}"
        lora_fwd = num(o, "lora_fwd_ms")
        floor = num(o, "floor_fwd_ms")
        lora_fb = num(o, "lora_fwdbwd_ms")
        branch_fb = num(o, "branch_fwdbwd_ms")
        gmm_fwd = num(t, "gmm_fwd_ms")
        gmm_fb = num(t, "gmm_fwdbwd_ms")
        torch_base_fb = num(t, "base_fwdbwd_ms")
        gmm_branch = num(t, "gmm_branch_fwdbwd_ms")

        pct_floor = None if floor is None or lora_fwd is None else 100.0 * floor / lora_fwd
        fwd_x = ratio(gmm_fwd, lora_fwd)
        fb_x = ratio(gmm_fb, lora_fb)
        branch_x = ratio(gmm_branch, branch_fb)
        accum_x = ratio(gmm_branch, num(o, "branch_accum_fwdbwd_ms"))
        if pct_floor is not None:
            floor_pcts.append((pct_floor, label))
        if fb_x is not None:
            fb_ratios.append((fb_x, label))
        if branch_x is not None:
            branch_ratios.append((branch_x, label))
        if accum_x is not None:
            accum_ratios.append((accum_x, label))

        base_fwd_x = ratio(num(t, "base_fwd_ms"), num(o, "base_fwd_ms"))
        base_dx_x = ratio(num(t, "base_dgrad_ms"), num(o, "base_dgrad_ms"))
        if base_fwd_x is not None:
            base_fwd_ratios.append((base_fwd_x, label))
        if base_dx_x is not None:
            base_dx_ratios.append((base_dx_x, label))
        base_table.append("| " + " | ".join([
            k[0], str(k[1]), k[2], (o or {}).get("gemm", DASH), f_ms(num(o, "base_fwd_ms")),
            f_ms(num(t, "base_fwd_ms")), f_x(base_fwd_x), f_ms(num(o, "base_dgrad_ms")), f_ms(num(t, "base_dgrad_ms")),
            f_x(base_dx_x), f_pct(overhead(num(o, "layer_fwd_ms"), num(o, "base_fwd_ms"))),
            f_pct(overhead(num(t, "gmm_layer_fwd_ms"), num(t, "base_fwd_ms"))),
            f_pct(overhead(lora_fb, num(o, "base_fwdbwd_ms"))), f_pct(overhead(gmm_fb, torch_base_fb)),
            f_pct(overhead(num(o, "apart_fwd_ms"), num(o, "base_fwd_ms"))),
            f_pct(overhead(num(o, "apart_fwdbwd_ms"), num(o, "base_fwdbwd_ms"))),
            f_ms(num(o, "step_ms")), f_ms(num(o, "graph_step_ms")),
        ]) + " |")
        lines.append("| " + " | ".join([
            k[0], str(k[1]), k[2], f_ms(num(o, "base_fwd_ms")), f_ms(num(t, "base_fwd_ms")), f_ms(lora_fwd),
            f_ms(floor), f_pct(pct_floor), f_ms(gmm_fwd), f_ms(num(t, "loop_fwd_ms")), f_x(fwd_x),
        ]) + " |")
        training.append("| " + " | ".join([
            k[0], str(k[1]), k[2], f_ms(branch_fb), f_ms(gmm_branch), f_x(branch_x),
            f_ms(num(o, "branch_accum_fwdbwd_ms")), f_ms(num(o, "base_fwdbwd_ms")),
            f_ms(torch_base_fb), f_ms(lora_fb), f_ms(gmm_fb), f_ms(num(t, "loop_fwdbwd_ms")), f_x(fb_x),
        ]) + " |")
    lines += training
    lines += base_table

    lines.append("")
    lines.append(f"**Summary** ({len(keys)} rows)")
    lines.append("")
    if floor_pcts:
        lo, hi = min(floor_pcts), max(floor_pcts)
        lines.append(f"- % of floor (LoRA fwd): min {lo[0]:.1f}% ({lo[1]}), "
                     f"max {hi[0]:.1f}% ({hi[1]})")
    else:
        lines.append("- % of floor (LoRA fwd): no data")
    for name, values in (("base fwd GEMM", base_fwd_ratios), ("base dx GEMM", base_dx_ratios)):
        if values:
            level = sum(1 for v, _ in values if v >= 0.97)
            worst = min(values)
            lines.append(f"- {name}: ours at least as fast as torch grouped_mm (within 3%) in {level} of "
                         f"{len(values)} rows; worst ratio {worst[0]:.2f}× ({worst[1]})")
    if fb_ratios:
        ordered = sorted(v for v, _ in fb_ratios)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        lines.append(f"- whole layer f+b: median ratio {median:.2f}×")
    for name, values in (("LoRA branch f+b", branch_ratios), ("LoRA branch f+b (+=, more work than torch's)", accum_ratios),
                         ("whole layer f+b", fb_ratios)):
        if values:
            wins = sum(1 for v, _ in values if v >= 1.0)
            worst = min(values)
            lines.append(f"- {name}: ours at least as fast as torch grouped_mm in {wins} of {len(values)} rows; "
                         f"worst ratio {worst[0]:.2f}× ({worst[1]})")
        else:
            lines.append(f"- {name}: no data")
    missing = [f"{k[0]} r={k[1]} {k[2]}" for k in keys
               if k not in ours_recs or k not in torch_recs]
    if missing:
        lines.append(f"- rows present in only one input: {', '.join(missing)}")
    few = {(r["shape"], r["loop_fwdbwd_iters"]) for r in torch_recs.values()
           if r.get("loop_fwdbwd_iters") not in (None, r.get("iters"))}
    if few:
        counts = ", ".join(str(n) for n in sorted({n for _, n in few}))
        shapes = ", ".join(sorted({s for s, _ in few}))
        lines.append(f"- torch loop f+b used fewer timed iterations ({counts}) for: {shapes}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", required=True, help="JSON written by the C++ benchmark")
    ap.add_argument("--torch", required=True, help="JSON written by bench/torch_anchors.py")
    ap.add_argument("--date", default=datetime.date.today().isoformat(),
                    help="date for the header (default today)")
    ap.add_argument("--markdown-out", help="also write the Markdown to this file")
    args = ap.parse_args()

    text = build(load(args.ours), load(args.torch), args.date)
    sys.stdout.write(text)
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
