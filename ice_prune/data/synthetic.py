"""SyntheticScenes: a seeded, on-the-fly dataset of images with a class label and a ground-truth
foreground mask, for tests and for measuring explanation maps without real data."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import Dataset


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

    Deterministic: item ``i`` of split ``s`` with seed ``seed`` is always the same image, drawn from
    the random stream seeded with :meth:`item_seed` ``(seed, SPLITS[s], i)``. The splits draw from
    disjoint streams (they never share an image, whatever the seeds): ``"train"`` for training,
    ``"val"`` for validation and the evaluation of maps (the reproduce report's images), and
    ``"mapval"`` for scoring maps while choosing a training budget (``train/explain.py
    --map-val-images``), so that choice never sees the evaluation images.

    ``dataset[i]`` returns ``(image, label)``, or ``(image, label, mask)`` when ``return_mask=True``;
    :meth:`sample` always returns the triple. ``image`` is a float tensor ``[3, H, W]`` (normalized
    with ``mean``/``std``, then ``transform`` if given, which must not move pixels since the mask does
    not follow it), ``label`` an int, ``mask`` a bool tensor ``[H, W]``, True on the objects.
    """

    #: split -> the second entry of every item's seed: a new split takes a new number
    SPLITS = {"train": 0, "val": 1, "mapval": 2}

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

    def item_seed(self, index: int) -> tuple[int, int, int]:
        """``(seed, split number, index)``: the entropy of item ``index``'s random stream (numpy's
        ``SeedSequence``); items of different splits differ in the second entry."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        return (self.seed, self.SPLITS[self.split], index)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(list(self.item_seed(index)))

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
