"""The command lines of the scripts: shared arguments, their checks, and the data they build.

``train/explain.py``, ``train/prune.py`` and ``train/pm.py`` add their own arguments to
:func:`add_common_args`; :func:`check_common_args` refuses a bad device, model, JSON, data spec or
output folder before anything is built and returns what it parsed (:class:`ParsedArgs`), from
which the scripts build the data (:func:`build_data`) and the model (:func:`ice_prune.load_model`);
:func:`config_from_args` gives the :class:`ice_prune.training.engine.TrainConfig`. The checks the
other scripts share are here too (:func:`check_model_name`, :func:`check_keep_rate_arg`,
:func:`check_output_dir`, :func:`check_output_file`). :func:`run_script` ends a run on a bad
argument, path or checkpoint with one ``error: ...`` line and exit status 2 instead of a traceback;
:class:`ArgumentParser` reports its own errors the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.utils.data import Dataset

from ice_prune.checkpoint import CheckpointError
from ice_prune.throughput import check_device
from ice_prune.training.engine import TrainConfig, cleanup_distributed

TRUST_HELP = ("unpickle the checkpoint in full when it needs it, which runs whatever code it "
              "carries: only for a file you trust (without this flag checkpoints load with "
              "torch.load(weights_only=True) and such a file is refused)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one ``error: ...`` line (exit status 2), like run_script's."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_json_kwargs(text: str, flag: str) -> dict:
    """A JSON object of keyword arguments from ``flag``; anything else is a ValueError."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not JSON ({e}): give an object, e.g. '{{\"depth\": 6}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object of keyword arguments, got {text!r}")
    return value


def check_model_name(name: str, flag: str = "--model") -> None:
    """A ValueError for a name timm does not know (timm itself raises RuntimeError, after imports and
    data); hub and local-folder sources (``hf-hub:...``) are left to timm."""
    import timm
    from timm.models import parse_model_name, split_model_name_tag

    source, model = parse_model_name(name)
    if source is None and not timm.is_model(split_model_name_tag(model)[0]):
        raise ValueError(f"{flag}: unknown timm model {name!r}; list the names with "
                         f"timm.list_models('deit*') or timm.list_models('vit*'), e.g. "
                         f"deit_small_patch16_224")


def check_keep_rate_arg(value: float, flag: str = "--keep-rate") -> None:
    """A ValueError naming ``flag`` for a keep rate outside (0, 1]."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{flag} {value:g}: keep_rate must be in (0, 1], the share of tokens kept at "
                         f"each selection point; use 1.0 to keep every token")


def _cannot_create(folder: str) -> Optional[str]:
    """Why ``folder`` cannot be made or written, or None: it, or the nearest of its parents that
    exists, must be a writable folder."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable"
    return None


def check_output_dir(path: str, flag: str = "--output") -> None:
    """Refuse, before any work, a folder that cannot be made or written; the ValueError names
    ``flag`` and the fix."""
    reason = _cannot_create(path)
    if reason is not None:
        raise ValueError(f"{flag} {path!r} cannot be created: {reason}; choose another {flag}")


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, a file that cannot be written (its folder is made on writing)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file name")
    reason = _cannot_create(os.path.dirname(os.path.abspath(path)))
    if reason is not None:
        raise ValueError(f"{flag} {path!r} cannot be written: {reason}; choose another {flag}")


class ParsedArgs(NamedTuple):
    """What :func:`check_common_args` parsed from the common arguments."""

    device: torch.device
    model_kwargs: dict  # timm.create_model's: --model-kwargs, with --img-size and --drop-path
    synthetic_kwargs: dict  # SyntheticScenes': --synthetic-kwargs
    imagefolder: Optional[str]  # the PATH of --data imagefolder:PATH; None for synthetic


def check_common_args(args) -> ParsedArgs:
    """Check what :func:`add_common_args` takes before anything is built (the device, the model
    name, the JSON arguments, the form of --data, the --output folder, --reset-classifier's
    --checkpoint) and return it parsed."""
    device = check_device(args.device, "--device")
    check_model_name(args.model)
    model_kwargs = parse_json_kwargs(args.model_kwargs, "--model-kwargs")
    synthetic_kwargs = parse_json_kwargs(args.synthetic_kwargs, "--synthetic-kwargs")
    if args.data != "synthetic" and not args.data.startswith("imagefolder:"):
        raise ValueError(f"--data must be 'synthetic' or 'imagefolder:PATH', got {args.data!r}")
    check_output_dir(args.output)
    if args.reset_classifier and not args.checkpoint:
        raise ValueError("--reset-classifier applies to the weights of --checkpoint; give one (with "
                         "--pretrained, timm makes a new classifier when --num-classes differs)")
    model_kwargs = {"img_size": args.img_size, "drop_path_rate": args.drop_path, **model_kwargs}
    imagefolder = args.data.split(":", 1)[1] if args.data != "synthetic" else None
    return ParsedArgs(device, model_kwargs, synthetic_kwargs, imagefolder)


