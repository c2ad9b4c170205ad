"""The paper's experiments in miniature: the stages behind ``train/reproduce.py`` (``make reproduce``).

A run is a list of :class:`Stage` objects, each writing into its own folder ``OUT/work/<stage>`` and
ending with ``done.json`` (its results). :func:`run` skips every stage whose ``done.json`` exists
(``fresh=True`` starts over), and a training stage interrupted mid-way continues from its checkpoint
(``--resume`` of the training scripts). :func:`write_report` then builds ``OUT/results.json``,
``OUT/REPORT.md`` and ``OUT/figures/*.png`` from those ``done.json`` files only.

The stages call the command lines of ``train/`` in-process (``main(argv)``), so the run exercises
exactly what a user runs; the caller hands the three script modules in (:class:`Scripts`):

1. ``pretrain``: a 12-block ViT from scratch on SyntheticScenes with cross-entropy, through
   ``train/prune.py --method evit --keep-rate 1.0`` (keep rate 1 is exactly the unpatched ViT).
   At ``gpu`` scale a given DeiT-S checkpoint takes its place.
2. ``explain-<run>``: ICE, ICE-f, ICEv2-style and Table 6's ablation (alpha 1.0; lambda 0.5; both)
   with ``train/explain.py`` from the pretrained weights, each evaluated by
   ``train/evaluate.py explain --methods ice``; ``maps-baselines``: the attention baselines and the
   PM-style map on the pretrained model (the paper explains an unmodified DeiT-S with them).
3. ``prune-<method>-<rate>-s<seed>``: ``train/prune.py`` with ICE and EViT at each keep rate (and the
   unpruned model, ``none``, at keep rate 1 with the same budget), then ``train/evaluate.py accuracy``
   on one common validation set; ``speed``: parameters, GMACs and the speed-up over the unpruned model
   measured with all variants interleaved in one run.
4. ``examples``: a grid of maps on a few validation images.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

DONE = "done.json"

# ---------------------------------------------------------------------------------------------
# the paper's figures (ICE, CVPR 2023; DeiT-S on ImageNet), printed beside ours

PAPER = {
    # Table 1, DeiT-S row, ImageNet-Segmentation: (pixel accuracy, mIoU)
    "table1": {"gradcam": (64.33, 41.54), "rollout": (66.84, 47.85), "partial-lrp": (65.76, 43.37),
               "generic": (79.30, 60.60), "robustvit": (80.80, 64.00), "ice-f": (81.09, 62.12),
               "ice": (84.85, 67.94)},
    # Table 3, Jaccard on PASCAL VOC12 val
    "table3": {"raw-attention mean@0.9": 23.17, "raw-attention mean@0.8": 17.22,
               "raw-attention best-head@0.9": 21.80, "raw-attention best-head@0.8": 15.90,
               "ice-f": 34.85, "ice": 41.32},
    # Table 6: (pixel accuracy, mIoU, Jaccard)
    "table6": {"ice": (84.85, 67.94, 41.32), "ice-alpha1": (63.45, 45.36, 22.98),
               "ice-lambda0.5": (79.53, 57.59, 29.14), "ice-alpha1-lambda0.5": (66.26, 47.70, 23.87)},
    # Table 5: top-1 (%), params (M), throughput (img/s, RTX 3090, max batch); GMACs from EViT's
    # README (the paper gives none): DeiT-S 4.6, keep rate 0.7 3.0, 0.5 2.3
    "table5": {"none-1.0": (79.8, 22.1, 818, 4.6), "evit-0.7": (79.27, 22.1, 1291, 3.0),
               "ice-0.7": (79.34, 22.4, 1178, 3.0), "evit-0.5": (78.39, 22.1, 1701, 2.3),
               "ice-0.5": (78.49, 22.4, 1547, 2.3)},
}

# Table 6's runs: name -> extra arguments of train/explain.py (--variant ice)
ABLATION = {"ice-alpha1": ("--alpha", "1.0"), "ice-lambda0.5": ("--lambda-class", "0.5"),
            "ice-alpha1-lambda0.5": ("--alpha", "1.0", "--lambda-class", "0.5")}
VARIANTS = ("ice", "ice-f", "icev2-style")
COLUMN = {"ice": "ICE", "ice-f": "ICE-f", "icev2-style": "ICEv2-style"}
BASELINES = ("rollout", "gradcam", "generic", "raw-attention", "pm-style")


# ---------------------------------------------------------------------------------------------
# scales


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """One kind of training run: epochs, lr, batch and, on SyntheticScenes, how many images."""

    epochs: int
    lr: float
    batch_size: int
    train_images: int = 0  # SyntheticScenes only
    val_images: int = 0
    warmup_epochs: int = 0
    min_lr: Optional[float] = None
    weight_decay: Optional[float] = None
    clip_grad: Optional[float] = None
    # the DeiT augmentations (mixup 0.8, cutmix 1.0) unless switched off
    mixup: bool = True


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything a run needs besides the output folder."""

    name: str
    model: str
    model_kwargs: dict
    img_size: int
    train_data: str  # --data of the training scripts: synthetic | imagefolder:PATH
    maps_data: str  # --data of evaluate.py explain: synthetic | imagenet-seg:PATH
    accuracy_data: str  # --data of evaluate.py accuracy: synthetic | folder:PATH
    pretrain: Optional[TrainSpec]  # None: start from ``checkpoint``
    explain: TrainSpec
    prune: TrainSpec
    checkpoint: Optional[str] = None
    num_classes: int = 10  # SyntheticScenes classes
    synthetic_kwargs: dict = dataclasses.field(default_factory=dict)  # more SyntheticScenes arguments
    keep_rates: tuple[float, ...] = (0.7, 0.5)
    seeds: tuple[int, ...] = (0, 1)
    eval_images: Optional[int] = None  # None: the whole evaluation set
    grid_images: int = 4
    bench_batch: int = 64
    bench_reps: int = 20
    drop_path: float = 0.0
    workers: int = 1
    # torch threads (None: torch's default). One on a small shared CPU: with two, every parallel op
    # waits for both cores, and a second busy process makes a forward hundreds of times slower
    threads: Optional[int] = None
    device: Optional[str] = None
    note: str = ""  # why the scale is what it is, printed in the report's setup

    @property
    def synthetic(self) -> bool:
        return self.train_data == "synthetic"

    @property
    def model_kwargs_json(self) -> str:
        return json.dumps(self.model_kwargs, sort_keys=True)


