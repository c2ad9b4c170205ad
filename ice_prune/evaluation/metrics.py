"""The evaluation protocols of ICE's Tables 1-4, computed as the published code computes them.

* :class:`ImageNetSegMeter`: ImageNet-Segmentation (Guillaumin et al. 2014) as evaluated by Chefer et
  al. (``baselines/ViT/imagenet_seg_eval.py`` of Transformer-Explainability; ICE Tables 1-2).
* :func:`voc_jaccard`, :func:`cumulative_mass_mask`: Jaccard similarity on PASCAL VOC12 val as in
  Naseer et al. NeurIPS 2021 (``evaluate_segmentation.py`` of IPViT, after DINO; ICE Table 3).
* :func:`box_from_mask`, :func:`corloc_hit`, :func:`box_iou_lost`: CorLoc of LOST / TokenCut on
  VOC07/12 trainval (ICE Table 4).
* :func:`box_iou_inclusive`, :class:`CUBLocMeter`: CUB-200-2011 GT-known and top-1 localization with
  the inclusive-pixel IoU of the WSOL code TokenCut and TS-CAM evaluate with (ICE Table 4).
* :func:`map_agreement`: how far two maps of the same images agree (IoU of their foreground masks,
  rank correlation of their scores).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from scipy import ndimage, stats

ArrayLike = Union[np.ndarray, torch.Tensor]


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """``sklearn.metrics.average_precision_score`` for binary labels: ``sum_n (R_n - R_{n-1}) P_n``
    over the distinct score thresholds, highest first (no interpolation). 0.0 without positives,
    where sklearn warns and gives NaN that Chefer et al. turn into 0 with ``np.nan_to_num``."""
    labels = np.asarray(labels).ravel().astype(np.float64)
    scores = np.asarray(scores).ravel().astype(np.float64)
    if labels.sum() == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    tp = np.cumsum(labels)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def chefer_binarize(saliency: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Chefer et al.'s two-channel output for one map ``[H, W]``: returns ``(foreground [H, W] bool,
    ap_scores [2, H, W])``.

    The map is min-max normalized and thresholded at its mean: foreground where ``map > mean``.
    A constant map normalizes to NaN: both ``gt`` and ``le`` against a NaN mean are False, both
    channels are 0 and the argmax picks channel 0, so every pixel is background; the AP channels
    ``(1 - map, map)`` have their NaNs set to 0.
    """
    s = torch.as_tensor(_np(saliency), dtype=torch.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (s - s.min()) / (s.max() - s.min())
    mean = s.mean()
    fg = s.gt(mean) & ~s.le(mean)  # channel 1 beats channel 0 only where gt is true
    ap = torch.stack([1 - s, s]).nan_to_num(0.0)
    return fg.numpy(), ap.numpy()


class ImageNetSegMeter:
    """ImageNet-Segmentation protocol of Chefer et al. (the numbers of ICE's Tables 1-2).

    Per image: the map upsampled to the label's size (bilinear, done by the caller), binarized by
    :func:`chefer_binarize`. Pixel accuracy and the IoU of background and foreground are accumulated
    over the whole dataset (sums of correct / labeled pixels and of intersections / unions, not
    per-image means); mIoU = mean of the background and foreground IoU; mAP = the mean over images of
    the average precision of the two-channel map ``(1 - map, map)`` against the one-hot label.
    """

    def __init__(self) -> None:
        self.correct = 0
        self.labeled = 0
        self.inter = np.zeros(2, dtype=np.int64)
        self.union = np.zeros(2, dtype=np.int64)
        self.ap: list[float] = []

    def update(self, saliency: ArrayLike, label: ArrayLike) -> None:
        """``saliency [H, W]`` float map, ``label [H, W]`` with 0 background and 1 foreground."""
        gt = _np(label).astype(np.int64)
        if gt.shape != _np(saliency).shape:
            raise ValueError(f"map {tuple(_np(saliency).shape)} and label {gt.shape} differ in size: "
                             f"upsample the map to the label (ice_prune.maps.upsample)")
        if not np.isin(gt, (0, 1)).all():
            raise ValueError("ImageNet-Segmentation labels must be 0 (background) or 1 (foreground)")
        fg, ap_scores = chefer_binarize(saliency)
        pred = fg.astype(np.int64)
        self.correct += int((pred == gt).sum())
        self.labeled += gt.size
        for c in (0, 1):
            i = int(((pred == c) & (gt == c)).sum())
            self.inter[c] += i
            self.union[c] += int((pred == c).sum() + (gt == c).sum()) - i
        onehot = np.stack([gt == 0, gt == 1]).astype(np.float64)
        self.ap.append(average_precision(onehot, ap_scores))

    def compute(self) -> dict[str, float]:
        """Percentages, as the papers print them; ``np.spacing(1)`` guards the denominators as in the
        original code."""
        eps = np.spacing(1, dtype=np.float64)
        iou = self.inter / (eps + self.union)
        return {"pixel_accuracy": 100 * self.correct / (eps + self.labeled),
                "miou": 100 * float(iou.mean()), "iou_background": 100 * float(iou[0]),
                "iou_foreground": 100 * float(iou[1]),
                "map": 100 * float(np.mean(self.ap)) if self.ap else 0.0, "images": len(self.ap)}


def cumulative_mass_mask(attn: ArrayLike, tau: float) -> np.ndarray:
    """DINO's threshold, used by Naseer et al.: keep the highest values of each row of ``attn
    [K, n]`` whose share of the row's total mass reaches ``tau``.

    Sorted ascending and normalized, a value is kept where the cumulative sum exceeds ``1 - tau``.
    """
    a = torch.as_tensor(_np(attn), dtype=torch.float64)
    if a.ndim != 2:
        raise ValueError(f"attn must be [K, n] (one row per head or map), got {tuple(a.shape)}")
    val, idx = torch.sort(a, dim=1)
    val = val / val.sum(dim=1, keepdim=True)
    keep = val.cumsum(dim=1) > (1 - tau)
    return keep.gather(1, torch.argsort(idx, dim=1)).numpy()


def voc_jaccard(pred: ArrayLike, target: ArrayLike) -> float:
    """Naseer et al.'s per-image Jaccard: for each object class in ``target [H, W]`` (labels 0 =
    background and 255 = void are skipped) the IoU of its mask with the predicted foreground
    ``pred [K, H, W]`` (K candidate masks, e.g. one per head; ``[H, W]`` means K = 1), the best of the
    K taken per class; then the mean over the classes.

    Quirks kept: void pixels are not excluded (their mask ``cur_mask != 255`` is always true), and the
    best head is chosen per class, not once for the dataset. An image without an object class divided
    by zero in the original; here it raises.
    """
    p = _np(pred).astype(bool)
    p = p[None] if p.ndim == 2 else p
    t = _np(target).astype(np.int64)
    if p.shape[1:] != t.shape:
        raise ValueError(f"prediction {p.shape[1:]} and target {t.shape} differ in size")
    classes = [c for c in np.unique(t) if c not in (0, 255)]
    if not classes:
        raise ValueError("the target holds no object class (only background / void): VOC12 Jaccard "
                         "is defined for images with at least one object")
    total = 0.0
    for c in classes:
        m = t == c
        inter = (m & p).sum(axis=(1, 2))
        union = (m | p).sum(axis=(1, 2))
        total += float((inter / union).max())
    return total / len(classes)


def box_iou_lost(box: Sequence[float], gt_boxes: ArrayLike, eps: float = 1e-7) -> np.ndarray:
    """LOST's ``bbox_iou`` (from YOLOv5): boxes ``[x1, y1, x2, y2]`` with exclusive ends, ``eps`` added
    to the heights and to the union. Returns the IoU with each row of ``gt_boxes [M, 4]``."""
    b = np.asarray(box, dtype=np.float64)
    g = np.atleast_2d(_np(gt_boxes)).astype(np.float64)
    inter = (np.clip(np.minimum(b[2], g[:, 2]) - np.maximum(b[0], g[:, 0]), 0, None)
             * np.clip(np.minimum(b[3], g[:, 3]) - np.maximum(b[1], g[:, 1]), 0, None))
    area1 = (b[2] - b[0]) * (b[3] - b[1] + eps)
    area2 = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1] + eps)
    return inter / (area1 + area2 - inter + eps)


