"""Token selectors and the reorganize step they feed.

A selector turns what a block has already computed into one score per non-prefix token:

* ``evit``: the head-mean attention of the [CLS] query to each token (EViT, Liang et al. ICLR 2022),
  computed as one extra softmax row beside timm's fused attention. Dropped tokens are fused as their
  attention-weighted sum, not renormalized.
* ``ice``: ``1 - P(background)`` under the ICE head applied to the tokens the MLP reads (the block's
  ``norm2`` output). Dropped tokens are fused as their score-weighted mean.

New selectors register with :func:`register_selector`; ``patch(method=...)`` looks them up here.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SELECTORS: dict[str, type["Selector"]] = {}


def register_selector(name: str) -> Callable[[type["Selector"]], type["Selector"]]:
    def wrap(cls: type["Selector"]) -> type["Selector"]:
        cls.name = name
        SELECTORS[name] = cls
        return cls

    return wrap


class Selector(abc.ABC):
    """Scores tokens at a selection point. Stateless: parameters (the ICE head) live on the model."""

    name: str = ""
    #: the selector reads the [CLS] attention row, so the block computes it
    needs_cls_attn: bool = False
    #: the selector reads the MLP's input (norm2 output) through an ICE head
    needs_head: bool = False
    #: fusion weights renormalized over the dropped tokens (mean) or used as they are (sum)
    normalize: bool = False

    @abc.abstractmethod
    def scores(self, cls_attn: Optional[Tensor], h: Tensor, head: Optional[nn.Module],
               num_prefix: int) -> tuple[Tensor, Optional[Tensor]]:
        """Return ``(scores [B, n], head logits [B, n, C+1] or None)`` for the non-prefix tokens."""


@register_selector("evit")
class EViTSelector(Selector):
    needs_cls_attn = True
    normalize = False

    def scores(self, cls_attn, h, head, num_prefix):
        return cls_attn[:, num_prefix:], None


@register_selector("ice")
class ICESelector(Selector):
    needs_head = True
    normalize = True

    def scores(self, cls_attn, h, head, num_prefix):
        logits = head(h[:, num_prefix:])
        return foreground_score(logits), logits


def foreground_score(logits: Tensor) -> Tensor:
    """``1 - softmax(logits)[..., -1]`` (background is the last class), computed without cancellation.

    ``1 - p_bg = sigmoid(logsumexp(class logits) - background logit)``: the same value, exact even when
    ``p_bg`` rounds to 1.
    """
    return torch.sigmoid(torch.logsumexp(logits[..., :-1], dim=-1) - logits[..., -1])


def keep_count(keep_rate: float, n: int) -> int:
    """EViT's rule: of ``n`` non-prefix tokens keep ``ceil(keep_rate * n)``."""
    return math.ceil(keep_rate * n)


def token_schedule(num_tokens: int, num_prefix: int, keep_rates: Sequence[float],
                   fuse: bool = True) -> list[int]:
    """Sequence length after each selection point, from ``num_tokens`` (prefix included) at the start.

    DeiT-S at 0.7 with fusion: ``token_schedule(197, 1, [0.7] * 3) == [140, 100, 72]``.
    """
    out, n = [], num_tokens - num_prefix
    for rate in keep_rates:
        k = keep_count(rate, n)
        if k < n:
            n = k + int(fuse)
        out.append(num_prefix + n)
    return out


def attention_with_cls_row(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Attention.forward`` that also returns the head-mean [CLS] attention row ``[B, N]``.

    The block keeps timm's fused scaled-dot-product attention; the [CLS] row is one extra
    ``softmax(q_cls k^T / sqrt(d))``, ``B * H * N * d`` multiply-adds, instead of the full matrix.
    Mirrors timm 1.0 ``Attention`` (q/k norm, scale norm, gate, dropout) so outputs are unchanged.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cls_logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    # fp32 scores: in bf16 many near-equal attention values tie and the ranking degrades
    cls_attn = cls_logits.float().softmax(dim=-1).mean(dim=1)[:, 0]
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(a) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), cls_attn