def smoke_scale(**over) -> Scale:
    """Seconds, for tests: a 12-block ViT of width 24 on 32-pixel images."""
    base = dict(
        name="smoke", model="vit_tiny_patch16_224",
        model_kwargs={"patch_size": 8, "embed_dim": 24, "num_heads": 2}, img_size=32,
        train_data="synthetic", maps_data="synthetic", accuracy_data="synthetic",
        pretrain=TrainSpec(epochs=1, lr=1e-3, batch_size=16, train_images=32, val_images=16,
                           mixup=False),
        explain=TrainSpec(epochs=1, lr=1e-3, batch_size=16, train_images=16, val_images=16,
                          mixup=False),
        prune=TrainSpec(epochs=1, lr=1e-4, batch_size=16, train_images=16, val_images=16,
                        mixup=False),
        num_classes=4, eval_images=8, grid_images=2, bench_batch=4, bench_reps=2, workers=0,
        threads=1)
    base.update(over)
    return Scale(**base)


def cpu_scale(**over) -> Scale:
    """About 40 minutes on a 2-core CPU (most of it pretraining): a 12-block, 3-head ViT of width 96
    on 64-pixel images with 8-pixel patches (an 8 x 8 grid, 64 patch tokens), SyntheticScenes with 10
    classes in the setting a small ViT learns from scratch (see ``note``)."""
    base = dict(
        name="cpu", model="vit_tiny_patch16_224",
        model_kwargs={"patch_size": 8, "embed_dim": 96, "num_heads": 3}, img_size=64,
        train_data="synthetic", maps_data="synthetic", accuracy_data="synthetic",
        synthetic_kwargs={"scale": [0.35, 0.6], "instances": [1, 2], "distractors": [0, 2],
                          "polarity": "fixed", "texture_scale": 3.0},
        # from scratch: a warm-up epoch and a large lr, no mixup (it slows a short run down)
        pretrain=TrainSpec(epochs=22, lr=1e-3, batch_size=32, train_images=8000, val_images=200,
                           warmup_epochs=1, min_lr=1e-5, weight_decay=0.05, clip_grad=1.0,
                           mixup=False),
        explain=TrainSpec(epochs=2, lr=1e-4, batch_size=32, train_images=2000, val_images=200,
                          mixup=False),
        prune=TrainSpec(epochs=1, lr=1e-4, batch_size=32, train_images=2000, val_images=200,
                        min_lr=1e-5, mixup=False),
        num_classes=10, eval_images=400, grid_images=4, bench_batch=64, bench_reps=15, workers=1,
        threads=1,
        note="the scenes here (see Data) are easier than SyntheticScenes' defaults, in which a ViT "
             "from scratch sat at chance for over 2750 updates (13% top-1 after 4500; the first "
             "committed report): with random polarity no linear function of a patch tells the class, "
             "and textures wider than a patch leave only the shape over several patches. In trials on "
             "this machine (1500 updates, lr 1e-3) this setting reached 30% while the defaults and "
             "the larger objects alone stayed at 10-12%, and a conv stem only began to learn after "
             "900 updates")
    base.update(over)
    return Scale(**base)


def gpu_scale(data: Optional[str] = None, seg_data: Optional[str] = None,
              checkpoint: Optional[str] = None, **over) -> Scale:
    """The paper's sizes: DeiT-S at 224 from a pretrained checkpoint, ImageNet (an ImageFolder with
    ``train/`` and ``val/``) for training and accuracy, ImageNet-Segmentation for the maps; the
    training scripts' paper recipes (explanation: lr 1e-5, batch 256, 3 epochs; pruning: EViT's 30
    epochs at lr 2e-5, batch 128)."""
    missing = [f for f, v in (("--data", data), ("--seg-data", seg_data),
                              ("--checkpoint", checkpoint)) if not v]
    if missing:
        raise ValueError(f"--scale gpu needs {', '.join(missing)}: an ImageNet folder (train/, val/), "
                         f"ImageNet-Segmentation's gtsegs_ijcv.mat and a DeiT-S checkpoint (.pth)")
    base = dict(
        name="gpu", model="deit_small_patch16_224", model_kwargs={}, img_size=224,
        train_data=f"imagefolder:{data}", maps_data=f"imagenet-seg:{seg_data}",
        accuracy_data=f"folder:{os.path.join(data, 'val')}", pretrain=None, checkpoint=checkpoint,
        explain=TrainSpec(epochs=3, lr=1e-5, batch_size=256),
        prune=TrainSpec(epochs=30, lr=2e-5, batch_size=128, min_lr=2e-6, weight_decay=1e-6),
        num_classes=1000, eval_images=None, grid_images=6, bench_batch=256, bench_reps=30,
        drop_path=0.1, workers=8)
    base.update(over)
    return Scale(**base)