def box_from_mask(mask: ArrayLike, scores: ArrayLike, patch_size: Union[int, tuple[int, int]],
                  image_size: tuple[int, int] | None = None) -> list[float]:
    """LOST's ``detect_box`` on a foreground patch mask: the connected component (4-connectivity,
    ``scipy.ndimage.label``'s default as in LOST) holding the most confident foreground patch
    (highest ``scores``) becomes the box ``[x1, y1, x2, y2]`` in pixels, ends exclusive (``max + 1``
    patches, times the patch size), clipped to ``image_size (H, W)``.

    Which patch seeds the component is our choice (ICE does not say): the highest-scoring foreground
    patch. An empty mask gives the box of the highest-scoring patch alone.
    """
    m = _np(mask).astype(bool)
    s = _np(scores).astype(np.float64)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if m.any():
        seed = np.unravel_index(np.argmax(np.where(m, s, -np.inf)), m.shape)
        labeled, _ = ndimage.label(m)
        rows, cols = np.nonzero(labeled == labeled[seed])
    else:
        rows, cols = (np.array([i]) for i in np.unravel_index(np.argmax(s), s.shape))
    box = [cols.min() * pw, rows.min() * ph, (cols.max() + 1) * pw, (rows.max() + 1) * ph]
    if image_size is not None:
        box[2], box[3] = min(box[2], image_size[1]), min(box[3], image_size[0])
    return [float(v) for v in box]


