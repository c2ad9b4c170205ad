"""Datasets for training and evaluating ICE.

* :class:`SyntheticScenes`: a seeded, on-the-fly dataset of images with a class label and a
  ground-truth foreground mask, for tests and for measuring explanation maps without real data.
* :func:`build_imagefolder` / :func:`build_mixup`: an ``ImageFolder`` tree (ImageNet layout) with
  timm's transforms in the DeiT recipe (RandAugment, random erasing; mixup/cutmix on the batch).
* :class:`ImageNetSegmentation`, :class:`VOCSegmentationEval`, :class:`VOCDetectionEval`,
  :class:`CUB200`: the evaluation datasets in their published formats. Each returns images resized
  to ``image_size`` and normalized (ImageNet defaults as DeiT), with targets brought to the same size:
  label maps with nearest resampling, boxes scaled.
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple, Optional, Sequence, Union

import h5py
import numpy as np
import torch
import torchvision
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF


# Object shapes: indicator functions of local coordinates (u, v) in [-1, 1], before rotation/scale.
def _polar(u, v):
    return np.hypot(u, v), np.arctan2(v, u)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disk": lambda u, v: u * u + v * v < 0.9,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) < 0.75,
    "triangle": lambda u, v: (v < 0.5) & (math.sqrt(3) * u - v < 1.0) & (-math.sqrt(3) * u - v < 1.0),
    "star": lambda u, v: _polar(u, v)[0] < 0.55 + 0.4 * np.cos(5 * _polar(u, v)[1]),
    "cross": lambda u, v: ((abs(u) < 0.3) & (abs(v) < 0.95)) | ((abs(v) < 0.3) & (abs(u) < 0.95)),
    "ring": lambda u, v: (np.hypot(u, v) > 0.5) & (np.hypot(u, v) < 0.95),
    "diamond": lambda u, v: abs(u) + abs(v) < 0.95,
    "hexagon": lambda u, v: np.maximum.reduce(
        [abs(u * math.cos(a) + v * math.sin(a)) for a in (0, math.pi / 3, 2 * math.pi / 3)]) < 0.8,
    "crescent": lambda u, v: (u * u + v * v < 0.9) & ((u - 0.45) ** 2 + v * v > 0.55),
    "flower": lambda u, v: _polar(u, v)[0] < 0.6 + 0.3 * np.cos(8 * _polar(u, v)[1]),
}

# Object textures, in the object's own (rotated) coordinates: a pattern in {0, 1} that picks one of
# the instance's two colours. ``f`` is the spatial frequency.
TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "stripes": lambda u, v, f: np.sin(f * u) > 0,
    "checker": lambda u, v, f: np.sin(f * u) * np.sin(f * v) > 0,
    "dots": lambda u, v, f: np.cos(f * u) * np.cos(f * v) > 0.35,
    "rings": lambda u, v, f: np.sin(f * np.hypot(u, v)) > 0,
}

_PHOTOS: Optional[list[np.ndarray]] = None


def sample_photos() -> list[np.ndarray]:
    """The sample photographs scikit-image ships (float RGB in [0, 1]); empty without scikit-image."""
    global _PHOTOS
    if _PHOTOS is None:
        try:
            import skimage.data as skd
        except ImportError:
            _PHOTOS = []
        else:
            out = []
            for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                         "hubble_deep_field", "camera"):
                img = np.asarray(getattr(skd, name)(), dtype=np.float32) / 255.0
                if img.ndim == 2:
                    img = np.repeat(img[..., None], 3, axis=-1)
                out.append(img[..., :3])
            _PHOTOS = out
    return _PHOTOS


class SyntheticScenes(Dataset):
    """Images of C object classes on cluttered backgrounds, with exact foreground masks.

    Classes differ only in the object: class ``k`` is the shape family ``SHAPES[k % 10]`` with the
    texture ``TEXTURES[(k + k // 10) % 4]`` (unique for up to 40 classes; beyond that the texture
    frequency changes with ``k // 40``). Colours are random per instance and never tell the class.
    Each image holds ``instances`` objects of its class at random scale, position and rotation, on a
    background of smooth noise, stripes or crops of scikit-image's sample photos (when installed),
    with ``distractors`` class-agnostic irregular polygons in noise colours underneath the objects.

    ``polarity``: an object's two colours are a random colour and its complement. With ``"random"``
    (the default) either one paints the texture's "on" phase, so the texture's sign in any pixel
    channel is a coin toss and no linear function of a patch tells the class: a CNN (ReLU after
    convolution) copes, a ViT from scratch sits at chance for thousands of updates because its patch
    embedding is linear. ``"fixed"`` paints the "on" phase with the lighter of the two (as in natural
    images, where an object's light and dark parts keep their places): colour still says nothing
    about the class, but a ViT can start from first-order patch features. ``texture_scale``
    multiplies every texture's frequency: at the default a stripe is about half an object's radius
    wide, wider than a patch of a small ViT, so only the shape over several patches tells the class;
    finer textures put class evidence into each foreground patch, as in natural images.

    Deterministic: item ``i`` of split ``s`` with seed ``seed`` is always the same image, and the
    ``"train"`` and ``"val"`` splits draw from disjoint random streams (they never share an image).

    ``dataset[i]`` returns ``(image, label)``, or ``(image, label, mask)`` when ``return_mask=True``;
    :meth:`sample` always returns the triple. ``image`` is a float tensor ``[3, H, W]`` (normalized
    with ``mean``/``std``, then ``transform`` if given, which must not move pixels since the mask does
    not follow it), ``label`` an int, ``mask`` a bool tensor ``[H, W]``, True on the objects.
    """

    SPLITS = {"train": 0, "val": 1}

    def __init__(self, num_classes: int = 10, img_size: Union[int, Sequence[int]] = 224,
                 length: int = 1000, split: str = "train", seed: int = 0,
                 instances: tuple[int, int] = (1, 3), scale: tuple[float, float] = (0.18, 0.4),
                 distractors: tuple[int, int] = (1, 4), photos: bool = True,
                 polarity: str = "random", texture_scale: float = 1.0,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 transform: Optional[Callable[[Tensor], Tensor]] = None,
                 return_mask: bool = False) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {sorted(self.SPLITS)}, got {split!r}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"img_size must be an int or (H, W), each >= 8, got {img_size!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if not (1 <= instances[0] <= instances[1]):
            raise ValueError(f"instances must be (min, max) with 1 <= min <= max, got {instances}")
        if polarity not in ("random", "fixed"):
            raise ValueError(f"polarity must be 'random' or 'fixed', got {polarity!r}")
        if not texture_scale > 0:
            raise ValueError(f"texture_scale must be > 0, got {texture_scale}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must be (min, max) within (0, 1], got {scale}")
        self.num_classes = num_classes
        self.img_size = size
        self.length = length
        self.split = split
        self.seed = seed
        self.instances = instances
        self.scale = scale
        self.distractors = distractors
        self.polarity = polarity
        self.texture_scale = texture_scale
        self.photos = sample_photos() if photos else []
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.transform = transform
        self.return_mask = return_mask
        self.classes = [self.class_name(k) for k in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def class_spec(k: int) -> tuple[str, str, float]:
        """``(shape, texture, frequency)`` of class ``k``."""
        shapes, textures = list(SHAPES), list(TEXTURES)
        shape = shapes[k % len(shapes)]
        texture = textures[(k + k // len(shapes)) % len(textures)]
        freq = 6.0 * (1.0 + 0.5 * (k // (len(shapes) * len(textures))))
        return shape, texture, freq

    def class_name(self, k: int) -> str:
        shape, texture, freq = self.class_spec(k)
        return f"{texture}_{shape}" + ("" if freq == 6.0 else f"_f{freq:g}")

    def label(self, index: int) -> int:
        return int(self._rng(index).integers(self.num_classes))

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        return np.random.default_rng([self.seed, self.SPLITS[self.split], index])

    def render(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """``(image float32 [H, W, 3] in [0, 1], label, mask bool [H, W])`` of item ``index``."""
        rng = self._rng(index)
        label = int(rng.integers(self.num_classes))  # first draw: the same as label()
        H, W = self.img_size
        ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
        ys, xs = (ys + 0.5) / H, (xs + 0.5) / W
        img = self._background(rng, ys, xs)
        side = min(H, W) / max(H, W)
        for _ in range(rng.integers(self.distractors[0], self.distractors[1] + 1)):
            u, v, r = self._frame(rng, ys, xs, side)
            region = self._irregular_polygon(rng, u, v)
            img[region] = self._noise_colour(rng, region.sum())
        mask = np.zeros((H, W), dtype=bool)
        shape, texture, freq = self.class_spec(label)
        for _ in range(rng.integers(self.instances[0], self.instances[1] + 1)):
            u, v, r = self._frame(rng, ys, xs, side)
            region = SHAPES[shape](u, v)
            pattern = TEXTURES[texture](u, v, self.texture_scale * freq * (1.0 + 0.3 * rng.random()))
            c1 = rng.random(3).astype(np.float32)
            c2 = 1.0 - c1  # the complement: the texture stays visible whatever the colour
            if self.polarity == "fixed" and c1.sum() < c2.sum():
                c1, c2 = c2, c1  # the pattern's "on" phase is always the lighter colour
            colour = np.where(pattern[..., None], c1, c2)
            img[region] = colour[region]
            mask |= region
        return np.clip(img, 0.0, 1.0), label, mask

    def _frame(self, rng, ys, xs, side):
        """Local coordinates of a randomly placed, scaled and rotated object."""
        r = rng.uniform(*self.scale) * 0.5
        cy, cx = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
        a = rng.uniform(0, 2 * math.pi)
        H, W = ys.shape
        # isotropic in pixels: the shorter side is the unit of length
        dy, dx = (ys - cy) * (H / min(H, W)), (xs - cx) * (W / min(H, W))
        u = (math.cos(a) * dx + math.sin(a) * dy) / r
        v = (-math.sin(a) * dx + math.cos(a) * dy) / r
        return u, v, r

    @staticmethod
    def _irregular_polygon(rng, u, v):
        k = int(rng.integers(4, 9))
        radii = rng.uniform(0.4, 1.0, size=k)
        theta = np.arctan2(v, u) % (2 * math.pi)
        pos = theta / (2 * math.pi) * k
        i = np.floor(pos).astype(int) % k
        t = pos - np.floor(pos)
        return np.hypot(u, v) < (1 - t) * radii[i] + t * radii[(i + 1) % k]

    @staticmethod
    def _noise_colour(rng, n):
        base = rng.random(3).astype(np.float32)
        return np.clip(base + 0.15 * rng.standard_normal((n, 3)).astype(np.float32), 0, 1)

    def _background(self, rng, ys, xs):
        H, W = ys.shape
        kinds = ["noise", "stripes"] + (["photo"] if self.photos else [])
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "noise":
            g = int(rng.integers(3, 9))
            low = torch.from_numpy(rng.random((1, 3, g, g)).astype(np.float32))
            img = torch.nn.functional.interpolate(low, size=(H, W), mode="bicubic",
                                                  align_corners=False)[0].permute(1, 2, 0).numpy()
            img = img + 0.08 * rng.standard_normal((H, W, 3)).astype(np.float32)
        elif kind == "stripes":
            a, f = rng.uniform(0, math.pi), rng.uniform(8, 30)
            wave = 0.5 + 0.5 * np.sin(f * (math.cos(a) * xs + math.sin(a) * ys))
            c1, c2 = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
            img = wave[..., None] * c1 + (1 - wave[..., None]) * c2
        else:
            photo = self.photos[int(rng.integers(len(self.photos)))]
            ph, pw = photo.shape[:2]
            ch = int(rng.uniform(0.3, 1.0) * min(ph, pw))
            cw = min(pw, max(1, round(ch * W / H)))
            y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
            crop = Image.fromarray((photo[y0:y0 + ch, x0:x0 + cw] * 255).astype(np.uint8))
            img = np.asarray(crop.resize((W, H), Image.BILINEAR), dtype=np.float32) / 255.0
        return np.ascontiguousarray(img, dtype=np.float32)

    def sample(self, index: int) -> tuple[Tensor, int, Tensor]:
        """``(image [3, H, W], label, mask [H, W] bool)`` whatever ``return_mask`` says."""
        img, label, mask = self.render(index)
        x = (torch.from_numpy(img).permute(2, 0, 1) - self.mean) / self.std
        if self.transform is not None:
            x = self.transform(x)
        return x, label, torch.from_numpy(mask)

    def __getitem__(self, index: int):
        x, label, mask = self.sample(index)
        return (x, label, mask) if self.return_mask else (x, label)


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


# ---------------------------------------------------------------------------------------------
# a few masks for PM-style training (train/pm.py)


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
    step makes their masks (ICE pseudo masks, :class:`ice_prune.tasks.ICEPseudoMasks`) and never
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
