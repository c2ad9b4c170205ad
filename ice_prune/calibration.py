"""Calibrating a keep policy to a cost: the ICE threshold or EViT mass whose per-image token counts
cost, on average over a set of images, what a fixed keep rate costs.

A :class:`~ice_prune.select.KeepPolicy`'s value is on the selector's own scale (a foreground
probability, a share of the [CLS] attention), and how many tokens a value keeps depends on the
model: a head that calls nearly every patch foreground keeps every token up to a threshold near 1.
:func:`calibrate_keep_policy` picks the value from the model and a set of images instead, so that
an adaptive policy can be compared with a fixed keep rate at equal mean cost.

The cost is the token rows the blocks process: per image, the sum over the blocks of the rows each
block's MLP runs on (prefix, kept tokens and the fused token where the image dropped some; under
EViT's placement a selecting block's MLP already runs on the reduced rows, its attention not), the
mean over the images. It is linear in the tokens, a stand-in for MACs: the linear layers, which
dominate at these sequence lengths, scale with the rows; attention's part quadratic in them (the
products with the keys) is not counted.
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

    The cost is the mean over the images of the token rows the blocks process (this module's
    docstring): linear in the tokens, a stand-in for MACs. ICE's count does not grow with the
    threshold, EViT's does not shrink with the mass, so the value is found by bisection on the grid
    of multiples of ``2 ** -iterations`` in [0, 1] (the mass in (0, 1]): the returned value is the
    one of the two neighbouring grid values whose costs bracket the target that comes nearer to it
    (a tie to the one keeping more), so moving it by one step crosses the target. Where no value
    within the share bounds reaches the target, the nearest end, with a warning.

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
        target = _block_rows(torch.tensor([token_schedule(P + num_patches, P, rates, state.fuse)]),
                             P + num_patches, state.locs, len(model.blocks), state.placement)
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
                total += float(_block_rows(rows, P + num_patches, state.locs, len(model.blocks),
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
                        f"no {rule} reaches fixed keep rate {keep_rate}'s cost ({target:.2f} token "
                        f"rows per image) within min_share={min_share:g}, max_share={max_share:g}: "
                        f"the policy keeping the {side} tokens costs {end_cost:.2f}; returning it "
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


def _block_rows(rows_after: Tensor, rows_before: int, locs: Sequence[int], depth: int,
                placement: str) -> Tensor:
    """``[B]`` float64: the rows each of ``depth`` blocks' MLPs run on, summed, from the rows
    ``[B, points]`` after the selection points at ``locs`` and the ``rows_before`` the first. Under
    EViT's placement (``"attn"``) a selecting block's MLP reads the reduced rows, under ``"block"``
    the next block does."""
    rows_after = rows_after.to(torch.float64)
    total = torch.zeros(rows_after.shape[0], dtype=torch.float64)
    for block in range(depth):
        passed = sum(loc < block or (placement == "attn" and loc == block) for loc in locs)
        total += rows_before if passed == 0 else rows_after[:, passed - 1]
    return total
