"""Pictures of what a patched model kept: EViT's masked-image figure from ``model.ice_trace``."""
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
