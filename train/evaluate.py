#!/usr/bin/env python3
"""Evaluate explanations and accuracy of a timm ViT with an ICE head.

  python train/evaluate.py explain --data imagenet-seg:gtsegs_ijcv.mat --checkpoint ckpt.pth \\
      --model deit_small_patch16_224 --methods ice,rollout,gradcam,generic,raw-attention,pm-style
  python train/evaluate.py accuracy --data folder:/imagenet/val --checkpoint ckpt.pth \\
      --model deit_small_patch16_224 --method ice --keep-rate 0.7

``--data``: ``synthetic`` (SyntheticScenes with masks; pixel accuracy, mIoU, mAP and Jaccard),
``imagenet-seg:PATH`` (gtsegs_ijcv.mat; Chefer et al.'s pixel accuracy, mIoU, mAP),
``voc:PATH`` (VOC2012 segmentation val; Naseer et al.'s Jaccard), ``voc07:PATH`` / ``voc12:PATH``
(VOC trainval detection; CorLoc), ``cub:PATH`` (CUB-200-2011 test; top-1, GT-known and top-1 loc),
``folder:PATH`` (an ImageFolder; accuracy only). PATH of VOC is the folder holding ``VOCdevkit``.

Checkpoint: a dict with ``"model"`` (the timm model's state dict) or the state dict itself. Keys
``ice_head.*`` (as a model patched with ``heads="shared"`` saves them) build the ICE head from their
shapes: ``ice_head.fc.weight [C+1, D]`` is ICE's linear head, ``ice_head.fc.0.weight [hidden, D]``
and ``ice_head.fc.2.weight [C+1, hidden]`` the MLP head of ICE-f. Without ``--checkpoint`` the model
is randomly initialized (a smoke test, not a result).

``explain`` prints a table, writes ``<out>/explain.json`` and a PNG grid ``<out>/explain_grid.png``
(image | one overlay per method | ICE's foreground mask | ground truth).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

import numpy as np
import timm
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import ice_prune
from ice_prune import data as idata
from ice_prune import metrics as M
from ice_prune import visualize as vis
from ice_prune.head import ICEHead

from ice_prune import maps as ex

ALL_METHODS = ("ice", "rollout", "gradcam", "generic", "raw-attention", "pm-style")
JACCARD_TAUS = (0.9, 0.8)  # Naseer et al.'s thresholds on the cumulative attention mass (ICE Table 3)


# ---------------------------------------------------------------------------------------------
# model and checkpoint

def split_checkpoint(path: Optional[str]) -> tuple[dict, dict]:
    """``(model state dict without ice_head, ice_head state dict with the prefix stripped)``."""
    if path is None:
        return {}, {}
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds neither a state dict nor a dict with 'model'")
    model_sd = {k: v for k, v in state.items() if not k.startswith("ice_head.")}
    head_sd = {k[len("ice_head."):]: v for k, v in state.items() if k.startswith("ice_head.")}
    return model_sd, head_sd


def head_from_state(head_sd: dict) -> Optional[ICEHead]:
    """Build an ICEHead from its state dict's shapes (linear: ``fc.weight``; MLP: ``fc.0`` / ``fc.2``)."""
    if not head_sd:
        return None
    if "fc.weight" in head_sd:
        out, dim = head_sd["fc.weight"].shape
        head = ICEHead(dim, out - 1)
    elif "fc.0.weight" in head_sd and "fc.2.weight" in head_sd:
        hidden, dim = head_sd["fc.0.weight"].shape
        head = ICEHead(dim, head_sd["fc.2.weight"].shape[0] - 1, hidden_dim=hidden)
    else:
        raise ValueError(f"ice_head keys {sorted(head_sd)} are neither a linear head (fc.weight) nor an "
                         f"MLP head (fc.0.*, fc.2.*); per-location heads cannot explain: save the "
                         f"explanation head as the shared ice_head")
    head.load_state_dict(head_sd)
    return head.eval()


