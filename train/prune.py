"""Token-pruning fine-tuning, ICE against EViT (paper Table 5).

    python train/prune.py --method ice --keep-rate 0.7 \\
        --checkpoint deit_small_patch16_224-cd65a155.pth --data imagefolder:/data/imagenet \\
        --output runs/ice-0.7

Defaults are EViT's fine-tuning recipe from a pretrained DeiT-S (its finetune.sh): 30 epochs, cosine
lr 2e-5 -> 2e-6, weight decay 1e-6, no warm-up, the target keep rate from the start
(``--shrink-epochs 0``), selection after blocks 3, 6, 9 with fusion, and the DeiT augmentations.
EViT ran 8 processes x 128 images; its main.py scales the lr by global batch / 512 and this script
does not: pass the lr you want. Loss: cross-entropy on [CLS] plus, for ICE, ``--ice-weight`` x the
ICE loss of the shared head averaged over the selection points.
"""
import dataclasses

import ice_prune
from ice_prune.data import build_mixup
from ice_prune.loss import LOSS_MODES, ICELoss, parse_lambda
from ice_prune.select import SELECTORS
from ice_prune.training import cli, engine
from ice_prune.training.tasks import PruneTask


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="ice", choices=sorted(SELECTORS))
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--locs", type=int, nargs="+", default=[3, 6, 9])
    p.add_argument("--placement", default="attn", choices=("attn", "block"))
    p.add_argument("--no-fuse", action="store_true", help="drop the pruned tokens instead of fusing")
    p.add_argument("--shrink-start", type=int, default=0,
                   help="epochs at keep rate 1 before shrinking (EViT from scratch: 10)")
    p.add_argument("--shrink-epochs", type=int, default=0,
                   help="epochs of the cosine from 1 to --keep-rate (EViT from scratch: 100)")
    p.add_argument("--ice-weight", type=float, default=1.0, help="weight of the ICE loss (ICE only)")
    p.add_argument("--ice-loss-mode", default="paper", choices=sorted(LOSS_MODES))
    p.add_argument("--lambda-class", default=None,
                   help="paper mode class weight: auto (default: from the class count, 0.975 at 1000 "
                        "classes), paper (the literal 0.975) or a number in [0, 1]")
    cli.add_common_args(p, epochs=30, lr=2e-5, min_lr=2e-6, weight_decay=1e-6, batch_size=128)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cli.check_keep_rate_arg(args.keep_rate)
    parsed = cli.check_common_args(args)
    if args.ice_weight < 0:
        raise ValueError(f"--ice-weight must be >= 0, got {args.ice_weight}")
    loss_fn = None
    if args.method == "ice":
        lambda_class = None if args.lambda_class is None else parse_lambda(args.lambda_class)
        loss_fn = ICELoss(args.ice_loss_mode, lambda_class=lambda_class)
    elif args.lambda_class is not None:
        raise ValueError("--lambda-class weights the ICE loss: it applies to --method ice only")
    info = engine.init_distributed(parsed.device)
    cfg = cli.config_from_args(args, find_unused_parameters=args.method == "ice"
                                  and args.shrink_start > 0)
    train_set, val_set, num_classes = cli.build_data(args, parsed)
    engine.seed_everything(args.seed)  # the same initial weights in every process
    model = ice_prune.load_model(
        args.model, args.checkpoint, method=args.method, keep_rate=args.keep_rate,
        patch_kwargs=dict(locs=args.locs, placement=args.placement, fuse=not args.no_fuse),
        num_classes=num_classes, reset_classifier=args.reset_classifier, pretrained=args.pretrained,
        trust=args.trust_checkpoint, **parsed.model_kwargs)
    task = PruneTask(loss_fn, ice_weight=args.ice_weight)
    meta = {"kind": "prune", "model": args.model, "model_kwargs": args.model_kwargs,
            "method": args.method, "keep_rate": args.keep_rate, "locs": args.locs,
            "placement": args.placement, "fuse": not args.no_fuse, "num_classes": num_classes,
            "img_size": args.img_size,
            "loss": dataclasses.asdict(loss_fn.config) if loss_fn is not None else None,
            "lambda_rule": loss_fn.lambda_rule if loss_fn is not None else None,
            "lambda_class": loss_fn.resolved_lambda(num_classes) if loss_fn is not None else None}

    def keep_rates(iters_per_epoch):
        return ice_prune.keep_rate_schedule(args.keep_rate, args.shrink_start, args.shrink_epochs,
                                            iters_per_epoch)

    engine.fit(cfg, model, task.step, task.eval, train_set, val_set, info,
               mixup_fn=build_mixup(num_classes, args.mixup, args.cutmix, label_smoothing=args.smoothing),
               keep_rate_fn_factory=keep_rates, meta=meta, args=vars(args))


if __name__ == "__main__":
    cli.run_script(main)
