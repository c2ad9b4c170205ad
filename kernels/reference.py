"""Plain-torch reorganize step: the CPU path and the oracle for the Triton kernels."""
from __future__ import annotations

import torch
from torch import Tensor

# Fusion weights are renormalized over the dropped tokens (ICE); a sum of near-zero scores must not
# divide by zero.
_EPS = 1e-12


def reorganize_reference(
    x: Tensor,
    scores: Tensor,
    keep: int,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` highest-scoring non-prefix tokens and fuse the rest into one token.

    Args:
        x: ``[B, N, D]`` tokens, the first ``num_prefix`` of them prefix tokens (never touched).
        scores: ``[B, N - num_prefix]`` one score per non-prefix token; also the fusion weights.
        keep: how many non-prefix tokens to keep, ``0 < keep <= N - num_prefix``.
        num_prefix: number of prefix tokens (CLS, registers, distillation).
        fuse: append one token fusing the dropped ones (EViT's inattentive-token fusion).
        normalize: fusion weights renormalized over the dropped tokens (ICE's score-weighted
            mean) instead of used as they are (EViT's attention-weighted sum).

    Returns:
        ``out``: ``[B, num_prefix + keep (+ 1 if fuse), D]``, kept tokens in descending score order,
        fused token last.
        ``order``: ``[B, N - num_prefix]`` int64, non-prefix positions sorted by descending score:
        the first ``keep`` were kept, the rest dropped (and fused).
    """
    B, N, D = x.shape
    n = N - num_prefix
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    tokens = x[:, num_prefix:]
    kept = tokens.gather(1, order[:, :keep, None].expand(B, keep, D))
    parts = [x[:, :num_prefix], kept]
    if fuse:
        dropped = order[:, keep:]
        w = scores.gather(1, dropped)
        if normalize:
            w = w / w.sum(dim=1, keepdim=True).clamp_min(_EPS)
        dropped_tokens = tokens.gather(1, dropped[..., None].expand(B, n - keep, D))
        fused = torch.einsum("bn,bnd->bd", w.to(torch.float32), dropped_tokens.to(torch.float32))
        parts.append(fused.to(x.dtype)[:, None])
    return torch.cat(parts, dim=1), order


def reorganize(
    x: Tensor,
    scores: Tensor,
    keep: int,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The reorganize step, dispatched to a kernel. Same contract as :func:`reorganize_reference`."""
    return reorganize_reference(x, scores, keep, num_prefix, fuse, normalize)