def build_model(args, num_classes: Optional[int] = None) -> tuple[torch.nn.Module, Optional[ICEHead], dict]:
    model_sd, head_sd = split_checkpoint(args.checkpoint)
    if args.checkpoint is None:
        print("warning: no --checkpoint, the model is randomly initialized", file=sys.stderr)
    kwargs = {"pretrained": False, **json.loads(args.model_kwargs)}
    if "head.weight" in model_sd:
        kwargs["num_classes"] = model_sd["head.weight"].shape[0]
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.patch_size is not None:
        kwargs["patch_size"] = args.patch_size
    model = timm.create_model(args.model, **kwargs)
    if model_sd:
        model.load_state_dict(model_sd)
    return model.eval(), head_from_state(head_sd), head_sd


# ---------------------------------------------------------------------------------------------
# data

def synthetic_dataset(args, num_classes: int) -> Dataset:
    """SyntheticScenes' validation split with masks, sized for the model; ``--data-kwargs`` (JSON)
    overrides any argument, e.g. ``'{"length": 500, "seed": 0}'``."""
    from ice_prune.data import SyntheticScenes

    kwargs = {"num_classes": num_classes, "img_size": image_size(args), "split": "val",
              "return_mask": True, **json.loads(args.data_kwargs)}
    return SyntheticScenes(**kwargs)


def image_size(args) -> int:
    return args.img_size or 224


# (path, args, num_classes of the model) -> dataset
DATASETS: dict[str, Callable] = {
    "synthetic": lambda path, a, c: synthetic_dataset(a, c),
    "imagenet-seg": lambda path, a, c: idata.ImageNetSegmentation(path, image_size=image_size(a)),
    "voc": lambda path, a, c: idata.VOCSegmentationEval(path, image_size=image_size(a)),
    "voc07": lambda path, a, c: idata.VOCDetectionEval(path, year="2007", image_size=image_size(a)),
    "voc12": lambda path, a, c: idata.VOCDetectionEval(path, year="2012", image_size=image_size(a)),
    "cub": lambda path, a, c: idata.CUB200(path, image_size=image_size(a)),
    "folder": lambda path, a, c: torchvision.datasets.ImageFolder(
        path, transform=timm.data.create_transform(image_size(a))),
}

# which protocol each dataset runs
PROTOCOLS = {"synthetic": ("segmentation", "jaccard"), "imagenet-seg": ("segmentation",),
             "voc": ("jaccard",), "voc07": ("corloc",), "voc12": ("corloc",), "cub": ("cub",)}


def collate(batch):
    """Stack images; targets of varying shape (a detection image's boxes) stay a list."""
    fields = list(zip(*batch))
    out = []
    for f in fields:
        try:
            out.append(torch.utils.data.default_collate(list(f)))
        except RuntimeError:
            out.append([torch.as_tensor(x) for x in f])
    return out


def parse_data(spec: str) -> tuple[str, Optional[str]]:
    kind, _, path = spec.partition(":")
    if kind not in DATASETS:
        raise SystemExit(f"unknown --data {spec!r}: use synthetic or one of "
                         f"{sorted(k + ':PATH' for k in DATASETS if k != 'synthetic')}")
    if kind != "synthetic" and not path:
        raise SystemExit(f"--data {kind} needs a path: --data {kind}:PATH")
    return kind, path or None


# ---------------------------------------------------------------------------------------------
# explain

def compute_maps(model, head, images, methods) -> tuple[dict[str, torch.Tensor], ex.ICEExplanation, torch.Tensor]:
    """Patch-grid maps per method for the model's top-1 class, ICE's explanation, the logits."""
    with torch.no_grad():
        logits = model(images)
    target = logits.argmax(-1)
    maps, ice = {}, None
    for name in methods:
        if name == "ice":
            ice = ex.ice_explain(model, images, head=head, target=target)
            maps[name] = ice.class_map
        else:
            maps[name] = ex.explain(model, images, name, target=target)
    return maps, ice, logits


def patch_mask(name: str, patch_map: torch.Tensor, ice: Optional[ex.ICEExplanation], i: int) -> np.ndarray:
    """Foreground patches for box protocols: ICE's argmax mask; for the other maps Chefer et al.'s
    threshold (min-max normalized map above its mean)."""
    if name == "ice":
        return ice.foreground[i].cpu().numpy()
    return M.chefer_binarize(patch_map)[0]