def corloc_hit(box: Sequence[float], gt_boxes: ArrayLike, threshold: float = 0.5) -> bool:
    """CorLoc of one image: the box overlaps any ground-truth box with IoU >= 0.5 (LOST's IoU)."""
    return bool((box_iou_lost(box, gt_boxes) >= threshold).any())


def box_iou_inclusive(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of boxes ``[x1, y1, x2, y2]`` whose ends are inclusive pixel indices (+1 in every width
    and height), the ``calculate_IOU`` of the WSOL code TokenCut / TS-CAM report CUB with."""
    xa, ya = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    xb, yb = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    inter = max(0.0, xb - xa + 1) * max(0.0, yb - ya + 1)
    area_a = (box_a[2] - box_a[0] + 1) * (box_a[3] - box_a[1] + 1)
    area_b = (box_b[2] - box_b[0] + 1) * (box_b[3] - box_b[1] + 1)
    return float(inter / (area_a + area_b - inter))


class CUBLocMeter:
    """CUB-200-2011 weakly-supervised localization: top-1 classification, GT-known localization (the
    best IoU with a ground-truth box >= 0.5, class ignored) and top-1 localization (GT-known and the
    top-1 class correct), in percent."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.n = self.cls = self.gt_known = self.top1_loc = 0

    def update(self, box: Sequence[float], gt_boxes: ArrayLike, pred_class: int, label: int) -> None:
        gts = np.atleast_2d(_np(gt_boxes))
        hit = max(box_iou_inclusive(box, g) for g in gts) >= self.threshold
        correct = int(pred_class) == int(label)
        self.n += 1
        self.cls += correct
        self.gt_known += hit
        self.top1_loc += hit and correct

    def compute(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"top1_cls": 100 * self.cls / n, "gt_known_loc": 100 * self.gt_known / n,
                "top1_loc": 100 * self.top1_loc / n, "images": self.n}


def map_agreement(first: ArrayLike, second: ArrayLike, threshold: float = 0.5
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per image, how far two maps ``[B, ...]`` of the same images agree: ``(iou [B], spearman
    [B])``.

    ``iou``: the IoU of the foreground masks ``map > threshold`` (1.0 where both are empty: they
    agree that nothing is foreground). ``spearman``: Spearman's rank correlation of the two maps'
    values over the image's patches (``scipy.stats.spearmanr``, ties ranked by their mean), NaN where
    either map is constant (no ranking to compare).
    """
    a = _np(first).astype(np.float64)
    b = _np(second).astype(np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"map_agreement needs two maps [B, ...] of one shape, got {a.shape} and "
                         f"{b.shape}")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    fa, fb = a > threshold, b > threshold
    inter, union = (fa & fb).sum(1), (fa | fb).sum(1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    rho = np.full(a.shape[0], np.nan)
    for i in range(a.shape[0]):
        if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0:
            rho[i] = stats.spearmanr(a[i], b[i]).statistic
    return iou, rho
