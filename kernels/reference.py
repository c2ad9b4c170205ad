"""Plain torch: the reorganize step and the fused ICE score, the CPU paths and the oracles for the
Triton kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Fusion weights are renormalized over the dropped tokens (ICE); a sum of near-zero scores must not
# divide by zero.
EPS = 1e-12


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
            w = w / w.sum(dim=1, keepdim=True).clamp_min(EPS)
        dropped_tokens = tokens.gather(1, dropped[..., None].expand(B, n - keep, D))
        fused = torch.einsum("bn,bnd->bd", w.to(torch.float32), dropped_tokens.to(torch.float32))
        parts.append(fused.to(x.dtype)[:, None])
    return torch.cat(parts, dim=1), order


def reorganize_backward_reference(
    grad_out: Tensor,
    x: Tensor,
    scores: Tensor,
    order: Tensor,
    keep: int,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`reorganize_reference` to ``x`` and ``scores``, written out by hand.

    It is the CPU backward of the op and the formula the Triton backward kernel implements; the tests
    check it against autograd through :func:`reorganize_reference`. With ``F`` the fused row, ``g_F``
    its gradient, ``a_i = <g_F, x_i>`` and ``S`` the sum of the dropped scores:

    * each input row gets its output row's gradient (kept) or ``w_i g_F`` (dropped; 0 without fusion);
    * a dropped score gets ``a_i`` (EViT, ``w_i = s_i``) or ``(a_i - sum_j w_j a_j) / S``
      (ICE, ``w_i = s_i / S``); kept scores get 0 (the ranking is piecewise constant).
    """
    B, N, D = x.shape
    n = N - num_prefix
    grad_x = torch.empty_like(x)
    grad_x[:, :num_prefix] = grad_out[:, :num_prefix]
    # inverse permutation: input row P + order[r] came from output row P + r
    rows = order[..., None].expand(B, n, D)
    grad_tokens = torch.zeros(B, n, D, dtype=torch.float32, device=x.device)
    grad_tokens.scatter_(1, rows[:, :keep], grad_out[:, num_prefix:num_prefix + keep].float())
    grad_scores = torch.zeros(B, n, dtype=torch.float32, device=scores.device)
    if fuse:
        dropped = order[:, keep:]
        g_f = grad_out[:, num_prefix + keep].float()  # [B, D]
        s = scores.gather(1, dropped).float()
        total = s.sum(dim=1, keepdim=True)
        w = s / total.clamp_min(EPS) if normalize else s
        grad_tokens.scatter_(1, rows[:, keep:], w[..., None] * g_f[:, None])
        dropped_tokens = x[:, num_prefix:].gather(1, rows[:, keep:]).float()
        a = torch.einsum("bd,bnd->bn", g_f, dropped_tokens)
        if normalize:
            # clamp_min passes the gradient to S only where S >= EPS, else w_i = s_i / EPS
            centred = (a - (w * a).sum(dim=1, keepdim=True)) / total.clamp_min(EPS)
            a = torch.where(total >= EPS, centred, a / EPS)
        grad_scores.scatter_(1, dropped, a)
    grad_x[:, num_prefix:] = grad_tokens.to(x.dtype)
    return grad_x, grad_scores.to(scores.dtype)


# The torch ICE score computes the logits of this many (token, class) pairs at a time, 16 MiB in fp32.
ICE_SCORE_CHUNK = 1 << 22


def ice_score_reference(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
    chunk: int = ICE_SCORE_CHUNK,
) -> Tensor:
    """ICE's foreground score ``1 - P(background)`` per token, without the ``[B, n, C + 1]`` logits.

    ``sigmoid(logsumexp_c(W_c h + b_c) - (w_bg . h + b_bg))`` for the image classes ``c < C`` and the
    background row ``C`` (the last), with the logits of about ``chunk`` (token, class) pairs at a time
    folded into a running logsumexp, so the extra memory stays bounded whatever ``C`` is.

    Args:
        h: ``[B, n, D]`` tokens.
        weight: ``[C + 1, D]`` the head's (last) linear layer, background last.
        bias: ``[C + 1]`` or ``None``.
        compute_dtype: the inputs are rounded to it (as autocast rounds a linear layer's inputs), then
            multiplied and summed in fp32; default the promoted dtype of ``h`` and ``weight``.
        chunk: (token, class) pairs per chunk of logits.

    Returns:
        ``[B, n]`` fp32 scores.
    """
    if compute_dtype is None:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    C = weight.shape[0] - 1

    def rounded(t: Tensor) -> Tensor:
        return t.to(compute_dtype).float()

    # explicit dtypes: an autocast region around the call must not recast the fp32 arithmetic
    with torch.autocast(h.device.type, enabled=False):
        x, w = rounded(h), rounded(weight)
        b = None if bias is None else rounded(bias)
        tokens = max(1, x.shape[0] * x.shape[1])
        step = max(1, chunk // tokens)
        lse = None
        for c0 in range(0, C, step):
            c1 = min(c0 + step, C)
            part = F.linear(x, w[c0:c1], None if b is None else b[c0:c1]).logsumexp(dim=-1)
            lse = part if lse is None else torch.logaddexp(lse, part)
        background = F.linear(x, w[C:], None if b is None else b[C:])[..., 0]
        return torch.sigmoid(lse - background)
