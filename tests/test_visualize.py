"""Overlays and the grid figure."""
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
