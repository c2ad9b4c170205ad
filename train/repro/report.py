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

from ice_prune.evaluation.paper import TABLE1, TABLE3, TABLE5, TABLE6

from ice_prune.loss import auto_lambda

from .plots import plot_accuracy, plot_class_counts, plot_speed
from .scales import BASELINES, PM_RUNS, TABLE6 as TABLE6_SETTINGS, VARIANTS, ablation_runs

# the class-count rule is "in the good region" at a class count when its mIoU is within this many
# points of the best lambda tried there (a yardstick stated before the runs, not fitted to them)
GOOD_REGION_MIOU = 5.0
# Table 6's rows and how the report names them
ABLATION_LABELS = {"ice": "ICE (alpha 0.5, lambda 0.975)", "ice-alpha1": "alpha 1.0",
                   "ice-lambda0.5": "lambda 0.5", "ice-alpha1-lambda0.5": "alpha 1.0, lambda 0.5"}
# the PM paper states only an abstract: what each comparison of a trained PM-style map rests on
PM_ABSTRACT = ("the PM abstract claims better maps and classification than previous techniques, "
               "no figure")


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
    for run in VARIANTS + tuple(ablation_runs(scale["num_classes"])):
        maps[run] = _ice_maps(stages[f"explain-{run}"])
    for name, measured in stages["maps-baselines"]["maps"].items():
        maps[name] = _map_figures(measured)
    best_baseline = max(BASELINES, key=lambda b: maps[b]["miou"])
    pm = {run: {**_map_figures(stages[f"explain-{run}"]["maps"]),
                **{k: stages[f"explain-{run}"][k] for k in (
                    "top1", "top5", "mask_source", "mask_fraction", "masked_images",
                    "train_images", "mask_weight", "smoothing")}}
          for run in PM_RUNS if f"explain-{run}" in stages}
    unmodified_top1 = stages["pretrain"]["top1"] if "pretrain" in stages else None
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
    for run in ("ice-alpha1", "ice-lambda0.5", "ice-alpha1-lambda0.5"):
        paper = f"paper: +{TABLE6['ice'].miou - TABLE6[run].miou:.2f}"
        comparisons.append(_claim(
            f"Table 6 as written: ICE (alpha 0.5, lambda 0.975) beats {ABLATION_LABELS[run]} on "
            f"mIoU", maps["ice-literal"]["miou"] - maps[f"{run}-literal"]["miou"], paper))
        comparisons.append(_claim(
            f"Table 6 balance-equivalent at {scale['num_classes']} classes: ICE beats "
            f"{ABLATION_LABELS[run]} on mIoU", ice["miou"] - maps[run]["miou"], paper))
    comparisons.extend(_pm_claims(pm, maps, best_baseline, unmodified_top1))
    classes = _class_counts(stages, scale)
    for num_classes, study in classes.items():
        rule, literal = study["rule"], study["literal"]
        best = max(study["runs"], key=lambda r: r["miou"])
        comparisons.append(_claim(
            f"{num_classes} classes: the class-count rule (lambda {rule['lambda_class']:.3f}) beats "
            f"the paper's literal lambda 0.975 on mIoU", rule["miou"] - literal["miou"],
            "the paper trains at 1000 classes only"))
        comparisons.append(_claim(
            f"{num_classes} classes: the class-count rule is within {GOOD_REGION_MIOU:g} mIoU "
            f"points of the best lambda tried ({best['lambda_class']:.3g}: {best['miou']:.2f})",
            rule["miou"] - best["miou"], "our yardstick: by is the rule's mIoU minus the best's",
            threshold=-GOOD_REGION_MIOU))
        comparisons.append(_claim(
            f"{num_classes} classes: ICE (class-count rule) beats generic attention on mIoU",
            rule["miou"] - study["generic"]["miou"],
            f"paper: +{TABLE1['ice'].miou - TABLE1['generic'].miou:.2f} at 1000 classes"))
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
    return {"maps": maps, "best_baseline": best_baseline, "pm": pm,
            "unmodified_top1": unmodified_top1, "prune": prune, "classes": classes,
            "comparisons": comparisons}


def _map_figures(measured: dict) -> dict:
    """A non-ICE map's figures from train/evaluate.py explain: the segmentation meter's and the
    best Jaccard threshold / head variant, as Table 3 lists the best of each."""
    jaccard = measured.get("jaccard")
    return {"pixel_accuracy": measured["pixel_accuracy"], "miou": measured["miou"],
            "map": measured["map"], "jaccard": max(jaccard.values()) if jaccard else None,
            "jaccard_variants": jaccard}


