"""What a run holds and how large it is: the explanation runs and maps every scale evaluates, and
:class:`Scale` (model, data, training recipes, benchmark settings) with its factories, ``smoke``
(seconds, for tests), ``cpu`` (``make reproduce``) and ``gpu`` (the paper's sizes)."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from typing import Callable, Optional

import torch

from ice_prune.loss import auto_lambda
from ice_prune.training.engine import CHECKPOINT

# the explanation variants (train/explain.py --variant), each trained and evaluated
VARIANTS = ("ice", "ice-f", "icev2-style")
# Table 6's rows: (alpha, lambda) as the paper ran them, at ImageNet's 1000 classes
TABLE6 = {"ice": (0.5, 0.975), "ice-alpha1": (1.0, 0.975), "ice-lambda0.5": (0.5, 0.5),
          "ice-alpha1-lambda0.5": (1.0, 0.5)}


def ablation_runs(num_classes: int) -> dict[str, tuple[str, ...]]:
    """Table 6 two ways: run name -> extra arguments of train/explain.py (--variant ice).

    ``<row>-literal``: the row's alpha and lambda as the paper wrote them, at any class count.
    ``<row>``: balance-equivalent, the row's alpha with the lambda that keeps the row's balance of
    the two phases at ``num_classes`` (``auto_lambda(C, row lambda)``; ice_prune.loss), so that the
    rows compare at this class count as they did at 1000. The ``ice`` row that way is the default
    ICE run, ``explain-ice``, and has no entry here.
    """
    runs = {}
    for row, (alpha, lam) in TABLE6.items():
        alpha_args = ("--alpha", "1.0") if alpha == 1.0 else ()
        literal = "paper" if lam == 0.975 else f"{lam:g}"
        runs[f"{row}-literal"] = alpha_args + ("--lambda-class", literal)
        if row != "ice":
            balanced = "auto" if lam == 0.975 else f"{auto_lambda(num_classes, lam):.6g}"
            runs[row] = alpha_args + ("--lambda-class", balanced)
    return runs


def class_count_runs(scale: "Scale") -> list[tuple[int, str]]:
    """The class-count study: ``(C, --lambda-class)`` for every class count and lambda it trains,
    the paper's literal value, the class-count rule and the sweep."""
    return [(c, lam) for c in scale.class_counts
            for lam in ("paper", "auto") + tuple(f"{x:g}" for x in scale.lambda_sweep)]
# the maps of the unmodified pretrained model (train/evaluate.py explain --methods)
BASELINES = ("rollout", "gradcam", "generic", "raw-attention", "pm-style")
# PM-style training runs (train/pm.py): ground-truth masks, ICE pseudo masks, none (the control)
PM_RUNS = ("pm-style", "pm-style-pseudo", "pm-style-no-masks")


# the per-image token counts stage (``adaptive``): SyntheticScenes with objects from 10% to 60% of the
# image side, so that the images hold very different amounts of foreground
ADAPTIVE_OBJECT_SCALE = (0.1, 0.6)
# the fixed keep rates the pruning checkpoints also run at
ADAPTIVE_FIXED_RATES = (1.0, 0.9, 0.7, 0.5, 0.3)
# ICE's threshold and EViT's mass are set per fixed rate below 1 from the method and its training
# data: ice_prune.calibrate_keep_policy on this many SyntheticScenes training images (the pruning
# run's split and seed, objects of ADAPTIVE_OBJECT_SCALE, labels unused) gives the value whose mean
# MACs equal the fixed rate's, bisected to 2 ** -ADAPTIVE_CALIBRATION_ITERATIONS (a grid on
# the selector's own scale can miss the range of costs: a head that calls nearly every patch
# foreground keeps every token up to a threshold near 1)
ADAPTIVE_CALIBRATION_IMAGES = 400
ADAPTIVE_CALIBRATION_ITERATIONS = 16
# every image keeps at least 10% of its tokens at each point (one the head calls all background still
# reaches the classifier through some of its own tokens) and at most all of them (a cluttered one
# drops nothing): fixed for both methods, so that only the threshold or mass sets the count
ADAPTIVE_MIN_SHARE, ADAPTIVE_MAX_SHARE = 0.1, 1.0
# the speed goal's variants (fixed keep at the match rate, the ICE policy calibrated to it, its mean
# counts as a fixed schedule, the packed bookkeeping) are timed again alone, this many times the
# scale's repetitions: the stage's main run interleaves every variant, and one run's ratios moved by
# 2-3% from run to run on the 2-core CPU
ADAPTIVE_FOCUS_REPS_FACTOR = 4


