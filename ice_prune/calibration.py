"""Calibrating a keep policy to a cost: the ICE threshold or EViT mass whose per-image token counts
cost, on average over a set of images, what a fixed keep rate costs.

A :class:`~ice_prune.select.KeepPolicy`'s value is on the selector's own scale (a foreground
probability, a share of the [CLS] attention), and how many tokens a value keeps depends on the
model: a head that calls nearly every patch foreground keeps every token up to a threshold near 1.
:func:`calibrate_keep_policy` picks the value from the model and a set of images instead, so that
an adaptive policy can be compared with a fixed keep rate at equal mean cost.

The cost is the blocks' multiply-adds (MACs) per image, the mean over the images. Block ``b``
costs ``a * attn_row + a ** 2 * pair + m * mlp_row``: ``attn_row`` the weights of the linear
layers in its attention (timm: qkv and proj), ``pair`` the products per pair of rows (``q k^T``
and the attention times ``v``: ``2 * num_heads * head_dim``), ``mlp_row`` the weights of the
linear layers in its MLP, all read from the model; ``a`` the rows its attention runs on and ``m``
the rows its MLP runs on (prefix, kept tokens and the fused token where the image dropped some; a
selecting block's attention reads its full input; under EViT's placement its MLP already runs on
the reduced rows, under ``"block"`` the next block does). MACs, since the comparison is at equal
GMACs: attention's part quadratic in the rows makes a policy whose counts vary from image to image
(and keep more early) cost more than the rows say. Not counted: the patch embedding, the layer
norms, the classifier head and the selection steps (ICE's scoring head, the reorganize), the same
for every policy or small.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from ice_prune.integrations.common import ICEModel
from ice_prune.select import KeepPolicy, KeepRate, check_keep_rate, token_schedule

#: the rule of each selector that has a keep policy
RULES = {"ice": "threshold", "evit": "mass"}


def calibrate_keep_policy(model: nn.Module, images: Tensor, keep_rate: KeepRate, *,
                          min_share: float = 0.0, max_share: float = 1.0, batch_size: int = 128,
                          iterations: int = 16) -> KeepPolicy:
    """The :class:`~ice_prune.select.KeepPolicy` of ``model``'s method whose mean cost over
    ``images`` equals that of the fixed ``keep_rate`` on the same model.

    ``model``: patched with ``method="ice"`` (the policy's ``threshold``: ICE keeps the tokens whose
    foreground probability reaches it) or ``method="evit"`` (its ``mass``: EViT keeps the fewest
    tokens holding that share of the [CLS] attention). ``images``: ``[B, C, H, W]``, e.g. training
    images, so that the setting comes from the method and its training data. ``keep_rate``: a float
    in (0, 1] or one per selection point, as ``model.keep_rate`` takes it. Each image keeps between
    ``min_share`` and ``max_share`` of its tokens at each point (the returned policy's bounds).

    The cost is the mean over the images of the blocks' multiply-adds (this module's docstring):
    the linear layers of attention and MLP on the rows each runs on and attention's products
    between rows, quadratic in them, since policies are compared with fixed rates at equal GMACs
    and a policy whose counts vary costs more than its mean count says; not the patch embedding,
    the layer norms, the head or the selection steps (the same for every policy, or small). ICE's
    count does not grow with the threshold, EViT's does not shrink with the mass, so the value is
    found by bisection on the grid of multiples of ``2 ** -iterations`` in [0, 1] (the mass in
    (0, 1]): the returned value is the one of the two neighbouring grid values whose costs bracket
    the target that comes nearer to it (a tie to the one keeping more), so moving it by one step
    crosses the target. (At the first point the count moves one way only; a later point's count
    also depends on what the earlier ones kept, so the total cost can step back between
    neighbouring values, and another value far off may bracket the target too: the bisection
    returns one bracketing pair's nearer value.) Where no value within the share bounds reaches the
    target, the nearest end, with a warning.

    Runs eval-mode forwards of ``batch_size`` images under ``torch.no_grad()``, ``iterations + 2``
    passes over the images at most; the model's ``keep_policy`` and the train/eval mode of each of
    its modules are restored afterwards.

    >>> ice_prune.patch(model, method="ice")  # doctest: +SKIP
    >>> model.keep_policy = ice_prune.calibrate_keep_policy(model, train_images, 0.5,
    ...                                                     min_share=0.1)  # doctest: +SKIP
    """
    if not isinstance(model, ICEModel):
        raise ValueError(f"calibrate_keep_policy needs a model patched with "
                         f"ice_prune.patch(model, method='ice') or method='evit'; this "
                         f"{type(model).__name__} is not patched")
    state = model._ice
    rule = RULES.get(state.selector.name)
    if rule is None:
        raise ValueError(f"calibrate_keep_policy sets ICE's threshold or EViT's mass; "
                         f"method={state.selector.name!r} has no keep policy")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, C, H, W] tensor of at least one image, got "
                         f"{shape}")
    rates = check_keep_rate(keep_rate, len(state.locs))
    for name, number in (("batch_size", batch_size), ("iterations", iterations)):
        if isinstance(number, bool) or not isinstance(number, numbers.Integral) or number < 1:
            raise ValueError(f"{name} must be a positive integer, got {number!r}")
    steps = 2 ** int(iterations)

    def policy(i: int) -> KeepPolicy:
        """Grid point ``i`` of ``steps``, ordered by the tokens kept: ICE's threshold falls with
        ``i``, EViT's mass grows."""
        value = (steps - i) / steps if rule == "threshold" else i / steps
        return KeepPolicy(**{rule: value}, min_share=min_share, max_share=max_share)

    fewest = 0 if rule == "threshold" else 1  # a mass is above 0
    lowest_policy = policy(fewest)  # checks the share bounds before the model is touched
    saved_policy = state.keep_policy
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        model.keep_policy = lowest_policy  # refuses a model or setting a policy cannot run on
        grid = model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        num_patches = grid[0] * grid[1]
        P = state.num_prefix
        dims = _block_dims(model)
        target = _block_macs(torch.tensor([token_schedule(P + num_patches, P, rates, state.fuse)]),
                             P + num_patches, state.locs, dims, state.placement)
        target = float(target[0])
        param = next(model.parameters())

        def cost(i: int) -> float:
            model.keep_policy = policy(i)
            total = 0.0
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].to(param.device, param.dtype)
                model(x)
                counts = torch.stack(model.ice_keep_counts, dim=1).cpu()
                rows = _rows_after_points(counts, num_patches, P, state.fuse)
                total += float(_block_macs(rows, P + num_patches, state.locs, dims,
                                           state.placement).sum())
            return total / images.shape[0]

        with torch.no_grad():
            lo, hi = fewest, steps
            cost_lo, cost_hi = cost(lo), cost(hi)
            if cost_lo >= target or cost_hi <= target:
                end, end_cost = (lo, cost_lo) if cost_lo >= target else (hi, cost_hi)
                if end_cost != target:
                    side = "fewest" if end == lo else "most"
                    warnings.warn(
                        f"no {rule} reaches fixed keep rate {keep_rate}'s cost "
                        f"({target / 1e6:.2f} MMACs per image) within min_share={min_share:g}, "
                        f"max_share={max_share:g}: the policy keeping the {side} tokens costs "
                        f"{end_cost / 1e6:.2f} MMACs; returning it "
                        f"({rule}={getattr(policy(end), rule):g}), the nearest end", stacklevel=2)
                return policy(end)
            while hi - lo > 1:  # cost(lo) < target < cost(hi)
                mid = (lo + hi) // 2
                cost_mid = cost(mid)
                if cost_mid == target:
                    return policy(mid)
                if cost_mid < target:
                    lo, cost_lo = mid, cost_mid
                else:
                    hi, cost_hi = mid, cost_mid
            return policy(lo if target - cost_lo < cost_hi - target else hi)
    finally:
        state.keep_policy = saved_policy
        for module, training in modes:
            module.training = training


