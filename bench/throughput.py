#!/usr/bin/env python
"""Throughput, GMACs and parameters of a ViT, EViT and ICE at several keep rates (the paper's Table 5).

    python bench/throughput.py                                   # DeiT-S, keep rates 0.7 and 0.5
    python bench/throughput.py --device cuda --dtype bf16 --batch-size max --json r.json --plot r.png
    python bench/throughput.py --latency-only --threads 1          # batch-1 latency: median, p90
    python bench/throughput.py --device cuda --dtype bf16 --evit-reference --cuda-graphs
    python bench/throughput.py --explain                           # + ICE with its map, vs ICE
    python bench/throughput.py --device cuda --model-dtype bf16    # bf16 weights, no autocast
    python bench/throughput.py --thresholds 0.5 0.7 --masses 0.9   # + per-image keep counts
    python bench/throughput.py --thresholds 0.5 --masses 0.9 --masked   # + padded-and-masked twins

All variants are timed interleaved in one run (ice_prune.benchmark_models); a speed-up is the ratio of
the variant's median img/s to the baseline's. GMACs are fvcore counts with the SDPA and reorganize
handles of ice_prune.flops. Weights are random (seeded by --seed) unless --checkpoint or --pretrained:
the work a fixed-keep forward does, and so its speed, does not depend on them (it keeps a fixed number
of tokens); a keep policy's does (below).
``--latency`` / ``--latency-only`` time single-image forwards, interleaved the same way
(ice_prune.throughput.latency), each captured once as a CUDA graph on a GPU (``--no-cuda-graphs``: eager;
``--compile`` then uses mode="reduce-overhead"), and report median and p90 milliseconds.

On a GPU the default run times every variant eager and torch.compile'd in the same interleaved run and
prints one table each (a compiled variant's speed-up is over the compiled baseline); cuDNN benchmark
is on while timing. ``--cuda-graphs`` replays each eager variant as a captured CUDA graph in the
throughput run too, and compiles with mode="reduce-overhead" (small, launch-bound models).
``--evit-reference`` adds, per keep rate, EViT with timm's non-fused attention in every block (the
full attention matrix materialized, as the official EViT code computes it) and reports our EViT's
throughput over it. ``--explain`` adds, per keep rate, ICE in explain mode (``ice-explain@RATE``: the
map from the pruned forward, ``model.ice_explanation``; the ``ice@RATE`` model's own weight tensors)
and reports its throughput over ICE's: the ratio of medians, and the per-repetition ratios' median,
quartiles and range.

Per-image keep counts (``model.keep_policy``): ``--thresholds`` adds ICE keeping each image's tokens
whose foreground probability passes the threshold (``ice@threshold=T``), ``--masses`` EViT keeping
the fewest tokens that hold that share of the [CLS] attention (``evit@mass=M``), each image within
``--policy-min-share`` and ``--policy-max-share`` of the tokens at each point. What they cost
depends on the images, so with them every variant runs on one seeded batch of SyntheticScenes images
(``--images synthetic``: objects of ``--object-scale`` of the image side, a wide range, so that the
images keep different counts; random noise makes every token look alike). Each such row reports the
mean tokens kept per selection point over the batch (``model.ice_keep_counts``), GMACs per image
(``count_flops(images=...)`` over the batch) and its img/s, and its img/s over the fixed-keep
variant of its method nearest in GMACs. They run eager: their packed forward syncs with the host at
each point. ``--masked`` adds, for each of them, its padded-and-masked twin
(``ice@threshold=T,masked``: ``KeepPolicy(masked=True)``, ice_prune.masked, what A-ViT-style code
does) on the same weights: the same tokens kept, the same outputs, but the batch stays ``[B, N, D]``
and the dropped tokens are only masked out of attention. Its GMACs are what it computes, every row
of every block (about the baseline's); its img/s is reported over its packed twin's, and its JSON
row has ``"masked": true``.

Precision: ``--dtype fp16/bf16`` runs fp32 weights under autocast; ``--model-dtype fp16/bf16`` casts
the weights and inputs instead (no autocast, as timm's benchmark.py offers). Each variant's first
forward is timed before the warm-up (compilation, Triton compiles, cuDNN's search included), and its
first forward at half the batch size after the timed rounds; both are printed and written to --json
with their difference to the baseline's (compiled variants: to the compiled baseline's).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import itertools
import json
import os
import platform
import sys
from typing import Optional

import timm
import torch
from tqdm.auto import tqdm

import ice_prune
from ice_prune.checkpoint import read_state_dict, split_ice_head
from ice_prune.select import KeepPolicy
from ice_prune.training.cli import (TRUST_HELP, ArgumentParser, check_keep_rate_arg, check_model_name,
                                    check_output_file, run_script)
from ice_prune.throughput import (DEFAULTS, LATENCY_DEFAULTS, benchmark_models, latency,
                                  max_batch_size, check_device, percentile)
from ice_prune.flops import count_flops
from ice_prune.kernels.ops import KERNEL_CHOICES
from ice_prune.evaluation.paper import TABLE5, TABLE5_KEEP_RATES, TABLE5_SOURCE, Efficiency

METHODS = ("evit", "ice")
#: the method name of --evit-reference's variants: EViT materializing the attention matrix
REFERENCE = "evit-ref"
#: the method name of --explain's variants: ICE with the map from the pruned forward
EXPLAIN = "ice-explain"
#: the method names of the --thresholds / --masses variants: a keep policy, a count per image
ADAPTIVE = {"ice": "ice-adaptive", "evit": "evit-adaptive"}


def published(method: str, keep_rate: float = 1.0) -> Optional[Efficiency]:
    """The paper's Table 5 row of ``method`` (baseline, evit, ice) at ``keep_rate``, None where the
    paper has none; drawn beside our figures for reference only: another GPU, other software."""
    if method == "baseline":
        return TABLE5["none-1.0"]
    return TABLE5[f"{method}-{keep_rate:g}"] if keep_rate in TABLE5_KEEP_RATES else None


def published_json() -> dict:
    """Table 5 in the --json output: the source, then the baseline and each method by keep rate."""
    def fields(row: Efficiency) -> dict:
        return {"img_per_s": row.img_per_s, "gmacs": row.gmacs, "params_m": row.params_m}

    return {"source": TABLE5_SOURCE, "baseline": fields(published("baseline")),
            **{method: {str(rate): fields(published(method, rate)) for rate in TABLE5_KEEP_RATES}
               for method in METHODS}}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="any timm VisionTransformer")
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5],
                   help="keep rates for EViT and ICE")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", default=None,
                         help="weights: DeiT release .pth ({'model': ...}), plain state dict or "
                              ".safetensors; ice_head.* keys, if present, go to the ICE models")
    weights.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fp16/bf16 run under autocast (fp32 weights)")
    parser.add_argument("--model-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="fp16/bf16: weights and inputs cast to it, no autocast (--dtype fp32)")
    parser.add_argument("--batch-size", default=None,
                   help=f"images per forward, or 'max' on CUDA (the largest that fits); default "
                        f"{DEFAULTS['cpu']['batch_size']} on CPU, {DEFAULTS['cuda']['batch_size']} "
                        f"on CUDA")
    parser.add_argument("--reps", type=int, default=None,
                   help=f"timed repetitions; default {DEFAULTS['cpu']['reps']} on CPU, "
                        f"{DEFAULTS['cuda']['reps']} on CUDA")
    parser.add_argument("--warmup", type=int, default=None, help="discarded repetitions")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--ice-classes", type=int, default=None,
                   help="image classes of the ICE head (default: the model's); 1 gives a 2-output "
                        "head, the cost of a distilled foreground/background selector")
    parser.add_argument("--kernel", default="auto", choices=KERNEL_CHOICES, help="reorganize kernel")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile'd models, in the same run; None: on CUDA "
                             "only")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="throughput run on CUDA: replay each eager variant as a captured CUDA "
                             "graph, compile with mode='reduce-overhead' (small, launch-bound models)")
    parser.add_argument("--evit-reference", action="store_true",
                        help="also time, per keep rate, EViT materializing the attention matrix "
                             "(timm's non-fused attention, as the official EViT code) and report "
                             "our EViT's throughput over it")
    parser.add_argument("--explain", action="store_true",
                        help=f"also time, per keep rate, ICE in explain mode ({EXPLAIN}@RATE: one "
                             f"pruned forward also gives the map; the ice@RATE model's weights) and "
                             f"report its throughput over ICE's")
    lat = parser.add_argument_group("batch-1 latency")
    lat.add_argument("--latency", action="store_true",
                     help="also measure batch-1 latency (median and p90 of single-image forwards, "
                          "interleaved) after the throughput run")
    lat.add_argument("--latency-only", action="store_true", help="measure latency, not throughput")
    lat.add_argument("--latency-reps", type=int, default=None,
                     help=f"timed single-image forwards per variant; default "
                          f"{LATENCY_DEFAULTS['cpu']['reps']} on CPU, "
                          f"{LATENCY_DEFAULTS['cuda']['reps']} on CUDA")
    lat.add_argument("--latency-warmup", type=int, default=None, help="discarded rounds")
    lat.add_argument("--no-cuda-graphs", action="store_true",
                     help="on CUDA, time eager forwards instead of replaying a captured CUDA graph")
    adaptive = parser.add_argument_group("per-image keep counts (model.keep_policy)")
    adaptive.add_argument("--thresholds", type=float, nargs="+", default=[],
                          help="ICE variants keeping each image's tokens whose foreground "
                               "probability is at least each threshold (KeepPolicy(threshold=T))")
    adaptive.add_argument("--masses", type=float, nargs="+", default=[],
                          help="EViT variants keeping the fewest tokens that hold each share of "
                               "the [CLS] attention (KeepPolicy(mass=M))")
    adaptive.add_argument("--masked", action="store_true",
                          help="also time each --thresholds / --masses variant padded and masked "
                               "(NAME,masked: KeepPolicy(masked=True), as A-ViT-style code runs "
                               "it: the same tokens kept, dropped ones masked out of attention "
                               "but still computed) and report its img/s over the packed one's; "
                               "its GMACs count what it computes, all N rows of every block")
    adaptive.add_argument("--policy-min-share", type=float, default=0.0,
                          help="each image keeps at least this share of the tokens at each point")
    adaptive.add_argument("--policy-max-share", type=float, default=1.0,
                          help="each image keeps at most this share of the tokens at each point")
    adaptive.add_argument("--images", choices=["random", "synthetic"], default=None,
                          help="what every variant runs on: random noise, or a seeded batch of "
                               "SyntheticScenes images (the default, and needed, with --thresholds "
                               "or --masses)")
    adaptive.add_argument("--object-scale", type=float, nargs=2, default=[0.1, 0.6],
                          metavar=("MIN", "MAX"),
                          help="--images synthetic: object sizes, shares of the image side")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the random weights (those no checkpoint gives) and the "
                             "--images synthetic batch")
    parser.add_argument("--json", default=None, help="write every figure and the settings here")
    parser.add_argument("--plot", default=None, help="write a PNG of speed-up and GMACs vs keep rate")
    args = parser.parse_args(argv)
    for rate in args.keep_rates:
        check_keep_rate_arg(rate, "--keep-rates")
    if args.model_dtype != "fp32" and args.dtype != "fp32":
        raise ValueError(f"--model-dtype {args.model_dtype} runs the weights in {args.model_dtype} "
                         f"without autocast; --dtype {args.dtype} (autocast) cannot be combined "
                         f"with it: use one of the two")
    if args.batch_size not in (None, "max"):
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            parser.error(f"--batch-size takes a number or 'max', got {args.batch_size!r}")
    for flag in ("threads", "latency_reps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    check_model_name(args.model)
    check_adaptive_args(args)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(path, flag)
    return args


def keep_policies(args: argparse.Namespace) -> list[tuple[str, KeepPolicy]]:
    """``(method, KeepPolicy)`` of each --thresholds / --masses variant, each followed by its
    masked twin with --masked; bad values raise."""
    shares = dict(min_share=args.policy_min_share, max_share=args.policy_max_share)
    policies = ([("ice", KeepPolicy(threshold=t, **shares)) for t in args.thresholds]
                + [("evit", KeepPolicy(mass=m, **shares)) for m in args.masses])
    if not args.masked:
        return policies
    return [(method, p) for method, policy in policies
            for p in (policy, dataclasses.replace(policy, masked=True))]


def check_adaptive_args(args: argparse.Namespace) -> None:
    """The keep policies checked, ``args.images`` resolved, and the options the adaptive variants
    cannot run with refused, the fix named."""
    policies = keep_policies(args)
    if args.masked and not policies:
        raise ValueError("--masked adds the padded-and-masked twin of each --thresholds / "
                         "--masses variant: give some of those too")
    if args.images is None:
        args.images = "synthetic" if policies else "random"
    if policies and args.images != "synthetic":
        raise ValueError("--thresholds / --masses keep what the images make them keep, and random "
                         "noise makes every token look alike: use --images synthetic")
    if args.images == "synthetic" and args.batch_size == "max":
        raise ValueError("--images synthetic draws --batch-size images: give a number, not 'max'")
    if policies and (args.latency or args.latency_only or args.cuda_graphs):
        raise ValueError("--thresholds / --masses variants sync with the host at each selection "
                         "point and run on the --images batch: drop --latency, --latency-only "
                         "and --cuda-graphs, or run those without the adaptive variants")


def policy_name(method: str, policy: KeepPolicy) -> str:
    """``ice@threshold=T`` / ``evit@mass=M``: a variant with a keep policy; ``,masked`` appended
    for a masked one."""
    if policy.threshold is not None:
        name = f"{method}@threshold={policy.threshold:g}"
    else:
        name = f"{method}@mass={policy.mass:g}"
    return name + ",masked" if policy.masked else name


def synthetic_images(count: int, input_size: tuple[int, int, int], seed: int,
                     scale: tuple[float, float]) -> torch.Tensor:
    """``[count, C, H, W]``: the first ``count`` images of SyntheticScenes' "val" split with
    ``seed``, objects of ``scale`` of the image side, normalized as the models expect."""
    from ice_prune.data import SyntheticScenes
    scenes = SyntheticScenes(img_size=tuple(input_size[1:]), length=count, split="val", seed=seed,
                             scale=tuple(scale))
    return torch.stack([scenes[i][0] for i in range(count)])


def build_variants(args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """The baseline and EViT / ICE at every keep rate and with every keep policy, sharing the
    baseline's weights; the ICE models get the checkpoint's ICE head, if it has one. With
    ``--explain``, ``ice-explain@RATE`` is ``ice@RATE`` in explain mode, holding the same weight
    tensors; with ``--masked``, ``NAME,masked`` is the policy variant ``NAME`` run masked, holding
    the same weight tensors."""
    kwargs = {} if args.img_size is None else {"img_size": args.img_size}
    state = read_state_dict(args.checkpoint, args.trust_checkpoint) if args.checkpoint else None
    base = ice_prune.load_model(args.model, split_ice_head(state)[0] if state else None,
                                pretrained=args.pretrained, **kwargs)
    models, meta = {"baseline": base}, {"baseline": {"method": "baseline", "keep_rate": 1.0}}
    for rate in args.keep_rates:
        for method in METHODS:
            patch_kwargs = {"kernel": args.kernel}
            if method == "ice" and args.ice_classes:
                patch_kwargs["num_classes"] = args.ice_classes
            name = f"{method}@{rate:g}"
            models[name] = ice_prune.load_model(copy.deepcopy(base), state, method=method,
                                                keep_rate=rate, patch_kwargs=patch_kwargs)
            meta[name] = {"method": method, "keep_rate": rate}
        if args.explain:
            name = f"{EXPLAIN}@{rate:g}"
            models[name] = sharing_weights(models[f"ice@{rate:g}"])
            models[name].explain = True
            meta[name] = {"method": EXPLAIN, "keep_rate": rate}
        if args.evit_reference:
            name = f"{REFERENCE}@{rate:g}"
            models[name] = materialize_attention(ice_prune.load_model(
                copy.deepcopy(base), state, method="evit", keep_rate=rate,
                patch_kwargs={"kernel": args.kernel}))
            meta[name] = {"method": REFERENCE, "keep_rate": rate}
    for method, policy in keep_policies(args):
        name = policy_name(method, policy)
        if policy.masked:  # the packed twin's weight tensors (its ICE head too), run masked
            models[name] = sharing_weights(models[name.removesuffix(",masked")])
            models[name].keep_policy = policy
        else:
            patch_kwargs = {"kernel": args.kernel, "keep_policy": policy}
            if method == "ice" and args.ice_classes:
                patch_kwargs["num_classes"] = args.ice_classes
            models[name] = ice_prune.load_model(copy.deepcopy(base), state, method=method,
                                                patch_kwargs=patch_kwargs)
        rule = {k: v for k, v in dataclasses.asdict(policy).items() if k != "masked"}
        meta[name] = {"method": ADAPTIVE[method], "keep_rate": None, "policy": rule,
                      "masked": policy.masked}
    return models, meta


def sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (its own knobs) that holds ``model``'s parameter and buffer tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def materialize_attention(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with timm's non-fused attention in every block (``attn.fused_attn = False``): the
    full ``[B, H, N, N]`` attention matrix is written and read, as in the official EViT code (timm
    0.3's Attention), instead of fused scaled-dot-product attention. Our EViT's [CLS] row stays the
    one extra ``q_cls k^T`` row (1/N of the matrix's multiply-adds), so against the official code's
    structure this reference is at most that much slower."""
    for i, block in enumerate(model.blocks):
        if not hasattr(block.attn, "fused_attn"):
            raise ValueError(f"blocks.{i}.attn ({type(block.attn).__name__}) has no fused_attn "
                             f"switch: --evit-reference needs timm's Attention")
        block.attn.fused_attn = False
    return model


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
    adaptive = any(row.get("kept_per_point") for row in rows)
    width = name_width(rows)
    cols = f"{'variant':<{width}}{'keep':>6}{'params(M)':>11}{'GMACs':>8}{'img/s med':>11}" \
           f"{'img/s best':>12}{'speed-up':>10}{'paired':>8}{'vs EViT':>9}" \
           f"{'  tokens kept per point' if adaptive else ''}"
    print(cols)
    print("-" * len(cols))
    for row in rows:
        vs_evit = f"{row['vs_evit']:.3f}" if row.get("vs_evit") is not None else ""
        keep = f"{row['keep_rate']:.2f}" if row["keep_rate"] is not None else "-"
        kept = "  " + " / ".join(f"{k:.1f}" for k in row["kept_per_point"]) \
            if row.get("kept_per_point") else ""
        print(f"{row['name']:<{width}}{keep:>6}{row['params_m']:>11.2f}{row['gmacs']:>8.2f}"
              f"{row['median_img_per_s']:>11.1f}{row['best_img_per_s']:>12.1f}{row['speedup']:>9.2f}x"
              f"{row['paired_speedup']:>7.2f}x{vs_evit:>9}{kept}")
    print("speed-up: ratio of median img/s; paired: median over repetitions of the ratio within one "
          "repetition; vs EViT: ICE's median img/s over EViT's at the same keep rate")
    if adaptive:
        print("tokens kept per point: a keep policy's mean over the images of the tokens each "
              "selection point kept; GMACs: the mean per image on the same images")
    for row in rows:
        if row.get("nearest_fixed"):
            print(f"{row['name']}: {row['vs_nearest_fixed']:.3f} of the img/s of "
                  f"{row['nearest_fixed']}, the fixed keep rate nearest in GMACs")
    for row in rows:
        if row.get("vs_evit") is None:
            continue
        line = (f"{row['name']}: {100 * (row['vs_evit'] - 1):+.1f}% throughput vs EViT at the same "
                f"keep rate (goal: no worse than -3%)")
        paper_ice, paper_evit = published("ice", row["keep_rate"]), published("evit", row["keep_rate"])
        if paper_ice and paper_evit:
            ratio = paper_ice.img_per_s / paper_evit.img_per_s
            line += f"; the paper's ICE: {100 * (ratio - 1):+.1f}%"
        print(line)
    for row in rows:
        if row.get("vs_ice") is not None:
            reps = row["vs_ice_reps"]
            print(f"{row['name']}: {row['vs_ice']:.3f} of ICE's img/s at the same keep rate (per "
                  f"repetition: median {row['vs_ice_paired']:.3f}, quartiles "
                  f"{percentile(reps, 25):.3f}-{percentile(reps, 75):.3f}, range {min(reps):.3f}-"
                  f"{max(reps):.3f}; goal: at least 0.98 on a GPU at batch 256 bf16)")
    for row in rows:
        if row.get("vs_packed") is not None:
            print(f"{row['name']}: {row['vs_packed']:.3f} of the img/s of {row['packed']}, the "
                  f"same policy packed (the same tokens kept; masked computes every row)")
    for row in rows:
        if row.get("vs_reference") is not None:
            print(f"{row['name']}: {row['vs_reference']:.2f}x the img/s of EViT materializing the "
                  f"attention matrix ({REFERENCE}, same run; goal: at least 1)")
    if rows and rows[0].get("first_call_s") is not None:
        print_first_calls(rows)


