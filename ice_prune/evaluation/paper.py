"""The published figures of the ICE paper (CVPR 2023; DeiT-S on ImageNet and its evaluation sets),
printed beside ours by the reproduction report (``train/repro``) and the throughput benchmark
(``bench/throughput.py``). Each table maps a method to its row; rows are named tuples, so they
index like the paper's columns and serialize to JSON as lists.
"""
from __future__ import annotations

from typing import NamedTuple


class Segmentation(NamedTuple):
    """A Table 1 cell pair, ImageNet-Segmentation (Chefer et al.'s protocol), in percent."""

    pixel_accuracy: float
    miou: float


class Ablation(NamedTuple):
    """A Table 6 row: ImageNet-Segmentation pixel accuracy and mIoU, VOC12 Jaccard, in percent."""

    pixel_accuracy: float
    miou: float
    jaccard: float


class Efficiency(NamedTuple):
    """A Table 5 row: top-1 (%), parameters (M), throughput (img/s) and GMACs per image."""

    top1: float
    params_m: float
    img_per_s: float
    gmacs: float


# Table 1, DeiT-S row
TABLE1: dict[str, Segmentation] = {
    "gradcam": Segmentation(64.33, 41.54), "rollout": Segmentation(66.84, 47.85),
    "partial-lrp": Segmentation(65.76, 43.37), "generic": Segmentation(79.30, 60.60),
    "robustvit": Segmentation(80.80, 64.00), "ice-f": Segmentation(81.09, 62.12),
    "ice": Segmentation(84.85, 67.94),
}

# Table 3, Jaccard on PASCAL VOC12 val: raw attention by threshold on the cumulative mass and by
# output (the head-mean row, or the best head)
TABLE3: dict[str, float] = {
    "raw-attention mean@0.9": 23.17, "raw-attention mean@0.8": 17.22,
    "raw-attention best-head@0.9": 21.80, "raw-attention best-head@0.8": 15.90,
    "ice-f": 34.85, "ice": 41.32,
}

# Table 5: all models from a pretrained DeiT-S, 30 epochs; throughput on one machine (two RTX 3090s)
# at the maximum batch size. The paper gives no GMACs: these are DeiT's (4.6) and EViT's README
# figures at keep rates 0.7 and 0.5 (3.0, 2.3). Keys: method-keep rate ("none-1.0": the unpruned DeiT-S)
TABLE5: dict[str, Efficiency] = {
    "none-1.0": Efficiency(79.8, 22.1, 818, 4.6),
    "evit-0.7": Efficiency(79.27, 22.1, 1291, 3.0), "ice-0.7": Efficiency(79.34, 22.4, 1178, 3.0),
    "evit-0.5": Efficiency(78.39, 22.1, 1701, 2.3), "ice-0.5": Efficiency(78.49, 22.4, 1547, 2.3),
}
TABLE5_KEEP_RATES = (0.7, 0.5)
TABLE5_SOURCE = ("ICE (CVPR 2023) Table 5, RTX 3090 at the maximum batch size; GMACs from DeiT and "
                 "EViT's README")

# Table 6, the ablation of the background scale alpha and the class weight lambda
TABLE6: dict[str, Ablation] = {
    "ice": Ablation(84.85, 67.94, 41.32), "ice-alpha1": Ablation(63.45, 45.36, 22.98),
    "ice-lambda0.5": Ablation(79.53, 57.59, 29.14),
    "ice-alpha1-lambda0.5": Ablation(66.26, 47.70, 23.87),
}

TABLES = {"table1": TABLE1, "table3": TABLE3, "table5": TABLE5, "table6": TABLE6}
