"""Padded-and-masked execution of a keep policy (``KeepPolicy(masked=True)``) on a timm ViT, in eval
mode: what A-ViT-style code does with per-image token counts, kept for comparison with the packed
execution (:mod:`ice_prune.packed`) in benchmarks.

The batch keeps its ``[B, N, D]`` shape from start to end. A ``[B, N]`` bool mask
(:attr:`Padded.active`) says which rows are still tokens of their image; the prefix rows always
are. A dropped token's row stays where it was and every later block goes on computing it, but the
attention of every block after the first selection point masks the inactive keys out, so no active
row ever reads it. At each selection point:

* the scores are those packed computes: ICE's head on the ``norm2`` output of every row, EViT's
  head-mean [CLS] attention row with the inactive keys masked out (the softmax over the image's own
  tokens, as packed computes it over the image's rows);
* each image's scores of its active non-prefix rows are compacted into the first ``sizes[b]``
  columns, in the order the image's rows have in the packed batch (:attr:`Padded.position`), and
  the policy gives its count from them as packed does, so the counts and the ties are the same;
* the ``count`` best by score stay active (descending, ties to the earlier packed row, as
  :func:`~ice_prune.kernels.reorganize_packed_reference` ranks), the others turn inactive; with
  fusion their weighted sum (the weights of the reference: the scores, renormalized over the
  dropped tokens where the selector says so, summed in fp32) is written over the best-ranked
  dropped row, which stays active. An image that drops nothing gets no fused token.

Attention over a set of keys does not depend on their order, so each image's active rows hold what
its packed rows hold, up to rounding, and an image's output does not depend on its batch.
``forward_features`` returns ``[B, N, D]`` after the final norm; timm's ``"token"`` pooling reads
the [CLS] row, as it reads packed's prefix rows. Where no image drops anything at a point, nothing
changes there. The shapes never depend on the counts, so there is no host sync.

The cost is the point of the comparison: every block runs on all ``N`` rows, plus the selection
steps. ``count_flops`` counts what is computed, all ``N`` rows (the masked attention at its full
``N x N``), not the FLOPs the masked tokens would save on paper.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ice_prune.integrations.common import ICEState, cls_attention_row
from ice_prune.kernels.reference import EPS
from ice_prune.packed import selection_block


class Padded(NamedTuple):
    """Which rows of a ``[B, N, D]`` batch are still tokens, once a selection point has run."""

    #: ``[B, N]`` bool: the row is a token of its image (prefix, kept or fused); attention masks
    #: the other rows out as keys
    active: Tensor
    #: ``[B, N]`` int64: the row's place among its image's rows in the packed batch (prefix first,
    #: then the kept tokens by rank, the fused token last); it orders the compacted scores as
    #: packed orders its rows, so that ties break the same way. Meaningless for inactive rows.
    position: Tensor


def key_mask(padded: Optional[Padded]) -> Optional[Tensor]:
    """The attention mask of timm's ``Attention`` (``[B, 1, 1, N]`` bool, ``True``: attend) that
    keeps each row's attention to its image's active rows; ``None`` before the first point."""
    return None if padded is None else padded.active[:, None, None, :]


def forward_features(model: nn.Module, x: Tensor) -> Tensor:
    """timm ``VisionTransformer.forward_features`` under a masked keep policy: ``[B, N, D]`` after
    the final norm, every row computed, the [CLS] row each image's own."""
    state = model._ice
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for block in model.blocks:
        # a selection point masks its own attention (ICEBlock.forward runs selection_block_forward)
        x = block(x) if state.padded is None or hasattr(block, "_ice") else \
            block(x, attn_mask=key_mask(state.padded))
    return model.norm(x)


