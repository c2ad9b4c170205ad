#!/usr/bin/env python3
"""Evaluate explanations and accuracy of a timm ViT with an ICE head.

  python train/evaluate.py explain --data imagenet-seg:gtsegs_ijcv.mat --checkpoint ckpt.pth \\
      --model deit_small_patch16_224 --methods ice,rollout,gradcam,generic,raw-attention,pm-style
  python train/evaluate.py accuracy --data folder:/imagenet/val --checkpoint ckpt.pth \\
      --model deit_small_patch16_224 --method ice --keep-rate 0.7
  python train/evaluate.py explain --data imagenet-seg:gtsegs_ijcv.mat --checkpoint ice-0.7.pth \\
      --method ice --keep-rate 0.7 --methods ice-pruned
  python train/evaluate.py agreement --data imagenet-seg:gtsegs_ijcv.mat --checkpoint ice-0.7.pth \\
      --keep-rate 0.7

``--data``: ``synthetic`` (SyntheticScenes with masks; pixel accuracy, mIoU, mAP and Jaccard),
``imagenet-seg:PATH`` (gtsegs_ijcv.mat; Chefer et al.'s pixel accuracy, mIoU, mAP),
``voc:PATH`` (VOC2012 segmentation val; Naseer et al.'s Jaccard), ``voc07:PATH`` / ``voc12:PATH``
(VOC trainval detection; CorLoc), ``cub:PATH`` (CUB-200-2011 test; top-1, GT-known and top-1 loc),
``folder:PATH`` (an ImageFolder; accuracy only). PATH of VOC is the folder holding ``VOCdevkit``.
``--methods``: any maps of ice_prune.maps.METHODS (default: every one the model gives).
``--method`` / ``--keep-rate`` patch the model with that selector and load the checkpoint's pruning
head (explain and accuracy); ``ice-pruned``, ICE's map from the pruned forward, needs
``--method ice``: at ``--keep-rate 1`` it is the unpruned pass of the same weights.

Checkpoint: a dict with ``"model"`` (the timm model's state dict), the state dict itself, or a
``.safetensors`` file, loaded with weights only (``--trust-checkpoint`` unpickles a file you trust in
full; see ice_prune.checkpoint). Keys ``ice_head.*`` build the ICE head from their shapes
(ice_prune.load_model). Without ``--checkpoint`` the model is randomly initialized (a smoke test,
not a result).

``explain`` prints a table, writes ``<out>/explain.json`` and a PNG grid ``<out>/explain_grid.png``
(image | one overlay per method | ICE's foreground mask | ground truth); ``accuracy`` writes
``<out>/accuracy.json``; ``agreement`` (a pruning checkpoint of ICE) compares the map from the pruned
forward at ``--keep-rate`` with the same weights' at ``--reference-keep-rate`` (default 1): IoU of
the foreground masks (1 - P(background) > 0.5), Spearman rank correlation, and whether the map leaves
the logits bit-identical, in ``<out>/agreement.json``. The protocols live in ice_prune.evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ice_prune import evaluation, load_model, maps, visualize
from ice_prune.select import SELECTORS
from ice_prune.training.cli import (TRUST_HELP, ArgumentParser, check_keep_rate_arg,
                                    check_model_name, check_output_dir, parse_json_kwargs, run_script)


def open_data(args, kind: str, path, data_kwargs: dict, model):
    """The ``--data`` dataset at the model's image size and class count."""
    return evaluation.open_dataset(kind, path, image_size=args.img_size or model.patch_embed.img_size[0],
                                   num_classes=model.num_classes, kwargs=data_kwargs)


def load_model_for(args, model_kwargs: dict, method):
    """The model patched with ``method`` at ``args.keep_rate`` with the checkpoint's pruning head, or
    unpatched (with the checkpoint's explanation head, if any) where ``method`` is None."""
    return load_model(args.model, args.checkpoint, method=method, keep_rate=args.keep_rate,
                      require_head=True, trust=args.trust_checkpoint, **model_kwargs)


def run_explain(args, kind: str, path, model_kwargs: dict, data_kwargs: dict) -> dict:
    protocols = evaluation.DATASETS[kind].protocols
    model = load_model_for(args, model_kwargs, args.method)
    head = getattr(model, "ice_head", None)
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None
               else evaluation.default_methods(model))
    evaluation.check_methods(methods, head, model)
    dataset = open_data(args, kind, path, data_kwargs, model)
    patched = {"method": args.method, "keep_rate": args.keep_rate} if args.method else {}
    results = {"data": args.data, "model": args.model, "checkpoint": args.checkpoint, **patched,
               **evaluation.evaluate_maps(model, head, dataset, protocols, methods,
                                          batch_size=args.batch_size, workers=args.workers,
                                          limit=args.limit, progress=not args.quiet,
                                          ice_target=args.ice_target)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "explain.json"), "w") as f:
        json.dump(results, f, indent=2)
    rows = evaluation.grid_rows(model, head, dataset, protocols, methods,
                                count=min(args.grid, results["images"]))
    if rows:
        visualize.save_grid(rows, os.path.join(args.out, "explain_grid.png"))
    print(evaluation.format_table(results, args.data))
    return results