SCALES: dict[str, Callable[..., Scale]] = {"smoke": smoke_scale, "cpu": cpu_scale, "gpu": gpu_scale}


# ---------------------------------------------------------------------------------------------
# command lines of the train/ scripts


@dataclasses.dataclass(frozen=True)
class Scripts:
    """``main(argv)`` of train/prune.py, train/explain.py and train/evaluate.py (their modules)."""

    prune: Any
    explain: Any
    evaluate: Any


def train_argv(scale: Scale, spec: TrainSpec, seed: int = 0) -> list[str]:
    """Arguments shared by train/prune.py and train/explain.py for one run of ``spec``."""
    argv = ["--model", scale.model, "--model-kwargs", scale.model_kwargs_json,
            "--img-size", str(scale.img_size), "--data", scale.train_data,
            "--epochs", str(spec.epochs), "--lr", str(spec.lr), "--batch-size", str(spec.batch_size),
            "--warmup-epochs", str(spec.warmup_epochs), "--drop-path", str(scale.drop_path),
            "--workers", str(scale.workers), "--seed", str(seed)]
    if scale.synthetic:
        argv += ["--num-classes", str(scale.num_classes), "--synthetic-train",
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


def eval_argv(scale: Scale, command: str, checkpoint: str, out: str) -> list[str]:
    """train/evaluate.py ``explain`` / ``accuracy`` on the scale's evaluation data."""
    data = scale.maps_data if command == "explain" else scale.accuracy_data
    argv = [command, "--data", data, "--checkpoint", checkpoint, "--model", scale.model,
            "--model-kwargs", scale.model_kwargs_json, "--img-size", str(scale.img_size),
            "--out", out, "--quiet", "--batch-size", "32"]
    if data == "synthetic":
        # the validation split, seed 0: the same images for every model
        argv += ["--data-kwargs", json.dumps({**scale.synthetic_kwargs, "num_classes": scale.num_classes,
                                              "length": scale.eval_images or 500, "seed": 0})]
    elif scale.eval_images is not None:
        argv += ["--limit", str(scale.eval_images)]
    return argv


def last_epoch(output: str) -> dict:
    """The last epoch record of a training run's ``log.jsonl`` (train and val means, time)."""
    from ice_prune.engine import LOG

    record = None
    with open(os.path.join(output, LOG)) as f:
        for line in f:
            r = json.loads(line)
            if "train" in r:
                record = r
    if record is None:
        raise RuntimeError(f"{output}/{LOG} holds no finished epoch")
    return record


def train(script: Any, argv: list[str], output: str) -> dict:
    """Run a training script (its module) into ``output``, continuing its checkpoint if one is
    there. ``sys.argv`` is the script's own while it runs, so the resume command it prints is right."""
    import sys

    from ice_prune.engine import CHECKPOINT

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
# stages


@dataclasses.dataclass(frozen=True)
class Stage:
    """``fn(ctx, folder) -> results`` (JSON-serializable), written to ``folder/done.json``."""

    name: str
    fn: Callable[["Context", str], dict]
    kind: str


@dataclasses.dataclass
class Context:
    scale: Scale
    scripts: Scripts
    work: str

    def folder(self, stage: str) -> str:
        return os.path.join(self.work, stage)

    def checkpoint(self, stage: str) -> str:
        from ice_prune.engine import CHECKPOINT

        return os.path.join(self.folder(stage), CHECKPOINT)

    @property
    def pretrained(self) -> str:
        return self.scale.checkpoint if self.scale.pretrain is None else self.checkpoint("pretrain")


def _pretrain(ctx: Context, out: str) -> dict:
    s = ctx.scale
    rec = train(ctx.scripts.prune, ["--method", "evit", "--keep-rate", "1.0"]
                + train_argv(s, s.pretrain), out)
    acc = ctx.scripts.evaluate.main(eval_argv(s, "accuracy", ctx.checkpoint("pretrain"),
                                              os.path.join(out, "eval")))
    return {"train": rec, "top1": acc["top1"], "checkpoint": ctx.checkpoint("pretrain")}


def _explain_stage(run: str) -> Callable[[Context, str], dict]:
    variant = run if run in VARIANTS else "ice"

    def fn(ctx: Context, out: str) -> dict:
        s = ctx.scale
        argv = ["--variant", variant, "--checkpoint", ctx.pretrained] + list(ABLATION.get(run, ()))
        rec = train(ctx.scripts.explain, argv + train_argv(s, s.explain), out)
        maps = ctx.scripts.evaluate.main(eval_argv(s, "explain", ctx.checkpoint(f"explain-{run}"),
                                                   os.path.join(out, "eval")) + ["--methods", "ice"])
        return {"run": run, "variant": variant, "args": argv[4:], "train": rec,
                "maps": maps["methods"]["ice"], "images": maps["images"]}
    return fn


def _maps_baselines(ctx: Context, out: str) -> dict:
    s = ctx.scale
    maps = ctx.scripts.evaluate.main(eval_argv(s, "explain", ctx.pretrained, out)
                                     + ["--methods", ",".join(BASELINES)])
    return {"maps": maps["methods"], "images": maps["images"]}


def prune_name(method: str, rate: float, seed: int) -> str:
    return f"prune-{method}-{rate:g}-s{seed}"


def _prune_stage(method: str, rate: float, seed: int) -> Callable[[Context, str], dict]:
    def fn(ctx: Context, out: str) -> dict:
        s = ctx.scale
        selector = "evit" if method == "none" else method  # EViT at keep rate 1 = unpruned
        argv = ["--method", selector, "--keep-rate", str(rate), "--checkpoint", ctx.pretrained]
        rec = train(ctx.scripts.prune, argv + train_argv(s, s.prune, seed), out)
        eval_args = eval_argv(s, "accuracy", ctx.checkpoint(prune_name(method, rate, seed)),
                              os.path.join(out, "eval"))
        if method != "none":
            eval_args += ["--method", method, "--keep-rate", str(rate)]
        acc = ctx.scripts.evaluate.main(eval_args)
        return {"method": method, "keep_rate": rate, "seed": seed, "train": rec,
                "top1": acc["top1"], "top5": acc["top5"], "images": acc["images"]}
    return fn


def pruned_models(ctx: Context, seed: int) -> dict[str, torch.nn.Module]:
    """name -> eval-mode model of the seed's pruning runs (``none-1.0`` is the unpruned one)."""
    import timm

    import ice_prune
    from ice_prune.engine import read_state_dict

    s = ctx.scale
    models = {}
    for method, rate in [("none", 1.0)] + [(m, r) for r in s.keep_rates for m in ("evit", "ice")]:
        state = read_state_dict(ctx.checkpoint(prune_name(method, rate, seed)))
        model = timm.create_model(s.model, pretrained=False, img_size=s.img_size,
                                  num_classes=state["head.weight"].shape[0], **s.model_kwargs)
        if method != "none":
            ice_prune.patch(model, keep_rate=rate, method=method)
        model.load_state_dict(state)
        models[f"{method}-{rate:g}"] = model.eval()
    return models


def _speed(ctx: Context, out: str) -> dict:
    """Parameters, GMACs (:func:`ice_prune.count_flops`) and the speed-up over the unpruned model,
    all variants interleaved in one :func:`ice_prune.benchmark_models` run."""
    import ice_prune

    s = ctx.scale
    models = pruned_models(ctx, s.seeds[0])
    size = (3, s.img_size, s.img_size)
    run = ice_prune.benchmark_models(models, size, batch_size=s.bench_batch, device=s.device,
                                     reps=s.bench_reps, baseline="none-1", progress=True)
    rows = {}
    for name, model in models.items():
        m = run[name]
        rows[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                      "gmacs": ice_prune.count_flops(model, size) / 1e9,
                      "img_s_median": m.median, "img_s_best": m.best,
                      "speedup": run.speedup(name), "paired_speedup": run.paired_speedup(name)}
    return {"models": rows, "batch": s.bench_batch, "reps": s.bench_reps,
            "threads": torch.get_num_threads(), "device": _device_name(),
            "flops": "ice_prune.count_flops (fvcore with handles for attention and reorganize)",
            "benchmark": run.to_dict()}


def _device_name() -> str:
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _examples(ctx: Context, out: str) -> dict:
    """A grid: image | ICE | ICE-f | ICEv2-style | baselines | ICE's mask | ground truth."""
    import timm

    from ice_prune import visualize as vis
    from ice_prune.maps import ice_explain, upsample

    ev = ctx.scripts.evaluate
    s = ctx.scale

    def load(ckpt):
        args = ev.parser().parse_args(eval_argv(s, "explain", ckpt, out))
        model, head, _ = ev.build_model(args)
        return args, model, head

    args, base, _ = load(ctx.pretrained)
    heads = {name: load(ctx.checkpoint(f"explain-{name}"))[1:] for name in VARIANTS}
    dataset = ev.DATASETS[args.data.partition(":")[0]](args.data.partition(":")[2] or None, args,
                                                       base.num_classes)
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD)[:, None, None]
    rows = []
    for i in range(s.grid_images):
        item = dataset[i]
        image, label = item[0][None], item[-1]
        size = tuple(image.shape[-2:])
        shown = (image[0] * std + mean).clamp(0, 1)
        row = {"image": vis.to_uint8_image(shown)}
        explanations = {name: ice_explain(model, image, head=head)
                        for name, (model, head) in heads.items()}
        for name, e in explanations.items():
            row[COLUMN[name]] = vis.overlay(shown, upsample(e.class_map, size)[0])
        maps, _, _ = ev.compute_maps(base, None, image, BASELINES)
        for name in BASELINES:
            row[name] = vis.overlay(shown, upsample(maps[name], size)[0])
        row["ICE mask"] = vis.mask_overlay(shown, explanations["ice"].foreground[0])
        fg = torch.as_tensor(label) > 0
        row["ground truth"] = vis.mask_overlay(shown, fg & (torch.as_tensor(label) != 255),
                                               color=(0, 255, 0))
        rows.append(row)
    path = os.path.join(out, "examples.png")
    vis.save_grid(rows, path, cell_inches=1.1)  # small enough to commit
    return {"figure": path, "images": len(rows)}