def pm_label(run: str, result: dict) -> str:
    """How the report names a trained PM-style run."""
    if run == "pm-style-no-masks":
        return "PM-style fine-tuning without masks (the control)"
    source = "ground-truth" if run == "pm-style" else "ICE pseudo"
    return (f"PM-style trained with {100 * result['mask_fraction']:g}% {source} masks "
            f"({result['masked_images']} images)")


def _pm_claims(pm: dict, maps: dict, best_baseline: str, unmodified_top1: Optional[float]
               ) -> list[dict]:
    """Whether each PM-style run with masks beats the untrained reading, the same fine-tuning
    without masks and the best baseline on mIoU, and the unmodified model and the control on top-1;
    the pseudo-mask run also against ICE, whose foreground it learned from."""
    claims = []
    control = pm.get("pm-style-no-masks")
    for run in ("pm-style", "pm-style-pseudo"):
        if run not in pm:
            continue
        ours, label = pm[run], pm_label(run, pm[run])
        claims.append(_claim(f"{label} beats the untrained PM-style reading on mIoU",
                             ours["miou"] - maps["pm-style"]["miou"], PM_ABSTRACT))
        if control is not None:
            claims.append(_claim(f"{label} beats the same fine-tuning without masks on mIoU",
                                 ours["miou"] - control["miou"], "our control; none in the abstract"))
        claims.append(_claim(f"{label} beats the best baseline map ({best_baseline}) on mIoU",
                             ours["miou"] - maps[best_baseline]["miou"], PM_ABSTRACT))
        if run == "pm-style-pseudo":
            claims.append(_claim(f"{label} beats ICE, the source of its masks, on mIoU",
                                 ours["miou"] - maps["ice"]["miou"],
                                 "the abstract names pseudo masks for localization, no source"))
        if unmodified_top1 is not None:
            claims.append(_claim(f"{label} is more accurate than the unmodified model",
                                 ours["top1"] - unmodified_top1, PM_ABSTRACT, unit=" points top-1"))
        if control is not None:
            claims.append(_claim(f"{label} is more accurate than the same fine-tuning without masks",
                                 ours["top1"] - control["top1"], "our control; none in the abstract",
                                 unit=" points top-1"))
    return claims


def _ice_maps(result: dict) -> dict:
    """The map figures of an ICE run's ``done.json``, with its foreground share."""
    measured = result["maps"]
    val = result.get("train", {}).get("val", {})
    return {"pixel_accuracy": measured["pixel_accuracy"], "miou": measured["miou"],
            "map": measured["map"],
            "jaccard": measured["jaccard"]["mask"] if "jaccard" in measured else None,
            "fg_share": 100 * val["fg_fraction"] if "fg_fraction" in val else None}


def _class_counts(stages: dict, scale: dict) -> dict:
    """The class-count study: per class count, every lambda's maps (sorted by lambda), the rule's and
    the literal value's runs, and generic attention on the same scenes."""
    classes = {}
    for num_classes in scale.get("class_counts") or ():
        prefix = f"classes-{num_classes}-lambda-"
        runs = [{"lambda": r["lambda"], "lambda_class": r["lambda_class"], **_ice_maps(r)}
                for name, r in stages.items() if name.startswith(prefix)]
        runs.sort(key=lambda r: r["lambda_class"])
        generic = stages[f"classes-{num_classes}-generic"]["maps"]
        classes[num_classes] = {
            "runs": runs, "rule": next(r for r in runs if r["lambda"] == "auto"),
            "literal": next(r for r in runs if r["lambda"] == "paper"),
            "generic": {"pixel_accuracy": generic["pixel_accuracy"], "miou": generic["miou"],
                        "jaccard": max(generic["jaccard"].values()) if generic.get("jaccard")
                        else None}}
    return classes


def _claim(text: str, diff: float, paper: str, unit: str = " points", threshold: float = 0.0
           ) -> dict:
    """A statement and whether our figures agree: yes when ``diff > threshold``."""
    return {"claim": text, "holds": bool(diff > threshold), "by": round(float(diff), 2),
            "unit": unit, "paper": paper}