def _rows_after_points(counts: Tensor, num_patches: int, num_prefix: int, fuse: bool) -> Tensor:
    """``[B, points]`` rows of each image after each selection point, from its kept counts
    ``[B, points]`` (``ice_keep_counts``) out of ``num_patches``: prefix, kept tokens and, where
    the image dropped some there, the fused token."""
    n = torch.full((counts.shape[0],), num_patches, dtype=torch.int64)
    rows = []
    for k in counts.to(torch.int64).unbind(dim=1):
        n = k + (k < n).to(torch.int64) * int(fuse)
        rows.append(num_prefix + n)
    return torch.stack(rows, dim=1)


def _block_dims(model: nn.Module) -> list[tuple[int, int, int]]:
    """``(attn_row, pair, mlp_row)`` of each of ``model.blocks``: the MACs per row of the linear
    layers in its attention and in its MLP (``in_features * out_features``, summed), and those of
    attention's products per pair of rows (``q k^T`` and the attention times ``v``)."""
    def weights(module: nn.Module) -> int:
        return sum(m.in_features * m.out_features for m in module.modules()
                   if isinstance(m, nn.Linear))

    return [(weights(block.attn), 2 * block.attn.num_heads * block.attn.head_dim,
             weights(block.mlp)) for block in model.blocks]


def _block_macs(rows_after: Tensor, rows_before: int, locs: Sequence[int],
                dims: Sequence[tuple[int, int, int]], placement: str) -> Tensor:
    """``[B]`` float64: the blocks' MACs, from the rows ``[B, points]`` after the selection points
    at ``locs``, the ``rows_before`` the first and each block's ``(attn_row, pair, mlp_row)``
    (:func:`_block_dims`): ``a * attn_row + a ** 2 * pair + m * mlp_row`` summed over the blocks,
    ``a`` the rows its attention runs on, ``m`` those its MLP runs on. A selecting block's
    attention reads its full input; under EViT's placement (``"attn"``) its MLP reads the reduced
    rows, under ``"block"`` the next block does."""
    rows_after = rows_after.to(torch.float64)
    total = torch.zeros(rows_after.shape[0], dtype=torch.float64)

    def rows(passed: int):
        return rows_before if passed == 0 else rows_after[:, passed - 1]

    for block, (attn_row, pair, mlp_row) in enumerate(dims):
        a = rows(sum(loc < block for loc in locs))
        m = rows(sum(loc < block or (placement == "attn" and loc == block) for loc in locs))
        total += a * attn_row + a * a * pair + m * mlp_row
    return total