def plan(scale: Scale) -> list[Stage]:
    """The stages of a run, in order."""
    stages = []
    if scale.pretrain is not None:
        stages.append(Stage("pretrain", _pretrain, "pretrain"))
    for run in VARIANTS + tuple(ABLATION):
        stages.append(Stage(f"explain-{run}", _explain_stage(run), "explain"))
    stages.append(Stage("maps-baselines", _maps_baselines, "maps"))
    for seed in scale.seeds:
        stages.append(Stage(prune_name("none", 1.0, seed), _prune_stage("none", 1.0, seed), "prune"))
        for rate in scale.keep_rates:
            for method in ("evit", "ice"):
                stages.append(Stage(prune_name(method, rate, seed), _prune_stage(method, rate, seed),
                                    "prune"))
    stages.append(Stage("speed", _speed, "speed"))
    stages.append(Stage("examples", _examples, "examples"))
    return stages


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def run(scale: Scale, out: str, scripts: Scripts, fresh: bool = False,
        log: Callable[[str], None] = print, until: Optional[str] = None) -> Optional[dict]:
    """Run (or reuse) every stage, then write the report. Returns the results dict.
    ``until``: stop after that stage (no report); a later run reuses what it finished."""
    work = os.path.join(out, "work")
    if fresh and os.path.isdir(work):
        shutil.rmtree(work)
    ctx = Context(scale, scripts, work)
    if scale.threads is not None:
        torch.set_num_threads(scale.threads)
    stages = plan(scale)
    if until is not None and until not in [st.name for st in stages]:
        raise ValueError(f"until={until!r} is no stage of this scale; choose one of "
                         f"{[st.name for st in stages]}")
    t_start = time.time()
    for i, stage in enumerate(stages, 1):
        folder = ctx.folder(stage.name)
        if os.path.exists(os.path.join(folder, DONE)):
            log(f"[{i}/{len(stages)}] {stage.name}: done before, reused")
            continue
        log(f"[{i}/{len(stages)}] {stage.name} ...  ({time.time() - t_start:.0f} s so far)")
        os.makedirs(folder, exist_ok=True)
        t0 = time.time()
        result = stage.fn(ctx, folder)
        result["wall_s"] = round(time.time() - t0, 1)
        _write_json(os.path.join(folder, DONE), result)
        log(f"[{i}/{len(stages)}] {stage.name}: {result['wall_s']:.0f} s")
        if stage.name == until:
            return None
    results = collect(scale, work, stages)
    write_report(results, out)
    return results


