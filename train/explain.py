"""Explanation training of ICE: a per-patch head learns the image classes and background.

    python train/explain.py --variant ice --checkpoint deit_small_patch16_224-cd65a155.pth \\
        --data imagefolder:/data/imagenet --output runs/ice

Paper recipe (Sec. 4.1): DeiT-S, adversarial normalization alpha 0.5, lambda 0.975 (ICE-f 0.99)
for ImageNet's 1000 classes, lr 1e-5, batch 256, the other DeiT hyper-parameters. ``--lambda-class
auto`` (the default) derives lambda from the class count, exactly the paper's at 1000 classes (see
ice_prune.loss); ``--lambda-class paper`` takes the literal value. Multi-process: ``torchrun
--nproc_per_node N train/explain.py ...`` (``--batch-size`` is per process). The checkpoint
``OUTPUT/last.pth`` holds the timm model's weights with the head under ``ice_head.`` (see
ice_prune.training.engine).

``--map-val-images N`` (``--data synthetic`` only) scores ICE's map at the end of every epoch on N
images of SyntheticScenes' ``mapval`` split, disjoint from the training and evaluation images, with
the evaluation's segmentation protocol: the epoch's record in ``OUTPUT/log.jsonl`` gets ``"map_val":
{"miou", "pixel_accuracy", "map", "fg_share", "images", "updates"}`` (percent; ``updates``: optimizer
steps so far), the curve a training budget is chosen on. It never changes the training.
"""
import dataclasses

import ice_prune
from ice_prune.data import build_mixup
from ice_prune.head import HEAD_VARIANTS, ICEExplainer, set_trainable
from ice_prune.loss import LOSS_MODES, ICELoss, parse_lambda
from ice_prune.training import cli, engine
from ice_prune.training.tasks import ExplainTask, MapValidation


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="ice", choices=sorted(HEAD_VARIANTS))
    p.add_argument("--trainable-blocks", type=int, default=None,
                   help="icev2-style: how many of the last blocks train (default 2)")
    p.add_argument("--loss-mode", default="paper", choices=sorted(LOSS_MODES))
    p.add_argument("--lambda-class", default=None,
                   help="paper mode class weight: auto (default: from the class count, the paper's "
                        "value at 1000 classes), paper (the paper's literal 0.975 / ICE-f 0.99 at any "
                        "class count) or a number in [0, 1]")
    p.add_argument("--alpha", type=float, default=None, help="background scale (default 0.5)")
    p.add_argument("--cls-weight", type=float, default=0.0,
                   help="weight of cross-entropy on [CLS] (0 in the paper)")
    p.add_argument("--map-val-images", type=int, default=0,
                   help="score ICE's map at every epoch's end on this many images of "
                        "SyntheticScenes' mapval split (disjoint from the training and evaluation "
                        "images; --data synthetic only), into log.jsonl's \"map_val\" (0: off)")
    p.add_argument("--map-val-ice-target", default="classifier", choices=("classifier", "ice"),
                   help="the class the scored map explains: the classifier's top-1, or ICE's own "
                        "prediction (for a classifier not trained on the head's classes)")
    cli.add_common_args(p, epochs=3, lr=1e-5, min_lr=1e-6, weight_decay=0.05, batch_size=256)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    parsed = cli.check_common_args(args)
    variant = HEAD_VARIANTS[args.variant]
    if args.trainable_blocks is not None:
        if args.variant != "icev2-style":
            raise ValueError("--trainable-blocks applies to --variant icev2-style only")
        variant = dataclasses.replace(variant, trainable_blocks=args.trainable_blocks)
    overrides = {} if args.alpha is None else {"alpha": args.alpha}
    lambda_class = None if args.lambda_class is None else parse_lambda(args.lambda_class)
    loss_fn = ICELoss(args.loss_mode, lambda_class=lambda_class, paper_lambda=variant.lambda_class,
                      **overrides)
    cli.check_map_val_arg(args.map_val_images, parsed)
    info = engine.init_distributed(parsed.device)
    cfg = cli.config_from_args(args)
    train_set, val_set, num_classes = cli.build_data(args, parsed)
    map_val_set = (cli.map_val_data(args, parsed, args.map_val_images, num_classes)
                   if args.map_val_images else None)
    engine.seed_everything(args.seed)  # the same initial weights in every process
    model = ice_prune.load_model(args.model, args.checkpoint, num_classes=num_classes,
                                 reset_classifier=args.reset_classifier, pretrained=args.pretrained,
                                 trust=args.trust_checkpoint, **parsed.model_kwargs)
    head = variant.build(model, num_classes)
    if hasattr(model, "ice_head"):  # the checkpoint's: training goes on from it
        ice_prune.load_checkpoint(head, model.ice_head.state_dict(),
                                  name=f"the ICE head of checkpoint {args.checkpoint!r}")
    explainer = ICEExplainer(model, head)
    set_trainable(model, explainer.head, variant.trainable_blocks,
                  train_classifier=args.cls_weight > 0)
    task = ExplainTask(loss_fn, cls_weight=args.cls_weight)
    meta = {"kind": "ice-explain", "model": args.model, "model_kwargs": args.model_kwargs,
            "variant": variant.name, "trainable_blocks": variant.trainable_blocks,
            "num_classes": num_classes, "head": {"dim": explainer.head.dim,
                                                 "hidden_dim": explainer.head.hidden_dim},
            "img_size": args.img_size, "loss_mode": loss_fn.mode,
            "lambda_rule": loss_fn.lambda_rule, "lambda_class": loss_fn.resolved_lambda(num_classes),
            "loss": dataclasses.asdict(loss_fn.config)}
    epoch_end = (MapValidation(model, map_val_set, args.map_val_images,
                               ice_target=args.map_val_ice_target)
                 if map_val_set is not None else None)
    engine.fit(cfg, explainer, task.step, task.eval, train_set, val_set, info, save_module=model,
               mixup_fn=build_mixup(num_classes, args.mixup, args.cutmix, label_smoothing=args.smoothing),
               meta=meta, args=vars(args), epoch_end=epoch_end)


if __name__ == "__main__":
    cli.run_script(main)
