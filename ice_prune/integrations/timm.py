"""``patch()`` / ``unpatch()`` for timm's ``VisionTransformer``, by class swap.

ToMe's pattern: the model and the blocks at the selection points get a subclass of their own class
that overrides ``forward``; one :class:`~ice_prune.integrations.common.ICEState` is shared by all of them and
carries the knobs (``model.keep_rate = 0.5`` takes effect on the next forward). Nothing else in the
model changes, so timm's state-dict keys stay, LayerScale, q/k norm, register and distillation
tokens, and fused attention all keep working, and ``unpatch`` gives the original model back.

Supported: timm 1.0's ``VisionTransformer`` (DeiT, ViT, DeiT III, register and distilled ViTs) whose
blocks at the selection points are timm's pre-norm ``Block`` with timm ``Attention``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ice_prune.integrations.common import (ICEModel, ICEState, attach_heads, check_patch_args,
                                          cls_attention_row, install, uninstall)
from ice_prune.select import SELECTORS, KeepRate, keep_count


class ICEVisionTransformer(ICEModel):
    """Mixin put in front of the model's own class by :func:`patch`."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                         is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "a token-pruned ViT changes its sequence inside the blocks, so attention masks and "
                "causal attention do not apply; call ice_prune.unpatch(model) to use them")
        self._ice.begin(self.training, self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])),
                        self.patch_embed.patch_size)
        return super().forward_features(x)


class ICEBlock:
    """Mixin for the blocks at selection points: select after attention ("attn") or the block."""

    _ice: ICEState
    _ice_loc: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported on a token-pruned ViT")
        state, loc = self._ice, self._ice_loc
        n = x.shape[1] - state.num_prefix
        keep = keep_count(state.keep_rate[loc], n)
        if keep >= n:  # nothing to drop: exactly the original block
            return super().forward(x)
        if state.selector.needs_cls_attn:
            y, cls_attn = attention_with_cls_row(self.attn, self.norm1(x))
        else:
            y, cls_attn = self.attn(self.norm1(x)), None
        x = x + self.drop_path1(self.ls1(y))
        if state.placement == "attn":  # EViT: the MLP already runs on the reduced sequence
            h = self.norm2(x) if state.selector.needs_head else None
            x = state.select(x, h, cls_attn, keep, loc)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        h = self.norm2(x)
        x = x + self.drop_path2(self.ls2(self.mlp(h)))
        return state.select(x, h, cls_attn, keep, loc)


def attention_with_cls_row(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Attention.forward`` that also returns the head-mean [CLS] attention row ``[B, N]``.

    A modified copy of timm 1.0's ``Attention.forward`` (as ToMe copies it for its merging): keep it
    in step with timm's when timm's changes.

    The block keeps timm's fused scaled-dot-product attention; the [CLS] row is one extra
    ``softmax(q_cls k^T / sqrt(d))`` (:func:`~ice_prune.integrations.common.cls_attention_row`,
    without copying K) instead of the full matrix.
    Mirrors timm 1.0 ``Attention`` (q/k norm, scale norm, gate, dropout) so outputs are unchanged.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cls_attn = cls_attention_row(q, k, attn.scale)
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


def patch(model: nn.Module, keep_rate: KeepRate, method: str, locs: Sequence[int], placement: str,
          fuse: bool, heads: str, num_classes: Optional[int], trace: bool,
          kernel: str) -> VisionTransformer:
    """:func:`ice_prune.patch` for a timm ``VisionTransformer``, in place; every argument as
    ``ice_prune.patch`` passes it (its defaults and docs are there)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"ice_prune.patch needs a timm VisionTransformer (e.g. timm.create_model("
            f"'deit_small_patch16_224')), got {type(model).__name__}; other architectures have no "
            f"single token sequence to prune")
    if isinstance(model, ICEVisionTransformer):
        raise RuntimeError(
            "this model is already patched; change model.keep_rate / model.fuse / model.trace in "
            "place, or call ice_prune.unpatch(model) before patching with other settings")
    locs, rates = check_patch_args(method, placement, heads, kernel, locs, keep_rate,
                                   len(model.blocks))
    for i in locs:
        blk = model.blocks[i]
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise TypeError(
                f"block {i} is a {type(blk).__name__} with {type(blk.attn).__name__}; ice_prune "
                f"selects tokens in timm's pre-norm Block with timm Attention only")

    selector = SELECTORS[method]()
    head_list = attach_heads(model, selector, heads, model.num_classes if num_classes is None
                             else num_classes, model.embed_dim, len(locs), method,
                             given=num_classes is not None)
    state = ICEState(selector, locs, placement, rates, bool(fuse), bool(trace), kernel,
                     model.num_prefix_tokens, head_list)
    return install(model, ICEVisionTransformer, model.blocks, ICEBlock, state)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original classes, no ICE head, the original outputs. Returns the model."""
    if not isinstance(model, ICEVisionTransformer):
        raise ValueError("this model is not patched by ice_prune; nothing to undo")
    return uninstall(model, model.blocks)
