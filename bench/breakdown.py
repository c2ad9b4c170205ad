#!/usr/bin/env python
"""Where the speed-up goes: time and MACs per kind of work, DeiT-S against EViT and ICE.

    python bench/breakdown.py --device cuda --dtype bf16 --batch-size 256 --json breakdown.json
    python bench/breakdown.py --device cuda --dtype bf16 --batch-size 1024 --compile
    python bench/breakdown.py --batch-size 8 --keep-rates 0.7          # CPU, small

For every variant a profiled forward (ice_prune.breakdown: torch.profiler device time per op on a
GPU, self CPU time on a CPU) split into matmul, attention, selection and other, each kind's speed-up
over the baseline printed beside its MAC ratio. A kind whose speed-up is below its MAC ratio is where
a pruned model loses speed to its MACs; selection and other time the baseline
lacks is overhead. Profiling adds its own overhead: read ratios, and the throughput from
bench/throughput.py.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
from typing import Optional

import timm
import torch
from tqdm.auto import tqdm

import ice_prune
from ice_prune.breakdown import KINDS, breakdown, compare, mac_breakdown
from ice_prune.training.cli import (ArgumentParser, check_keep_rate_arg, check_model_name,
                                    check_output_file, run_script)
from ice_prune.throughput import cudnn_benchmark_mode, check_device, resolve_dtype


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="any timm VisionTransformer")
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--methods", nargs="+", default=["evit", "ice"], choices=["evit", "ice"])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="fp16/bf16 run under autocast")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 8 on CPU")
    parser.add_argument("--reps", type=int, default=5, help="profiled forwards per variant")
    parser.add_argument("--warmup", type=int, default=3, help="forwards before profiling")
    parser.add_argument("--compile", action="store_true", help="profile torch.compile'd models")
    parser.add_argument("--json", default=None, help="write every figure and the settings here")
    args = parser.parse_args(argv)
    for rate in args.keep_rates:
        check_keep_rate_arg(rate, "--keep-rates")
    for flag in ("reps", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    check_model_name(args.model)
    if args.json:
        check_output_file(args.json, "--json")
    return args


def print_comparison(name: str, rows: dict) -> None:
    print(f"\n{name} against the baseline")
    cols = f"{'kind':<11}{'base ms':>10}{'ms':>10}{'speed-up':>10}{'MAC ratio':>11}{'added ms':>10}"
    print(cols)
    print("-" * len(cols))
    for kind, row in rows.items():
        def fmt(value):
            return f"{value:>9.2f}x" if value is not None else f"{'-':>10}"
        print(f"{kind:<11}{row['base_ms']:>10.2f}{row['ms']:>10.2f}{fmt(row['speedup'])}"
              f"{fmt(row['mac_ratio']):>11}{row['delta_ms']:>10.2f}")


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = check_device(args.device, "--device")
    dtype = resolve_dtype(args.dtype)
    batch = args.batch_size or (256 if device.type == "cuda" else 8)
    base = ice_prune.load_model(args.model).to(device)
    models = {"baseline": base}
    for rate in args.keep_rates:
        for method in args.methods:
            models[f"{method}@{rate:g}"] = ice_prune.load_model(copy.deepcopy(base), method=method,
                                                                keep_rate=rate)
    embed = base.patch_embed
    x = torch.randn(batch, embed.proj.in_channels, *embed.img_size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    results = {}
    with autocast, cudnn_benchmark_mode(device), torch.no_grad():
        for name, model in tqdm(models.items(), desc="profiling", leave=False):
            macs = mac_breakdown(model, x)
            run = torch.compile(model) if args.compile else model
            results[name] = breakdown(run, x, args.reps, args.warmup, macs=macs)
    header = (f"{args.model} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
              f" ({args.dtype}, batch {batch}{', compiled' if args.compile else ''}): ms per "
              f"forward by kind ({', '.join(KINDS)}), profiled")
    print(header)
    comparisons = {name: compare(results["baseline"], res) for name, res in results.items()
                   if name != "baseline"}
    for name, rows in comparisons.items():
        print_comparison(name, rows)
    output = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else argv)),
        "header": header, "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "settings": dict(vars(args), batch_size=batch, device=str(device)),
        "breakdown": results, "comparisons": comparisons,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(output, f, indent=2)
        print(f"wrote {args.json}")
    return output


if __name__ == "__main__":
    run_script(main)
