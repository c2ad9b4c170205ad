"""Token selection in timm's ``VisionTransformer``, by class swap (:data:`INTEGRATION`).

ToMe's pattern: the model and the blocks at the selection points get a subclass of their own class
that overrides ``forward``; one :class:`~ice_prune.integrations.common.ICEState` is shared by all of
them and carries the knobs (``model.keep_rate = 0.5`` takes effect on the next forward). Nothing
else in the model changes, so timm's state-dict keys stay, LayerScale, q/k norm, register and
distillation tokens, and fused attention all keep working, and ``unpatch`` gives the original model
back.

Supported: timm 1.0's ``VisionTransformer`` (DeiT, ViT, DeiT III, register and distilled ViTs) whose
blocks at the selection points are timm's pre-norm ``Block`` with timm ``Attention``. A keep policy
(per-image counts, :mod:`ice_prune.packed`, or padded and masked for comparison,
:mod:`ice_prune.masked`) needs those blocks from the first selection point on and
``global_pool="token"``, and runs in eval mode.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ice_prune import masked, packed
from ice_prune.integrations.common import (ICEModel, ICEState, Integration, check_keep_policy,
                                           cls_attention_row)
from ice_prune.select import keep_count


class ICEVisionTransformer(ICEModel):
    """Mixin put in front of the model's own class by :func:`patch`."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                         is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "a token-pruned ViT changes its sequence inside the blocks, so attention masks and "
                "causal attention do not apply; call ice_prune.unpatch(model) to use them")
        state = self._ice
        state.begin(self.training, self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])),
                    self.patch_embed.patch_size)
        if state.keep_policy is None:
            return super().forward_features(x)
        if self.training:
            raise ValueError("keep_policy (per-image keep counts) runs in eval mode; training "
                             "stays fixed-keep: call model.eval(), or set model.keep_policy = None "
                             "to train with keep_rate")
        check_keep_policy(state.keep_policy, state.selector, state.trace, state.explain,
                          self._keep_policy_refusal(self, state.locs))
        if state.keep_policy.masked:  # for comparison: [B, N, D] throughout, tokens masked
            return masked.forward_features(self, x)
        return packed.forward_features(self, x)

    @staticmethod
    def _keep_policy_refusal(model: nn.Module, locs: Sequence[int]) -> Optional[str]:
        if model.global_pool != "token" or model.attn_pool is not None:
            return (f"keep_policy reads each image's [CLS] token (global_pool='token'); this model "
                    f"pools with global_pool={model.global_pool!r}: use keep_policy=None")
        for i, block in enumerate(model.blocks):
            if i >= locs[0] and not (isinstance(block, Block)
                                     and isinstance(block.attn, Attention)):
                return (f"keep_policy runs every block after the first selection point packed, "
                        f"and block {i} is a {type(block).__name__}, not timm's Block with "
                        f"Attention: use keep_policy=None")
        return None


class ICEBlock:
    """Mixin for the blocks at selection points: select after attention ("attn") or the block."""

    _ice: ICEState
    _ice_loc: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported on a token-pruned ViT")
        state, loc = self._ice, self._ice_loc
        if state.keep_policy is not None:
            if state.keep_policy.masked:  # the batch stays [B, N, D], dropped tokens masked out
                return masked.selection_block_forward(self, x, state, loc)
            if state.segments is not None:  # an earlier point packed the batch
                return packed.selection_block_forward(self, x, state, loc)
            keep = None  # one count per image, from the scores
        else:
            n = x.shape[1] - state.num_prefix
            keep = keep_count(state.keep_rate[loc], n)
            if state.skips(keep, n):  # nothing to drop or score: exactly the original block
                return super().forward(x)
        if state.selector.needs_cls_attn:
            y, cls_attn = attention_with_cls_row(self.attn, self.norm1(x))
        else:
            y, cls_attn = self.attn(self.norm1(x)), None
        x = x + self.drop_path1(self.ls1(y))
        if state.placement == "attn":  # EViT: the MLP already runs on the reduced sequence
            h = self.norm2(x) if state.selector.needs_head else None
            kept = self._select(x, h, cls_attn, keep)  # packed rows [T, D] from here, maybe
            # an explain-mode point that keeps every token returns x itself: h is its norm
            h = h if kept is x and h is not None else self.norm2(kept)
            return kept + self.drop_path2(self.ls2(self.mlp(h)))
        h = self.norm2(x)
        x = x + self.drop_path2(self.ls2(self.mlp(h)))
        return self._select(x, h, cls_attn, keep)

    def _select(self, x: Tensor, h: Optional[Tensor], cls_attn: Optional[Tensor],
                keep: Optional[int]) -> Tensor:
        if keep is None:
            return packed.pack(self._ice, x, h, cls_attn, self._ice_loc)
        return self._ice.select(x, h, cls_attn, keep, self._ice_loc)


def attention_with_cls_row(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Attention.forward`` that also returns the head-mean [CLS] attention row ``[B, N]``.

    A copy of timm 1.0's ``Attention.forward`` (q/k norm, scale norm, gate, dropout; keep it in step
    with timm's), as ToMe copies it: the block keeps timm's fused scaled-dot-product attention and
    the [CLS] row is one extra ``softmax(q_cls k^T / sqrt(d))``
    (:func:`~ice_prune.integrations.common.cls_attention_row`, without copying K), not the full
    matrix.
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


class TimmIntegration(Integration):
    """timm's ``VisionTransformer`` with timm's pre-norm ``Block`` and ``Attention`` at the
    selection points."""

    model_mixin = ICEVisionTransformer
    layer_mixin = ICEBlock

    def check_model(self, model: nn.Module) -> None:
        if not isinstance(model, VisionTransformer):
            raise TypeError(
                f"ice_prune.patch needs a timm VisionTransformer (e.g. timm.create_model("
                f"'deit_small_patch16_224')), got {type(model).__name__}; other architectures have "
                f"no single token sequence to prune")

    def layers(self, model: nn.Module) -> nn.Sequential:
        return model.blocks

    def check_layer(self, i: int, layer: nn.Module) -> None:
        if not isinstance(layer, Block) or not isinstance(layer.attn, Attention):
            raise TypeError(
                f"block {i} is a {type(layer).__name__} with {type(layer.attn).__name__}; "
                f"ice_prune selects tokens in timm's pre-norm Block with timm Attention only")

    def num_prefix(self, model: nn.Module) -> int:
        return model.num_prefix_tokens

    def embed_dim(self, model: nn.Module) -> int:
        return model.embed_dim

    def num_classes(self, model: nn.Module) -> Optional[int]:
        return model.num_classes


INTEGRATION = TimmIntegration()