def _number(x: Optional[float], digits: int = 2) -> str:
    """``x`` with ``digits`` decimals; a dash for a figure that is missing or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_report(results: dict, out: str) -> str:
    """``out/results.json``, ``out/figures/*.png`` and ``out/REPORT.md``; returns the report path."""
    summary = summarize(results)
    results = {**results, "summary": summary}
    scale = results["scale"]
    figures = os.path.join(out, "figures")
    os.makedirs(figures, exist_ok=True)
    plot_accuracy(summary, scale, os.path.join(figures, "accuracy_vs_keep_rate.png"))
    plot_speed(summary, os.path.join(figures, "speedup_vs_gmacs.png"))
    if summary["classes"]:
        plot_class_counts(summary, os.path.join(figures, "miou_vs_lambda.png"))
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
    lines.append(f"- ICE's loss, every ICE run unless a table names another: adversarial "
                 f"normalization with alpha 0.5 and lambda from the class count "
                 f"(`--lambda-class auto`, the default since the paper's 0.975 belongs to 1000 "
                 f"classes): {auto_lambda(scale['num_classes']):.4f} for ICE and ICEv2-style, "
                 f"{auto_lambda(scale['num_classes'], 0.99):.4f} for ICE-f at "
                 f"{scale['num_classes']} classes.")
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
    lines.append("| map | pixel acc. | mIoU | mAP | Jaccard | foreground share | top-1 (%) | "
                 "paper pixel acc. | paper mIoU | paper Jaccard |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    paper_jaccard = {"ice": TABLE3["ice"], "ice-f": TABLE3["ice-f"],
                     "raw-attention": TABLE3["raw-attention mean@0.9"]}
    rows = [(name, maps[name], None) for name in VARIANTS]
    # the baselines explain the unmodified model: its top-1 is theirs
    rows += [(name, maps[name], summary["unmodified_top1"]) for name in BASELINES]
    rows += [(f"pm-style, {_pm_row(run, ours)}", ours, ours["top1"])
             for run, ours in summary["pm"].items()]
    for name, ours, top1 in rows:
        published = TABLE1.get(name)
        lines.append(f"| {name} | {_number(ours['pixel_accuracy'])} | {_number(ours['miou'])} | "
                     f"{_number(ours['map'])} | {_number(ours['jaccard'])} | "
                     f"{_number(ours.get('fg_share'), 1)} | {_number(top1)} | "
                     f"{_number(published.pixel_accuracy if published else None)} | "
                     f"{_number(published.miou if published else None)} | "
                     f"{_number(paper_jaccard.get(name))} |")
    lines.append(f"| RobustViT (not run here) | | | | | | | {TABLE1['robustvit'].pixel_accuracy:.2f} | "
                 f"{TABLE1['robustvit'].miou:.2f} | |")
    lines.append("")
    lines.append("Foreground share: the percentage of patches the ICE head's argmax calls foreground "
                 "on its run's validation images (a mask that covers every patch scores the pixel "
                 "accuracy of calling everything foreground). Top-1: the classifier of the model the "
                 "map explains, on the accuracy images (`train/evaluate.py accuracy`); the baselines "
                 "explain the unmodified model; ICE's runs train no classifier.")
    lines.append("")
    lines.append("ICEv2-style: what ICEv2's abstract states (the last 2 blocks train, an MLP head); its "
                 "exact method is not public. PM-style: the model's own classifier on every patch; the "
                 "ICE paper has no PM column.")
    lines.append("")
    if summary["pm"]:
        lines.extend(_render_pm(summary["pm"], scale))
    lines.extend(_render_ablation(maps, scale["num_classes"]))
    if summary["classes"]:
        lines.extend(_render_class_counts(summary["classes"], scale["num_classes"]))
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
    if summary["classes"]:
        lines.append("![mIoU vs lambda](figures/miou_vs_lambda.png)")
        lines.append("")
    lines.append("## Stage times")
    lines.append("")
    lines.append("| stage | wall (s) |")
    lines.append("|---|---|")
    for name, result in stages.items():
        lines.append(f"| {name} | {result['wall_s']:.0f} |")
    lines.append("")
    return "\n".join(lines)


def _pm_row(run: str, result: dict) -> str:
    """The maps table's name of a trained PM-style run."""
    if run == "pm-style-no-masks":
        return "fine-tuned without masks (control)"
    source = "ground-truth" if run == "pm-style" else "ICE pseudo"
    return f"trained, {100 * result['mask_fraction']:g}% {source} masks"


def _render_pm(pm: dict, scale: dict) -> list[str]:
    """What the trained PM-style rows are, and which of their choices are ours."""
    spec, first = scale["explain"], next(iter(pm.values()))
    counts = {run: f"{r['masked_images']} of {r['train_images']}" for run, r in pm.items()}
    text = (f"PM-style trained (`train/pm.py`, from the pretrained weights with the explanation "
            f"runs' budget: {spec['epochs']} epoch(s), lr {spec['lr']:g}): the whole model "
            f"fine-tunes with cross-entropy on [CLS] for every image plus a patch-level mask loss "
            f"on the images that keep a mask")
    parts = []
    if "pm-style" in pm:
        parts.append(f"ground-truth masks on {counts['pm-style']} training images (seeded choice)")
    if "pm-style-pseudo" in pm:
        parts.append(f"ICE pseudo masks on {counts['pm-style-pseudo']}: the `explain-ice` run's "
                     f"foreground (argmax not background) of the same images, no ground-truth mask")
    if "pm-style-no-masks" in pm:
        parts.append("no mask at all, the control that tells what the masks add to the same "
                     "fine-tuning")
    return [text + ("; " + "; ".join(parts) if parts else "") + ". No parameter is added; the map "
            "is read as the untrained row reads it.", "",
            "Only the PM paper's abstract is available (Kang, Heo & Choe, Pattern Recognition "
            "Letters 2024): a patch-level mask prediction from the ViT's features in one forward "
            "pass, no extra parameters, under 1% of ImageNet's training images with masks, pseudo "
            "masks for localization. It gives no loss, layer, weighting or threshold, and no "
            "figure we could set beside ours. **Ours**: the map is the model's own classifier "
            "(final norm, classifier) on the last block's patch tokens, softmax over the classes, "
            "the explained class's probability; the mask loss is binary cross-entropy of each "
            "patch's probability of the image's class against the patch's foreground fraction, "
            f"averaged over the masked images, weight {first['mask_weight']:g} beside "
            f"cross-entropy (label smoothing {first['smoothing']:g}); "
            "pseudo masks on the same share of images as the ground-truth run; no mixup or cutmix "
            "(they mix images but not masks); no threshold of our own (each protocol binarizes the "
            "map as it does every map).", ""]


def _render_ablation(maps: dict, num_classes: int) -> list[str]:
    """Table 6 two ways: the paper's settings as written, and balance-equivalent at this class count."""
    lines = ["## Ablation (paper Table 6)", "",
             f"Two ways. *As written*: the paper's alpha and lambda, tuned for 1000 classes. "
             f"*Balance-equivalent*: the paper's alpha with the lambda that keeps each row's balance "
             f"between the class and background phases, `R = (1 - lambda) alpha C / lambda`, at this "
             f"run's C = {num_classes} (`auto_lambda(C, row lambda)`, ice_prune.loss), so the "
             f"direction of the paper's ablation can be checked where its literal lambdas mean "
             f"something else.", "",
             "| row | as written: lambda | pixel acc. | mIoU | Jaccard | fg share | "
             "balance-equivalent: lambda | pixel acc. | mIoU | Jaccard | fg share | paper pixel acc. "
             "| paper mIoU | paper Jaccard |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, (alpha, lam) in TABLE6_SETTINGS.items():
        literal, balanced = maps[f"{row}-literal"], maps[row]
        balanced_lambda = auto_lambda(num_classes, lam)
        published = TABLE6[row]
        lines.append(
            f"| {ABLATION_LABELS[row]} | {lam:g} | {_number(literal['pixel_accuracy'])} | "
            f"{_number(literal['miou'])} | {_number(literal['jaccard'])} | "
            f"{_number(literal['fg_share'], 1)} | {balanced_lambda:.4f} | "
            f"{_number(balanced['pixel_accuracy'])} | {_number(balanced['miou'])} | "
            f"{_number(balanced['jaccard'])} | {_number(balanced['fg_share'], 1)} | "
            f"{published.pixel_accuracy:.2f} | {published.miou:.2f} | {published.jaccard:.2f} |")
    lines.append("")
    return lines


def _render_class_counts(classes: dict, pretrain_classes: int) -> list[str]:
    """The class-count study: every lambda at every class count, the rule and generic attention."""
    lines = ["## Lambda and the class count", "",
             "ICE (`--variant ice`) trained from the same pretrained weights on SyntheticScenes with "
             f"each class count (a new classifier where it differs from the pretraining's "
             f"{pretrain_classes}), with "
             "the paper's literal lambda 0.975, the class-count rule (`--lambda-class auto`) and a "
             "sweep. Its maps explain the class ICE itself predicts (`--ice-target ice`: the new "
             "classifier is untrained); generic attention is the pretrained model's, on the same "
             "evaluation scenes. Fg share: the patches ICE's argmax calls foreground on its "
             "validation images.", "",
             "| classes | lambda | fg share | pixel acc. | mIoU | Jaccard |", "|---|---|---|---|---|---|"]
    for num_classes, study in classes.items():
        for r in study["runs"]:
            name = {"auto": " (rule)", "paper": " (paper, literal)"}.get(r["lambda"], "")
            lines.append(f"| {num_classes} | {r['lambda_class']:.3f}{name} | "
                         f"{_number(r['fg_share'], 1)} | {_number(r['pixel_accuracy'])} | "
                         f"{_number(r['miou'])} | {_number(r['jaccard'])} |")
        generic = study["generic"]
        lines.append(f"| {num_classes} | generic attention | | {_number(generic['pixel_accuracy'])} | "
                     f"{_number(generic['miou'])} | {_number(generic['jaccard'])} |")
    lines.append("")
    return lines