def run_accuracy(args, kind: str, path, model_kwargs: dict, data_kwargs: dict) -> dict:
    model = load_model_for(args, model_kwargs, args.method)
    dataset = open_data(args, kind, path, data_kwargs, model)
    accuracy = evaluation.evaluate_accuracy(model, dataset, batch_size=args.batch_size,
                                            workers=args.workers, limit=args.limit,
                                            progress=not args.quiet)
    results = {"data": args.data, "images": accuracy["images"], "method": args.method,
               "keep_rate": args.keep_rate, "top1": accuracy["top1"], "top5": accuracy["top5"]}
    print(f"{args.data}: top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}  "
          f"({results['images']} images, method={args.method}, keep_rate={args.keep_rate})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def run_agreement(args, kind: str, path, model_kwargs: dict, data_kwargs: dict) -> dict:
    model = load_model_for(args, model_kwargs, "ice")
    dataset = open_data(args, kind, path, data_kwargs, model)
    agreement = evaluation.evaluate_agreement(model, dataset, args.reference_keep_rate,
                                              batch_size=args.batch_size, workers=args.workers,
                                              limit=args.limit, progress=not args.quiet)
    results = {"data": args.data, "model": args.model, "checkpoint": args.checkpoint,
               "method": "ice", **agreement}
    spearman = "-" if results["spearman"] is None else f"{results['spearman']:.3f}"
    print(f"{args.data}: ICE's pruned-forward map at keep rate {args.keep_rate:g} against keep rate "
          f"{args.reference_keep_rate:g}: foreground IoU {results['foreground_iou']:.2f}, Spearman "
          f"{spearman}; logits with the map {'bit-identical' if results['logits_identical'] else 'DIFFER'} "
          f"({results['images']} images)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "agreement.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("explain", "accuracy", "agreement"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True)
        s.add_argument("--data-kwargs", default="{}",
                       help='JSON keyword arguments of the dataset, e.g. \'{"length": 500}\' (synthetic)')
        s.add_argument("--checkpoint", default=None)
        s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
        s.add_argument("--model", default="deit_small_patch16_224")
        s.add_argument("--img-size", type=int, default=None)
        s.add_argument("--patch-size", type=int, default=None)
        s.add_argument("--model-kwargs", default="{}",
                       help='JSON keyword arguments for timm.create_model, e.g. \'{"embed_dim": 96}\'')
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--workers", type=int, default=0)
        s.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
        s.add_argument("--out", default="output/evaluate")
        s.add_argument("--quiet", action="store_true")
    # read when the parser is built: a map registered in ice_prune.maps.METHODS is a choice
    sub.choices["explain"].add_argument(
        "--methods", default=None,
        help=f"comma-separated maps of ice_prune.maps.METHODS ({','.join(maps.METHODS)}); default: "
             f"every one the model gives ({','.join(maps.PRUNED_FORWARD_METHODS)} with --method ice)")
    sub.choices["explain"].add_argument("--grid", type=int, default=4, help="examples in the PNG grid")
    sub.choices["explain"].add_argument(
        "--ice-target", default="classifier", choices=evaluation.ICE_TARGETS,
        help="the class ICE's map explains: the classifier's top-1 (default) or ICE's own prediction "
             "(a model whose classifier was not trained on the ICE head's classes)")
    for name in ("explain", "accuracy"):
        sub.choices[name].add_argument("--method", choices=sorted(SELECTORS), default=None,
                                       help="patch the model with this selector and load the "
                                            "checkpoint's pruning head (default: unpatched)")
        sub.choices[name].add_argument("--keep-rate", type=float, default=0.7)
    sub.choices["agreement"].add_argument("--keep-rate", type=float, default=0.7,
                                          help="the keep rate of the pruned forward")
    sub.choices["agreement"].add_argument("--reference-keep-rate", type=float, default=1.0,
                                          help="the keep rate of the map it is compared with")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    # checked and parsed once, before a model is built or data read
    kind, path = evaluation.parse_data_spec(args.data)
    if args.command == "explain" and not evaluation.DATASETS[kind].protocols:
        raise ValueError(f"--data {kind} has no masks or boxes to explain against; use one of "
                         f"{', '.join(k for k, d in evaluation.DATASETS.items() if d.protocols)}")
    if args.command == "accuracy" and not evaluation.DATASETS[kind].labeled:
        raise ValueError(f"--data {kind} has no image-class labels; accuracy needs one of "
                         f"{', '.join(k for k, d in evaluation.DATASETS.items() if d.labeled)}")
    check_model_name(args.model)
    model_kwargs = parse_json_kwargs(args.model_kwargs, "--model-kwargs")
    data_kwargs = parse_json_kwargs(args.data_kwargs, "--data-kwargs")
    if args.command == "agreement":
        check_keep_rate_arg(args.keep_rate)
        check_keep_rate_arg(args.reference_keep_rate, "--reference-keep-rate")
    elif args.method is not None:
        check_keep_rate_arg(args.keep_rate)
    check_output_dir(args.out, "--out")
    if args.img_size is not None:
        model_kwargs["img_size"] = args.img_size
    if args.patch_size is not None:
        model_kwargs["patch_size"] = args.patch_size
    if args.checkpoint is None:
        print("warning: no --checkpoint, the model is randomly initialized", file=sys.stderr)
    run = {"explain": run_explain, "accuracy": run_accuracy, "agreement": run_agreement}[args.command]
    return run(args, kind, path, model_kwargs, data_kwargs)


if __name__ == "__main__":
    run_script(main)