def collect(scale: Scale, work: str, stages: Optional[list[Stage]] = None) -> dict:
    """Everything the report shows, read from the stages' ``done.json``."""
    stages = plan(scale) if stages is None else stages
    done = {}
    for stage in stages:
        with open(os.path.join(work, stage.name, DONE)) as f:
            done[stage.name] = json.load(f)
    return {"scale": dataclasses.asdict(scale), "stages": done, "paper": PAPER,
            "wall_s": round(sum(r["wall_s"] for r in done.values()), 1),
            "versions": {"torch": torch.__version__, "timm": __import__("timm").__version__},
            "date": time.strftime("%Y-%m-%d")}


# ---------------------------------------------------------------------------------------------
# the report


def summarize(results: dict) -> dict:
    """Derived figures: the maps table, the ablation, the pruning table, and the comparisons."""
    st = results["stages"]
    scale = results["scale"]
    maps = {}
    for run in VARIANTS + tuple(ABLATION):
        m = st[f"explain-{run}"]["maps"]
        maps[run] = {"pixel_accuracy": m["pixel_accuracy"], "miou": m["miou"], "map": m["map"],
                     "jaccard": m["jaccard"]["mask"] if "jaccard" in m else None}
    for name, m in st["maps-baselines"]["maps"].items():
        jac = m.get("jaccard")
        maps[name] = {"pixel_accuracy": m["pixel_accuracy"], "miou": m["miou"], "map": m["map"],
                      # the best threshold / head variant, as Table 3 lists the best of each
                      "jaccard": max(jac.values()) if jac else None,
                      "jaccard_variants": jac}
    best_base = max(BASELINES, key=lambda b: maps[b]["miou"])
    groups: dict[str, list[dict]] = {}
    for name, r in st.items():
        if name.startswith("prune-"):
            groups.setdefault(f"{r['method']}-{r['keep_rate']:g}", []).append(r)
    speed = st["speed"]["models"]
    prune = {}
    for key, runs in groups.items():
        top1 = [r["top1"] for r in runs]
        prune[key] = {"top1_mean": float(np.mean(top1)),
                      "top1_spread": float(np.max(top1) - np.min(top1)) if len(top1) > 1 else 0.0,
                      "top1_std": float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0,
                      "top1_runs": top1, "seeds": [r["seed"] for r in runs], **speed[key]}
    comparisons = []
    ice, base = maps["ice"], maps[best_base]
    p1 = PAPER["table1"]
    comparisons.append(_claim(
        f"ICE beats the best baseline map ({best_base}) on mIoU", ice["miou"] - base["miou"],
        f"paper: +{p1['ice'][1] - p1['robustvit'][1]:.2f} over RobustViT, "
        f"+{p1['ice'][1] - p1['generic'][1]:.2f} over Chefer et al. 2021 (the best baseline we also "
        f"run)"))
    comparisons.append(_claim(
        f"ICE beats the best baseline map ({best_base}) on pixel accuracy",
        ice["pixel_accuracy"] - base["pixel_accuracy"],
        f"paper: +{p1['ice'][0] - p1['generic'][0]:.2f} over Chefer et al. 2021"))
    jac_base = max(BASELINES, key=lambda b: maps[b]["jaccard"] or -1)
    if ice["jaccard"] is not None and maps[jac_base]["jaccard"] is not None:
        comparisons.append(_claim(
            f"ICE beats the best baseline ({jac_base}, best threshold/head) on Jaccard",
            ice["jaccard"] - maps[jac_base]["jaccard"],
            f"paper: +{PAPER['table3']['ice'] - PAPER['table3']['raw-attention mean@0.9']:.2f} over "
            f"raw attention (mean, 0.9)"))
    comparisons.append(_claim("ICE beats ICE-f on mIoU", ice["miou"] - maps["ice-f"]["miou"],
                              f"paper: +{p1['ice'][1] - p1['ice-f'][1]:.2f}"))
    for run, label in (("ice-alpha1", "alpha 1.0"), ("ice-lambda0.5", "lambda 0.5"),
                       ("ice-alpha1-lambda0.5", "alpha 1.0 and lambda 0.5")):
        comparisons.append(_claim(
            f"ICE (alpha 0.5, lambda 0.975) beats the ablation with {label} on mIoU",
            ice["miou"] - maps[run]["miou"],
            f"paper: +{PAPER['table6']['ice'][1] - PAPER['table6'][run][1]:.2f}"))
    p5 = PAPER["table5"]
    for rate in scale["keep_rates"]:
        e, i = prune[f"evit-{rate:g}"], prune[f"ice-{rate:g}"]
        noise = max(e["top1_spread"], i["top1_spread"])
        comparisons.append(_claim(
            f"ICE is more accurate than EViT at keep rate {rate:g}",
            i["top1_mean"] - e["top1_mean"],
            f"paper: +{p5[f'ice-{rate:g}'][0] - p5[f'evit-{rate:g}'][0]:.2f}; here the seed spread "
            f"is up to {noise:.2f}, so a gap below it is not a difference", unit=" points top-1"))
        comparisons.append(_claim(
            f"ICE is at least as fast as EViT at keep rate {rate:g} (speed-up ratio ICE / EViT - 1)",
            100 * (i["speedup"] / e["speedup"] - 1),
            f"paper: {100 * (p5[f'ice-{rate:g}'][2] / p5[f'evit-{rate:g}'][2] - 1):+.1f}%",
            unit="%", threshold=0.0))
        comparisons.append(_claim(
            f"ICE at keep rate {rate:g} is faster than the unpruned model (speed-up - 1)",
            100 * (i["speedup"] - 1),
            f"paper: {100 * (p5[f'ice-{rate:g}'][2] / p5['none-1.0'][2] - 1):+.1f}%", unit="%"))
    return {"maps": maps, "best_baseline": best_base, "prune": prune, "comparisons": comparisons}


