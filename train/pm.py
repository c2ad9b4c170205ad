"""PM-style explanation training: the ViT's own classifier learns to read every patch from a few masks.

    python train/pm.py --checkpoint runs/pretrained/last.pth --data synthetic --mask-fraction 0.01 \\
        --output runs/pm
    python train/pm.py --checkpoint deit_small_patch16_224-cd65a155.pth \\
        --data imagefolder:/data/imagenet --pseudo-masks ice:runs/ice/last.pth --output runs/pm-pseudo

After the PM paper's abstract (Kang, Heo & Choe, Pattern Recognition Letters 2024; only the abstract
is available): a patch-level mask prediction read off the ViT's own features in one forward pass,
no extra parameters, fewer than 1% of the training images with a mask, pseudo masks for weakly
supervised localization. The whole model fine-tunes with cross-entropy on [CLS] for every image plus
the patch-level mask loss on the images that keep a mask (ice_prune.training.tasks.PMStyleTask); the map it
trains is ``pm-style`` (ice_prune.maps.pm_style_map; ``train/evaluate.py explain --methods
pm-style``). The abstract gives no loss, layer, weighting or threshold: those here are ours (see
PMStyleTask and pm_style_loss).

``--mask-fraction`` (default 0.01) chooses which training images keep their mask: a seeded choice
(``--mask-seed``, default ``--seed``) recorded in the checkpoint's meta with the exact count and the
indices. Masks come from the dataset (``--data synthetic``: SyntheticScenes' exact masks), or with
``--pseudo-masks ice:CHECKPOINT`` from a trained ICE model (``train/explain.py`` of the same model
and class count): its foreground mask, computed during training for the same chosen images (so a
run with pseudo masks differs from one with the dataset's only in where the masks come from; give
``--mask-fraction 1`` for every image), and no ground-truth mask is read. ``--mask-fraction 0`` is
plain fine-tuning with cross-entropy, exactly ``train/prune.py --method evit --keep-rate 1.0`` with
the same arguments.

Mixup and cutmix are off (they mix images but not their masks); label smoothing (``--smoothing``)
stays. Defaults are ICE's explanation recipe (3 epochs, lr 1e-5, batch 256, weight decay 0.05): the
paper's are not known. The checkpoint ``OUTPUT/last.pth`` holds exactly timm's keys.
"""

import ice_prune
from ice_prune.data import PartialMasks, has_masks, mask_selection
from ice_prune.training import cli, engine
from ice_prune.training.tasks import ICEPseudoMasks, PatchClassifier, PMStyleTask

PSEUDO_SOURCES = ("ice",)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mask-fraction", type=float, default=0.01,
                   help="share of the training images that keep a mask, in [0, 1] (default 0.01)")
    p.add_argument("--mask-seed", type=int, default=None,
                   help="seed of the choice of masked images (default: --seed)")
    p.add_argument("--mask-weight", type=float, default=1.0,
                   help="weight of the mask loss beside cross-entropy on [CLS] (ours: 1)")
    p.add_argument("--pseudo-masks", default=None, metavar="ice:CHECKPOINT",
                   help="masks from a trained ICE model's foreground instead of the dataset's")
    cli.add_common_args(p, epochs=3, lr=1e-5, min_lr=1e-6, weight_decay=0.05, batch_size=256)
    p.set_defaults(mixup=0.0, cutmix=0.0)
    return p.parse_args(argv)


def pseudo_checkpoint(spec):
    """``"ice:CHECKPOINT"`` -> CHECKPOINT (None without pseudo masks)."""
    if spec is None:
        return None
    source, _, path = spec.partition(":")
    if source not in PSEUDO_SOURCES or not path:
        raise ValueError(f"--pseudo-masks must be ice:CHECKPOINT (a train/explain.py checkpoint), "
                         f"got {spec!r}")
    return path


def main(argv=None):
    args = parse_args(argv)
    parsed = cli.check_common_args(args)
    if not 0 <= args.mask_fraction <= 1:
        raise ValueError(f"--mask-fraction must be in [0, 1], got {args.mask_fraction}")
    if args.mixup > 0 or args.cutmix > 0:
        raise ValueError("--mixup and --cutmix mix images but not their masks: PM-style training "
                         "runs without them (--smoothing still applies)")
    pseudo_path = pseudo_checkpoint(args.pseudo_masks)
    info = engine.init_distributed(parsed.device)
    cfg = cli.config_from_args(args)
    train_set, val_set, num_classes = cli.build_data(args, parsed)
    engine.seed_everything(args.seed)  # the same initial weights in every process
    model = ice_prune.load_model(args.model, args.checkpoint, num_classes=num_classes,
                                 reset_classifier=args.reset_classifier, pretrained=args.pretrained,
                                 trust=args.trust_checkpoint, **parsed.model_kwargs)
    if hasattr(model, "ice_head"):  # an explanation checkpoint's: PM-style training reads none
        del model.ice_head
    pseudo = None
    if pseudo_path is not None:
        pseudo = ICEPseudoMasks.from_checkpoint(pseudo_path, model, args.model, parsed.model_kwargs,
                                                trust=args.trust_checkpoint)
    grid = tuple(model.patch_embed.grid_size)
    mask_seed = args.seed if args.mask_seed is None else args.mask_seed
    masked = mask_selection(len(train_set), args.mask_fraction, mask_seed)
    train = PartialMasks(train_set, grid, masked, dataset_masks=pseudo is None)
    val = None
    if val_set is not None:
        # validation reports the mask loss on every image when masks are at hand (never trained on)
        val_masked = range(len(val_set)) if pseudo is not None or has_masks(val_set) else ()
        val = PartialMasks(val_set, grid, val_masked, dataset_masks=pseudo is None)
    task = PMStyleTask(num_classes, mask_weight=args.mask_weight, smoothing=args.smoothing,
                       pseudo_masks=pseudo)
    meta = {"kind": "pm-style", "model": args.model, "model_kwargs": args.model_kwargs,
            "num_classes": num_classes, "img_size": args.img_size, "grid": list(grid),
            "mask_source": "dataset" if pseudo is None else f"ice:{pseudo_path}",
            "mask_fraction": args.mask_fraction, "mask_seed": mask_seed,
            "train_images": len(train_set), "masked_images": len(masked),
            "masked_share": len(masked) / len(train_set), "masked_indices": masked.tolist(),
            "mask_weight": args.mask_weight, "smoothing": args.smoothing,
            "loss": "CE([CLS]) + mask_weight * pm_style_loss (BCE of each patch's class probability "
                    "against its foreground fraction) on the masked images"}
    engine.fit(cfg, PatchClassifier(model), task.step, task.eval, train, val, info,
               save_module=model, meta=meta, args=vars(args))


if __name__ == "__main__":
    cli.run_script(main)
