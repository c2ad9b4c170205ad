"""Training data in the DeiT recipe: an ``ImageFolder`` tree (ImageNet layout) with timm's transforms
(RandAugment, random erasing) and mixup / cutmix on the batch."""
from __future__ import annotations

import os
from typing import Optional


def build_imagefolder(root: str, img_size: int = 224, is_training: bool = True,
                      auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.3,
                      re_prob: float = 0.25, re_mode: str = "pixel", re_count: int = 1,
                      interpolation: str = "bicubic", crop_pct: float = 0.875):
    """``torchvision.datasets.ImageFolder(root)`` with timm's DeiT transforms (training: RandAugment
    rand-m9-mstd0.5-inc1, colour jitter 0.3, bicubic random-resized crop, random erasing 0.25;
    evaluation: resize to ``img_size / crop_pct`` and centre crop)."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"data path {root!r} is not a directory; give an ImageFolder tree (root/<class>/<image>), "
            f"e.g. imagenet/train")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root!r} has no class folders; expected root/<class>/<image>")
    transform = create_transform(
        img_size, is_training=is_training, auto_augment=auto_augment if is_training else None,
        color_jitter=color_jitter if is_training else None, re_prob=re_prob if is_training else 0.0,
        re_mode=re_mode, re_count=re_count, interpolation=interpolation, crop_pct=crop_pct)
    try:
        return ImageFolder(root, transform=transform)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e} (under {root!r}); every class folder needs at least one image, remove empty "
            f"class folders or fill them") from None


def build_mixup(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0,
                switch_prob: float = 0.5, label_smoothing: float = 0.1):
    """timm ``Mixup`` with the DeiT settings, or ``None`` when mixup, cutmix and smoothing are all 0.
    It returns soft targets ``[B, C]``, which the ICE loss takes as they are."""
    from timm.data import Mixup

    if mixup <= 0 and cutmix <= 0 and label_smoothing <= 0:
        return None
    if mixup <= 0 and cutmix <= 0:  # label smoothing alone: timm's Mixup with mixing switched off
        mixup, prob = 1.0, 0.0
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob,
                 mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)
