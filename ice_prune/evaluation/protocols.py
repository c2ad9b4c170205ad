"""Scoring explanation maps against masks and boxes, and the top-1 / top-5 of a (pruned) model: what
``train/evaluate.py`` runs, importable.

>>> model = ice_prune.load_model("deit_small_patch16_224", "runs/ice/last.pth")
>>> dataset = open_dataset("imagenet-seg", "gtsegs_ijcv.mat", image_size=224)
>>> results = evaluate_maps(model, model.ice_head, dataset, DATASETS["imagenet-seg"].protocols)
>>> print(format_table(results, "imagenet-seg"))

Map methods are those of the :data:`ice_prune.maps.METHODS` registry: a map registered there is
evaluated like the built-in ones. Each map explains the model's own top-1 class; ``ice-pruned``
(ICE's map from the pruned forward) is the foreground of any class, and needs a model patched with
ICE (:func:`default_methods`). :func:`evaluate_agreement` compares that map at the model's keep rate
with the same weights' at keep rate 1, and checks that the map leaves the logits unchanged.

Protocols, and the dataset items each reads:

* ``segmentation``: Chefer et al.'s pixel accuracy, mIoU and mAP of the map upsampled to the image
  (:class:`ice_prune.evaluation.metrics.ImageNetSegMeter`); items ``(image, ..., mask)``, mask 0/1 or bool.
* ``jaccard``: Naseer et al.'s per-image Jaccard, averaged over images, of the foreground masks
  :func:`jaccard_masks` gives per variant; items ``(image, ..., label)``, label a mask or VOC's
  palette indices (0 background, 255 void).
* ``corloc``: LOST's CorLoc of the box around the map's foreground patches (:func:`patch_mask`);
  items ``(image, boxes [M, 4])``.
* ``cub``: CUB-200-2011 top-1, GT-known and top-1 localization with the same box; items ``(image,
  label, box)``.

Datasets (:data:`DATASETS`, by the kind ``train/evaluate.py --data`` names): ``synthetic``
(SyntheticScenes' validation split with its masks), ``imagenet-seg`` (gtsegs_ijcv.mat), ``voc``
(VOC2012 segmentation val), ``voc07`` / ``voc12`` (VOC detection trainval), ``cub`` (CUB test) and
``folder`` (an ImageFolder, accuracy only).

Models and their ICE heads come from :func:`ice_prune.load_model`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ice_prune import data, maps, visualize
from ice_prune.evaluation import metrics
from ice_prune.head import ICEHead

JACCARD_TAUS = (0.9, 0.8)  # Naseer et al.'s thresholds on the cumulative attention mass (ICE Table 3)
PROTOCOL_NAMES = ("segmentation", "jaccard", "corloc", "cub")


# ---------------------------------------------------------------------------------------------
# data

@dataclasses.dataclass(frozen=True)
class DataKind:
    """One kind of evaluation data: ``build(path, image_size, num_classes, kwargs)`` opens it, the
    dict ``kwargs`` overriding any argument; ``path`` says what its PATH is; ``protocols`` are the
    map protocols its items allow (none: no masks or boxes); ``labeled``: its items' second field is
    the image class (accuracy)."""

    build: Callable[[Optional[str], int, int, dict], Dataset]
    path: str
    protocols: tuple[str, ...] = ()
    labeled: bool = False


def _synthetic(path: Optional[str], image_size: int, num_classes: int, kwargs: dict) -> Dataset:
    # the validation split with masks, sized for the model
    return data.SyntheticScenes(**{"num_classes": num_classes, "img_size": image_size, "split": "val",
                                   "return_mask": True, **kwargs})


def _resized(cls: Callable[..., Dataset], **fixed) -> Callable[[Optional[str], int, int, dict], Dataset]:
    """The builder of ``cls(path, image_size=image_size, **fixed)``."""
    return lambda path, image_size, num_classes, kwargs: cls(path, **{"image_size": image_size, **fixed,
                                                                      **kwargs})


DATASETS: dict[str, DataKind] = {
    "synthetic": DataKind(_synthetic, "none (generated)", ("segmentation", "jaccard"), labeled=True),
    "imagenet-seg": DataKind(_resized(data.ImageNetSegmentation), "Chefer et al.'s gtsegs_ijcv.mat",
                             ("segmentation",)),
    "voc": DataKind(_resized(data.VOCSegmentationEval), "the folder holding VOCdevkit/VOC2012",
                    ("jaccard",)),
    "voc07": DataKind(_resized(data.VOCDetectionEval, year="2007"), "the folder holding VOCdevkit/VOC2007",
                      ("corloc",)),
    "voc12": DataKind(_resized(data.VOCDetectionEval, year="2012"), "the folder holding VOCdevkit/VOC2012",
                      ("corloc",)),
    "cub": DataKind(_resized(data.CUB200), "the CUB_200_2011 folder", ("cub",), labeled=True),
    "folder": DataKind(
        lambda path, image_size, num_classes, kwargs: data.build_imagefolder(
            path, **{"img_size": image_size, "is_training": False, **kwargs}),
        "an ImageFolder tree, PATH/<class>/<image>", labeled=True),
}


def parse_data_spec(spec: str) -> tuple[str, Optional[str]]:
    """``"kind:PATH"`` (or ``"synthetic"``) -> ``(kind, PATH or None)``."""
    kind, _, path = spec.partition(":")
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset kind {kind!r} in {spec!r}: use synthetic or one of "
                         f"{', '.join(k + ':PATH' for k in DATASETS if k != 'synthetic')}")
    if kind != "synthetic" and not path:
        raise ValueError(f"{kind} data needs a path: {kind}:PATH with PATH {DATASETS[kind].path}")
    return kind, path or None


def open_dataset(kind: str, path: Optional[str] = None, image_size: int = 224, num_classes: int = 10,
                 kwargs: Optional[dict] = None) -> Dataset:
    """The evaluation dataset of ``kind`` at ``path``, images resized to ``image_size``;
    ``num_classes`` sizes SyntheticScenes; ``kwargs`` go to the dataset's class, overriding any
    argument (``--data-kwargs``)."""
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset kind {kind!r}: choose one of {', '.join(DATASETS)}")
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"{kind} data {path!r} does not exist: PATH is "
                                f"{DATASETS[kind].path}")
    return DATASETS[kind].build(path, image_size, num_classes, dict(kwargs or {}))


def collate(batch):
    """Stack images; targets of varying shape (a detection image's boxes) stay a list."""
    out = []
    for field in zip(*batch):
        try:
            out.append(torch.utils.data.default_collate(list(field)))
        except RuntimeError:
            out.append([torch.as_tensor(x) for x in field])
    return out


def _loader(dataset: Dataset, limit: Optional[int], batch_size: int, workers: int
            ) -> tuple[DataLoader, int]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return DataLoader(Subset(dataset, range(n)), batch_size=batch_size, num_workers=workers,
                      collate_fn=collate), n


def _progress(loader: DataLoader, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(loader, desc=desc, disable=not progress)


# ---------------------------------------------------------------------------------------------
# explanation maps

def default_methods(model: nn.Module) -> list[str]:
    """Every map of :data:`ice_prune.maps.METHODS` that ``model`` gives: the pruned-forward maps
    (:data:`ice_prune.maps.PRUNED_FORWARD_METHODS`) only for a model patched with ICE."""
    pruned = maps.gives_pruned_forward_maps(model)
    return [m for m in maps.METHODS if pruned or m not in maps.PRUNED_FORWARD_METHODS]


def check_methods(methods: Sequence[str], head: Optional[ICEHead],
                  model: Optional[nn.Module] = None) -> None:
    """Every method is registered in :data:`ice_prune.maps.METHODS`; ``ice`` has a head; with
    ``model``, the pruned-forward maps have a model patched with ICE."""
    choices = ",".join(maps.METHODS)
    unknown = [m for m in methods if m not in maps.METHODS]
    if unknown:
        raise ValueError(f"unknown map methods {unknown}: choose from {choices} "
                         f"(ice_prune.maps.METHODS)")
    if not methods:
        raise ValueError(f"no map method given: choose from {choices}")
    if "ice" in methods and head is None:
        raise ValueError("the ice map needs an ICE head, and there is none: the checkpoint has no "
                         "ice_head.* keys (train one with train/explain.py), or leave ice out of "
                         "the methods")
    pruned = [m for m in methods if m in maps.PRUNED_FORWARD_METHODS]
    if pruned and model is not None and not maps.gives_pruned_forward_maps(model):
        raise ValueError(f"the {', '.join(pruned)} map reads a model patched with ICE, and this one "
                         f"is not: load the pruning checkpoint with --method ice --keep-rate K "
                         f"(ice_prune.load_model(..., method='ice')), or leave it out of the methods")


ICE_TARGETS = ("classifier", "ice")


def compute_maps(model: nn.Module, head: Optional[ICEHead], images: Tensor, methods: Sequence[str],
                 ice_target: str = "classifier"
                 ) -> tuple[dict[str, Tensor], Optional[maps.ICEExplanation], Tensor]:
    """Patch-grid maps per method for the model's top-1 class, ICE's explanation (``None`` without
    ``ice`` in ``methods``), the logits. ``ice_target="ice"``: ICE's map explains the class ICE
    itself predicts (a model whose classifier was not trained on the head's classes)."""
    if ice_target not in ICE_TARGETS:
        raise ValueError(f"ice_target must be one of {ICE_TARGETS}, got {ice_target!r}")
    with torch.no_grad():
        logits = model(images)
    target = logits.argmax(-1)
    method_maps, ice = {}, None
    for name in methods:
        if name == "ice":
            ice = maps.ice_explain(model, images, head=head,
                                   target="ice" if ice_target == "ice" else target)
            method_maps[name] = ice.class_map
        else:
            method_maps[name] = maps.explain(model, images, name, target=target)
    return method_maps, ice, logits


def patch_mask(method: str, patch_map: Tensor, ice_foreground: Optional[Tensor] = None) -> np.ndarray:
    """Foreground patches ``[gh, gw]`` for the box protocols: ICE's argmax mask
    (``ice_foreground``); a pruned-forward map above :data:`ice_prune.maps.FOREGROUND_THRESHOLD`;
    for the other maps Chefer et al.'s threshold (min-max normalized map above its mean)."""
    if method == "ice":
        return ice_foreground.cpu().numpy()
    if method in maps.PRUNED_FORWARD_METHODS:
        return (patch_map > maps.FOREGROUND_THRESHOLD).cpu().numpy()
    return metrics.chefer_binarize(patch_map)[0]


def jaccard_masks(model: nn.Module, image: Tensor, method: str, patch_map: Tensor,
                  size: tuple[int, int], target: Tensor, ice_foreground: Optional[Tensor] = None
                  ) -> Iterator[tuple[str, Tensor]]:
    """``(variant, predicted foreground)`` pairs the Jaccard protocol compares, for one ``image [1,
    3, H, W]`` and its ``patch_map [gh, gw]``, masks upsampled to ``size``.

    ICE: its foreground mask (no threshold, as in ICE Table 3); a pruned-forward map: its foreground
    probability above :data:`ice_prune.maps.FOREGROUND_THRESHOLD`, also ``"mask"``. Raw attention:
    DINO/Naseer's cumulative-mass threshold tau on the head-mean row (``mean@tau``) and on every head
    with the best head taken per class (``best-head@tau``, masks ``[H_heads, *size]``). The other
    maps: the same threshold on the map.
    """
    if method == "ice" or method in maps.PRUNED_FORWARD_METHODS:
        foreground = (ice_foreground if method == "ice"
                      else patch_map > maps.FOREGROUND_THRESHOLD)
        yield "mask", maps.upsample(foreground[None].float(), size, mode="nearest")[0] > 0.5
        return
    heads = (maps.raw_attention(model, image, target=target, per_head=True)[0]
             if method == "raw-attention" else None)
    for tau in JACCARD_TAUS:
        mask = metrics.cumulative_mass_mask(patch_map.reshape(1, -1), tau)
        mask = torch.from_numpy(mask).float().reshape(1, *patch_map.shape)
        yield f"mean@{tau}", maps.upsample(mask, size, mode="nearest")[0] > 0.5
        if heads is not None:
            head_masks = metrics.cumulative_mass_mask(heads.reshape(heads.shape[0], -1), tau)
            head_masks = torch.from_numpy(head_masks).float().reshape(heads.shape)
            yield f"best-head@{tau}", maps.upsample(head_masks, size, mode="nearest") > 0.5


def evaluate_maps(model: nn.Module, head: Optional[ICEHead], dataset: Dataset,
                  protocols: Sequence[str], methods: Optional[Sequence[str]] = None, *,
                  batch_size: int = 16, workers: int = 0, limit: Optional[int] = None,
                  progress: bool = False, ice_target: str = "classifier") -> dict:
    """Score each method's maps on ``dataset`` (its first ``limit`` images) under ``protocols``
    (``DATASETS[kind].protocols`` for the built-in kinds; see the module docstring).

    ``methods`` default to every map of :data:`ice_prune.maps.METHODS` the model gives
    (:func:`default_methods`); ``ice`` reads ``head`` and explains the classifier's top-1 class, or
    with ``ice_target="ice"`` ICE's own prediction.
    Returns ``{"images": n, "methods": {method: figures}}``, figures in percent: the segmentation
    meter's, ``jaccard`` per variant, ``corloc``, or the CUB meter's. The model is put in eval mode;
    the images go to the device of its parameters (a model training on a GPU is scored there).
    """
    methods = default_methods(model) if methods is None else list(methods)
    check_methods(methods, head, model)
    unknown = [p for p in protocols if p not in PROTOCOL_NAMES]
    if unknown or not protocols:
        raise ValueError(f"protocols must be some of {PROTOCOL_NAMES}, got {list(protocols)}: maps "
                         f"are scored against masks or boxes")
    model.eval()
    loader, n = _loader(dataset, limit, batch_size, workers)
    segmentation = {m: metrics.ImageNetSegMeter() for m in methods}
    jaccard = {m: {} for m in methods}  # method -> variant -> per-image values
    corloc = {m: [] for m in methods}
    cub = {m: metrics.CUBLocMeter() for m in methods}
    patch_size = tuple(model.patch_embed.patch_size)
    device = next(model.parameters()).device
    for batch in _progress(loader, "explain", progress):
        images, target = batch[0].to(device), batch[1:]
        method_maps, ice, logits = compute_maps(model, head, images, methods, ice_target)
        size = tuple(images.shape[-2:])
        upsampled = {m: maps.upsample(v, size) for m, v in method_maps.items()}
        for i in range(images.shape[0]):
            ice_foreground = None if ice is None else ice.foreground[i]
            if "segmentation" in protocols or "jaccard" in protocols:
                mask = torch.as_tensor(target[-1][i]).long()  # bool masks become 0/1
                for m in methods:
                    if "segmentation" in protocols:
                        segmentation[m].update(upsampled[m][i], mask)
                    if "jaccard" in protocols:
                        for variant, pred in jaccard_masks(model, images[i:i + 1], m, method_maps[m][i],
                                                           size, logits[i:i + 1].argmax(-1),
                                                           ice_foreground):
                            jaccard[m].setdefault(variant, []).append(metrics.voc_jaccard(pred, mask))
            if "corloc" in protocols or "cub" in protocols:
                for m in methods:
                    box = metrics.box_from_mask(patch_mask(m, method_maps[m][i], ice_foreground),
                                                method_maps[m][i], patch_size, size)
                    if "corloc" in protocols:
                        corloc[m].append(metrics.corloc_hit(box, target[0][i]))
                    if "cub" in protocols:
                        # inclusive-pixel convention: the last pixel inside the box
                        cub[m].update([box[0], box[1], box[2] - 1, box[3] - 1], target[1][i][None],
                                      int(logits[i].argmax()), int(target[0][i]))
    results = {"images": n, "methods": {}}
    for m in methods:
        figures = {}
        if "segmentation" in protocols:
            figures.update(segmentation[m].compute())
        if "jaccard" in protocols:
            figures["jaccard"] = {v: 100 * float(np.mean(x)) for v, x in jaccard[m].items()}
        if "corloc" in protocols:
            figures["corloc"] = 100 * float(np.mean(corloc[m]))
        if "cub" in protocols:
            figures.update(cub[m].compute())
        results["methods"][m] = figures
    return results


def evaluate_agreement(model: nn.Module, dataset: Dataset, reference_keep_rate: float = 1.0, *,
                       batch_size: int = 16, workers: int = 0, limit: Optional[int] = None,
                       progress: bool = False) -> dict:
    """ICE's map from the pruned forward of ``model`` (patched with ICE) at its keep rate against the
    same weights' at ``reference_keep_rate`` (1: nothing dropped, the head read at the selection
    points, the last one for every patch), on the first ``limit`` images of ``dataset``; and whether
    explain mode leaves the logits unchanged (eager forwards with it off and on).

    Returns ``{"images", "keep_rate", "reference_keep_rate", "threshold", "foreground_iou",
    "spearman", "spearman_images", "foreground_share", "reference_foreground_share",
    "logits_identical", "logits_differing_images", "logits_max_abs_diff"}``: the mean over images of
    :func:`~ice_prune.evaluation.metrics.map_agreement`'s foreground IoU (percent) and rank
    correlation (over the ``spearman_images`` images where neither map is constant, ``None`` if
    none), each map's share of foreground patches (percent), and the logits compared bit for bit.
    The model's keep rate and explain setting are restored.
    """
    if not maps.gives_pruned_forward_maps(model):
        raise ValueError("the agreement of ICE's pruned-forward maps needs a model patched with ICE "
                         "(ice_prune.load_model(..., method='ice'))")
    threshold = maps.FOREGROUND_THRESHOLD
    loader, n = _loader(dataset, limit, batch_size, workers)
    keep_rate, explain = model.keep_rate, model.explain
    ious, rhos, shares = [], [], ([], [])
    differing, max_diff = 0, 0.0
    model.eval()
    try:
        with torch.no_grad():
            for batch in _progress(loader, "agreement", progress):
                images = batch[0]
                model.explain = False
                plain = model(images)
                model.explain = True
                logits = model(images)
                pruned = model.ice_explanation.foreground
                model.keep_rate = reference_keep_rate
                model(images)
                reference = model.ice_explanation.foreground
                model.keep_rate = keep_rate
                differing += int((plain != logits).any(-1).sum())
                max_diff = max(max_diff, float((plain.float() - logits.float()).abs().max()))
                iou, rho = metrics.map_agreement(pruned, reference, threshold)
                ious.extend(iou.tolist())
                rhos.extend(rho.tolist())
                for share, fg in zip(shares, (pruned, reference)):
                    share.extend((fg > threshold).float().mean(1).tolist())
    finally:
        model.keep_rate, model.explain = keep_rate, explain
    defined = [r for r in rhos if not np.isnan(r)]
    return {"images": n, "keep_rate": keep_rate, "reference_keep_rate": reference_keep_rate,
            "threshold": threshold, "foreground_iou": 100 * float(np.mean(ious)),
            "spearman": float(np.mean(defined)) if defined else None,
            "spearman_images": len(defined),
            "foreground_share": 100 * float(np.mean(shares[0])),
            "reference_foreground_share": 100 * float(np.mean(shares[1])),
            "logits_identical": differing == 0, "logits_differing_images": differing,
            "logits_max_abs_diff": max_diff}


def grid_row(image: Tensor, upsampled: dict[str, Tensor], ice_foreground: Optional[Tensor] = None,
             mask: Optional[Tensor] = None) -> dict[str, np.ndarray]:
    """One row of the PNG grid: the image | one overlay per method (``upsampled``: method -> ``[H,
    W]`` map) | ICE's foreground mask | the ground-truth mask (non-zero, not VOC's void 255)."""
    # every dataset here normalizes with ImageNet's mean and std (SyntheticScenes too): undo it
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    image = (image * std + mean).clamp(0, 1)
    row = {"image": visualize.to_uint8_image(image)}
    for m, v in upsampled.items():
        row[m] = visualize.overlay(image, v)
    if ice_foreground is not None:
        row["ICE mask"] = visualize.mask_overlay(image, ice_foreground)
    if mask is not None:
        mask = torch.as_tensor(mask)
        row["ground truth"] = visualize.mask_overlay(image, (mask > 0) & (mask != 255), color=(0, 255, 0))
    return row


def grid_rows(model: nn.Module, head: Optional[ICEHead], dataset: Dataset, protocols: Sequence[str],
              methods: Sequence[str], count: int = 4) -> list[dict[str, np.ndarray]]:
    """:func:`grid_row` for the first ``count`` images of ``dataset``, with the ground truth where
    the protocols read a mask."""
    has_mask = "segmentation" in protocols or "jaccard" in protocols
    rows = []
    model.eval()
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        image = item[0][None]
        method_maps, ice, _ = compute_maps(model, head, image, methods)
        size = tuple(image.shape[-2:])
        rows.append(grid_row(image[0], {m: maps.upsample(v, size)[0] for m, v in method_maps.items()},
                             None if ice is None else ice.foreground[0],
                             item[-1] if has_mask else None))
    return rows


def format_table(results: dict, title: str = "") -> str:
    """:func:`evaluate_maps`' results as a Markdown table, one row per method, headed by ``title
    (N images)``."""
    rows = []
    for m, figures in results["methods"].items():
        flat = {}
        for k, v in figures.items():
            if isinstance(v, dict):
                flat.update({f"{k}[{kk}]": vv for kk, vv in v.items()})
            elif k != "images":
                flat[k] = v
        rows.append((m, flat))
    cols = sorted({k for _, flat in rows for k in flat})
    lines = [" | ".join(["method"] + cols), " | ".join(["---"] * (len(cols) + 1))]
    for m, flat in rows:
        lines.append(" | ".join([m] + [f"{flat[c]:.2f}" if c in flat else "-" for c in cols]))
    return f"{title} ({results['images']} images)\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# accuracy

def evaluate_accuracy(model: nn.Module, dataset: Dataset, *, batch_size: int = 16, workers: int = 0,
                      limit: Optional[int] = None, progress: bool = False) -> dict:
    """Top-1 and top-5 (top-C below 5 classes) in percent of ``model`` on the first ``limit`` items
    ``(image, class, ...)`` of ``dataset``: ``{"images": n, "top1": ..., "top5": ...}``."""
    loader, n = _loader(dataset, limit, batch_size, workers)
    correct1 = correct5 = 0
    model.eval()
    with torch.no_grad():
        for batch in _progress(loader, "accuracy", progress):
            images, labels = batch[0], torch.as_tensor(batch[1])
            logits = model(images)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(-1).sum())
    return {"images": n, "top1": 100 * correct1 / max(n, 1), "top5": 100 * correct5 / max(n, 1)}
