"""Pruned tokens back on the full patch grid, so a dense head (segmentation, detection) can read a
token-pruned backbone: :func:`restore`.

The module is not named ``restore``: a public function never takes the name of a submodule (it would
hide the module, as ``ice_prune.explain`` once hid its own).

Which token a patch reads. A patch reads the token that stands for it after the last selection
point. Until it is dropped, that is its own token. A patch dropped at a point with ``fuse=True`` was
absorbed by that point's fused token, and from then on reads whatever that fused token became: the
fused token is scored at the next point like any other token, so if it is kept there the patch reads
it at its new position; if it is dropped there it is absorbed in turn by the new fused token, and the
patch reads that one. The rule composes over all points, so every patch of a fused forward reads
exactly one final token: its own, or the fused token that (directly or through earlier fused tokens)
absorbed it, with the value that token has in the tokens passed in (after the later blocks). With
``fuse=False`` a dropped patch has no token left and reads zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor


def token_sources(trace: dict, batch: int, device: torch.device) -> Tensor:
    """``[batch, H*W]`` int64: for each patch, in the original patch order, the index among the
    final non-prefix tokens of the token it reads (see the module docstring), or -1 for a patch
    dropped without fusion.

    Composes the per-point ``order`` of the trace: at a point of ``keep`` kept tokens, the token at
    incoming position ``order[r]`` moves to ``r`` if ``r < keep``, else to the fused token ``keep``
    (or nowhere, -1, without fusion).
    """
    gh, gw = trace["grid"]
    sources = torch.arange(gh * gw, device=device).expand(batch, gh * gw)
    for loc in trace["locations"]:
        order, keep = loc["order"].to(device), loc["keep"]
        if order.shape[0] != batch:
            raise ValueError(f"the trace is of a batch of {order.shape[0]} images, the tokens of "
                             f"{batch}: pass the tokens of the forward that recorded the trace")
        n = order.shape[1]
        rank = torch.arange(n, device=device)
        dropped_to = keep if loc["fused"] is not None else -1
        moves_to = torch.where(rank < keep, rank, dropped_to).expand(batch, n)
        new_position = torch.empty_like(order).scatter_(1, order, moves_to)
        sources = torch.where(sources >= 0, new_position.gather(1, sources.clamp_min(0)), -1)
    return sources


def restore(tokens: Tensor, trace: dict) -> Tensor:
    """Tokens of a pruned forward scattered back to the full patch grid.

    Args:
        tokens: ``[B, prefix + kept (+ fused), D]`` tokens after the last selection point of the
            forward that recorded ``trace``: the last block's output, or ``model.forward_features(x)``
            (the final norm works per token, so it commutes with the scatter).
        trace: ``model.ice_trace`` of that forward (patch with ``trace=True`` or set
            ``model.trace = True`` before it).

    Returns:
        ``[B, prefix + H*W, D]``: the prefix tokens (CLS, registers, distillation) unchanged and in
        place, then one token per patch in the original row-major patch order: a patch that stands as
        its own token gets that token; a dropped patch gets the fused token that absorbed it, as it
        ended up after the later selection points (module docstring), or zeros with ``fuse=False``.
        With no selection (``keep_rate=1.0``) it returns the tokens unchanged.
    """
    if not trace or "grid" not in trace:
        raise ValueError("restore needs model.ice_trace of the forward that made the tokens: set "
                         "model.trace = True before that forward")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    B, N, D = tokens.shape
    prefix = trace["num_prefix"]
    locations = trace["locations"]
    gh, gw = trace["grid"]
    expected = locations[-1]["tokens_out"] if locations else prefix + gh * gw
    if N != expected:
        raise ValueError(
            f"the trace ends with {expected} tokens ({prefix} prefix) but the tokens have {N}: pass "
            f"the tokens after the last selection point of the forward that recorded the trace")
    sources = token_sources(trace, B, tokens.device)
    patches = tokens[:, prefix:].gather(1, sources.clamp_min(0)[..., None].expand(-1, -1, D))
    patches = torch.where(sources[..., None] >= 0, patches, patches.new_zeros(()))
    return torch.cat([tokens[:, :prefix], patches], dim=1)
