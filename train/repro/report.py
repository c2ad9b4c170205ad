"""The report of a run, read from the stages' results only: :func:`summarize` (the derived tables and
whether the paper's claims hold here), :func:`render` (``REPORT.md``) and :func:`write_report`
(``results.json``, ``figures/*.png``, ``REPORT.md``)."""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Optional

import numpy as np

from ice_prune.paper import TABLE1, TABLE3, TABLE5, TABLE6

from .plots import plot_accuracy, plot_speed
from .scales import ABLATION, BASELINES, VARIANTS


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` to ``path`` through a temporary file, so a reader never sees half of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def summarize(results: dict) -> dict:
    """Derived figures: the maps table, the ablation, the pruning table, and the comparisons."""
    stages = results["stages"]
    scale = results["scale"]
    maps = {}
    for run in VARIANTS + tuple(ABLATION):
        measured = stages[f"explain-{run}"]["maps"]
        maps[run] = {"pixel_accuracy": measured["pixel_accuracy"], "miou": measured["miou"],
                     "map": measured["map"],
                     "jaccard": measured["jaccard"]["mask"] if "jaccard" in measured else None}
    for name, measured in stages["maps-baselines"]["maps"].items():
        jaccard = measured.get("jaccard")
        maps[name] = {"pixel_accuracy": measured["pixel_accuracy"], "miou": measured["miou"],
                      "map": measured["map"],
                      # the best threshold / head variant, as Table 3 lists the best of each
                      "jaccard": max(jaccard.values()) if jaccard else None,
                      "jaccard_variants": jaccard}
    best_baseline = max(BASELINES, key=lambda b: maps[b]["miou"])
    groups: dict[str, list[dict]] = {}
    for name, result in stages.items():
        if name.startswith("prune-"):
            groups.setdefault(f"{result['method']}-{result['keep_rate']:g}", []).append(result)
    speed = stages["speed"]["models"]
    prune = {}
    for key, runs in groups.items():
        top1 = [r["top1"] for r in runs]
        prune[key] = {"top1_mean": float(np.mean(top1)),
                      "top1_spread": float(np.max(top1) - np.min(top1)) if len(top1) > 1 else 0.0,
                      "top1_std": float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0,
                      "top1_runs": top1, "seeds": [r["seed"] for r in runs], **speed[key]}
    comparisons = []
    ice, baseline = maps["ice"], maps[best_baseline]
    comparisons.append(_claim(
        f"ICE beats the best baseline map ({best_baseline}) on mIoU", ice["miou"] - baseline["miou"],
        f"paper: +{TABLE1['ice'].miou - TABLE1['robustvit'].miou:.2f} over RobustViT, "
        f"+{TABLE1['ice'].miou - TABLE1['generic'].miou:.2f} over Chefer et al. 2021 (the best "
        f"baseline we also run)"))
    comparisons.append(_claim(
        f"ICE beats the best baseline map ({best_baseline}) on pixel accuracy",
        ice["pixel_accuracy"] - baseline["pixel_accuracy"],
        f"paper: +{TABLE1['ice'].pixel_accuracy - TABLE1['generic'].pixel_accuracy:.2f} over "
        f"Chefer et al. 2021"))
    jaccard_baseline = max(BASELINES, key=lambda b: maps[b]["jaccard"] or -1)
    if ice["jaccard"] is not None and maps[jaccard_baseline]["jaccard"] is not None:
        comparisons.append(_claim(
            f"ICE beats the best baseline ({jaccard_baseline}, best threshold/head) on Jaccard",
            ice["jaccard"] - maps[jaccard_baseline]["jaccard"],
            f"paper: +{TABLE3['ice'] - TABLE3['raw-attention mean@0.9']:.2f} over "
            f"raw attention (mean, 0.9)"))
    comparisons.append(_claim("ICE beats ICE-f on mIoU", ice["miou"] - maps["ice-f"]["miou"],
                              f"paper: +{TABLE1['ice'].miou - TABLE1['ice-f'].miou:.2f}"))
    for run, label in (("ice-alpha1", "alpha 1.0"), ("ice-lambda0.5", "lambda 0.5"),
                       ("ice-alpha1-lambda0.5", "alpha 1.0 and lambda 0.5")):
        comparisons.append(_claim(
            f"ICE (alpha 0.5, lambda 0.975) beats the ablation with {label} on mIoU",
            ice["miou"] - maps[run]["miou"],
            f"paper: +{TABLE6['ice'].miou - TABLE6[run].miou:.2f}"))
    for rate in scale["keep_rates"]:
        evit, ice_pruned = prune[f"evit-{rate:g}"], prune[f"ice-{rate:g}"]
        paper_evit, paper_ice = TABLE5[f"evit-{rate:g}"], TABLE5[f"ice-{rate:g}"]
        noise = max(evit["top1_spread"], ice_pruned["top1_spread"])
        comparisons.append(_claim(
            f"ICE is more accurate than EViT at keep rate {rate:g}",
            ice_pruned["top1_mean"] - evit["top1_mean"],
            f"paper: +{paper_ice.top1 - paper_evit.top1:.2f}; here the seed spread "
            f"is up to {noise:.2f}, so a gap below it is not a difference", unit=" points top-1"))
        comparisons.append(_claim(
            f"ICE is at least as fast as EViT at keep rate {rate:g} (speed-up ratio ICE / EViT - 1)",
            100 * (ice_pruned["speedup"] / evit["speedup"] - 1),
            f"paper: {100 * (paper_ice.img_per_s / paper_evit.img_per_s - 1):+.1f}%",
            unit="%", threshold=0.0))
        comparisons.append(_claim(
            f"ICE at keep rate {rate:g} is faster than the unpruned model (speed-up - 1)",
            100 * (ice_pruned["speedup"] - 1),
            f"paper: {100 * (paper_ice.img_per_s / TABLE5['none-1.0'].img_per_s - 1):+.1f}%",
            unit="%"))
    return {"maps": maps, "best_baseline": best_baseline, "prune": prune,
            "comparisons": comparisons}


def _claim(text: str, diff: float, paper: str, unit: str = " points", threshold: float = 0.0
           ) -> dict:
    """A statement and whether our figures agree: yes when ``diff > threshold``."""
    return {"claim": text, "holds": bool(diff > threshold), "by": round(float(diff), 2),
            "unit": unit, "paper": paper}


def _number(x: Optional[float], digits: int = 2) -> str:
    """``x`` with ``digits`` decimals; a dash for a figure that is missing or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _foreground_share(stages: dict, run: str) -> Optional[float]:
    """Percent of patches an ICE run's head calls foreground on its validation images, or None."""
    val = stages.get(f"explain-{run}", {}).get("train", {}).get("val", {})
    return 100 * val["fg_fraction"] if "fg_fraction" in val else None


def write_report(results: dict, out: str) -> str:
    """``out/results.json``, ``out/figures/*.png`` and ``out/REPORT.md``; returns the report path."""
    summary = summarize(results)
    results = {**results, "summary": summary}
    scale = results["scale"]
    figures = os.path.join(out, "figures")
    os.makedirs(figures, exist_ok=True)
    plot_accuracy(summary, scale, os.path.join(figures, "accuracy_vs_keep_rate.png"))
    plot_speed(summary, os.path.join(figures, "speedup_vs_gmacs.png"))
    shutil.copyfile(results["stages"]["examples"]["figure"], os.path.join(figures, "examples.png"))
    write_json(os.path.join(out, "results.json"), results)
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as f:
        f.write(render(results))
    return path


def render(results: dict) -> str:
    """``REPORT.md``: the setup, the maps, the ablation and the pruning tables beside the paper's,
    which claims hold here, the figures and the stage times."""
    stages, summary, scale = results["stages"], results["summary"], results["scale"]
    maps, prune = summary["maps"], summary["prune"]
    pretrain = stages.get("pretrain")
    spec = scale["pretrain"]
    lines = [f"# ICE in miniature: `{scale['name']}` scale", ""]
    lines.append(f"Written by `train/reproduce.py --scale {scale['name']}` on {results['date']} "
                 f"({stages['speed']['device']}; torch {results['versions']['torch']}, timm "
                 f"{results['versions']['timm']}); the stages took {results['wall_s'] / 60:.1f} "
                 f"minutes in all. Every figure below is read from the stages' outputs "
                 f"(`results.json` holds them all). **The paper's figures are DeiT-S on ImageNet and "
                 f"its evaluation sets; ours are a small ViT on SyntheticScenes**: compare directions "
                 f"and gaps, not values.")
    if pretrain is not None and pretrain["top1"] < 2 * 100 / scale["num_classes"]:
        lines.append("")
        lines.append(f"**Warning: the pretrained stand-in did not learn** (top-1 "
                     f"{pretrain['top1']:.2f}% on {scale['num_classes']} classes, chance "
                     f"{100 / scale['num_classes']:.0f}%). Every later stage explains or prunes a "
                     f"network that has not learned the task, so the comparisons below are between "
                     f"near-random maps and models: they test that the pipeline runs end to end, not "
                     f"the paper's claims.")
    lines.append("")
    lines.append("## Setup")
    lines.append("")
    model_kwargs = json.dumps(scale["model_kwargs"])
    lines.append(f"- Model: timm `{scale['model']}` with `{model_kwargs}`, image {scale['img_size']} "
                 f"px, 12 blocks, selection after blocks 3, 6, 9.")
    if scale["train_data"] == "synthetic":
        synthetic_args = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}"
                                 for k, v in sorted(scale.get("synthetic_kwargs", {}).items()))
        lines.append(f"- Data, every stage: `SyntheticScenes(num_classes={scale['num_classes']}, "
                     f"img_size={scale['img_size']}{synthetic_args})`, training and validation "
                     f"images from disjoint random streams.")
    if pretrain is not None:
        lines.append(f"- Stand-in for the pretrained DeiT-S: trained from scratch on SyntheticScenes "
                     f"({scale['num_classes']} classes, {spec['train_images']} training images, "
                     f"{spec['epochs']} epochs, lr {spec['lr']:g}, batch {spec['batch_size']}) with "
                     f"cross-entropy (`train/prune.py --method evit --keep-rate 1.0`, exactly the "
                     f"unpruned ViT): top-1 **{pretrain['top1']:.2f}%** on the evaluation images.")
    else:
        lines.append(f"- Pretrained weights: `{scale['checkpoint']}`.")
    explain_spec, prune_spec = scale["explain"], scale["prune"]
    lines.append(f"- Explanation runs (`train/explain.py`): {explain_spec['epochs']} epoch(s) of "
                 f"{explain_spec['train_images'] or 'all'} images, lr {explain_spec['lr']:g}, batch "
                 f"{explain_spec['batch_size']}, from the pretrained weights. Maps evaluated by "
                 f"`train/evaluate.py explain` on {stages['maps-baselines']['images']} validation "
                 f"images with ground-truth masks.")
    lines.append(f"- Pruning runs (`train/prune.py`): {prune_spec['epochs']} epoch(s) of "
                 f"{prune_spec['train_images'] or 'all'} images, lr {prune_spec['lr']:g}, batch "
                 f"{prune_spec['batch_size']}, seeds {list(scale['seeds'])}, the same budget for ICE, "
                 f"EViT and the unpruned model, all from the same pretrained weights (ICE with a "
                 f"fresh head, as in the paper); top-1 by `train/evaluate.py accuracy` on one common "
                 f"validation set.")
    if scale.get("note"):
        lines.append(f"- Note: {scale['note']}.")
    lines.append("")
    lines.append("## Explanation maps (paper Tables 1 and 3)")
    lines.append("")
    lines.append("Pixel accuracy and mIoU: Chefer et al.'s ImageNet-Segmentation protocol; Jaccard: "
                 "Naseer et al.'s (ICE: its foreground mask; the other maps: the best of the "
                 "cumulative-mass thresholds 0.9 / 0.8 and, for raw attention, of mean or best head). "
                 "Paper columns: DeiT-S, ImageNet-Segmentation (Table 1) and VOC12 (Table 3).")
    lines.append("")
    lines.append("| map | pixel acc. | mIoU | mAP | Jaccard | foreground share | paper pixel acc. | "
                 "paper mIoU | paper Jaccard |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    paper_jaccard = {"ice": TABLE3["ice"], "ice-f": TABLE3["ice-f"],
                     "raw-attention": TABLE3["raw-attention mean@0.9"]}
    for name in VARIANTS + BASELINES:
        ours, published = maps[name], TABLE1.get(name)
        lines.append(f"| {name} | {_number(ours['pixel_accuracy'])} | {_number(ours['miou'])} | "
                     f"{_number(ours['map'])} | {_number(ours['jaccard'])} | "
                     f"{_number(_foreground_share(stages, name), 1)} | "
                     f"{_number(published.pixel_accuracy if published else None)} | "
                     f"{_number(published.miou if published else None)} | "
                     f"{_number(paper_jaccard.get(name))} |")
    lines.append(f"| RobustViT (not run here) | | | | | | {TABLE1['robustvit'].pixel_accuracy:.2f} | "
                 f"{TABLE1['robustvit'].miou:.2f} | |")
    lines.append("")
    lines.append("Foreground share: the percentage of patches the ICE head's argmax calls foreground "
                 "on its run's validation images (a mask that covers every patch scores the pixel "
                 "accuracy of calling everything foreground).")
    lines.append("")
    lines.append("ICEv2-style: what ICEv2's abstract states (the last 2 blocks train, an MLP head); its "
                 "exact method is not public. PM-style: the model's own classifier on every patch, "
                 "untrained on masks; the paper has no PM column.")
    lines.append("")
    lines.append("## Ablation (paper Table 6)")
    lines.append("")
    lines.append("| run | pixel acc. | mIoU | Jaccard | foreground share | paper pixel acc. | "
                 "paper mIoU | paper Jaccard |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for run, label in (("ice", "ICE (alpha 0.5, lambda 0.975)"), ("ice-alpha1", "alpha 1.0"),
                       ("ice-lambda0.5", "lambda 0.5"),
                       ("ice-alpha1-lambda0.5", "alpha 1.0, lambda 0.5")):
        ours, published = maps[run], TABLE6[run]
        lines.append(f"| {label} | {_number(ours['pixel_accuracy'])} | {_number(ours['miou'])} | "
                     f"{_number(ours['jaccard'])} | {_number(_foreground_share(stages, run), 1)} | "
                     f"{published.pixel_accuracy:.2f} | {published.miou:.2f} | "
                     f"{published.jaccard:.2f} |")
    lines.append("")
    lines.append("## Pruning (paper Table 5)")
    lines.append("")
    speed = stages["speed"]
    lines.append(f"Top-1: mean over seeds and (max - min). Speed-up: median forward time of the "
                 f"unpruned model over the model's, batch {speed['batch']}, {speed['reps']} "
                 f"interleaved repetitions, torch threads: {speed['threads']}, {speed['device']}. "
                 f"GMACs by {speed['flops']}. Paper: DeiT-S on ImageNet, 30 epochs, throughput on an "
                 f"RTX 3090; its GMACs are EViT's README figures.")
    lines.append("")
    lines.append("| method | keep rate | top-1 (%) | spread | params (M) | GMACs | img/s | speed-up | "
                 "paper top-1 | paper params | paper GMACs | paper speed-up |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = ["none-1"] + [f"{m}-{r:g}" for r in scale["keep_rates"] for m in ("evit", "ice")]
    for key in order:
        ours = prune[key]
        method, rate = key.split("-")
        published = TABLE5.get(f"{method}-{float(rate):.1f}" if method == "none" else key)
        label = {"none": "unpruned", "evit": "EViT", "ice": "ICE"}[method]
        paper_speedup = (published.img_per_s / TABLE5["none-1.0"].img_per_s if published
                         else float("nan"))
        lines.append(f"| {label} | {rate} | {ours['top1_mean']:.2f} | {ours['top1_spread']:.2f} | "
                     f"{ours['params_m']:.3f} | {ours['gmacs']:.4f} | {ours['img_s_median']:.0f} | "
                     f"{ours['speedup']:.2f}x | {_number(published.top1 if published else None)} | "
                     f"{_number(published.params_m if published else None, 1)} | "
                     f"{_number(published.gmacs if published else None, 1)} | "
                     f"{paper_speedup:.2f}x |")
    lines.append("")
    lines.append("## Where ours agree with the paper")
    lines.append("")
    for comparison in summary["comparisons"]:
        lines.append(f"- {comparison['claim']}: **{'yes' if comparison['holds'] else 'no'}**, by "
                     f"{comparison['by']:+.2f}{comparison['unit']} ({comparison['paper']}).")
    lines.append("")
    lines.append("## Figures")
    lines.append("")
    lines.append("Examples (image | ICE | ICE-f | ICEv2-style | baselines | ICE's foreground mask | "
                 "ground truth), on validation images:")
    lines.append("")
    lines.append("![examples](figures/examples.png)")
    lines.append("")
    lines.append("![accuracy vs keep rate](figures/accuracy_vs_keep_rate.png)")
    lines.append("")
    lines.append("![speed-up vs GMACs](figures/speedup_vs_gmacs.png)")
    lines.append("")
    lines.append("## Stage times")
    lines.append("")
    lines.append("| stage | wall (s) |")
    lines.append("|---|---|")
    for name, result in stages.items():
        lines.append(f"| {name} | {result['wall_s']:.0f} |")
    lines.append("")
    return "\n".join(lines)