def add_common_args(parser, *, epochs: int, lr: float, min_lr: float, weight_decay: float,
                    batch_size: int) -> None:
    """Arguments both train/ scripts take; defaults are each script's paper recipe."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    g.add_argument("--model-kwargs", default="{}",
                   help='JSON keyword arguments for timm.create_model, e.g. \'{"depth": 6}\'')
    g.add_argument("--checkpoint", default=None,
                   help="weights to start from: a DeiT release .pth, a timm state dict or "
                        ".safetensors, or a checkpoint of this project")
    g.add_argument("--reset-classifier", action="store_true",
                   help="do not load the --checkpoint's classifier nor its ICE head: new ones for "
                        "this run's class count (e.g. ImageNet weights on a 200-class data set)")
    g.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    g.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights (downloads from the hub)")
    g.add_argument("--data", default="synthetic", help="synthetic | imagefolder:PATH")
    g.add_argument("--num-classes", type=int, default=None,
                   help="image classes (synthetic: default 10; imagefolder: its class folders)")
    g.add_argument("--img-size", type=int, default=224)
    g.add_argument("--synthetic-train", type=int, default=5000, help="synthetic training images")
    g.add_argument("--synthetic-val", type=int, default=500, help="synthetic validation images")
    g.add_argument("--synthetic-kwargs", default="{}",
                   help='JSON keyword arguments for SyntheticScenes, e.g. \'{"distractors": [0, 2]}\'')
    g.add_argument("--drop-path", type=float, default=0.1)
    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=batch_size, help="per process")
    g.add_argument("--opt", default="adamw")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--min-lr", type=float, default=min_lr)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=weight_decay)
    g.add_argument("--sched", default="cosine")
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"),
                   help="autocast dtype on CUDA (CPU runs fp32)")
    g.add_argument("--ema-decay", type=float, default=None)
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--smoothing", type=float, default=0.1)
    g = parser.add_argument_group("run")
    g.add_argument("--output", required=True, help="run directory (checkpoint, log.jsonl)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output")
    g.add_argument("--overwrite", action="store_true", help="start over in --output")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=4)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--no-progress", action="store_true")


def config_from_args(args, **extra) -> TrainConfig:
    return TrainConfig(
        output=args.output, epochs=args.epochs, batch_size=args.batch_size, opt=args.opt,
        lr=args.lr, min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay, sched=args.sched, clip_grad=args.clip_grad, amp=args.amp,
        ema_decay=args.ema_decay, workers=args.workers, seed=args.seed, log_every=args.log_every,
        resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
        device=args.device, trust_checkpoint=args.trust_checkpoint, **extra)


def build_data(args, parsed: ParsedArgs) -> tuple[Dataset, Optional[Dataset], int]:
    """``(train, val, num_classes)`` from ``--data`` as :func:`check_common_args` parsed it."""
    from ice_prune.data import SyntheticScenes, build_imagefolder

    root = parsed.imagefolder
    if root is None:
        num_classes = args.num_classes or 10
        kwargs = dict(num_classes=num_classes, img_size=args.img_size, seed=args.seed,
                      **parsed.synthetic_kwargs)
        return (SyntheticScenes(length=args.synthetic_train, split="train", **kwargs),
                SyntheticScenes(length=args.synthetic_val, split="val", **kwargs), num_classes)
    train_dir = os.path.join(root, "train")
    has_split = os.path.isdir(train_dir)
    train = build_imagefolder(train_dir if has_split else root, args.img_size, True)
    val_dir = os.path.join(root, "val")
    val = build_imagefolder(val_dir, args.img_size, False) if os.path.isdir(val_dir) else None
    num_classes = len(train.classes)
    if args.num_classes is not None and args.num_classes != num_classes:
        raise ValueError(f"--num-classes {args.num_classes} but {root!r} has {num_classes} class folders")
    return train, val, num_classes


def check_map_val_arg(images: int, parsed: ParsedArgs, flag: str = "--map-val-images") -> None:
    """A ValueError naming ``flag`` for a negative count, or any count with ``--data
    imagefolder:PATH`` (maps are scored against SyntheticScenes' masks); 0 (off) passes."""
    if images < 0:
        raise ValueError(f"{flag} must be >= 0 (0: off), got {images}")
    if images and parsed.imagefolder is not None:
        raise ValueError(f"{flag} scores maps against SyntheticScenes' masks and needs --data "
                         f"synthetic; an ImageFolder has no masks (leave {flag} at 0)")


def map_val_data(args, parsed: ParsedArgs, images: int, num_classes: int,
                 flag: str = "--map-val-images") -> Dataset:
    """SyntheticScenes' ``"mapval"`` split with masks, ``images`` long, for scoring maps during
    training: the scenes of ``--synthetic-kwargs`` at ``--img-size``, seed 0 like the evaluation
    images (the same validation images for every run), and never one of the training or evaluation
    images (another split: a disjoint random stream). A ValueError naming ``flag`` for
    ``--data imagefolder:PATH`` (no masks) or ``images < 1``."""
    from ice_prune.data import SyntheticScenes

    check_map_val_arg(images, parsed, flag)
    if images < 1:
        raise ValueError(f"{flag} must be >= 1 to score maps, got {images}")
    return SyntheticScenes(**{"num_classes": num_classes, "img_size": args.img_size, "seed": 0,
                              **parsed.synthetic_kwargs, "split": "mapval", "length": images,
                              "return_mask": True})


def run_script(main: Callable[[], Any]) -> None:
    """Run a script's ``main``; a bad argument, path or checkpoint ends it with one ``error: ...``
    line and exit status 2, not a traceback (CheckpointError covers UnsafeCheckpointError; OSError
    covers a missing, unreadable or unwritable path)."""
    try:
        main()
    except (ValueError, TypeError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup_distributed()
