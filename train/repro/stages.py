"""The stages of a run and what each computes, in :func:`plan`'s order (:mod:`.runner` runs them).

Each :class:`Stage` writes into its own folder ``OUT/work/<stage>`` and ends with ``done.json`` (its
results). Training and evaluation go through the command lines beside this package
(``prune.main(argv)``, ``explain.main(argv)``, ``pm.main(argv)``, ``evaluate.main(argv)``), so a run
exercises exactly what a user runs; the speed and examples stages use the library directly, as does
the per-image token counts stage (:mod:`.adaptive`, its own module: its variants, calibration and
timing).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Callable, Optional

import timm
import torch
from torch.utils.data import Dataset

import ice_prune
from ice_prune import visualize
from ice_prune.data import ImageNetSegmentation, SyntheticScenes
from ice_prune.checkpoint import read_checkpoint
from ice_prune.training.engine import CHECKPOINT, LOG
from ice_prune.loss import ICELoss, parse_lambda
from ice_prune.maps import ice_explain, upsample

# the sibling scripts in train/ (on sys.path, see train/reproduce.py)
import evaluate
import explain
import pm
import prune

from .adaptive import adaptive_stage
from .scales import (BASELINES, VARIANTS, Scale, TrainSpec, ablation_runs, class_count_runs,
                     Context, device_name, pm_runs, prune_name, synthetic_eval_kwargs)
from .summary import choose_budget

DONE = "done.json"

# the examples grid's column of each explanation variant
COLUMN = {"ice": "ICE", "ice-f": "ICE-f", "icev2-style": "ICEv2-style"}


# ---------------------------------------------------------------------------------------------
# command lines of the train/ scripts


def train_argv(scale: Scale, spec: TrainSpec, seed: int = 0, num_classes: Optional[int] = None
               ) -> list[str]:
    """Arguments shared by train/prune.py and train/explain.py for one run of ``spec`` (on
    SyntheticScenes with ``num_classes`` classes, default the scale's)."""
    argv = ["--model", scale.model, "--model-kwargs", scale.model_kwargs_json,
            "--img-size", str(scale.img_size), "--data", scale.train_data,
            "--epochs", str(spec.epochs), "--lr", str(spec.lr), "--batch-size", str(spec.batch_size),
            "--warmup-epochs", str(spec.warmup_epochs), "--drop-path", str(scale.drop_path),
            "--workers", str(scale.workers), "--seed", str(seed)]
    if scale.synthetic:
        argv += ["--num-classes", str(num_classes or scale.num_classes), "--synthetic-train",
                 str(spec.train_images), "--synthetic-val", str(spec.val_images),
                 "--synthetic-kwargs", json.dumps(scale.synthetic_kwargs)]
    if spec.min_lr is not None:
        argv += ["--min-lr", str(spec.min_lr)]
    if spec.weight_decay is not None:
        argv += ["--weight-decay", str(spec.weight_decay)]
    if spec.clip_grad is not None:
        argv += ["--clip-grad", str(spec.clip_grad)]
    if not spec.mixup:
        argv += ["--mixup", "0", "--cutmix", "0"]
    if scale.device:
        argv += ["--device", scale.device]
    return argv


def eval_argv(scale: Scale, command: str, checkpoint: str, out: str,
              num_classes: Optional[int] = None) -> list[str]:
    """train/evaluate.py ``explain`` / ``agreement`` (on the maps data) or ``accuracy`` on the scale's
    evaluation data (SyntheticScenes with ``num_classes`` classes, default the scale's)."""
    data = scale.accuracy_data if command == "accuracy" else scale.maps_data
    argv = [command, "--data", data, "--checkpoint", checkpoint, "--model", scale.model,
            "--model-kwargs", scale.model_kwargs_json, "--img-size", str(scale.img_size),
            "--out", out, "--quiet", "--batch-size", "32"]
    if data == "synthetic":
        argv += ["--data-kwargs", json.dumps(synthetic_eval_kwargs(scale, num_classes))]
    elif scale.eval_images is not None:
        argv += ["--limit", str(scale.eval_images)]
    return argv


def last_epoch(output: str) -> dict:
    """The last epoch record of a training run's ``log.jsonl`` (train and val means, time)."""
    record = None
    with open(os.path.join(output, LOG)) as f:
        for line in f:
            entry = json.loads(line)
            if "train" in entry:
                record = entry
    if record is None:
        raise RuntimeError(f"{output}/{LOG} holds no finished epoch")
    return record


def train(script: Any, argv: list[str], output: str) -> dict:
    """Run a training script (its module) into ``output``, continuing its checkpoint if one is
    there. ``sys.argv`` is the script's own while it runs, so the resume command it prints is right."""
    resume = os.path.exists(os.path.join(output, CHECKPOINT))
    argv = argv + ["--output", output, "--resume" if resume else "--overwrite"]
    saved = sys.argv
    sys.argv = [os.path.relpath(script.__file__)] + argv
    try:
        script.main(argv)
    finally:
        sys.argv = saved
    return last_epoch(output)


# ---------------------------------------------------------------------------------------------
# models and data the library-side stages read


def maps_dataset(scale: Scale) -> Dataset:
    """The images with masks the maps are evaluated on: what ``eval_argv(scale, "explain", ...)``
    hands train/evaluate.py."""
    kind, _, path = scale.maps_data.partition(":")
    if kind == "synthetic":
        return SyntheticScenes(**{"img_size": scale.img_size, "split": "val", "return_mask": True,
                                  **synthetic_eval_kwargs(scale)})
    if kind == "imagenet-seg":
        return ImageNetSegmentation(path, image_size=scale.img_size)
    raise ValueError(f"maps_data {scale.maps_data!r}: expected synthetic or imagenet-seg:PATH")


# ---------------------------------------------------------------------------------------------
# stages


@dataclasses.dataclass(frozen=True)
class Stage:
    """``fn(context, folder) -> results`` (JSON-serializable), written to ``folder/done.json``.
    ``after``: the stages whose results or checkpoints it reads (run before it); ``exclusive``: it
    runs with no other stage beside it (the speed stage's timings)."""

    name: str
    fn: Callable[["Context", str], dict]
    kind: str
    after: tuple[str, ...] = ()
    exclusive: bool = False


def _pretrain(context: Context, out: str) -> dict:
    scale = context.scale
    record = train(prune, ["--method", "evit", "--keep-rate", "1.0"]
                   + train_argv(scale, scale.pretrain), out)
    accuracy = evaluate.main(eval_argv(scale, "accuracy", context.checkpoint("pretrain"),
                                       os.path.join(out, "eval")))
    return {"train": record, "top1": accuracy["top1"], "checkpoint": context.checkpoint("pretrain")}


def _explain_stage(run: str) -> Callable[[Context, str], dict]:
    variant = run if run in VARIANTS else "ice"

    def fn(context: Context, out: str) -> dict:
        scale = context.scale
        argv = (["--variant", variant, "--checkpoint", context.pretrained]
                + list(ablation_runs(scale.num_classes).get(run, ())))
        record = train(explain, argv + train_argv(scale, scale.explain), out)
        return _ice_map_result(scale, out, out, run, variant, argv[4:], record,
                               {"epochs": scale.explain.epochs, "updates": record["num_updates"]})
    return fn


def _ice_map_result(scale: Scale, source: str, out: str, run: str, variant: str, args: list,
                    record: dict, budget: dict) -> dict:
    """An explanation stage's results: the ICE map of ``source``'s checkpoint scored on the
    evaluation images (``train/evaluate.py explain``, into ``out/eval``) beside its training."""
    maps = evaluate.main(eval_argv(scale, "explain", os.path.join(source, CHECKPOINT),
                                   os.path.join(out, "eval")) + ["--methods", "ice"])
    return {"run": run, "variant": variant, "args": args, "train": record,
            "maps": maps["methods"]["ice"], "images": maps["images"], "budget": budget}


def budget_name(variant: str, epochs: int) -> str:
    return f"budget-{variant}-e{epochs}"


def budget_results(context: Context, variant: str, below: Optional[int] = None) -> list[dict]:
    """The finished budget stages of ``variant`` (all, or those of fewer than ``below`` epochs), in
    the scale's order."""
    results = []
    for epochs in context.scale.explain_budgets:
        if below is not None and epochs >= below:
            break
        with open(os.path.join(context.folder(budget_name(variant, epochs)), DONE)) as f:
            results.append(json.load(f))
    return results


def map_val_curve(output: str) -> list[dict]:
    """Every epoch's ``map_val`` record of a train/explain.py run (``--map-val-images``)."""
    curve = []
    with open(os.path.join(output, LOG)) as f:
        for line in f:
            entry = json.loads(line)
            if "map_val" in entry:
                curve.append({"epoch": entry["epoch"], **entry["map_val"]})
    return curve


def _budget_stage(variant: str, epochs: int) -> Callable[[Context, str], dict]:
    """``variant`` trained for ``epochs`` (the explanation recipe otherwise), its map scored on the
    mapval split after every epoch (``--map-val-images``, which leaves the training unchanged). No
    evaluation image is looked at. Skipped (no training) when a smaller pair of budgets already
    met the rule (:func:`~.summary.choose_budget`): the budget is chosen, a longer run adds
    nothing to the choice."""

    def fn(context: Context, out: str) -> dict:
        scale = context.scale
        earlier = budget_results(context, variant, below=epochs)
        chosen = choose_budget(earlier, scale.budget_gain)
        if chosen["flattened"]:
            return {"variant": variant, "epochs": epochs,
                    "skipped": f"the rule chose {chosen['epochs']} epochs before this budget"}
        argv = ["--variant", variant, "--checkpoint", context.pretrained,
                "--map-val-images", str(scale.map_val_images)]
        spec = dataclasses.replace(scale.explain, epochs=epochs)
        record = train(explain, argv + train_argv(scale, spec), out)
        curve = map_val_curve(out)
        return {"variant": variant, "epochs": epochs, "updates": record["num_updates"],
                "train": record, "map_val": curve[-1], "curve": curve}
    return fn


def _chosen_explain_stage(variant: str) -> Callable[[Context, str], dict]:
    """The explanation run of ``variant`` at the budget the sweep chose: the budget stage's
    checkpoint (the same training, since scoring the mapval split changes nothing) copied here and
    evaluated once on the evaluation images."""

    def fn(context: Context, out: str) -> dict:
        scale = context.scale
        chosen = choose_budget(budget_results(context, variant), scale.budget_gain)
        source = context.folder(budget_name(variant, chosen["epochs"]))
        for name in (CHECKPOINT, LOG):
            shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
        return _ice_map_result(scale, out, out, variant, variant, [], last_epoch(out),
                               {**chosen, "source": budget_name(variant, chosen["epochs"])})
    return fn


def main_explain_epochs(context: Context) -> int:
    """The epochs of the main ICE run (``explain-ice``): the sweep's choice, else the recipe's."""
    with open(os.path.join(context.folder("explain-ice"), DONE)) as f:
        return json.load(f)["budget"]["epochs"]


def _maps_baselines(context: Context, out: str) -> dict:
    maps = evaluate.main(eval_argv(context.scale, "explain", context.pretrained, out)
                         + ["--methods", ",".join(BASELINES)])
    return {"maps": maps["methods"], "images": maps["images"]}


def _pm_stage(run: str) -> Callable[[Context, str], dict]:
    """PM-style training (train/pm.py) from the pretrained weights with the explanation runs'
    budget, then its ``pm-style`` map (train/evaluate.py explain) and its top-1 (train/evaluate.py
    accuracy). ``run``: ``pm-style`` (the scale's share of ground-truth masks), ``pm-style-pseudo``
    (the same share of images with the ``explain-ice`` run's ICE foreground as masks, no ground
    truth) or ``pm-style-no-masks`` (no mask: the same cross-entropy fine-tuning, the control that
    tells what the masks add)."""

    def fn(context: Context, out: str) -> dict:
        scale = context.scale
        fraction = 0.0 if run == "pm-style-no-masks" else scale.pm_mask_fraction
        argv = ["--checkpoint", context.pretrained, "--mask-fraction", f"{fraction:g}"]
        if run == "pm-style-pseudo":
            argv += ["--pseudo-masks", f"ice:{context.checkpoint('explain-ice')}"]
        spec = scale.explain  # the recipe's budget, as the ablation's
        record = train(pm, argv + train_argv(scale, spec), out)
        checkpoint = os.path.join(out, CHECKPOINT)
        maps = evaluate.main(eval_argv(scale, "explain", checkpoint, os.path.join(out, "eval"))
                             + ["--methods", "pm-style"])
        accuracy = evaluate.main(eval_argv(scale, "accuracy", checkpoint,
                                           os.path.join(out, "accuracy")))
        meta = read_checkpoint(checkpoint)["meta"]
        return {"run": run, "args": argv[2:], "mask_source": meta["mask_source"],
                "mask_fraction": fraction, "masked_images": meta["masked_images"],
                "train_images": meta["train_images"], "mask_weight": meta["mask_weight"],
                "smoothing": meta["smoothing"], "train": record,
                "maps": maps["methods"]["pm-style"], "images": maps["images"],
                "top1": accuracy["top1"], "top5": accuracy["top5"],
                "budget": {"epochs": spec.epochs, "updates": record["num_updates"]}}
    return fn


def class_count_name(num_classes: int, lambda_class: str) -> str:
    return f"classes-{num_classes}-lambda-{lambda_class}"


def resolved_lambda(num_classes: int, lambda_class: str) -> float:
    """The class weight train/explain.py (--variant ice) uses for ``--lambda-class lambda_class``."""
    return ICELoss("paper", parse_lambda(lambda_class)).resolved_lambda(num_classes)


def _class_count_stage(num_classes: int, lambda_class: str, main_budget: bool = False
                       ) -> Callable[[Context, str], dict]:
    """ICE on scenes of ``num_classes`` classes from the pretrained weights (a new classifier where
    the class count differs from the pretraining's). Its maps explain the class ICE itself predicts
    (``--ice-target ice``): the new classifier is untrained and explains nothing. ``main_budget``:
    trained for the main ICE run's epochs (the sweep's choice) instead of the study's."""

    def fn(context: Context, out: str) -> dict:
        scale = context.scale
        argv = ["--variant", "ice", "--checkpoint", context.pretrained,
                "--lambda-class", lambda_class]
        if num_classes != scale.num_classes:
            argv.append("--reset-classifier")
        spec = (dataclasses.replace(scale.explain, epochs=main_explain_epochs(context))
                if main_budget else scale.explain)
        record = train(explain, argv + train_argv(scale, spec, num_classes=num_classes), out)
        maps = evaluate.main(eval_argv(scale, "explain", os.path.join(out, CHECKPOINT),
                                       os.path.join(out, "eval"), num_classes=num_classes)
                             + ["--methods", "ice", "--ice-target", "ice"])
        return {"num_classes": num_classes, "lambda": lambda_class,
                "lambda_class": resolved_lambda(num_classes, lambda_class), "train": record,
                "maps": maps["methods"]["ice"], "images": maps["images"],
                "budget": {"epochs": spec.epochs, "updates": record["num_updates"]}}
    return fn


def _class_count_baseline(num_classes: int) -> Callable[[Context, str], dict]:
    """Generic attention (the best baseline map at the cpu scale) of the pretrained model on the
    same scenes, for the class-count study's comparison."""

    def fn(context: Context, out: str) -> dict:
        maps = evaluate.main(eval_argv(context.scale, "explain", context.pretrained, out,
                                       num_classes=num_classes) + ["--methods", "generic"])
        return {"num_classes": num_classes, "maps": maps["methods"]["generic"],
                "images": maps["images"]}
    return fn


def _prune_stage(method: str, rate: float, seed: int, epochs: Optional[int] = None
                 ) -> Callable[[Context, str], dict]:
    def fn(context: Context, out: str) -> dict:
        scale = context.scale
        selector = "evit" if method == "none" else method  # EViT at keep rate 1 = unpruned
        argv = ["--method", selector, "--keep-rate", str(rate), "--checkpoint", context.pretrained]
        spec = scale.prune if epochs is None else dataclasses.replace(scale.prune, epochs=epochs)
        record = train(prune, argv + train_argv(scale, spec, seed), out)
        eval_args = eval_argv(scale, "accuracy", os.path.join(out, CHECKPOINT),
                              os.path.join(out, "eval"))
        if method != "none":
            eval_args += ["--method", method, "--keep-rate", str(rate)]
        accuracy = evaluate.main(eval_args)
        return {"method": method, "keep_rate": rate, "seed": seed, "epochs": spec.epochs,
                "updates": record["num_updates"], "train": record, "top1": accuracy["top1"],
                "top5": accuracy["top5"], "images": accuracy["images"]}
    return fn


def pruned_map_name(rate: float, seed: int) -> str:
    return f"pruned-map-ice-{rate:g}-s{seed}"


def _pruned_map_stage(rate: float, seed: int) -> Callable[[Context, str], dict]:
    """ICE's map from the pruned forward of the ``prune-ice-<rate>-s<seed>`` checkpoint
    (``train/evaluate.py explain --method ice --keep-rate <rate> --methods ice-pruned``), the
    unpruned pass of the same weights (the same at keep rate 1: the head read at the selection
    points, the last one for every patch), and their agreement with the logits-unchanged check
    (``train/evaluate.py agreement``)."""

    def fn(context: Context, out: str) -> dict:
        scale = context.scale
        checkpoint = context.checkpoint(prune_name("ice", rate, seed))
        figures = {}
        for name, keep in (("pruned", rate), ("unpruned", 1.0)):
            scored = evaluate.main(eval_argv(scale, "explain", checkpoint, os.path.join(out, name))
                                   + ["--methods", "ice-pruned", "--method", "ice",
                                      "--keep-rate", str(keep)])
            figures[name] = scored["methods"]["ice-pruned"]
        agreement = evaluate.main(eval_argv(scale, "agreement", checkpoint,
                                            os.path.join(out, "agreement"))
                                  + ["--keep-rate", str(rate)])
        return {"keep_rate": rate, "seed": seed, "checkpoint": checkpoint, **figures,
                "agreement": agreement, "images": scored["images"]}
    return fn


def pruned_models(context: Context, seed: int) -> dict[str, torch.nn.Module]:
    """name -> eval-mode model of the seed's pruning runs (``none-1`` is the unpruned one)."""
    scale = context.scale
    models = {}
    for method, rate in [("none", 1.0)] + [(m, r) for r in scale.keep_rates for m in ("evit", "ice")]:
        models[f"{method}-{rate:g}"] = ice_prune.load_model(
            scale.model, context.checkpoint(prune_name(method, rate, seed)),
            method=None if method == "none" else method, keep_rate=rate,
            img_size=scale.img_size, **scale.model_kwargs)
    return models


def _speed(context: Context, out: str) -> dict:
    """Parameters, GMACs (:func:`ice_prune.count_flops`) and the speed-up over the unpruned model,
    all variants interleaved in one :func:`ice_prune.benchmark_models` run."""
    scale = context.scale
    models = pruned_models(context, scale.seeds[0])
    size = (3, scale.img_size, scale.img_size)
    timed = {name: torch.compile(model) if scale.bench_compile else model
             for name, model in models.items()}
    benchmark = ice_prune.benchmark_models(timed, size, batch_size=scale.bench_batch,
                                           device=scale.device, dtype=scale.bench_dtype,
                                           reps=scale.bench_reps, baseline="none-1", progress=True)
    rows = {}
    for name, model in models.items():
        measured = benchmark[name]
        rows[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                      "gmacs": ice_prune.count_flops(model, size) / 1e9,
                      "img_s_median": measured.median, "img_s_best": measured.best,
                      "speedup": benchmark.speedup(name),
                      "paired_speedup": benchmark.paired_speedup(name)}
    return {"models": rows, "batch": scale.bench_batch, "reps": scale.bench_reps,
            "compiled": scale.bench_compile, "dtype": scale.bench_dtype,
            "threads": torch.get_num_threads(), "device": device_name(),
            "flops": "ice_prune.count_flops (fvcore with handles for attention and reorganize)",
            "benchmark": benchmark.to_dict()}


def _examples(context: Context, out: str) -> dict:
    """Two grids: image | ICE | ICE-f | ICEv2-style | baselines | ICE's mask | ground truth
    (``examples.png``), and the first seed's ICE pruning runs at each keep rate, their map from the
    pruned forward beside the patches they keep to the end (``pruned_forward_map.png``)."""
    scale = context.scale
    model_kwargs = dict(img_size=scale.img_size, **scale.model_kwargs)
    base = ice_prune.load_model(scale.model, context.pretrained, **model_kwargs)
    # each with the ICE head its explain run trained, as model.ice_head
    explainers = {variant: ice_prune.load_model(scale.model, context.checkpoint(f"explain-{variant}"),
                                                **model_kwargs)
                  for variant in VARIANTS}
    dataset = maps_dataset(scale)
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD)[:, None, None]
    rows = []
    for i in range(scale.grid_images):
        item = dataset[i]
        image, label = item[0][None], item[-1]
        size = tuple(image.shape[-2:])
        shown = (image[0] * std + mean).clamp(0, 1)
        row = {"image": visualize.to_uint8_image(shown)}
        explanations = {variant: ice_explain(model, image) for variant, model in explainers.items()}
        for variant, explanation in explanations.items():
            row[COLUMN[variant]] = visualize.overlay(shown, upsample(explanation.class_map, size)[0])
        with torch.no_grad():
            target = base(image).argmax(-1)
        for name in BASELINES:
            patch_map = ice_prune.explain(base, image, name, target=target)
            row[name] = visualize.overlay(shown, upsample(patch_map, size)[0])
        row["ICE mask"] = visualize.mask_overlay(shown, explanations["ice"].foreground[0])
        mask = torch.as_tensor(label)
        row["ground truth"] = visualize.mask_overlay(shown, (mask > 0) & (mask != 255),
                                                     color=(0, 255, 0))
        rows.append(row)
    path = os.path.join(out, "examples.png")
    visualize.save_grid(rows, path, cell_inches=1.1)  # small enough to commit
    pruned_path = os.path.join(out, "pruned_forward_map.png")
    _pruned_forward_figure(context, dataset, pruned_path)
    return {"figure": path, "pruned_forward_figure": pruned_path, "images": len(rows)}


