"""The report of a run: :func:`render` (``REPORT.md``) and :func:`write_report` (``results.json``,
``figures/*.png``, ``REPORT.md``), from the stages' results and their :func:`~.summary.summarize`."""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Optional

from ice_prune.evaluation.paper import TABLE1, TABLE3, TABLE5, TABLE6
from ice_prune.loss import auto_lambda

from .plots import (plot_accuracy, plot_adaptive, plot_budget_curve, plot_class_counts,
                    plot_prune_curve, plot_speed)
from .scales import BASELINES, TABLE6 as TABLE6_SETTINGS, VARIANTS
from .summary import (ABLATION_LABELS, ADAPTIVE_BOOKKEEPING, ADAPTIVE_CURVES, ADAPTIVE_SCHEDULE,
                      summarize)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` to ``path`` through a temporary file, so a reader never sees half of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


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
    if summary["budgets"]:
        plot_budget_curve(summary, os.path.join(figures, "explain_budget.png"))
    if summary["prune_curve"]:
        plot_prune_curve(summary, os.path.join(figures, "prune_budget.png"))
    if summary["adaptive"]:
        plot_adaptive(summary, os.path.join(figures, "adaptive.png"))
    examples = results["stages"]["examples"]
    shutil.copyfile(examples["figure"], os.path.join(figures, "examples.png"))
    if "pruned_forward_figure" in examples:
        shutil.copyfile(examples["pruned_forward_figure"],
                        os.path.join(figures, "pruned_forward_map.png"))
    write_json(os.path.join(out, "results.json"), results)
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as f:
        f.write(render(results))
    return path


def render(results: dict) -> str:
    """``REPORT.md``: the setup, the maps, the ablation and the pruning tables beside the paper's,
    which claims hold here, the figures and the stage times."""
    summary, scale = results["summary"], results["scale"]
    lines = _render_header(results)
    lines += _render_setup(results)
    if summary["budgets"]:
        lines += _render_budgets(summary, scale)
    lines += _render_maps(results)
    if summary["pm"]:
        lines.extend(_render_pm(summary["pm"], scale))
    lines.extend(_render_ablation(summary["maps"], scale["num_classes"]))
    if summary["classes"]:
        lines.extend(_render_class_counts(summary["classes"], scale["num_classes"]))
    lines += _render_pruning(results)
    if summary["prune_curve"]:
        lines += _render_prune_curve(summary["prune_curve"])
    if summary["pruned_maps"]:
        lines += _render_pruned_maps(summary)
    if summary["adaptive"]:
        lines += _render_adaptive(summary["adaptive"])
    lines += _render_claims(summary["comparisons"])
    lines += _render_figures(bool(summary["classes"]),
                             "pruned_forward_figure" in results["stages"]["examples"])
    lines += _render_stage_times(results["stages"])
    return "\n".join(lines)


def _render_header(results: dict) -> list[str]:
    """The title, where the figures come from, and a warning when the stand-in did not learn."""
    stages, scale = results["stages"], results["scale"]
    pretrain = stages.get("pretrain")
    lines = [f"# ICE in miniature: `{scale['name']}` scale", ""]
    lines.append(f"Written by `train/reproduce.py --scale {scale['name']}` on {results['date']} "
                 f"({stages['speed']['device']}; torch {results['versions']['torch']}, timm "
                 f"{results['versions']['timm']}); the stages' compute took "
                 f"{results['wall_s'] / 60:.1f} minutes in all{_elapsed(results)}. Every figure below is read from the stages' outputs "
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
    return lines


def _render_setup(results: dict) -> list[str]:
    """The model, data and budgets of every stage."""
    stages, scale = results["stages"], results["scale"]
    pretrain, spec = stages.get("pretrain"), scale["pretrain"]
    lines = ["## Setup", ""]
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
    summary = results["summary"]
    if summary["budgets"]:
        chosen = ", ".join(f"{variant} {sweep['chosen']['epochs']} epochs "
                           f"({sweep['chosen']['updates']} updates)"
                           for variant, sweep in summary["budgets"].items())
        budget = (f"ICE, ICE-f and ICEv2-style for the budget chosen on the mapval split (see "
                  f"Training budgets: {chosen}); Table 6's ablation, PM-style and the class-count "
                  f"study {explain_spec['epochs']} epoch(s) (the recipe's, the sweep's first "
                  f"budget), with the class-count rule's row of every class count also at ICE's")
    else:
        budget = f"{explain_spec['epochs']} epoch(s)"
    lines.append(f"- Explanation runs (`train/explain.py`): {budget}; each epoch "
                 f"{explain_spec['train_images'] or 'all'} images, lr {explain_spec['lr']:g} "
                 f"(cosine), batch {explain_spec['batch_size']}, from the pretrained weights. Maps "
                 f"evaluated by `train/evaluate.py explain` on {stages['maps-baselines']['images']} "
                 f"validation images with ground-truth masks.")
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
    return lines


def _render_maps(results: dict) -> list[str]:
    """Tables 1 and 3: every map beside the paper's."""
    summary = results["summary"]
    maps = summary["maps"]
    lines = []
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
    return lines


def _elapsed(results: dict) -> str:
    """How long the stages took by the clock, where they ran in parallel, and how much of the
    compute was reused from an earlier run."""
    text = ""
    reused = [r["wall_s"] for r in results["stages"].values() if "reused_from" in r]
    if reused:
        text += (f" ({sum(reused) / 60:.1f} of them in {len(reused)} stages reused from an earlier "
                 f"run, marked in the stage times)")
    if results.get("jobs", 1) > 1 and results.get("elapsed_s"):
        text += (f"; {results['elapsed_s'] / 60:.1f} minutes elapsed with up to {results['jobs']} "
                 f"stages at once (one torch thread each)")
        runs = results.get("elapsed_runs", [])
        if len(runs) > 1:  # a resumed or partly re-run report: each invocation, with its note
            text += " in " + "; ".join(
                f"{run['seconds'] / 60:.1f}" + (f" ({run['note']})" if run.get("note") else "")
                for run in runs)
    return text


def _render_budgets(summary: dict, scale: dict) -> list[str]:
    """The explanation budget sweep on the mapval split, and the choice it made."""
    sweeps = summary["budgets"]
    gain = next(iter(sweeps.values()))["chosen"]["gain"]
    images = next(r["images"] for sweep in sweeps.values() for r in sweep["runs"] if "images" in r)
    lines = ["## Training budgets", "",
             f"Each explanation variant trained from the pretrained weights for each budget in turn "
             f"(its own cosine schedule; only the epoch count changes), its map scored after every "
             f"epoch on {images} images of SyntheticScenes' `mapval` split, which shares no image "
             f"with the training or evaluation images (`train/explain.py --map-val-images`). The "
             f"budget is the first whose next doubling gains under {gain:g} point of validation "
             f"mIoU and moves the foreground share by under {gain:g} point (a longer budget is "
             f"skipped once the choice is made); the evaluation images are not looked at until the "
             f"chosen run is evaluated once (the maps table).", "",
             "| variant | epochs | updates | mapval mIoU | gain | pixel acc. | fg share (%) | |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, sweep in sweeps.items():
        previous = None
        for r in sweep["runs"]:
            if "skipped" in r:
                lines.append(f"| {variant} | {r['epochs']} | - | skipped: {r['skipped']} | | | | |")
                continue
            gained = "" if previous is None else f"{r['miou'] - previous:+.2f}"
            mark = "**chosen**" if r["epochs"] == sweep["chosen"]["epochs"] else ""
            lines.append(f"| {variant} | {r['epochs']} | {r['updates']} | {r['miou']:.2f} | "
                         f"{gained} | {r['pixel_accuracy']:.2f} | {r['fg_share']:.1f} | {mark} |")
            previous = r["miou"]
    lines.append("")
    lines.append("![explanation budget](figures/explain_budget.png)")
    lines.append("")
    return lines


def _render_prune_curve(curve: dict) -> list[str]:
    """ICE against EViT in top-1 as the pruning runs' budget grows."""
    lines = ["## Pruning budget", "",
             "ICE and EViT fine-tuned from the same pretrained weights for each budget (the pruning "
             "recipe otherwise, its own cosine schedule), every seed, top-1 on the accuracy images: "
             "does ICE's lead hold as the budget grows? Mean over seeds and (max - min).", "",
             "| keep rate | epochs | updates | EViT top-1 | spread | ICE top-1 | spread | ICE - EViT |",
             "|---|---|---|---|---|---|---|---|"]
    for rate, by_epochs in curve.items():
        for epochs, methods in by_epochs.items():
            evit, ice = methods.get("evit"), methods.get("ice")
            if evit is None or ice is None:
                continue
            lines.append(f"| {rate} | {epochs} | {ice['updates']} | {evit['top1_mean']:.2f} | "
                         f"{evit['top1_spread']:.2f} | {ice['top1_mean']:.2f} | "
                         f"{ice['top1_spread']:.2f} | {ice['top1_mean'] - evit['top1_mean']:+.2f} |")
    lines.append("")
    lines.append("![pruning budget](figures/prune_budget.png)")
    lines.append("")
    return lines


def _render_pruning(results: dict) -> list[str]:
    """Table 5: top-1, cost and speed-up of every pruned model beside the paper's."""
    stages, summary, scale = results["stages"], results["summary"], results["scale"]
    prune = summary["prune"]
    lines = []
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
    return lines


def _render_pruned_maps(summary: dict) -> list[str]:
    """ICE's map from the pruned forward beside the unpruned pass of the same weights, the
    explanation run's ICE map and the best baseline."""
    maps, best = summary["maps"], summary["best_baseline"]
    lines = ["## ICE's map from the pruned forward", "",
             "The ICE pruning runs' checkpoints (first seed) in explain mode: one pruned forward "
             "gives the logits and the map, each patch's 1 - P(background) from its last scoring "
             "at a selection point (`train/evaluate.py explain --method ice --keep-rate K --methods "
             "ice-pruned`). The unpruned pass is the same weights at keep rate 1: the head read at "
             "the selection points, the last one for every patch. Same protocols and images as the "
             "maps above; beside them the explanation run's ICE map (its own head on the last block) "
             "and the best baseline. Agreement with the unpruned pass (`train/evaluate.py "
             "agreement`), mean over images: IoU of the foreground masks (1 - P(background) > 0.5) "
             "and Spearman's rank correlation of the scores; logits: with the map on and off, eager.",
             "",
             "| map | keep rate | pixel acc. | mIoU | mAP | Jaccard | fg share | fg IoU with keep 1 "
             "| Spearman with keep 1 | logits unchanged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rate, study in summary["pruned_maps"].items():
        agreement = study["agreement"]
        for label, keep, ours, pruned in (
                (f"pruned forward, prune-ice-{rate}-s{study['seed']}", rate, study["pruned"], True),
                ("unpruned pass of the same weights", "1", study["unpruned"], False)):
            unchanged = ("yes" if agreement["logits_identical"] else
                         f"no ({agreement['logits_differing_images']} images)")
            lines.append(f"| {label} | {keep} | {_number(ours['pixel_accuracy'])} | "
                         f"{_number(ours['miou'])} | {_number(ours['map'])} | "
                         f"{_number(ours['jaccard'])} | {_number(ours['fg_share'], 1)} | "
                         f"{_number(agreement['foreground_iou']) if pruned else ''} | "
                         f"{_number(agreement['spearman'], 3) if pruned else ''} | "
                         f"{unchanged if pruned else ''} |")
    for label, ours in (("ICE, explanation run (last block)", maps["ice"]),
                        (f"{best} (best baseline)", maps[best])):
        lines.append(f"| {label} | - | {_number(ours['pixel_accuracy'])} | {_number(ours['miou'])} | "
                     f"{_number(ours['map'])} | {_number(ours['jaccard'])} | "
                     f"{_number(ours.get('fg_share'), 1)} | | | |")
    lines.append("")
    lines.append("Fg share: the percentage of patches called foreground, by 1 - P(background) > 0.5 "
                 "on the maps images for the pruned-forward rows, by the head's argmax on its "
                 "validation images for the explanation run. Jaccard: the foreground mask (the same "
                 "rules).")
    lines.append("")
    return lines


