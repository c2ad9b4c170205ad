#!/usr/bin/env python
"""Throughput, GMACs and parameters of a ViT, EViT and ICE at several keep rates (the paper's Table 5).

    python bench/throughput.py                                   # DeiT-S, keep rates 0.7 and 0.5
    python bench/throughput.py --device cuda --dtype bf16 --batch-size max --json r.json --plot r.png

All variants are timed interleaved in one run (ice_prune.benchmark_models); a speed-up is the ratio of
the variant's median img/s to the baseline's. GMACs are fvcore counts with the SDPA and reorganize
handles of ice_prune.flops. Weights are random unless --checkpoint or --pretrained: the work a forward
does, and so its speed, does not depend on them (every variant keeps a fixed number of tokens).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
from typing import Optional

import timm
import torch
from tqdm.auto import tqdm

import ice_prune
from ice_prune.throughput import (DEFAULTS, benchmark_models, load_checkpoint, max_batch_size,
                                 read_checkpoint, resolve_device)
from ice_prune.flops import count_flops
from ice_prune.kernels.ops import KERNEL_CHOICES

METHODS = ("evit", "ice")

# The ICE paper's Table 5 (RTX 3090, maximum batch size, fp32 img/s) and the GMACs DeiT and EViT
# report; drawn beside our figures for reference only: another GPU, other software.
PAPER = {
    "source": "ICE (CVPR 2023) Table 5, RTX 3090 at maximum batch size; GMACs from DeiT / EViT",
    "baseline": {"img_per_s": 818, "gmacs": 4.6, "params_m": 22.1},
    "evit": {0.7: {"img_per_s": 1291, "gmacs": 3.0, "params_m": 22.1},
             0.5: {"img_per_s": 1701, "gmacs": 2.3, "params_m": 22.1}},
    "ice": {0.7: {"img_per_s": 1178, "gmacs": 3.0, "params_m": 22.4},
            0.5: {"img_per_s": 1547, "gmacs": 2.3, "params_m": 22.4}},
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224", help="any timm VisionTransformer")
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5],
                   help="keep rates for EViT and ICE")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", default=None,
                         help="weights: DeiT release .pth ({'model': ...}), plain state dict or "
                              ".safetensors; ice_head.* keys, if present, go to the ICE models")
    weights.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fp16/bf16 run under autocast")
    p.add_argument("--batch-size", default=None,
                   help=f"images per forward, or 'max' on CUDA (the largest that fits); default "
                        f"{DEFAULTS['cpu']['batch_size']} on CPU, {DEFAULTS['cuda']['batch_size']} "
                        f"on CUDA")
    p.add_argument("--reps", type=int, default=None,
                   help=f"timed repetitions; default {DEFAULTS['cpu']['reps']} on CPU, "
                        f"{DEFAULTS['cuda']['reps']} on CUDA")
    p.add_argument("--warmup", type=int, default=None, help="discarded repetitions")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--ice-classes", type=int, default=None,
                   help="image classes of the ICE head (default: the model's); 1 gives a 2-output "
                        "head, the cost of a distilled foreground/background selector")
    p.add_argument("--kernel", default="auto", choices=KERNEL_CHOICES, help="reorganize kernel")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--json", default=None, help="write every figure and the settings here")
    p.add_argument("--plot", default=None, help="write a PNG of speed-up and GMACs vs keep rate")
    args = p.parse_args(argv)
    for r in args.keep_rates:
        if not 0.0 < r <= 1.0:
            p.error(f"--keep-rates must lie in (0, 1], got {r}")
    if args.batch_size not in (None, "max"):
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            p.error(f"--batch-size takes a number or 'max', got {args.batch_size!r}")
    return args


def build_variants(args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """The baseline and EViT / ICE at every keep rate, sharing the baseline's weights."""
    kwargs = {} if args.img_size is None else {"img_size": args.img_size}
    base = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    state = read_checkpoint(args.checkpoint) if args.checkpoint else None
    head_state = {}
    if state is not None:
        load_checkpoint(base, {k: v for k, v in state.items() if not k.startswith("ice_head.")})
        head_state = {k: v for k, v in state.items() if k.startswith("ice_head.")}
    models, meta = {"baseline": base}, {"baseline": {"method": "baseline", "keep_rate": 1.0}}
    for rate in args.keep_rates:
        for method in METHODS:
            extra = {"num_classes": args.ice_classes} if method == "ice" and args.ice_classes else {}
            model = ice_prune.patch(copy.deepcopy(base), rate, method=method, kernel=args.kernel,
                                    **extra)
            if method == "ice" and head_state:
                load_checkpoint(model, state)
            name = f"{method}@{rate:g}"
            models[name], meta[name] = model, {"method": method, "keep_rate": rate}
    return models, meta


def environment(device: torch.device, threads: int) -> tuple[dict, dict]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    info = {"type": device.type, "name": name, "threads": threads}
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "timm": timm.__version__, "ice_prune": ice_prune.__version__,
                "cuda": torch.version.cuda}
    for module in ("fvcore", "triton"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "unknown")
        except ImportError:
            versions[module] = None
    return info, versions


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    cols = f"{'variant':<18}{'keep':>6}{'params(M)':>11}{'GMACs':>8}{'img/s med':>11}" \
           f"{'img/s best':>12}{'speed-up':>10}{'paired':>8}{'vs EViT':>9}"
    print(cols)
    print("-" * len(cols))
    for r in rows:
        vs = f"{r['vs_evit']:.3f}" if r.get("vs_evit") is not None else ""
        print(f"{r['name']:<18}{r['keep_rate']:>6.2f}{r['params_m']:>11.2f}{r['gmacs']:>8.2f}"
              f"{r['median_img_per_s']:>11.1f}{r['best_img_per_s']:>12.1f}{r['speedup']:>9.2f}x"
              f"{r['paired_speedup']:>7.2f}x{vs:>9}")
    print("speed-up: ratio of median img/s; paired: median over repetitions of the ratio within one "
          "repetition; vs EViT: ICE's median img/s over EViT's at the same keep rate")
    for r in rows:
        if r.get("vs_evit") is None:
            continue
        line = (f"{r['name']}: {100 * (r['vs_evit'] - 1):+.1f}% throughput vs EViT at the same keep "
                f"rate (goal: no worse than -3%)")
        if r["keep_rate"] in PAPER["ice"]:
            paper = PAPER["ice"][r["keep_rate"]]["img_per_s"] / PAPER["evit"][r["keep_rate"]]["img_per_s"]
            line += f"; the paper's ICE: {100 * (paper - 1):+.1f}%"
        print(line)