def run_explain(args) -> dict:
    kind, path = parse_data(args.data)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {','.join(ALL_METHODS)}")
    if kind not in PROTOCOLS:
        raise SystemExit(f"--data {kind} has no masks or boxes to explain against; use one of "
                         f"{sorted(PROTOCOLS)}")
    model, head, _ = build_model(args)
    dataset = DATASETS[kind](path, args, model.num_classes)
    if "ice" in methods and head is None:
        raise SystemExit("--methods ice needs an ICE head: the checkpoint has no ice_head.* keys "
                         "(train one with train/explain.py, or drop ice from --methods)")
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=collate)
    protocols = PROTOCOLS[kind]
    seg = {m: M.ImageNetSegMeter() for m in methods}
    jac = {m: {} for m in methods}  # method -> variant -> list of per-image values
    corloc = {m: [] for m in methods}
    cub = {m: M.CUBLocMeter() for m in methods}
    grid_rows = []
    patch_size = tuple(model.patch_embed.patch_size)
    for batch in tqdm(loader, desc="explain", disable=args.quiet):
        images, target = batch[0], batch[1:]
        maps, ice, logits = compute_maps(model, head, images, methods)
        size = tuple(images.shape[-2:])
        up = {m: ex.upsample(v, size) for m, v in maps.items()}
        for i in range(images.shape[0]):
            if "segmentation" in protocols or "jaccard" in protocols:
                label = target[-1][i]
                fg = (label > 0).long() if kind == "synthetic" else label
                if "segmentation" in protocols:
                    for m in methods:
                        seg[m].update(up[m][i], fg)
                if "jaccard" in protocols:
                    jlabel = fg if kind == "synthetic" else label
                    for m in methods:
                        for variant, pred in jaccard_masks(model, images[i:i + 1], m, maps[m][i], ice, i,
                                                           size, target=logits[i:i + 1].argmax(-1)):
                            jac[m].setdefault(variant, []).append(M.voc_jaccard(pred, jlabel))
            if "corloc" in protocols or "cub" in protocols:
                for m in methods:
                    box = M.box_from_mask(patch_mask(m, maps[m][i], ice, i), maps[m][i], patch_size, size)
                    if "corloc" in protocols:
                        corloc[m].append(M.corloc_hit(box, target[0][i]))
                    else:
                        # inclusive-pixel convention: the last pixel inside the box
                        cub[m].update([box[0], box[1], box[2] - 1, box[3] - 1], target[1][i][None],
                                      int(logits[i].argmax()), int(target[0][i]))
            if len(grid_rows) < args.grid:
                grid_rows.append(grid_row(images[i], up, ice, i, target, kind))
    results = {"data": args.data, "model": args.model, "checkpoint": args.checkpoint,
               "images": n, "methods": {}}
    for m in methods:
        r = {}
        if "segmentation" in protocols:
            r.update(seg[m].compute())
        if "jaccard" in protocols:
            r["jaccard"] = {v: 100 * float(np.mean(x)) for v, x in jac[m].items()}
        if "corloc" in protocols:
            r["corloc"] = 100 * float(np.mean(corloc[m]))
        if "cub" in protocols:
            r.update(cub[m].compute())
        results["methods"][m] = r
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "explain.json"), "w") as f:
        json.dump(results, f, indent=2)
    if grid_rows:
        vis.save_grid(grid_rows, os.path.join(args.out, "explain_grid.png"))
    print(format_table(results))
    return results


def jaccard_masks(model, image, name, patch_map, ice, i, size, target):
    """The predicted foreground masks the Jaccard protocol compares, per reported variant.

    ICE: its foreground mask (no threshold, as in ICE Table 3). Raw attention: DINO/Naseer's
    cumulative-mass threshold tau on the head-mean row ("mean") and on every head with the best head
    taken per class ("best-head"). The other maps: the same threshold on the map.
    """
    if name == "ice":
        yield "mask", ex.upsample(ice.foreground[i:i + 1].float(), size, mode="nearest")[0] > 0.5
        return
    heads = ex.raw_attention(model, image, target=target, per_head=True)[0] if name == "raw-attention" else None
    for tau in JACCARD_TAUS:
        flat = patch_map.reshape(1, -1)
        m = torch.from_numpy(M.cumulative_mass_mask(flat, tau)).float().reshape(1, *patch_map.shape)
        yield f"mean@{tau}", ex.upsample(m, size, mode="nearest")[0] > 0.5
        if heads is not None:
            hm = torch.from_numpy(M.cumulative_mass_mask(heads.reshape(heads.shape[0], -1), tau)).float()
            yield f"best-head@{tau}", ex.upsample(hm.reshape(heads.shape), size, mode="nearest") > 0.5