def _render_adaptive(adaptive: dict) -> list[str]:
    """Per-image token counts: every variant of the adaptive stage, the four curves' points and
    the bookkeeping variant in a row of its own."""
    rate, seed = adaptive["source_keep_rate"], adaptive["seed"]
    low, high = adaptive["data"]["object_scale"]
    calibration = adaptive["calibration"]
    cal_low, cal_high = calibration["object_scale"]
    book = adaptive["bookkeeping"]
    lines = ["## Per-image token counts", "",
             f"A keep policy gives each image its own token count at each selection point (ICE: the "
             f"tokens whose foreground probability reaches a threshold; EViT: the fewest holding a "
             f"share of the [CLS] attention), and the batch runs packed. The pruning checkpoints "
             f"at keep rate {rate:g} (prune-ice-{rate:g}-s{seed}, prune-evit-{rate:g}-s{seed}), "
             f"trained at that fixed rate, run at the fixed keep rates "
             f"{', '.join(f'{r:g}' for r in adaptive['fixed_rates'])} (every rate but {rate:g} is "
             f"one they were not trained at) and under policies calibrated to them: for each fixed "
             f"rate below 1, the ICE threshold and the EViT mass whose mean cost per image equals "
             f"the fixed rate's on {calibration['images']} SyntheticScenes training images (the "
             f"split and seed {calibration['seed']} the pruning runs trained on, objects of "
             f"{cal_low:g} to {cal_high:g} of the image side, no labels read), found by "
             f"`ice_prune.calibrate_keep_policy` (bisection on [0, 1] to "
             f"{calibration['precision']:.2g}; the cost: the blocks' multiply-adds per image: "
             f"linear layers and attention's products of token pairs). The setting comes from the "
             f"method and its training data, never from the evaluation images or labels. "
             f"Thresholds: {', '.join(f'{t:.4g}' for t in adaptive['thresholds'])}; masses: "
             f"{', '.join(f'{m:.4g}' for m in adaptive['masses'])} (for fixed keep "
             f"{', '.join(f'{r:g}' for r in calibration['rates'])}). Each image keeps between "
             f"{adaptive['min_share']:g} and {adaptive['max_share']:g} of its tokens at each point "
             f"(at least a few tokens for an image the head calls all background; all of them for "
             f"a cluttered one). No run was trained with a policy.", ""]
    if book is not None:
        share = book["policy"]["min_share"]
        lines += [f"{ADAPTIVE_BOOKKEEPING[0].upper() + ADAPTIVE_BOOKKEEPING[1:]} "
                  f"({book['name']}): ICE's policy with both share bounds at {share:g}, so that "
                  f"every image keeps fixed keep {share:g}'s tokens (checked on every image) and "
                  f"the run differs from fixed keep {share:g} only in the packed path's "
                  f"bookkeeping. It is not adaptive: on no curve and not in the figure.", ""]
    schedule = adaptive.get("schedule")
    if schedule is not None:
        point = adaptive["matched"]["ice"]["adaptive"]
        lines += [f"{ADAPTIVE_SCHEDULE[0].upper() + ADAPTIVE_SCHEDULE[1:]} ({schedule['name']}): the fixed-keep ICE model "
                  f"with one keep rate per point, so that every image keeps the mean tokens per "
                  f"point of {point['name']} (the ICE policy calibrated to fixed keep "
                  f"{adaptive['match_rate']:g}) on these images, rounded, run dense. It splits "
                  f"that point's time against fixed keep {adaptive['match_rate']:g} in two: what "
                  f"its schedule of counts costs (how many tokens at which point) and what the "
                  f"spread of its images' counts around that mean and the packed path cost. On no "
                  f"curve and not in the figure.", ""]
    lines += [f"Images: {adaptive['images']} SyntheticScenes validation images (seed "
              f"{adaptive['data']['seed']}) with objects of {low:g} to {high:g} of the image side, "
              f"so that the images hold very different amounts of foreground: a set apart from the "
              f"maps and accuracy images wherever the scale's object sizes differ from these, and "
              f"harder for small objects than the training scenes. Tokens kept: the mean over the "
              f"images at each point, of {adaptive['num_patches']} patches (fixed keep: the "
              f"schedule). GMACs: `ice_prune.count_flops` on the images, the mean per image (fixed "
              f"keep: one image's, the same for every image). img/s: every variant in one "
              f"interleaved `ice_prune.benchmark_models` run on the first {adaptive['batch']} of "
              f"the images, {adaptive['reps']} repetitions, eager, {adaptive['dtype']}, torch "
              f"threads: {adaptive['threads']}, {adaptive['device']}.",
              "",
              "| variant | policy | tokens kept per point | GMACs | img/s | top-1 (%) |",
              "|---|---|---|---|---|---|"]

    def row_line(label: str, row: dict) -> str:
        policy = row["policy"]
        if row["kind"] == "schedule":
            described = "keep rates " + " / ".join(f"{r:.4g}" for r in row["keep_rates"])
        elif policy is None:
            described = f"keep rate {row['keep_rate']:g}"
        else:
            rule = (f"threshold {policy['threshold']:.4g}" if policy["threshold"] is not None
                    else f"mass {policy['mass']:.4g}")
            if row["calibrated_to"] is not None:
                rule += f" (calibrated to keep {row['calibrated_to']:g})"
            described = f"{rule}, shares {policy['min_share']:g}-{policy['max_share']:g}"
        tokens = " / ".join(f"{k:.1f}" for k in row["tokens_per_point"])
        return (f"| {label} | {described} | {tokens} | {row['gmacs']:.4f} | "
                f"{row['img_s_median']:.0f} | {row['top1']:.2f} |")

    for curve in ("fixed-ice", "adaptive-ice", "fixed-evit", "adaptive-evit"):
        for row in sorted(adaptive["curves"][curve], key=_adaptive_order):
            lines.append(row_line(ADAPTIVE_CURVES[curve], row))
        if curve == "adaptive-ice" and book is not None:
            lines.append(row_line(ADAPTIVE_BOOKKEEPING, book))
        if curve == "adaptive-ice" and schedule is not None:
            lines.append(row_line(ADAPTIVE_SCHEDULE, schedule))
    lines.append("")
    for method in ("ice", "evit"):
        study = adaptive["matched"][method]
        point, fixed = study["adaptive"], study["fixed"]
        label = ADAPTIVE_CURVES[f"adaptive-{method}"]
        lines.append(f"- {label[0].upper() + label[1:]} calibrated to fixed keep "
                     f"{adaptive['match_rate']:g}'s cost ({fixed['gmacs']:.4f} GMACs): "
                     f"{point['name']} at {point['gmacs']:.4f} GMACs, top-1 {point['top1']:.2f} "
                     f"against {study[f'fixed-{method}_top1']:.2f} on the "
                     f"{ADAPTIVE_CURVES[f'fixed-{method}']} curve there (interpolated in GMACs), "
                     f"{point['img_s_median']:.0f} img/s against "
                     f"{study[f'fixed-{method}_img_s_median']:.0f}.")
    if book is not None:
        share = book["policy"]["min_share"]
        lines.append(f"- {ADAPTIVE_BOOKKEEPING[0].upper() + ADAPTIVE_BOOKKEEPING[1:]}: "
                     f"{book['img_s_median']:.0f} img/s against fixed keep {share:g}'s "
                     f"{book['fixed']['img_s_median']:.0f} ({book['img_s_ratio']:.3f}), the same "
                     f"tokens per point, {book['gmacs']:.4f} GMACs against "
                     f"{book['fixed']['gmacs']:.4f}.")
    focus = adaptive.get("focus")
    if focus is not None:
        speeds, ratio = focus["img_s_median"], focus["ratio"]
        lines.append(f"- The speed goal's variants again, alone ({focus['reps']} repetitions, one "
                     f"interleaved run): " + "; ".join(
                         f"{name} {speeds[name]:.0f} img/s"
                         + ("" if name == focus["fixed"] else f" ({ratio[name]:.3f})")
                         for name in focus["variants"])
                     + f". Where {focus['adaptive']}'s time goes: its mean counts as a fixed "
                     f"schedule run at {ratio[focus['schedule']]:.3f} of fixed keep "
                     f"{adaptive['match_rate']:g}, the adaptive point at "
                     f"{focus['adaptive_over_schedule']:.3f} of the schedule (the spread of the "
                     f"images' counts and the packed path), the packed path alone at equal counts "
                     f"at {ratio[focus['bookkeeping']]:.3f}.")
    elif schedule is not None:
        fixed = adaptive["matched"]["ice"]["fixed"]
        point = adaptive["matched"]["ice"]["adaptive"]
        lines.append(f"- Where {point['name']}'s time goes against fixed keep "
                     f"{adaptive['match_rate']:g} ({fixed['img_s_median']:.0f} img/s): its mean "
                     f"counts as a fixed schedule ({schedule['name']}, {schedule['gmacs']:.4f} "
                     f"GMACs) run at {schedule['img_s_ratio']:.3f} of it, and the adaptive point at "
                     f"{schedule['adaptive_over_schedule']:.3f} of the schedule (the spread of the "
                     f"images' counts and the packed path), "
                     f"{point['img_s_median'] / fixed['img_s_median']:.3f} in all.")
    lines.append("")
    lines.append("![per-image token counts](figures/adaptive.png)")
    lines.append("")
    return lines