def plot(rows: list[dict], path: str, title: str, reference: bool) -> None:
    """Speed-up and GMACs against keep rate; ``reference`` draws the paper's DeiT-S figures beside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_g) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = next(r for r in rows if r["method"] == "baseline" and not r["compiled"])
    styles = {"evit": ("tab:blue", "o"), "ice": ("tab:red", "s")}
    for method, (color, marker) in styles.items():
        for compiled in sorted({r["compiled"] for r in rows}):
            ours = sorted((r for r in rows if r["method"] == method and r["compiled"] == compiled),
                          key=lambda r: -r["keep_rate"])
            if not ours:
                continue
            label = f"{method.upper()} (ours{', compiled' if compiled else ''})"
            ls = ":" if compiled else "-"
            ax_s.plot([1.0] + [r["keep_rate"] for r in ours], [1.0] + [r["speedup"] for r in ours],
                      ls, color=color, marker=marker, label=label)
            if not compiled:
                ax_g.plot([1.0] + [r["keep_rate"] for r in ours],
                          [base["gmacs"]] + [r["gmacs"] for r in ours], ls, color=color,
                          marker=marker, label=label)
        if not reference:
            continue
        paper = PAPER[method]
        rates = sorted(paper, reverse=True)
        ax_s.plot([1.0] + rates,
                  [1.0] + [paper[r]["img_per_s"] / PAPER["baseline"]["img_per_s"] for r in rates],
                  "--", color=color, marker=marker, mfc="none", alpha=0.7,
                  label=f"{method.upper()} paper Table 5 (RTX 3090)")
    if reference:
        rates = sorted(PAPER["evit"], reverse=True)
        ax_g.plot([1.0] + rates, [PAPER["baseline"]["gmacs"]] + [PAPER["evit"][r]["gmacs"] for r in rates],
                  "--", color="gray", marker="o", mfc="none",
                  label="DeiT-S / EViT as published (ICE paper: none)")
    ax_s.set(xlabel="keep rate", ylabel="speed-up over the baseline (ratio of medians)",
             title="throughput")
    ax_g.set(xlabel="keep rate", ylabel="GMACs per image", title="compute (fvcore + SDPA)")
    for ax in (ax_s, ax_g):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models, meta = build_variants(args)
    embed = models["baseline"].patch_embed
    input_size = (embed.proj.in_channels, *embed.img_size)

    stats = {}
    for name, model in tqdm(models.items(), desc="counting GMACs", leave=False):
        stats[name] = {"params": sum(p.numel() for p in model.parameters()),
                       "macs": count_flops(model, input_size)}
    if args.compile:
        for name in list(models):
            models[f"{name}+compile"] = torch.compile(models[name])
            meta[f"{name}+compile"], stats[f"{name}+compile"] = meta[name], stats[name]

    batch_size = args.batch_size
    if batch_size == "max":
        batch_size = max_batch_size(models, input_size, device, args.dtype)
    run = benchmark_models(models, input_size, batch_size, device, args.dtype, args.reps,
                           args.warmup, baseline="baseline", progress=True)

    rows = []
    for res in run.to_dict()["results"]:
        name = res["name"]
        rows.append(dict(res, **meta[name], compiled=name.endswith("+compile"),
                         params=stats[name]["params"], params_m=stats[name]["params"] / 1e6,
                         macs=stats[name]["macs"], gmacs=stats[name]["macs"] / 1e9))
    for r in rows:  # ICE's throughput relative to EViT's at the same keep rate, in the same run
        evit = f"evit@{r['keep_rate']:g}" + ("+compile" if r["compiled"] else "")
        r["vs_evit"] = (r["median_img_per_s"] / run[evit].median if r["method"] == "ice" else None)

    info, versions = environment(device, torch.get_num_threads())
    reps = len(run[run.baseline].times)
    header = (f"{args.model} on {info['name']} ({device.type}, {args.dtype}, batch "
              f"{run[run.baseline].batch_size}, {reps} reps, warm-up {run.warmup}, "
              f"{info['threads']} threads)")
    print_table(rows, header)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else argv)),
        "device": info, "versions": versions,
        "settings": dict(vars(args), batch_size=run[run.baseline].batch_size,
                         batch_size_arg=args.batch_size, reps=reps, warmup=run.warmup,
                         input_size=list(input_size), device=str(device)),
        "results": rows, "schedule": run.schedule,
        "paper": {"source": PAPER["source"], "baseline": PAPER["baseline"],
                  **{m: {str(r): v for r, v in PAPER[m].items()} for m in METHODS}},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        # the paper's figures are for DeiT-S at 224 px: drawn only beside a run of that model
        reference = args.model.startswith("deit_small_patch16_224") and input_size[1:] == (224, 224)
        plot(rows, args.plot, header, reference)
        print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    main()