def pm_runs(scale: "Scale") -> tuple[str, ...]:
    """The PM-style runs of a scale: ground-truth masks only where the training data has them
    (SyntheticScenes; an ImageFolder has none)."""
    return tuple(run for run in PM_RUNS if run != "pm-style" or scale.synthetic)


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
    # the class-count study (SyntheticScenes only): ICE trained on scenes of each class count from
    # the same pretrained weights with the paper's lambda, the class-count rule and each sweep value
    class_counts: tuple[int, ...] = ()
    lambda_sweep: tuple[float, ...] = ()
    # time the speed stage's models with torch.compile (tiny models are launch-bound on a GPU)
    bench_compile: bool = False
    bench_dtype: str = "fp32"
    # PM-style training: the share of training images that keep a mask (the PM abstract: < 1%)
    pm_mask_fraction: float = 0.01
    # the explanation budget sweep (SyntheticScenes only; empty: every run trains ``explain.epochs``):
    # ICE, ICE-f and ICEv2-style trained for each of these epoch counts, in order, each scored on
    # ``map_val_images`` images of the mapval split; the budget is the first whose next one gains
    # under ``budget_gain`` points of validation mIoU and of foreground share (see
    # summary.choose_budget). The first is ``explain.epochs``: the ablation's and the class-count
    # study's budget
    explain_budgets: tuple[int, ...] = ()
    map_val_images: int = 0
    budget_gain: float = 1.0
    # the pruning curve: ICE and EViT at these keep rates also fine-tuned for these epoch counts
    # (every seed), beside the main runs' ``prune.epochs``
    prune_budgets: tuple[int, ...] = ()
    prune_curve_rates: tuple[float, ...] = ()
    # stages run at once after pretraining (each in its own process with ``threads`` threads);
    # the speed stage always runs alone
    jobs: int = 1

    @property
    def synthetic(self) -> bool:
        return self.train_data == "synthetic"

    @property
    def model_kwargs_json(self) -> str:
        return json.dumps(self.model_kwargs, sort_keys=True)


def smoke_scale(**overrides) -> Scale:
    """Seconds, for tests: a 12-block ViT of width 24 on 32-pixel images."""
    settings = dict(
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
        threads=1, class_counts=(3,), lambda_sweep=(0.5,),
        pm_mask_fraction=0.25,  # 4 of its 16 training images: 1% of them would be none
        explain_budgets=(1, 2, 4), map_val_images=4, prune_budgets=(2,), prune_curve_rates=(0.5,))
    settings.update(overrides)
    return Scale(**settings)


def cpu_scale(**overrides) -> Scale:
    """About 100 minutes on a 2-core CPU (pretraining 30 of them, then two stages at once): a
    12-block, 3-head ViT of width 96
    on 64-pixel images with 8-pixel patches (an 8 x 8 grid, 64 patch tokens), SyntheticScenes with 10
    classes in the setting a small ViT learns from scratch (see ``note``)."""
    settings = dict(
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
        threads=1, class_counts=(5, 10, 20), lambda_sweep=(0.1, 0.3, 0.5, 0.8),
        # 124 to 1984 updates: the first is the ablation's budget, the report's before the sweep
        explain_budgets=(2, 4, 8, 16, 32), map_val_images=200, prune_budgets=(2, 4),
        prune_curve_rates=(0.7,), jobs=2,
        note="the scenes here (see Data) are easier than SyntheticScenes' defaults, in which a ViT "
             "from scratch sat at chance for over 2750 updates (13% top-1 after 4500; the first "
             "committed report): with random polarity no linear function of a patch tells the class, "
             "and textures wider than a patch leave only the shape over several patches. In trials on "
             "this machine (1500 updates, lr 1e-3) this setting reached 30% while the defaults and "
             "the larger objects alone stayed at 10-12%, and a conv stem only began to learn after "
             "900 updates")
    settings.update(overrides)
    return Scale(**settings)