def _pruned_forward_figure(context: Context, dataset: Dataset, path: str) -> None:
    """image | per keep rate: ICE's map from the pruned forward, the patches kept to the end |
    ground truth, for the first ``grid_images`` images and the first seed's ICE pruning runs."""
    scale = context.scale
    count = scale.grid_images
    images = torch.stack([dataset[i][0] for i in range(count)])
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD)[:, None, None]
    shown = (images * std + mean).clamp(0, 1)
    rows = [{"image": visualize.to_uint8_image(image)} for image in shown]
    for rate in scale.keep_rates:
        model = ice_prune.load_model(scale.model,
                                     context.checkpoint(prune_name("ice", rate, scale.seeds[0])),
                                     method="ice", keep_rate=rate, img_size=scale.img_size,
                                     **scale.model_kwargs)
        for row, drawn in zip(rows, visualize.pruned_forward_rows(model, images, shown)):
            row[f"map, keep {rate:g}"] = drawn["map"]
            row[f"kept, keep {rate:g}"] = drawn["kept"]
    for i, row in enumerate(rows):
        mask = torch.as_tensor(dataset[i][-1])
        row["ground truth"] = visualize.mask_overlay(shown[i], (mask > 0) & (mask != 255),
                                                     color=(0, 255, 0))
    visualize.save_grid(rows, path, cell_inches=1.1)


