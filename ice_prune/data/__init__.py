"""Datasets of the training and evaluation harness.

* :mod:`~ice_prune.data.synthetic`: :class:`SyntheticScenes`, images with a class label and a
  ground-truth foreground mask, generated on the fly (no download).
* :mod:`~ice_prune.data.imagefolder`: an ImageNet-layout folder with timm's DeiT transforms, mixup.
* :mod:`~ice_prune.data.evalsets`: ImageNet-Segmentation, VOC and CUB-200 in their published formats.
* :mod:`~ice_prune.data.masks`: a few masks for PM-style training.
"""
from ice_prune.data.evalsets import CUB200, ImageNetSegmentation, VOCDetectionEval, VOCSegmentationEval, voc_boxes
from ice_prune.data.imagefolder import build_imagefolder, build_mixup
from ice_prune.data.masks import MaskedTarget, PartialMasks, has_masks, mask_selection
from ice_prune.data.synthetic import SHAPES, TEXTURES, SyntheticScenes, sample_photos

__all__ = ["CUB200", "ImageNetSegmentation", "MaskedTarget", "PartialMasks", "SHAPES", "SyntheticScenes",
           "TEXTURES", "VOCDetectionEval", "VOCSegmentationEval", "build_imagefolder", "build_mixup",
           "has_masks", "mask_selection", "sample_photos", "voc_boxes"]
