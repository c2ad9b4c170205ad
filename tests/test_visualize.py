"""Overlays and the grid figure."""
from types import SimpleNamespace

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from ice_prune import visualize


def test_overlay_grey_colormap_by_hand():
    image = np.zeros((2, 2, 3), np.uint8)
    out = visualize.overlay(image, torch.tensor([[0.0, 1.0], [2.0, 3.0]]), cmap="gray", alpha=1.0)
    # min-max normalized 0, 1/3, 2/3, 1 -> grey levels 0, 85, 170, 255 on every channel
    np.testing.assert_allclose(out[..., 0], [[0, 85], [170, 255]], atol=1)
    assert (out[..., 0] == out[..., 2]).all()
    half = visualize.overlay(np.full((2, 2, 3), 100, np.uint8), np.zeros((2, 2)), cmap="gray", alpha=0.5)
    assert (half == 50).all()           # constant map -> zeros, blended half-and-half


def test_overlay_resizes_the_map_to_the_image():
    out = visualize.overlay(torch.zeros(3, 8, 8), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), cmap="gray", alpha=1.0)
    assert out.shape == (8, 8, 3)
    assert out[0, 0, 0] == 0 and out[0, 7, 0] == 255 and out[0, 3, 0] < out[0, 4, 0]
    with pytest.raises(ValueError, match="one map"):
        visualize.overlay(np.zeros((2, 2, 3)), np.zeros((1, 2, 2)))


def test_mask_overlay():
    image = np.full((4, 4, 3), 100, np.uint8)
    out = visualize.mask_overlay(image, np.array([[1, 0], [0, 0]], bool), color=(200, 0, 0), alpha=0.5)
    assert (out[:2, :2] == [150, 50, 50]).all()        # the top-left patch, nearest-resized
    assert (out[2:] == 100).all() and (out[:2, 2:] == 100).all()


def test_save_grid(tmp_path):
    cell = np.zeros((8, 8, 3), np.uint8)
    rows = [{"image": cell, "ICE": cell + 255}, {"image": cell, "ICE": cell}]
    path = tmp_path / "grid.png"
    visualize.save_grid(rows, str(path), cell_inches=1.0)
    png = mpimg.imread(path)
    assert png.shape[:2] == (200, 200)                  # 2 x 2 cells of 1 inch at 100 dpi
    assert png[..., :3].max() == 1.0 and png[..., :3].min() == 0.0
    with pytest.raises(ValueError, match="columns"):
        visualize.save_grid([{"a": cell}, {"b": cell}], str(path))


def test_overlay_with_a_fixed_range():
    image = np.zeros((2, 2, 3), np.uint8)
    out = visualize.overlay(image, np.array([[0.5, 1.0], [0.75, 2.0]]), cmap="gray", alpha=1.0,
                            vrange=(0.0, 1.0))
    np.testing.assert_allclose(out[..., 0], [[128, 255], [191, 255]], atol=1)  # 2.0 clipped to 1
    constant = visualize.overlay(image, np.full((2, 2), 0.25), cmap="gray", alpha=1.0,
                                 vrange=(0.0, 1.0))
    assert (constant == 64).all()  # not normalized away as a constant map


def tiny_trace(mask):
    """A trace of 16 x 16 images of 8 x 8 patches whose last selection point kept ``mask [B, 4]``."""
    return {"grid": (2, 2), "patch_size": (8, 8), "num_prefix": 1,
            "locations": [{"mask": torch.tensor(mask)}]}


def test_pruned_forward_row_by_hand():
    image = np.full((16, 16, 3), 40, np.uint8)
    image[..., 0] = 120  # luminance (120 + 40 + 40) / 3
    foreground = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.25, 0.75]])
    explanation = SimpleNamespace(foreground=foreground, grid=(2, 2))  # what model.ice_explanation has
    trace = tiny_trace([[True, True, True, True], [True, False, True, True]])
    row = visualize.pruned_forward_row(image, explanation, trace, index=1, cmap="gray", alpha=1.0)
    assert list(row) == ["image", "map", "kept"]
    assert all(v.shape == (16, 16, 3) and v.dtype == np.uint8 for v in row.values())
    assert (row["image"] == image).all()
    # the map over the image, 0 to 1 on the colormap: each corner pixel is its patch's value
    corners = [row["map"][y, x, 0] for y, x in ((0, 0), (0, 15), (15, 0), (15, 15))]
    np.testing.assert_allclose(corners, [255, 0, 64, 191], atol=1)  # the colormap's 256 levels
    # patch (0, 1) was dropped: greyed, a quarter of its luminance showing; the others as they are
    greyed = round(0.25 * 200 / 3 + 0.75 * 200)
    assert (row["kept"][:8, 8:] == greyed).all()
    kept = np.ones((16, 16), bool)
    kept[:8, 8:] = False
    assert (row["kept"][kept] == image[kept]).all()


def test_pruned_forward_rows_run_one_forward_with_trace_and_explain():
    import timm

    import ice_prune

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                              num_classes=3, pretrained=False)
    ice_prune.patch(model, keep_rate=0.5, method="ice", locs=(1, 2))
    with torch.no_grad():
        model.ice_head.fc.weight.normal_()
    model.train()
    images = torch.rand(2, 3, 32, 32)
    rows = visualize.pruned_forward_rows(model, images)
    assert len(rows) == 2 and list(rows[0]) == ["image", "map", "kept"]
    assert not model.explain and not model.trace and model.training  # restored
    model.eval()
    model.explain = model.trace = True
    with torch.no_grad():
        model(images)
    for i, row in enumerate(rows):
        want = visualize.pruned_forward_row(images[i], model.ice_explanation, model.ice_trace, index=i)
        assert all((row[k] == want[k]).all() for k in row)
    # the patches not standing as their own tokens after the last point are greyed, the others not
    greyed = (rows[0]["kept"] != visualize.to_uint8_image(images[0])).any(-1)
    kept = model.ice_trace["locations"][-1]["mask"][0].reshape(4, 4).numpy()
    assert (greyed.reshape(4, 8, 4, 8).any(axis=(1, 3)) == ~kept).all() and kept.sum() in (4, 5)
