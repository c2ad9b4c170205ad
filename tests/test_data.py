import os

import numpy as np
import pytest
import torch
from PIL import Image

from ice_prune.data import SHAPES, TEXTURES, SyntheticScenes, build_imagefolder, build_mixup


def test_items_are_deterministic_and_masks_cover_the_objects():
    ds = SyntheticScenes(num_classes=10, img_size=32, length=20, return_mask=True)
    again = SyntheticScenes(num_classes=10, img_size=32, length=20, return_mask=True)
    for i in range(5):
        x, y, m = ds[i]
        x2, y2, m2 = again[i]
        assert torch.equal(x, x2) and y == y2 and torch.equal(m, m2)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert m.shape == (32, 32) and m.dtype == torch.bool
        assert 0 < m.float().mean() < 0.9 and 0 <= y < 10
        assert ds.label(i) == y
    x, y = SyntheticScenes(img_size=32, length=3)[0]  # without masks: the usual pair
    assert isinstance(y, int)


def test_mask_is_exactly_where_the_object_was_painted():
    ds = SyntheticScenes(num_classes=3, img_size=64, length=4, distractors=(0, 0), photos=False)
    img, label, mask = ds.render(0)
    # re-render the same background alone by drawing no instances: compare pixel by pixel
    rng = ds._rng(0)
    rng.integers(ds.num_classes)
    H, W = ds.img_size
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    bg = np.clip(ds._background(rng, (ys + 0.5) / H, (xs + 0.5) / W), 0, 1)
    changed = np.abs(img - bg).max(-1) > 1e-6
    assert 0 < mask.mean() < 1
    assert not changed[~mask].any()  # nothing outside the mask was painted
    assert changed[mask].all()  # and every pixel in it was (random colours never match exactly)


def test_splits_never_share_an_image_and_any_size_works():
    tr = SyntheticScenes(img_size=(24, 40), length=30, split="train", photos=False)
    va = SyntheticScenes(img_size=(24, 40), length=30, split="val", photos=False)
    a = torch.stack([tr[i][0] for i in range(30)]).flatten(1)
    b = torch.stack([va[i][0] for i in range(30)]).flatten(1)
    assert a.shape[1] == 3 * 24 * 40
    assert torch.cdist(a, b).min() > 1e-3


def test_class_specs_are_unique_for_any_class_count():
    specs = [SyntheticScenes.class_spec(k) for k in range(3 * len(SHAPES) * len(TEXTURES))]
    assert len(set(specs)) == len(specs)


def _solid_textures(monkeypatch, seen=None):
    """Every texture paints the whole object in its "on" colour; ``seen`` collects the frequencies."""
    import ice_prune.data.synthetic as data

    def solid(u, v, f):
        if seen is not None:
            seen.append(f)
        return np.ones_like(u, dtype=bool)
    monkeypatch.setattr(data, "TEXTURES", {name: solid for name in TEXTURES})


@pytest.mark.parametrize("polarity", ["random", "fixed"])
def test_polarity_fixed_paints_the_on_phase_with_the_lighter_colour(monkeypatch, polarity):
    _solid_textures(monkeypatch)
    ds = SyntheticScenes(num_classes=4, img_size=32, length=40, instances=(1, 1), distractors=(0, 0),
                         photos=False, polarity=polarity)
    # one object per image in one flat colour c1 (the "on" colour); its complement is 1 - c1
    lighter = []
    for i in range(len(ds)):
        img, _, mask = ds.render(i)
        colour = img[mask].mean(0)
        assert np.allclose(img[mask], colour, atol=1e-6)
        lighter.append(colour.sum() >= (1 - colour).sum())
    if polarity == "fixed":
        assert all(lighter)
    else:  # a coin toss per object: both outcomes occur among 40 (seeded, so always the same)
        assert 5 < sum(lighter) < 35


def test_texture_scale_multiplies_the_frequency_and_keeps_the_scene(monkeypatch):
    base, finer = [], []
    _solid_textures(monkeypatch, base)
    a = SyntheticScenes(img_size=32, length=5, photos=False).render(3)
    _solid_textures(monkeypatch, finer)
    b = SyntheticScenes(img_size=32, length=5, photos=False, texture_scale=3.0).render(3)
    assert len(base) == len(finer) > 0
    np.testing.assert_allclose(np.array(finer), 3.0 * np.array(base), rtol=1e-12)
    # same random draws: the same label, mask and pixels (the solid texture hides the frequency)
    assert a[1] == b[1] and (a[2] == b[2]).all() and np.array_equal(a[0], b[0])


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes(split="test")
    with pytest.raises(ValueError, match="img_size"):
        SyntheticScenes(img_size=4)
    with pytest.raises(IndexError, match="index 2 out of range for 2 images"):
        SyntheticScenes(length=2)[2]
    with pytest.raises(ValueError, match="polarity"):
        SyntheticScenes(polarity="dark")
    with pytest.raises(ValueError, match="texture_scale"):
        SyntheticScenes(texture_scale=0)


def _folder(root, counts):
    for name, n in counts.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(root / name / f"{i}.png")


def test_imagefolder_with_timm_transforms(tmp_path):
    _folder(tmp_path, {"a": 2, "b": 1})
    ds = build_imagefolder(str(tmp_path), img_size=32, is_training=True)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and ds.classes == ["a", "b"]
    mix = build_mixup(2, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    _, t = mix(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert t.shape == (2, 2) and torch.allclose(t.sum(-1), torch.ones(2))
    _, t = build_mixup(2, mixup=0, cutmix=0, label_smoothing=0.1)(torch.randn(2, 3, 8, 8),
                                                                  torch.tensor([0, 1]))
    torch.testing.assert_close(t, torch.tensor([[0.95, 0.05], [0.05, 0.95]]))


def test_imagefolder_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_imagefolder(str(tmp_path / "missing"))
    _folder(tmp_path, {"a": 1, "empty": 0})
    with pytest.raises(FileNotFoundError, match="empty"):
        build_imagefolder(str(tmp_path), img_size=32)


def test_mapval_split_is_deterministic_and_disjoint_from_train_and_val():
    # the map-validation split (train/explain.py --map-val-images) never holds an evaluation image
    # ("val", what the reproduce report scores maps on) nor a training image, for the same arguments
    kw = dict(num_classes=10, img_size=32, length=40, seed=0, photos=False)
    mv = SyntheticScenes(split="mapval", return_mask=True, **kw)
    again = SyntheticScenes(split="mapval", return_mask=True, **kw)
    others = [SyntheticScenes(split=s, **kw) for s in ("train", "val")]
    seeds = {ds.item_seed(i) for ds in others for i in range(40)}
    assert not seeds & {mv.item_seed(i) for i in range(40)}
    assert mv.item_seed(3) == (0, SyntheticScenes.SPLITS["mapval"], 3)
    images = torch.stack([mv[i][0] for i in range(40)]).flatten(1)
    for ds in others:
        assert torch.cdist(images, torch.stack([ds[i][0] for i in range(40)]).flatten(1)).min() > 1e-3
    for i in range(5):
        x, y, m = mv[i]
        x2, y2, m2 = again[i]
        assert torch.equal(x, x2) and y == y2 and torch.equal(m, m2) and m.any()
    # the split numbers are distinct, so no two splits ever share a stream whatever the seeds
    assert len(set(SyntheticScenes.SPLITS.values())) == len(SyntheticScenes.SPLITS)