def attention(attn: nn.Module, x: Tensor, padded: Optional[Padded],
              cls_row: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """timm ``Attention.forward`` on ``x [B, N, D]``, each row attending to its image's active rows
    (all rows where ``padded`` is ``None``); with ``cls_row`` also EViT's head-mean [CLS] attention
    row ``[B, N]`` fp32, over the active keys only (zero at the others).

    Without ``cls_row`` it is timm's own forward with the mask; with it, a copy of that forward (as
    :func:`ice_prune.integrations.timm.attention_with_cls_row`, keep them in step with timm's) that
    also computes the row."""
    mask = key_mask(padded)
    if not cls_row:
        return attn(x, attn_mask=mask), None
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if padded is None:
        row = cls_attention_row(q, k, attn.scale)
    else:  # q_cls k^T for every key, the inactive ones out of the softmax
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
        logits = logits.float().masked_fill(~mask, float("-inf"))
        row = logits.softmax(dim=-1).mean(dim=1)[:, 0]
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        out = a.softmax(dim=-1) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), row


def selection_block_forward(block: nn.Module, x: Tensor, state: ICEState, loc: int) -> Tensor:
    """A selection point's block (:class:`~ice_prune.integrations.timm.ICEBlock`) on the padded
    batch ``x [B, N, D]``: the block with masked attention, :func:`select` at the state's
    placement (:func:`ice_prune.packed.selection_block`, the packed run's skeleton)."""
    return selection_block(block, x, state, loc,
                           lambda attn, t, cls_row: attention(attn, t, state.padded, cls_row),
                           select)


def select(state: ICEState, x: Tensor, h: Optional[Tensor], cls_attn: Optional[Tensor],
           loc: int) -> Tensor:
    """A selection point on the padded batch ``x [B, N, D]``: each image keeps the count the policy
    gives it of its active tokens, the others masked from here on; ``state.padded`` follows.
    Returns ``x`` with the fused tokens written in (the same shape)."""
    P = state.num_prefix
    B, N, _ = x.shape
    n = N - P
    device = x.device
    head = state.heads[loc] if state.heads is not None else None
    # every row's score ([B, n]): the rows are all computed anyway
    scores = state.selector.scores(cls_attn, h, head, P, logits_needed=False,
                                   kernel=state.kernel)[0]
    padded = state.padded
    if padded is None:  # the first point: every row active, in its own order
        padded = Padded(torch.ones(B, N, dtype=torch.bool, device=device),
                        torch.arange(N, device=device).expand(B, N))
    active, position = padded.active[:, P:], padded.position[:, P:]
    sizes = active.sum(dim=1)
    columns = torch.arange(n, device=device)
    padding = columns >= sizes[:, None]
    # the active rows in packed order, then the inactive ones; each image's scores compacted so
    rows = torch.argsort(position.masked_fill(~active, N), dim=1, stable=True)
    compact = scores.gather(1, rows).masked_fill(padding, 0)
    counts = state.keep_policy.keep_counts(compact, sizes)
    state.keep_counts.append(counts)
    # rank by score, ties to the earlier packed row, padding last
    ranked = rows.gather(1, torch.argsort(compact.masked_fill(padding, float("-inf")), dim=1,
                                          descending=True, stable=True))
    rank = torch.empty_like(ranked).scatter_(1, ranked, columns.expand(B, n))  # each row's rank
    keep = counts[:, None]
    kept = rank < keep
    tokens = x[:, P:]
    if state.fuse:
        dropped = (rank >= keep) & (rank < sizes[:, None])
        w = torch.where(dropped, scores, 0)
        if state.selector.normalize:
            w = w / w.sum(dim=1, keepdim=True).clamp_min(EPS)
        acc = torch.promote_types(x.dtype, torch.float32)
        # where, not only w = 0: a row not dropped may hold inf, and 0 * inf is NaN; the sum in
        # fp32 even under autocast, as the reference sums it
        with torch.autocast(device.type, enabled=False):
            fused = torch.einsum("bn,bnd->bd", w.to(acc),
                                 torch.where(dropped[..., None], tokens, 0).to(acc)).to(x.dtype)
        slot = (rank == keep) & dropped  # the best-ranked dropped row holds the fused token
        tokens = torch.where(slot[..., None], fused[:, None], tokens)
        kept = kept | slot
        x = torch.cat([x[:, :P], tokens], dim=1)
    # packed reorders every image's rows by rank where some image drops, none where none does
    position = torch.where((counts < sizes).any(), P + rank, position)
    state.padded = Padded(torch.cat([padded.active[:, :P], kept], dim=1),
                          torch.cat([padded.position[:, :P], position], dim=1))
    return x