def plan(scale: Scale) -> list[Stage]:
    """The stages of a run, in an order that runs every stage after those it reads (``after``)."""
    stages = []
    first = ("pretrain",) if scale.pretrain is not None else ()
    if scale.pretrain is not None:
        stages.append(Stage("pretrain", _pretrain, "pretrain"))
    if scale.explain_budgets:
        if not scale.synthetic or scale.map_val_images < 1:
            raise ValueError("explain_budgets needs SyntheticScenes and map_val_images >= 1: the "
                             "budget is chosen on its mapval split")
        if scale.explain_budgets[0] != scale.explain.epochs:
            raise ValueError(f"explain_budgets must start at explain.epochs "
                             f"({scale.explain.epochs}), the ablation's budget, got "
                             f"{scale.explain_budgets}")
        for variant in VARIANTS:
            previous = first
            for epochs in scale.explain_budgets:
                name = budget_name(variant, epochs)
                stages.append(Stage(name, _budget_stage(variant, epochs), "budget", previous))
                previous = first + (name,)
            stages.append(Stage(f"explain-{variant}", _chosen_explain_stage(variant), "explain",
                                tuple(budget_name(variant, e) for e in scale.explain_budgets)))
        # Table 6's ICE row at the ablation's budget: the sweep's first run, evaluated
        stages.append(Stage("explain-ice-ablation", _ablation_ice_stage, "explain",
                            (budget_name("ice", scale.explain_budgets[0]),)))
        # the rule's row of every class count at the main budget (explain-ice is the scale's
        # own): planned here, the longest runs after the sweeps, so that a parallel run starts them
        # as soon as ICE's budget is chosen rather than after the short class-count runs
        for num_classes in scale.class_counts:
            if num_classes != scale.num_classes:
                stages.append(Stage(class_count_name(num_classes, "auto") + "-main",
                                    _class_count_stage(num_classes, "auto", main_budget=True),
                                    "classes", first + ("explain-ice",)))
    else:
        for run in VARIANTS:
            stages.append(Stage(f"explain-{run}", _explain_stage(run), "explain", first))
    for run in ablation_runs(scale.num_classes):
        stages.append(Stage(f"explain-{run}", _explain_stage(run), "explain", first))
    stages.append(Stage("maps-baselines", _maps_baselines, "maps", first))
    for run in pm_runs(scale):  # the pseudo masks come from explain-ice
        stages.append(Stage(f"explain-{run}", _pm_stage(run), "pm",
                            first + (("explain-ice",) if run == "pm-style-pseudo" else ())))
    for num_classes in scale.class_counts:
        stages.append(Stage(f"classes-{num_classes}-generic", _class_count_baseline(num_classes),
                            "classes", first))
    for num_classes, lambda_class in class_count_runs(scale):
        stages.append(Stage(class_count_name(num_classes, lambda_class),
                            _class_count_stage(num_classes, lambda_class), "classes", first))
    main_prune = []
    for seed in scale.seeds:
        for method, rate in [("none", 1.0)] + [(m, r) for r in scale.keep_rates
                                               for m in ("evit", "ice")]:
            name = prune_name(method, rate, seed)
            stages.append(Stage(name, _prune_stage(method, rate, seed), "prune", first))
            main_prune.append(name)
    for epochs in scale.prune_budgets:
        for seed in scale.seeds:
            for rate in scale.prune_curve_rates:
                for method in ("evit", "ice"):
                    stages.append(Stage(prune_name(method, rate, seed, epochs),
                                        _prune_stage(method, rate, seed, epochs), "prune-curve",
                                        first))
    for rate in scale.keep_rates:
        stages.append(Stage(pruned_map_name(rate, scale.seeds[0]),
                            _pruned_map_stage(rate, scale.seeds[0]), "pruned-map",
                            (prune_name("ice", rate, scale.seeds[0]),)))
    stages.append(Stage("speed", _speed, "speed", tuple(main_prune), exclusive=True))
    stages.append(Stage("examples", _examples, "examples",
                        tuple(f"explain-{v}" for v in VARIANTS)
                        + tuple(prune_name("ice", r, scale.seeds[0]) for r in scale.keep_rates)))
    if scale.synthetic:  # SyntheticScenes images of the models' own classes
        stages.append(Stage("adaptive", adaptive_stage, "adaptive",
                            tuple(prune_name(m, scale.keep_rates[0], scale.seeds[0])
                                  for m in ("ice", "evit")), exclusive=True))
    names = set()
    for stage in stages:
        missing = [n for n in stage.after if n not in names]
        if missing:  # a planning error, not a user's
            raise AssertionError(f"stage {stage.name} is planned before {missing}")
        names.add(stage.name)
    return stages


def _ablation_ice_stage(context: Context, out: str) -> dict:
    """The sweep's first ICE run (the ablation's budget) evaluated on the evaluation images: Table
    6's ICE row, trained as long as the ablation's other rows."""
    scale = context.scale
    epochs = scale.explain_budgets[0]
    source = context.folder(budget_name("ice", epochs))
    record = last_epoch(source)
    return _ice_map_result(scale, source, out, "ice", "ice", [], record,
                           {"epochs": epochs, "updates": record["num_updates"],
                            "source": budget_name("ice", epochs)})
