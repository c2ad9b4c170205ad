"""The evaluation datasets in their published formats: ImageNet-Segmentation, VOC segmentation and
detection, CUB-200. Each returns images resized to ``image_size`` and normalized (ImageNet defaults,
as DeiT), with targets brought to the same size: label maps with nearest resampling, boxes scaled."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import h5py
import numpy as np
import torch
import torchvision
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF


def _image_tensor(img: Image.Image, image_size: int, mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    img = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return TF.normalize(TF.to_tensor(img), mean, std)


def _label_tensor(label: Image.Image, image_size: int) -> torch.Tensor:
    return torch.from_numpy(np.array(label.resize((image_size, image_size), Image.NEAREST))).long()


class ImageNetSegmentation(Dataset):
    """ImageNet-Segmentation (Guillaumin et al. 2014) from Chefer et al.'s ``gtsegs_ijcv.mat``: a
    MATLAB v7.3 (HDF5) file whose ``/value/img`` and ``/value/gt`` hold object references, ``[N, 1]``;
    an image reference points at a ``[3, W, H]`` uint8 array (column-major), a ``gt`` reference at a
    1x1 cell whose reference points at the ``[W, H]`` 0/1 mask. Returns ``(image, mask [S, S] long)``.
    """

    def __init__(self, path: str, image_size: int = 224, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: download gtsegs_ijcv.mat (ImageNet-Segmentation,"
                                    f" as linked from Chefer et al.'s Transformer-Explainability)")
        self.path, self.image_size, self.mean, self.std = path, image_size, mean, std
        with h5py.File(path, "r") as f:
            if "value" not in f or "img" not in f["value"] or "gt" not in f["value"]:
                raise ValueError(f"{path} has no /value/img and /value/gt: not gtsegs_ijcv.mat")
            self._len = len(f["/value/img"])
        self._file: Optional[h5py.File] = None  # opened lazily, once per DataLoader worker

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        f = self._file
        img = np.array(f[f["/value/img"][index, 0]]).transpose(2, 1, 0)
        gt = np.array(f[f[f["/value/gt"][index, 0]][0, 0]]).transpose(1, 0)
        image = _image_tensor(Image.fromarray(img), self.image_size, self.mean, self.std)
        return image, _label_tensor(Image.fromarray(gt.astype(np.uint8)), self.image_size)


class VOCSegmentationEval(Dataset):
    """PASCAL VOC segmentation (``root/VOCdevkit/VOC2012``, torchvision's layout and parser):
    ``(image, label [S, S] long)`` with the palette indices (0 background, 1-20 classes, 255 void),
    resized with nearest resampling as Naseer et al. do."""

    def __init__(self, root: str, image_set: str = "val", year: str = "2012", image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        self.voc = torchvision.datasets.VOCSegmentation(root, year=year, image_set=image_set)
        self.image_size, self.mean, self.std = image_size, mean, std

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int):
        img, label = self.voc[index]
        return (_image_tensor(img, self.image_size, self.mean, self.std),
                _label_tensor(label, self.image_size))


def voc_boxes(annotation: dict, remove_hards: bool = False) -> np.ndarray:
    """LOST's ``extract_gt_VOC``: boxes ``[x1, y1, x2, y2]`` from the parsed XML with the 1-based
    inclusive corners made 0-based exclusive (``xmin - 1``, ``ymin - 1``); ``remove_hards`` drops
    truncated or difficult objects."""
    boxes = []
    for obj in annotation["annotation"]["object"]:
        if remove_hards and (obj.get("truncated") == "1" or obj.get("difficult") == "1"):
            continue
        b = obj["bndbox"]
        boxes.append([int(b["xmin"]) - 1, int(b["ymin"]) - 1, int(b["xmax"]), int(b["ymax"])])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


class VOCDetectionEval(Dataset):
    """PASCAL VOC07/12 detection folders (``root/VOCdevkit/VOC2007`` or ``VOC2012``), the CorLoc set
    of LOST / TokenCut (``trainval``): ``(image, boxes [M, 4] float in the resized image's pixels)``."""

    def __init__(self, root: str, year: str = "2007", image_set: str = "trainval", image_size: int = 224,
                 remove_hards: bool = False, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        self.voc = torchvision.datasets.VOCDetection(root, year=year, image_set=image_set)
        self.image_size, self.remove_hards, self.mean, self.std = image_size, remove_hards, mean, std

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int):
        img, ann = self.voc[index]
        boxes = voc_boxes(ann, self.remove_hards)
        w, h = img.size
        boxes = boxes * np.array([self.image_size / w, self.image_size / h] * 2)
        return (_image_tensor(img, self.image_size, self.mean, self.std),
                torch.from_numpy(boxes).float())


class CUB200(Dataset):
    """CUB-200-2011 (``root`` holds ``images.txt``, ``image_class_labels.txt``,
    ``train_test_split.txt``, ``bounding_boxes.txt`` and ``images/``): ``(image, label, box)`` with the
    0-based class and the box ``[x, y, x + w, y + h]`` scaled to the resized image."""

    def __init__(self, root: str, split: str = "test", image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
            if not os.path.isfile(os.path.join(root, name)):
                raise FileNotFoundError(f"{os.path.join(root, name)} not found: root must be the "
                                        f"CUB_200_2011 folder")
        table = {name: self._read(os.path.join(root, name)) for name in
                 ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")}
        want = "1" if split == "train" else "0"
        self.root, self.image_size, self.mean, self.std = root, image_size, mean, std
        self.items = [(table["images.txt"][i][0], int(table["image_class_labels.txt"][i][0]) - 1,
                       [float(v) for v in table["bounding_boxes.txt"][i]])
                      for i, s in table["train_test_split.txt"].items() if s[0] == want]

    @staticmethod
    def _read(path: str) -> dict[str, list[str]]:
        with open(path) as f:
            return {parts[0]: parts[1:] for parts in (line.split() for line in f) if parts}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        rel, label, (x, y, w, h) = self.items[index]
        img = Image.open(os.path.join(self.root, "images", rel))
        sx, sy = self.image_size / img.size[0], self.image_size / img.size[1]
        box = torch.tensor([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
        return _image_tensor(img, self.image_size, self.mean, self.std), label, box