def _adaptive_order(row: dict) -> float:
    """Fixed keep rates from 1 down, calibrated policies by the rate they match, from 1 down."""
    return -(row["keep_rate"] if row["policy"] is None else row["calibrated_to"])


def _render_claims(comparisons: list[dict]) -> list[str]:
    """Each of the paper's claims and whether it holds here."""
    lines = []
    lines.append("## Where ours agree with the paper")
    lines.append("")
    for comparison in comparisons:
        found = (comparison["detail"] if "detail" in comparison
                 else f"by {comparison['by']:+.2f}{comparison['unit']}")
        lines.append(f"- {comparison['claim']}: **{'yes' if comparison['holds'] else 'no'}**, "
                     f"{found} ({comparison['paper']}).")
    lines.append("")
    return lines


def _render_figures(class_counts: bool, pruned_forward: bool) -> list[str]:
    """The figures, with the class-count one where that study ran and the pruned-forward one where
    the examples stage drew it."""
    lines = []
    lines.append("## Figures")
    lines.append("")
    lines.append("Examples (image | ICE | ICE-f | ICEv2-style | baselines | ICE's foreground mask | "
                 "ground truth), on validation images:")
    lines.append("")
    lines.append("![examples](figures/examples.png)")
    lines.append("")
    if pruned_forward:
        lines.append("ICE's map from the pruned forward (1 - P(background), 0 blue to 1 red) beside "
                     "the patches kept to the end (the others greyed), per keep rate, first seed:")
        lines.append("")
        lines.append("![pruned-forward map](figures/pruned_forward_map.png)")
        lines.append("")
    lines.append("![accuracy vs keep rate](figures/accuracy_vs_keep_rate.png)")
    lines.append("")
    lines.append("![speed-up vs GMACs](figures/speedup_vs_gmacs.png)")
    lines.append("")
    if class_counts:
        lines.append("![mIoU vs lambda](figures/miou_vs_lambda.png)")
        lines.append("")
    return lines