def grid_row(image, up, ice, i, target, kind) -> dict[str, np.ndarray]:
    # every dataset here normalizes with ImageNet's mean and std (SyntheticScenes too): undo it
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD)[:, None, None]
    image = (image * std + mean).clamp(0, 1)
    row = {"image": vis.to_uint8_image(image)}
    for m, v in up.items():
        row[m] = vis.overlay(image, v[i])
    if ice is not None:
        row["ICE mask"] = vis.mask_overlay(image, ice.foreground[i])
    if kind in ("synthetic", "imagenet-seg", "voc"):
        label = target[-1][i]
        row["ground truth"] = vis.mask_overlay(image, (label > 0) & (label != 255), color=(0, 255, 0))
    return row


def format_table(results: dict) -> str:
    rows = []
    for m, r in results["methods"].items():
        flat = {}
        for k, v in r.items():
            if isinstance(v, dict):
                flat.update({f"{k}[{kk}]": vv for kk, vv in v.items()})
            elif k != "images":
                flat[k] = v
        rows.append((m, flat))
    cols = sorted({k for _, f in rows for k in f})
    lines = [" | ".join(["method"] + cols), " | ".join(["---"] * (len(cols) + 1))]
    for m, f in rows:
        lines.append(" | ".join([m] + [f"{f[c]:.2f}" if c in f else "-" for c in cols]))
    return f"{results['data']} ({results['images']} images)\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# accuracy

LABELED = ("synthetic", "cub", "folder")  # datasets whose second field is the image class


def run_accuracy(args) -> dict:
    kind, path = parse_data(args.data)
    if kind not in LABELED:
        raise SystemExit(f"--data {kind} has no image-class labels; accuracy needs one of {LABELED}")
    model, head, head_sd = build_model(args)
    dataset = DATASETS[kind](path, args, model.num_classes)
    if args.method is not None:
        num_classes = head.num_classes if head is not None else None
        ice_prune.patch(model, keep_rate=args.keep_rate, method=args.method, num_classes=num_classes)
        if args.method == "ice":
            if head is None:
                raise SystemExit("--method ice needs a checkpoint with the ICE head (ice_head.* keys)")
            model.ice_head.load_state_dict(head_sd)
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=collate)
    correct1 = correct5 = 0
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc="accuracy", disable=args.quiet):
            images, labels = batch[0], torch.as_tensor(batch[1])
            top = model(images).topk(min(5, model.num_classes), dim=-1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(-1).sum())
    res = {"data": args.data, "images": n, "method": args.method, "keep_rate": args.keep_rate,
           "top1": 100 * correct1 / max(n, 1), "top5": 100 * correct5 / max(n, 1)}
    print(f"{args.data}: top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  ({n} images, "
          f"method={args.method}, keep_rate={args.keep_rate})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(res, f, indent=2)
    return res


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("explain", "accuracy"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True)
        s.add_argument("--data-kwargs", default="{}", help="JSON keyword arguments of SyntheticScenes")
        s.add_argument("--checkpoint", default=None)
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
    sub.choices["explain"].add_argument("--methods", default=",".join(ALL_METHODS))
    sub.choices["explain"].add_argument("--grid", type=int, default=4, help="examples in the PNG grid")
    sub.choices["accuracy"].add_argument("--method", choices=sorted(ice_prune.SELECTORS), default=None,
                                         help="patch the model with this selector (default: unpatched)")
    sub.choices["accuracy"].add_argument("--keep-rate", type=float, default=0.7)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    return {"explain": run_explain, "accuracy": run_accuracy}[args.command](args)


if __name__ == "__main__":
    main()