def name_width(rows: list[dict]) -> int:
    """The variant column's width: 18, or wider for a long name."""
    return max(18, 2 + max(len(row["name"]) for row in rows))


def print_first_calls(rows: list[dict]) -> None:
    """Each variant's first forward and its first at the new batch size, and both beyond the
    baseline's."""
    batch, new_batch = rows[0]["batch_size"], rows[0]["new_batch_size"]
    width = name_width(rows)
    cols = (f"{'variant':<{width}}{f'1st call B={batch} s':>18}{'- baseline s':>14}"
            f"{f'1st call B={new_batch} s':>18}{'- baseline s':>14}")
    print(cols)
    print("-" * len(cols))
    for row in rows:
        print(f"{row['name']:<{width}}{row['first_call_s']:>18.3f}"
              f"{row['first_call_vs_baseline_s']:>+14.3f}"
              f"{row['new_batch_call_s']:>18.3f}{row['new_batch_call_vs_baseline_s']:>+14.3f}")
    print(f"1st call: a variant's first forward, timed alone before the warm-up (compiles, "
          f"autotuning, cuDNN's search included); B={new_batch}: its first forward at that batch "
          f"size, after the timed rounds; - baseline: beyond the baseline's, same process (the "
          f"first model timed also pays the process's one-time setup)")