def _render_stage_times(stages: dict) -> list[str]:
    lines = []
    lines.append("## Stage times")
    lines.append("")
    lines.append("| stage | wall (s) |")
    lines.append("|---|---|")
    for name, result in stages.items():
        reused = f" (reused: {result['reused_from']})" if "reused_from" in result else ""
        lines.append(f"| {name}{reused} | {result['wall_s']:.0f} |")
    lines.append("")
    return lines


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
        literal = maps[f"{row}-literal"]
        balanced = maps["ice-ablation"] if row == "ice" else maps[row]
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
        main = study.get("rule_main")
        if main is not None:
            lines.append(f"| {num_classes} | {study['rule']['lambda_class']:.3f} (rule, main "
                         f"budget: {main['updates']} updates) | "
                         f"{_number(main['fg_share'], 1)} | {_number(main['pixel_accuracy'])} | "
                         f"{_number(main['miou'])} | {_number(main['jaccard'])} |")
        generic = study["generic"]
        lines.append(f"| {num_classes} | generic attention | | {_number(generic['pixel_accuracy'])} | "
                     f"{_number(generic['miou'])} | {_number(generic['jaccard'])} |")
    lines.append("")
    return lines


def _number(x: Optional[float], digits: int = 2) -> str:
    """``x`` with ``digits`` decimals; a dash for a figure that is missing or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
