"""A few masks for PM-style training (train/pm.py): which images keep a mask, and the dataset that
gives each image its label and patch mask."""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ice_prune.data.synthetic import SyntheticScenes


class MaskedTarget(NamedTuple):
    """An image's target in PM-style training: ``label`` (class index), ``patch_mask [gh, gw]``
    (each patch's foreground fraction in [0, 1]; zeros where there is no mask or the training step
    makes it, as for pseudo masks) and ``has_mask`` (whether the image carries a mask).

    A named tuple, so DataLoader's collate batches it field by field (``[B]``, ``[B, gh, gw]``,
    ``[B]``), and with :meth:`to`, so the training loop moves it to the device as it moves a label
    tensor."""

    label: Tensor
    patch_mask: Tensor
    has_mask: Tensor

    def to(self, *args, **kwargs) -> "MaskedTarget":
        return MaskedTarget(*(t.to(*args, **kwargs) for t in self))


def mask_selection(length: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The sorted indices of the images that keep their mask: ``floor(fraction * length + 1/2)`` of
    ``length`` images, drawn without replacement by a generator seeded with ``seed`` alone, so the
    same arguments always choose the same images (in every process of a distributed run)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the mask fraction must be in [0, 1], got {fraction}")
    count = math.floor(fraction * length + 0.5)
    if fraction > 0 and count == 0:
        raise ValueError(f"a mask fraction of {fraction:g} of {length} training images keeps no mask "
                         f"(it rounds to 0 images): give a fraction of at least "
                         f"{0.5 / length:.2g}, or 0 to train without masks")
    return np.sort(np.random.default_rng(seed).permutation(length)[:count])


def _foreground(mask) -> Tensor:
    """A mask as a float 0/1 tensor: True, or a non-zero label other than VOC's void 255."""
    m = torch.as_tensor(mask)
    return (m if m.dtype == torch.bool else (m > 0) & (m != 255)).float()


def has_masks(dataset: Dataset) -> bool:
    """Whether ``dataset`` gives masks: SyntheticScenes, or items ``(image, label, mask)``."""
    if isinstance(dataset, SyntheticScenes):
        return True
    return len(dataset) > 0 and len(dataset[0]) >= 3


class PartialMasks(Dataset):
    """``dataset`` with a mask on a few images, for PM-style training: item ``i`` is ``(image,
    MaskedTarget(label, patch_mask, has_mask))``, ``has_mask`` True for the indices in ``masked``.

    ``grid``: the model's patch grid ``(gh, gw)``; a mask becomes each patch's foreground fraction
    (its mean over the patch, ``adaptive_avg_pool2d``). With ``dataset_masks=True`` the masks are
    the dataset's: a SyntheticScenes' (read whatever its ``return_mask`` says) or the last field of
    items ``(image, label, mask)``; a dataset without masks is an error as soon as one image should
    carry one. With ``dataset_masks=False`` the masked images' ``patch_mask`` is zeros: the training
    step makes their masks (ICE pseudo masks, :class:`ice_prune.training.tasks.ICEPseudoMasks`) and never
    reads the dataset's, so no ground-truth mask is touched.
    """

    def __init__(self, dataset: Dataset, grid: Sequence[int], masked: Sequence[int] = (),
                 dataset_masks: bool = True) -> None:
        self.dataset, self.grid = dataset, tuple(int(g) for g in grid)
        self.dataset_masks = dataset_masks
        self.masked = frozenset(int(i) for i in masked)
        bad = [i for i in self.masked if not 0 <= i < len(dataset)]
        if bad:
            raise IndexError(f"masked indices {sorted(bad)[:5]} are outside the {len(dataset)} images")
        if dataset_masks and self.masked and not has_masks(dataset):
            raise ValueError(f"{type(dataset).__name__} gives no masks (its items are (image, label)), "
                             f"and {len(self.masked)} of its images should carry one: PM-style "
                             f"training with a mask fraction above 0 needs a dataset with masks "
                             f"(--data synthetic) or pseudo masks (--pseudo-masks ice:CHECKPOINT)")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        has_mask = index in self.masked
        mask = torch.zeros(self.grid)
        if has_mask and self.dataset_masks:
            item = (self.dataset.sample(index) if isinstance(self.dataset, SyntheticScenes)
                    else self.dataset[index])
            if len(item) < 3:
                raise ValueError(f"item {index} of {type(self.dataset).__name__} has no mask")
            image, label = item[0], item[1]
            mask = torch.nn.functional.adaptive_avg_pool2d(_foreground(item[-1])[None], self.grid)[0]
        else:
            item = self.dataset[index]
            image, label = item[0], item[1]
        return image, MaskedTarget(torch.as_tensor(label, dtype=torch.long), mask,
                                   torch.tensor(has_mask))
