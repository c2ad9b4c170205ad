"""Pictures: EViT's masked-image figure from ``model.ice_trace``, map overlays, ICE's map from the
pruned forward beside the kept patches, and the explanation grid."""
from __future__ import annotations

from typing import Optional, Sequence, Union

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


def overlay(image: ImageLike, saliency: ImageLike, cmap: str = "jet", alpha: float = 0.5,
            vrange: Optional[tuple[float, float]] = None) -> np.ndarray:
    """``image`` blended with ``saliency`` (``[h, w]``) coloured by a matplotlib colormap; the map is
    resized bilinearly to the image. ``vrange``: the values at the colormap's ends (a probability:
    ``(0, 1)``), values outside clipped; default the map's min and max (a constant map shows as
    zeros). Returns ``[H, W, 3]`` uint8."""
    import matplotlib

    img = to_uint8_image(image)
    s = saliency.detach().cpu().float().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    if s.ndim != 2:
        raise ValueError(f"saliency must be one map [h, w], got shape {s.shape}")
    s = _resize_map(s, img.shape[:2], nearest=False).astype(np.float64)
    low, high = (s.min(), s.max()) if vrange is None else vrange
    s = np.clip((s - low) / (high - low), 0, 1) if high > low else np.zeros_like(s)
    heat = matplotlib.colormaps[cmap](s)[..., :3] * 255
    return ((1 - alpha) * img + alpha * heat).round().clip(0, 255).astype(np.uint8)


def pruned_forward_row(image: ImageLike, explanation, trace: dict, index: int = 0,
                       location: int = -1, cmap: str = "jet", alpha: float = 0.5
                       ) -> dict[str, np.ndarray]:
    """One image of a forward run with ``explain`` and ``trace`` on, side by side: ``{"image",
    "map", "kept"}``, each ``[H, W, 3]`` uint8 (a row of :func:`save_grid`).

    ``"map"``: ICE's map from the pruned forward (``explanation``: ``model.ice_explanation``), each
    patch's ``1 - P(background)`` over the image, the colormap spanning 0 to 1. ``"kept"``: the
    patches still standing as their own tokens after selection point ``location`` of ``trace``
    (``model.ice_trace``), the others greyed (:func:`kept_patches`). ``index``: the image in the
    batch; ``image``: that image as it is to be shown.
    """
    grid = tuple(explanation.grid)
    foreground = explanation.foreground[index].detach().float().reshape(grid)
    return {"image": to_uint8_image(image),
            "map": overlay(image, foreground, cmap=cmap, alpha=alpha, vrange=(0.0, 1.0)),
            "kept": kept_patches(image, trace, location=location, index=index)}


def pruned_forward_rows(model: torch.nn.Module, images: torch.Tensor,
                        shown: Optional[Sequence[ImageLike]] = None, location: int = -1
                        ) -> list[dict[str, np.ndarray]]:
    """:func:`pruned_forward_row` for every image of one eval-mode forward of ``model`` (patched with
    ICE, keep rate below 1) on ``images``, run with ``explain`` and ``trace`` on (both restored
    after). ``shown``: the images as they are to be drawn (e.g. without the input normalization);
    default ``images``."""
    from ice_prune.maps import eval_mode

    explain, trace = model.explain, model.trace
    model.explain = model.trace = True
    try:
        with torch.no_grad(), eval_mode(model):
            model(images)
        explanation, record = model.ice_explanation, model.ice_trace
    finally:
        model.explain, model.trace = explain, trace
    shown = images if shown is None else shown
    return [pruned_forward_row(shown[i], explanation, record, index=i, location=location)
            for i in range(images.shape[0])]


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