def gpu_scale(data: Optional[str] = None, seg_data: Optional[str] = None,
              checkpoint: Optional[str] = None, **overrides) -> Scale:
    """The paper's sizes: DeiT-S at 224 from a pretrained checkpoint, ImageNet (an ImageFolder with
    ``train/`` and ``val/``) for training and accuracy, ImageNet-Segmentation for the maps; the
    training scripts' paper recipes (explanation: lr 1e-5, batch 256, 3 epochs; pruning: EViT's 30
    epochs at lr 2e-5, batch 128)."""
    missing = [flag for flag, value in (("--data", data), ("--seg-data", seg_data),
                                        ("--checkpoint", checkpoint)) if not value]
    if missing:
        raise ValueError(f"--scale gpu needs {', '.join(missing)}: an ImageNet folder (train/, val/), "
                         f"ImageNet-Segmentation's gtsegs_ijcv.mat and a DeiT-S checkpoint (.pth)")
    settings = dict(
        name="gpu", model="deit_small_patch16_224", model_kwargs={}, img_size=224,
        train_data=f"imagefolder:{data}", maps_data=f"imagenet-seg:{seg_data}",
        accuracy_data=f"folder:{os.path.join(data, 'val')}", pretrain=None, checkpoint=checkpoint,
        explain=TrainSpec(epochs=3, lr=1e-5, batch_size=256),
        prune=TrainSpec(epochs=30, lr=2e-5, batch_size=128, min_lr=2e-6, weight_decay=1e-6),
        num_classes=1000, eval_images=None, grid_images=6, bench_batch=256, bench_reps=30,
        drop_path=0.1, workers=8)
    settings.update(overrides)
    return Scale(**settings)


def gpu_synthetic_scale(**overrides) -> Scale:
    """The cpu scale's model and scenes sized for one GPU in about 15 minutes: pretraining 30 epochs
    of 16,000 images at batch 64 (265 s on an H100 with 12 data workers), explanation runs 4 epochs of
    4,000 images, pruning 3 epochs of 4,000, two seeds, the class-count study at 5, 10, 20 and 40
    classes. A model this small is launch-bound on a GPU (eager, its pruned variants measured 0.71 to
    0.79x of the unpruned one at batch 256): the speed stage times torch.compile'd models in bf16 at
    batch 1024, where the GPU, not the launches, sets the pace."""
    cpu = cpu_scale()
    settings = dict(
        name="gpu-synthetic", model=cpu.model, model_kwargs=cpu.model_kwargs, img_size=cpu.img_size,
        train_data="synthetic", maps_data="synthetic", accuracy_data="synthetic",
        synthetic_kwargs=cpu.synthetic_kwargs,
        # the cpu scale's recipes, longer and on more images
        pretrain=dataclasses.replace(cpu.pretrain, epochs=30, batch_size=64, train_images=16000,
                                     val_images=400),
        explain=dataclasses.replace(cpu.explain, epochs=4, batch_size=64, train_images=4000,
                                    val_images=400),
        prune=dataclasses.replace(cpu.prune, epochs=3, batch_size=64, train_images=4000,
                                  val_images=400),
        num_classes=10, eval_images=400, grid_images=4, bench_batch=1024, bench_reps=30,
        bench_compile=True, bench_dtype="bf16", workers=12, device="cuda",
        class_counts=(5, 10, 20, 40), lambda_sweep=(0.1, 0.3, 0.5, 0.8),
        # the cpu scale's budget sweep and pruning curve from the recipes' epochs (one GPU: one
        # stage at a time)
        explain_budgets=(4, 8, 16, 32), map_val_images=400, prune_budgets=(6, 12),
        prune_curve_rates=(0.7,),
        note="the cpu scale's model and scenes, larger budgets for one GPU")
    settings.update(overrides)
    return Scale(**settings)


SCALES: dict[str, Callable[..., Scale]] = {"smoke": smoke_scale, "cpu": cpu_scale, "gpu": gpu_scale,
                                           "gpu-synthetic": gpu_synthetic_scale}


def synthetic_eval_kwargs(scale: Scale, num_classes: Optional[int] = None) -> dict:
    """SyntheticScenes' evaluation images: the validation split, seed 0, the same for every model."""
    return {**scale.synthetic_kwargs, "num_classes": num_classes or scale.num_classes,
            "length": scale.eval_images or 500, "seed": 0}


def prune_name(method: str, rate: float, seed: int, epochs: Optional[int] = None) -> str:
    """``prune-<method>-<rate>-s<seed>``, with ``-e<epochs>`` for the pruning curve's runs."""
    return f"prune-{method}-{rate:g}-s{seed}" + ("" if epochs is None else f"-e{epochs}")


def device_name() -> str:
    """The machine a stage ran on, as the report names it: the GPU's name, or the CPU and its cores."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


@dataclasses.dataclass
class Context:
    """A run's scale and its work folder: where each stage writes, and its checkpoint."""

    scale: Scale
    work: str

    def folder(self, stage: str) -> str:
        return os.path.join(self.work, stage)

    def checkpoint(self, stage: str) -> str:
        return os.path.join(self.folder(stage), CHECKPOINT)

    @property
    def pretrained(self) -> str:
        return self.scale.checkpoint if self.scale.pretrain is None else self.checkpoint("pretrain")