def plot(rows: list[dict], path: str, title: str, reference: bool) -> None:
    """Speed-up and GMACs against keep rate; ``reference`` draws the paper's DeiT-S figures beside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_gmacs) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = next(r for r in rows if r["method"] == "baseline" and not r["compiled"])
    styles = {"evit": ("tab:blue", "o"), "ice": ("tab:red", "s")}
    for method, (color, marker) in styles.items():
        for compiled in sorted({r["compiled"] for r in rows}):
            ours = sorted((r for r in rows if r["method"] == method and r["compiled"] == compiled),
                          key=lambda r: -r["keep_rate"])
            if not ours:
                continue
            label = f"{method.upper()} (ours{', compiled' if compiled else ''})"
            line_style = ":" if compiled else "-"
            ax_speed.plot([1.0] + [r["keep_rate"] for r in ours], [1.0] + [r["speedup"] for r in ours],
                      line_style, color=color, marker=marker, label=label)
            if not compiled:
                ax_gmacs.plot([1.0] + [r["keep_rate"] for r in ours],
                          [base["gmacs"]] + [r["gmacs"] for r in ours], line_style, color=color,
                          marker=marker, label=label)
        if not reference:
            continue
        baseline_img_per_s = published("baseline").img_per_s
        ax_speed.plot([1.0, *TABLE5_KEEP_RATES],
                  [1.0] + [published(method, r).img_per_s / baseline_img_per_s
                           for r in TABLE5_KEEP_RATES],
                  "--", color=color, marker=marker, mfc="none", alpha=0.7,
                  label=f"{method.upper()} paper Table 5 (RTX 3090)")
    if reference:
        ax_gmacs.plot([1.0, *TABLE5_KEEP_RATES],
                  [published("baseline").gmacs] + [published("evit", r).gmacs
                                                   for r in TABLE5_KEEP_RATES],
                  "--", color="gray", marker="o", mfc="none",
                  label="DeiT-S / EViT as published (ICE paper: none)")
    ax_speed.set(xlabel="keep rate", ylabel="speed-up over the baseline (ratio of medians)",
             title="throughput")
    ax_gmacs.set(xlabel="keep rate", ylabel="GMACs per image", title="compute (fvcore + SDPA)")
    for ax in (ax_speed, ax_gmacs):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = check_device(args.device, "--device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got --device {args.device} ({device})")
    if args.compile is None:  # the default: eager and compiled figures on a GPU
        args.compile = device.type == "cuda"
    torch.manual_seed(args.seed)
    models, meta = build_variants(args)
    embed = models["baseline"].patch_embed
    input_size = (embed.proj.in_channels, *embed.img_size)
    images = None
    if args.images == "synthetic":
        images = synthetic_images(args.batch_size or DEFAULTS.get(device.type, DEFAULTS["cpu"])[
            "batch_size"], input_size, args.seed, args.object_scale)

    stats = {name: variant_stats(model, input_size, images)
             for name, model in tqdm(models.items(), desc="counting GMACs", leave=False)}
    if args.compile:
        # with CUDA graphs or latency on CUDA: reduce-overhead, torch.compile's own CUDA graphs
        mode = ("reduce-overhead" if device.type == "cuda"
                and (args.cuda_graphs or args.latency or args.latency_only) else None)
        args.compile_mode = mode or "default"
        for name in [n for n in models if "policy" not in meta[n]]:  # a policy's forward syncs
            models[f"{name}+compile"] = torch.compile(models[name], mode=mode)
            meta[f"{name}+compile"], stats[f"{name}+compile"] = meta[name], stats[name]

    info, versions = environment(device, torch.get_num_threads())
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else argv)),
        "device": info, "versions": versions,
        "settings": dict(vars(args), input_size=list(input_size), device=str(device)),
    }
    if not args.latency_only:
        result.update(measure_throughput(args, models, meta, stats, input_size, device, info,
                                         images))
    if args.latency or args.latency_only:
        result["latency"] = measure_latency(args, models, meta, stats, input_size, device, info)
    result["paper"] = published_json()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot and "results" in result:
        # the paper's figures are for DeiT-S at 224 px: drawn only beside a run of that model
        reference = args.model.startswith("deit_small_patch16_224") and input_size[1:] == (224, 224)
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(result["results"], args.plot, result["header"], reference)
        print(f"wrote {args.plot}")
    return result


def variant_stats(model: torch.nn.Module, input_size: tuple[int, int, int],
                  images: Optional[torch.Tensor]) -> dict:
    """Parameters and MACs per image (on ``images``, their mean, where given); for a model with a
    keep policy, ``kept_per_point``: the mean tokens each selection point kept per image."""
    out = {"params": sum(p.numel() for p in model.parameters())}
    if images is None:
        out["macs"] = count_flops(model, input_size)
        return out
    out["macs"] = count_flops(model, images=images) / images.shape[0]
    if getattr(model, "keep_policy", None) is not None:
        with torch.no_grad():
            model.eval()(images)
        out["kept_per_point"] = [c.float().mean().item() for c in model.ice_keep_counts]
    return out


def variant_row(measured: dict, meta: dict, stats: dict) -> dict:
    name = measured["name"]
    return dict(measured, **meta[name], compiled=name.endswith("+compile"),
                params=stats[name]["params"], params_m=stats[name]["params"] / 1e6,
                macs=stats[name]["macs"], gmacs=stats[name]["macs"] / 1e9,
                kept_per_point=stats[name].get("kept_per_point"))


def precision(args: argparse.Namespace) -> str:
    """How the run computes: fp32, ``bf16 autocast`` (--dtype) or ``bf16 weights`` (--model-dtype)."""
    if args.model_dtype != "fp32":
        return f"{args.model_dtype} weights"
    return "fp32" if args.dtype == "fp32" else f"{args.dtype} autocast"


def measure_throughput(args, models, meta, stats, input_size, device, info, images=None) -> dict:
    """The throughput run (on ``images`` where given), its table, and its part of the --json
    output."""
    batch_size = None if images is not None else args.batch_size
    if batch_size == "max":
        batch_size = max_batch_size(models, input_size, device, args.dtype,
                                    model_dtype=args.model_dtype)
    run = benchmark_models(models, input_size, batch_size, device, args.dtype, args.reps,
                           args.warmup, baseline="baseline", progress=True,
                           cuda_graphs=args.cuda_graphs, cudnn_benchmark=True,
                           model_dtype=args.model_dtype, first_call=True, inputs=images)
    rows = throughput_rows(run, meta, stats)

    reps = len(run[run.baseline].times)
    cudnn = device.type == "cuda"  # benchmark_models turns cuDNN benchmark on for CUDA runs
    on = ("" if images is None else f", SyntheticScenes images (seed {args.seed}, objects "
          f"{args.object_scale[0]:g}-{args.object_scale[1]:g} of the side)")
    header = (f"{args.model} on {info['name']} ({device.type}, {precision(args)}, batch "
              f"{run[run.baseline].batch_size}, {reps} reps, warm-up {run.warmup}, "
              f"{info['threads']} threads{', cuDNN benchmark' if cudnn else ''}{on})")
    graphs = ", CUDA graphs" if any(r["cuda_graph"] for r in rows) else ""
    print_table([r for r in rows if not r["compiled"]], f"{header}\neager{graphs}")
    compiled = [r for r in rows if r["compiled"]]
    if compiled:
        print()
        print_table(compiled, f"{header}\ntorch.compile (mode {args.compile_mode}), same run; "
                              f"speed-ups over the compiled baseline")
        base = next(r for r in compiled if r["method"] == "baseline")
        print(f"compiled baseline: {base['vs_eager']:.2f}x the eager baseline's img/s")
    return {"header": header,
            "settings": dict(vars(args), batch_size=run[run.baseline].batch_size,
                             batch_size_arg=args.batch_size, reps=reps, warmup=run.warmup,
                             input_size=list(input_size), device=str(device),
                             cudnn_benchmark=cudnn, precision=precision(args),
                             new_batch_size=run[run.baseline].new_batch_size),
            "results": rows, "schedule": run.schedule}


def throughput_rows(run, meta: dict, stats: dict) -> list[dict]:
    """The rows of the throughput tables, every ratio taken inside ``run``: ``speedup`` /
    ``paired_speedup`` over the baseline of the same kind (eager over eager, compiled over compiled);
    ``vs_evit``: ICE's median img/s over EViT's at the same keep rate; ``vs_ice``: the --explain
    variant's over ICE's (``vs_ice_paired``: the median of ``vs_ice_reps``, ICE's time over the
    variant's in each repetition); ``vs_reference``: EViT's over the --evit-reference variant's;
    ``vs_eager``: a compiled variant's over its eager self; ``first_call_vs_baseline_s`` /
    ``new_batch_call_vs_baseline_s``: seconds of the first forward (at the timed / the new batch
    size) beyond the baseline's of the same kind; ``nearest_fixed`` / ``vs_nearest_fixed``: for a
    variant with a keep policy, the fixed-keep variant of its method nearest in GMACs and the
    policy's median img/s over it; ``packed`` / ``vs_packed``: for a --masked variant, its packed
    twin and its median img/s over the twin's."""
    rows = []
    for measured in run.to_dict()["results"]:
        row = variant_row(measured, meta, stats)
        name, suffix = row["name"], "+compile" if row["compiled"] else ""
        row["speedup"] = run.speedup(name, "baseline" + suffix)
        row["paired_speedup"] = run.paired_speedup(name, "baseline" + suffix)
        row["first_call_vs_baseline_s"] = run.first_call_delta(name, "baseline" + suffix)
        row["new_batch_call_vs_baseline_s"] = run.first_call_delta(name, "baseline" + suffix,
                                                                   new_batch=True)
        rate = f"{row['keep_rate']:g}" if row["keep_rate"] is not None else None
        row["vs_evit"] = run.speedup(name, f"evit@{rate}{suffix}") if row["method"] == "ice" else None
        ice = f"ice@{rate}{suffix}"
        explains = row["method"] == EXPLAIN
        row["vs_ice"] = run.speedup(name, ice) if explains else None
        row["vs_ice_paired"] = run.paired_speedup(name, ice) if explains else None
        row["vs_ice_reps"] = run.paired_ratios(name, ice) if explains else None
        reference = f"{REFERENCE}@{rate}{suffix}"
        row["vs_reference"] = (run.speedup(name, reference)
                               if row["method"] == "evit" and reference in run.measurements else None)
        row["vs_eager"] = run.speedup(name, name[:-len(suffix)]) if suffix else None
        masked = row.get("masked", False)
        row["packed"] = name.removesuffix(",masked") if masked else None
        row["vs_packed"] = run.speedup(name, row["packed"]) if masked else None
        rows.append(row)
    for row in rows:
        fixed = [r for r in rows if row.get("policy") and r["method"] == row["name"].split("@")[0]
                 and not r["compiled"]]
        nearest = min(fixed, key=lambda r: abs(r["macs"] - row["macs"]), default=None)
        row["nearest_fixed"] = nearest["name"] if nearest else None
        row["vs_nearest_fixed"] = run.speedup(row["name"], nearest["name"]) if nearest else None
    return rows


def measure_latency(args, models, meta, stats, input_size, device, info) -> dict:
    """The batch-1 latency run (median and p90 of single-image forwards, CUDA graphs on a GPU unless
    --no-cuda-graphs), its table, and its part of the --json output."""
    run = latency(models, input_size, device, args.dtype, args.latency_reps, args.latency_warmup,
                  baseline="baseline", cuda_graphs=False if args.no_cuda_graphs else "auto",
                  progress=True, model_dtype=args.model_dtype)
    rows = [variant_row(measured, meta, stats) for measured in run.to_dict()["results"]]
    reps = len(run[run.baseline].times)
    graphs = any(r["cuda_graph"] for r in rows)
    header = (f"{args.model} on {info['name']} ({device.type}, {precision(args)}, batch 1, {reps} "
              f"single-image forwards per variant, warm-up {run.warmup}, {info['threads']} threads"
              f"{', CUDA graphs' if graphs else ''})")
    print_latency_table(rows, header)
    return {"header": header, "reps": reps, "warmup": run.warmup, "batch_size": 1,
            "cuda_graphs": graphs, "results": rows, "schedule": run.schedule}


def print_latency_table(rows: list[dict], header: str) -> None:
    print(header)
    cols = (f"{'variant':<18}{'keep':>6}{'GMACs':>8}{'median ms':>11}{'p90 ms':>9}{'best ms':>9}"
            f"{'speed-up':>10}{'graph':>7}  note")
    print(cols)
    print("-" * len(cols))
    for row in rows:
        note = "slower than the baseline at batch 1" if row["speedup"] < 1 else ""
        print(f"{row['name']:<18}{row['keep_rate']:>6.2f}{row['gmacs']:>8.2f}{row['median_ms']:>11.2f}"
              f"{row['p90_ms']:>9.2f}{row['best_ms']:>9.2f}{row['speedup']:>9.2f}x"
              f"{'yes' if row['cuda_graph'] else 'no':>7}  {note}")
    print("speed-up: the baseline's median latency over the variant's, in the same interleaved run")


if __name__ == "__main__":
    run_script(main)
