"""Pictures: EViT's masked-image figure from ``model.ice_trace``, map overlays and the explanation grid."""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

ImageLike = Union[torch.Tensor, np.ndarray]


def to_uint8_image(image: ImageLike) -> np.ndarray:
    """``[3, H, W]`` / ``[H, W, 3]`` tensor or array, float or uint8, to an ``[H, W, 3]`` uint8 array.

    Floats already in [0, 1] are kept; anything else (a normalized input) is min-max rescaled.
    """
    a = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim != 3:
        raise ValueError(f"expected one image [3, H, W] or [H, W, 3], got shape {a.shape}")
    if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    if a.min() < 0 or a.max() > 1:
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    return (a * 255).round().astype(np.uint8)


def kept_patches(image: ImageLike, trace: dict, location: int = -1, index: int = 0,
                 grey: int = 200, keep_detail: float = 0.25) -> np.ndarray:
    """``image`` with the patches dropped by selection point ``location`` greyed out.

    Args:
        image: the model's input image (one image, any of the layouts :func:`to_uint8_image` takes).
        trace: ``model.ice_trace`` from a forward with ``trace=True``.
        location: which selection point (index into ``trace["locations"]``, -1 = the last).
        index: which image of the traced batch.
        grey: grey level of dropped patches; ``keep_detail`` of the original luminance shows through.

    Returns an ``[H, W, 3]`` uint8 array (``matplotlib.pyplot.imsave`` or PIL write it as PNG).
    A patch counts as kept while it stands as its own token; fused patches are greyed.
    """
    if not trace or not trace.get("locations"):
        raise ValueError("the trace holds no selection: run the patched model with model.trace = "
                         "True and a keep_rate below 1, then pass model.ice_trace")
    img = to_uint8_image(image)
    gh, gw = trace["grid"]
    ph, pw = trace["patch_size"]
    if img.shape[0] < gh * ph or img.shape[1] < gw * pw:
        raise ValueError(f"image {img.shape[:2]} is smaller than the traced patch grid "
                         f"{gh}x{gw} of {ph}x{pw} patches: pass the image the model saw")
    mask = trace["locations"][location]["mask"][index].cpu().numpy().reshape(gh, gw)
    pixel_mask = np.ones(img.shape[:2], dtype=bool)  # border pixels outside the grid count as kept
    pixel_mask[: gh * ph, : gw * pw] = np.kron(mask, np.ones((ph, pw), dtype=bool))
    lum = img.astype(np.float64).mean(axis=-1, keepdims=True)
    greyed = (keep_detail * lum + (1 - keep_detail) * grey).round().astype(np.uint8)
    return np.where(pixel_mask[..., None], img, np.broadcast_to(greyed, img.shape))


def _resize_map(values: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))[None, None]
    mode = {"mode": "nearest"} if nearest else {"mode": "bilinear", "align_corners": False}
    return torch.nn.functional.interpolate(t, size=size, **mode)[0, 0].numpy()


def overlay(image: ImageLike, saliency: ImageLike, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """``image`` blended with ``saliency`` (``[h, w]``, any range; min-max normalized, a constant map
    shows as zeros) coloured by a matplotlib colormap; the map is resized bilinearly to the image.
    Returns ``[H, W, 3]`` uint8."""
    import matplotlib

    img = to_uint8_image(image)
    s = saliency.detach().cpu().float().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    if s.ndim != 2:
        raise ValueError(f"saliency must be one map [h, w], got shape {s.shape}")
    s = _resize_map(s, img.shape[:2], nearest=False).astype(np.float64)
    span = s.max() - s.min()
    s = (s - s.min()) / span if span > 0 else np.zeros_like(s)
    heat = matplotlib.colormaps[cmap](s)[..., :3] * 255
    return ((1 - alpha) * img + alpha * heat).round().clip(0, 255).astype(np.uint8)


def mask_overlay(image: ImageLike, mask: ImageLike, color: tuple[int, int, int] = (255, 0, 0),
                 alpha: float = 0.5) -> np.ndarray:
    """``image`` with the pixels of a boolean ``mask`` (``[h, w]``, resized nearest to the image)
    tinted ``color``. Returns ``[H, W, 3]`` uint8."""
    img = to_uint8_image(image)
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be one mask [h, w], got shape {m.shape}")
    m = _resize_map(m.astype(np.float32), img.shape[:2], nearest=True) > 0.5
    tinted = ((1 - alpha) * img + alpha * np.asarray(color, dtype=np.float64)).round().astype(np.uint8)
    return np.where(m[..., None], tinted, img)


def save_grid(rows: list[dict[str, np.ndarray]], path: str, cell_inches: float = 1.6) -> None:
    """Save a grid figure as PNG: one row per example, one column per entry of the row's dict (e.g.
    ``{"image": ..., "ICE": overlay(...), "rollout": ..., "ground truth": ...}``), titled by the keys
    of the first row. Every row must have the same keys; entries are ``[H, W, 3]`` uint8 images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("save_grid needs at least one row")
    columns = list(rows[0])
    if any(list(r) != columns for r in rows):
        raise ValueError(f"every row must have the columns {columns} in that order")
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                             figsize=(cell_inches * len(columns), cell_inches * len(rows)))
    for i, row in enumerate(rows):
        for j, name in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(row[name])
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