def _claim(text: str, diff: float, paper: str, unit: str = " points", threshold: float = 0.0
           ) -> dict:
    """A statement and whether our figures agree: yes when ``diff > threshold``."""
    return {"claim": text, "holds": bool(diff > threshold), "by": round(float(diff), 2),
            "unit": unit, "paper": paper}


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def plot_accuracy(summary: dict, scale: dict, path: str) -> None:
    """Top-1 against keep rate (ours with the seed range, the paper's beside)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    rates = [1.0] + list(scale["keep_rates"])
    p5 = PAPER["table5"]
    for method, color in (("evit", "tab:blue"), ("ice", "tab:red")):
        keys = ["none-1"] + [f"{method}-{r:g}" for r in scale["keep_rates"]]
        pr = summary["prune"]
        mean = [pr[k]["top1_mean"] for k in keys]
        lo = [pr[k]["top1_mean"] - min(pr[k]["top1_runs"]) for k in keys]
        hi = [max(pr[k]["top1_runs"]) - pr[k]["top1_mean"] for k in keys]
        axes[0].errorbar(rates, mean, yerr=[lo, hi], marker="o", capsize=3, color=color,
                         label=method.upper() if method == "ice" else "EViT")
        paper = [p5["none-1.0"][0]] + [p5[f"{method}-{r:g}"][0] for r in (0.7, 0.5)]
        axes[1].plot([1.0, 0.7, 0.5], paper, marker="s", color=color, linestyle="--",
                     label=(method.upper() if method == "ice" else "EViT") + " (paper)")
    axes[0].set_title(f"ours: {scale['model']} ({scale['name']} scale), min-max over seeds",
                      fontsize=8)
    axes[1].set_title("paper's Table 5: DeiT-S on ImageNet", fontsize=8)
    for ax in axes:
        ax.set_xlabel("keep rate (1.0 = unpruned)")
        ax.set_ylabel("top-1 (%)")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_speed(summary: dict, path: str) -> None:
    """Speed-up over the unpruned model against GMACs (ours measured, the paper's beside)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    p5 = PAPER["table5"]
    for key, r in summary["prune"].items():
        method = key.split("-")[0]
        color = {"none": "black", "evit": "tab:blue", "ice": "tab:red"}[method]
        axes[0].scatter(r["gmacs"], r["speedup"], color=color)
        axes[0].annotate(key, (r["gmacs"], r["speedup"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    for key, (_, _, ips, gmacs) in p5.items():
        color = {"none": "black", "evit": "tab:blue", "ice": "tab:red"}[key.split("-")[0]]
        speedup = ips / p5["none-1.0"][2]
        axes[1].scatter(gmacs, speedup, color=color, marker="s")
        axes[1].annotate(key, (gmacs, speedup), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_title("ours: measured in one interleaved run", fontsize=8)
    axes[1].set_title("paper's Table 5 (RTX 3090); GMACs from EViT's README", fontsize=8)
    for ax in axes:
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel("speed-up over unpruned")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    _write_json(os.path.join(out, "results.json"), results)
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as f:
        f.write(render(results))
    return path


def _fg_share(stages: dict, run: str) -> Optional[float]:
    """Percent of patches an ICE run's head calls foreground on its validation images, or None."""
    val = stages.get(f"explain-{run}", {}).get("train", {}).get("val", {})
    return 100 * val["fg_fraction"] if "fg_fraction" in val else None


def render(results: dict) -> str:
    st, sm, scale = results["stages"], results["summary"], results["scale"]
    maps, prune = sm["maps"], sm["prune"]
    p1, p3, p5, p6 = (PAPER[k] for k in ("table1", "table3", "table5", "table6"))
    pre = st.get("pretrain")
    spec = scale["pretrain"]
    L = [f"# ICE in miniature: `{scale['name']}` scale", ""]
    L.append(f"Written by `train/reproduce.py --scale {scale['name']}` on {results['date']} "
             f"({st['speed']['device']}; torch {results['versions']['torch']}, timm "
             f"{results['versions']['timm']}); the stages took {results['wall_s'] / 60:.1f} minutes "
             f"in all. Every figure below is read from the stages' outputs (`results.json` holds "
             f"them all). **The paper's figures are DeiT-S on ImageNet and its evaluation sets; ours "
             f"are a small ViT on SyntheticScenes**: compare directions and gaps, not values.")
    if pre is not None and pre["top1"] < 2 * 100 / scale["num_classes"]:
        L.append("")
        L.append(f"**Warning: the pretrained stand-in did not learn** (top-1 {pre['top1']:.2f}% on "
                 f"{scale['num_classes']} classes, chance {100 / scale['num_classes']:.0f}%). Every "
                 f"later stage explains or prunes a network that has not learned the task, so the "
                 f"comparisons below are between near-random maps and models: they test that the "
                 f"pipeline runs end to end, not the paper's claims.")
    L.append("")
    L.append("## Setup")
    L.append("")
    mk = json.dumps(scale["model_kwargs"])
    L.append(f"- Model: timm `{scale['model']}` with `{mk}`, image {scale['img_size']} px, 12 blocks, "
             f"selection after blocks 3, 6, 9.")
    if scale["train_data"] == "synthetic":
        kw = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}"
                     for k, v in sorted(scale.get("synthetic_kwargs", {}).items()))
        L.append(f"- Data, every stage: `SyntheticScenes(num_classes={scale['num_classes']}, "
                 f"img_size={scale['img_size']}{kw})`, training and validation images from disjoint "
                 f"random streams.")
    if pre is not None:
        L.append(f"- Stand-in for the pretrained DeiT-S: trained from scratch on SyntheticScenes "
                 f"({scale['num_classes']} classes, {spec['train_images']} training images, "
                 f"{spec['epochs']} epochs, lr {spec['lr']:g}, batch {spec['batch_size']}) with "
                 f"cross-entropy (`train/prune.py --method evit --keep-rate 1.0`, exactly the "
                 f"unpruned ViT): top-1 **{pre['top1']:.2f}%** on the evaluation images.")
    else:
        L.append(f"- Pretrained weights: `{scale['checkpoint']}`.")
    e, p = scale["explain"], scale["prune"]
    L.append(f"- Explanation runs (`train/explain.py`): {e['epochs']} epoch(s) of "
             f"{e['train_images'] or 'all'} images, lr {e['lr']:g}, batch {e['batch_size']}, from the "
             f"pretrained weights. Maps evaluated by `train/evaluate.py explain` on "
             f"{st['maps-baselines']['images']} validation images with ground-truth masks.")
    L.append(f"- Pruning runs (`train/prune.py`): {p['epochs']} epoch(s) of {p['train_images'] or 'all'} "
             f"images, lr {p['lr']:g}, batch {p['batch_size']}, seeds {list(scale['seeds'])}, the "
             f"same budget for ICE, EViT and the unpruned model, all from the same pretrained "
             f"weights (ICE with a fresh head, as in the paper); top-1 by `train/evaluate.py "
             f"accuracy` on one common validation set.")
    if scale.get("note"):
        L.append(f"- Note: {scale['note']}.")
    L.append("")
    L.append("## Explanation maps (paper Tables 1 and 3)")
    L.append("")
    L.append("Pixel accuracy and mIoU: Chefer et al.'s ImageNet-Segmentation protocol; Jaccard: "
             "Naseer et al.'s (ICE: its foreground mask; the other maps: the best of the "
             "cumulative-mass thresholds 0.9 / 0.8 and, for raw attention, of mean or best head). "
             "Paper columns: DeiT-S, ImageNet-Segmentation (Table 1) and VOC12 (Table 3).")
    L.append("")
    L.append("| map | pixel acc. | mIoU | mAP | Jaccard | foreground share | paper pixel acc. | "
             "paper mIoU | paper Jaccard |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    paper_jac = {"ice": p3["ice"], "ice-f": p3["ice-f"], "raw-attention": p3["raw-attention mean@0.9"]}
    for name in VARIANTS + BASELINES:
        m = maps[name]
        pp = p1.get(name)
        L.append(f"| {name} | {_fmt(m['pixel_accuracy'])} | {_fmt(m['miou'])} | {_fmt(m['map'])} | "
                 f"{_fmt(m['jaccard'])} | {_fmt(_fg_share(st, name), 1)} | "
                 f"{_fmt(pp[0] if pp else None)} | "
                 f"{_fmt(pp[1] if pp else None)} | {_fmt(paper_jac.get(name))} |")
    L.append(f"| RobustViT (not run here) | | | | | | {p1['robustvit'][0]:.2f} | {p1['robustvit'][1]:.2f} | |")
    L.append("")
    L.append("Foreground share: the percentage of patches the ICE head's argmax calls foreground on "
             "its run's validation images (a mask that covers every patch scores the pixel accuracy "
             "of calling everything foreground).")
    L.append("")
    L.append("ICEv2-style: what ICEv2's abstract states (the last 2 blocks train, an MLP head); its "
             "exact method is not public. PM-style: the model's own classifier on every patch, "
             "untrained on masks; the paper has no PM column.")
    L.append("")
    L.append("## Ablation (paper Table 6)")
    L.append("")
    L.append("| run | pixel acc. | mIoU | Jaccard | foreground share | paper pixel acc. | paper mIoU | "
             "paper Jaccard |")
    L.append("|---|---|---|---|---|---|---|---|")
    for run, label in (("ice", "ICE (alpha 0.5, lambda 0.975)"), ("ice-alpha1", "alpha 1.0"),
                       ("ice-lambda0.5", "lambda 0.5"), ("ice-alpha1-lambda0.5", "alpha 1.0, lambda 0.5")):
        m, pp = maps[run], p6[run]
        L.append(f"| {label} | {_fmt(m['pixel_accuracy'])} | {_fmt(m['miou'])} | {_fmt(m['jaccard'])} | "
                 f"{_fmt(_fg_share(st, run), 1)} | {pp[0]:.2f} | {pp[1]:.2f} | {pp[2]:.2f} |")
    L.append("")
    L.append("## Pruning (paper Table 5)")
    L.append("")
    sp = st["speed"]
    L.append(f"Top-1: mean over seeds and (max - min). Speed-up: median forward time of the unpruned "
             f"model over the model's, batch {sp['batch']}, {sp['reps']} interleaved repetitions, "
             f"torch threads: {sp['threads']}, {sp['device']}. GMACs by {sp['flops']}. Paper: DeiT-S on "
             f"ImageNet, 30 epochs, throughput on an RTX 3090; its GMACs are EViT's README figures.")
    L.append("")
    L.append("| method | keep rate | top-1 (%) | spread | params (M) | GMACs | img/s | speed-up | "
             "paper top-1 | paper params | paper GMACs | paper speed-up |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = ["none-1"] + [f"{m}-{r:g}" for r in scale["keep_rates"] for m in ("evit", "ice")]
    for key in order:
        r = prune[key]
        method, rate = key.split("-")
        pk = f"{method}-{float(rate):.1f}" if method == "none" else key
        pp = p5.get(pk)
        label = {"none": "unpruned", "evit": "EViT", "ice": "ICE"}[method]
        L.append(f"| {label} | {rate} | {r['top1_mean']:.2f} | {r['top1_spread']:.2f} | "
                 f"{r['params_m']:.3f} | {r['gmacs']:.4f} | {r['img_s_median']:.0f} | "
                 f"{r['speedup']:.2f}x | {_fmt(pp[0] if pp else None)} | "
                 f"{_fmt(pp[1] if pp else None, 1)} | {_fmt(pp[3] if pp else None, 1)} | "
                 f"{(pp[2] / p5['none-1.0'][2]) if pp else float('nan'):.2f}x |")
    L.append("")
    L.append("## Where ours agree with the paper")
    L.append("")
    for c in sm["comparisons"]:
        L.append(f"- {c['claim']}: **{'yes' if c['holds'] else 'no'}**, by {c['by']:+.2f}{c['unit']} "
                 f"({c['paper']}).")
    L.append("")
    L.append("## Figures")
    L.append("")
    L.append("Examples (image | ICE | ICE-f | ICEv2-style | baselines | ICE's foreground mask | "
             "ground truth), on validation images:")
    L.append("")
    L.append("![examples](figures/examples.png)")
    L.append("")
    L.append("![accuracy vs keep rate](figures/accuracy_vs_keep_rate.png)")
    L.append("")
    L.append("![speed-up vs GMACs](figures/speedup_vs_gmacs.png)")
    L.append("")
    L.append("## Stage times")
    L.append("")
    L.append("| stage | wall (s) |")
    L.append("|---|---|")
    for name, r in st.items():
        L.append(f"| {name} | {r['wall_s']:.0f} |")
    L.append("")
    return "\n".join(L)
