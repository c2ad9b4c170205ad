"""ICE heads: per-patch classifiers over ``num_classes`` image classes plus one background class.

* ``ICEHead(dim, num_classes)``: ``Linear(dim, num_classes + 1, bias=False)``, the head of ICE and the
  selector head for pruning (DeiT-S: 384 x 1001 = 0.38M parameters, the paper's 22.4M in all).
* ``ICEHead(dim, num_classes, hidden_dim=...)``: a two-layer GELU MLP, the head of ICE-f (frozen
  backbone, only the head trains).

The background class is the last output. Scores for pruning are ``1 - P(background)``.

:data:`HEAD_VARIANTS` names the explanation-training configurations (``"ice"``, ``"ice-f"``,
``"icev2-style"``): which head and which backbone parameters train (:func:`set_trainable`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor, nn


class ICEHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, hidden_dim: Optional[int] = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ICEHead needs num_classes >= 1 image classes, got {num_classes}")
        self.dim = dim
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        if hidden_dim is None:
            self.fc = nn.Linear(dim, num_classes + 1, bias=False)
        else:
            self.fc = nn.Sequential(
                nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_classes + 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., dim] -> [..., num_classes + 1]`` logits, background last."""
        return self.fc(x)

    def extra_repr(self) -> str:
        kind = "linear" if self.hidden_dim is None else f"mlp(hidden={self.hidden_dim})"
        return f"dim={self.dim}, num_classes={self.num_classes} + background, {kind}"


def forward_with_tokens(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a timm ViT (patched or not) once; return ``(logits, tokens)`` where ``tokens [B, N, D]`` is
    the last block's output before the final norm, which ICE's explanation head reads (as in the
    official code). The sequence is ``[prefix, patches]`` or, on a pruned model, ``[prefix, kept, fused]``.
    """
    captured: list[Tensor] = []
    handle = model.norm.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured[-1]


@dataclasses.dataclass(frozen=True)
class HeadVariant:
    """How an explanation run builds its ICE head and which backbone parameters train.

    ``hidden_ratio``: ``None`` for the linear head, else the MLP's hidden width as a multiple of the
    embedding width. ``trainable_blocks``: ``None`` trains the whole backbone, ``0`` freezes it, ``k``
    trains only the last ``k`` blocks (and the final norm, which they feed).
    ``lambda_class``: the paper's class weight for this variant.
    """

    name: str
    hidden_ratio: Optional[float]
    trainable_blocks: Optional[int]
    lambda_class: float
    description: str

    def build(self, model: nn.Module, num_classes: int) -> ICEHead:
        hidden = None if self.hidden_ratio is None else int(model.embed_dim * self.hidden_ratio)
        ref = next(model.parameters())
        return ICEHead(model.embed_dim, num_classes, hidden_dim=hidden).to(ref.device, ref.dtype)


HEAD_VARIANTS: dict[str, HeadVariant] = {}


def register_head_variant(variant: HeadVariant) -> HeadVariant:
    HEAD_VARIANTS[variant.name] = variant
    return variant


register_head_variant(HeadVariant(
    "ice", hidden_ratio=None, trainable_blocks=None, lambda_class=0.975,
    description="ICE (CVPR 2023): Linear(D, C+1, bias=False) on the last block's output; the whole "
                "backbone fine-tunes"))
register_head_variant(HeadVariant(
    "ice-f", hidden_ratio=4.0, trainable_blocks=0, lambda_class=0.99,
    description="ICE-f (CVPR 2023): frozen backbone, only a two-layer GELU MLP head trains (hidden "
                "4D as in the official models_ICE_f.py)"))
register_head_variant(HeadVariant(
    "icev2-style", hidden_ratio=4.0, trainable_blocks=2, lambda_class=0.975,
    description="ICEv2-style: what ICEv2's abstract states (few trainable encoder layers, a "
                "redesigned MLP head). ICEv2's exact head, layer count and hyper-parameters are not "
                "public here: this trains the last trainable_blocks blocks and a GELU MLP head"))


def set_trainable(model: nn.Module, head: nn.Module, trainable_blocks: Optional[int],
                  train_classifier: bool = False) -> list[str]:
    """Set ``requires_grad`` for an explanation run; return the names of the trainable model params.

    The ICE head always trains. ``trainable_blocks``: ``None`` all blocks and embeddings, ``0`` none,
    ``k`` the last ``k`` blocks. The [CLS] path after the blocks (final ``norm``, ``fc_norm``,
    classifier ``head``) trains only with ``train_classifier``: ICE reads the tokens before the final
    norm and puts no loss on [CLS], and a parameter without a gradient stalls
    DistributedDataParallel.
    """
    depth = len(model.blocks)
    if trainable_blocks is not None and not 0 <= trainable_blocks <= depth:
        raise ValueError(f"trainable_blocks must be in [0, {depth}] for this {depth}-block model, "
                         f"got {trainable_blocks}")
    head_params = {id(p) for p in head.parameters()}
    cls_path = {id(p) for m in (model.norm, getattr(model, "fc_norm", None), model.get_classifier())
                if m is not None for p in m.parameters()}
    first = 0 if trainable_blocks is None else depth - trainable_blocks
    trained = tuple(f"blocks.{i}." for i in range(first, depth))

    def trains(name: str, p: nn.Parameter) -> bool:
        if id(p) in head_params:
            return True
        if id(p) in cls_path:
            return train_classifier
        return trainable_blocks is None or name.startswith(trained)

    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name, p))
        if p.requires_grad and id(p) not in head_params:
            names.append(name)
    for p in head.parameters():
        p.requires_grad_(True)
    return names


class ICEExplainer(nn.Module):
    """A timm ViT with its explanation head: ``forward(x) -> ([CLS] logits [B, C], ICE logits
    [B, N, C+1])``, the ICE head on the last block's patch tokens before the final norm.

    The head is stored as ``model.ice_head``, so ``model.state_dict()`` (what checkpoints hold) has
    timm's keys plus ``ice_head.fc.*``, the same keys a model patched with ``method="ice"`` has.
    """

    def __init__(self, model: nn.Module, head: ICEHead) -> None:
        super().__init__()
        self.model = model
        model.ice_head = head

    @property
    def head(self) -> ICEHead:
        return self.model.ice_head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, tokens = forward_with_tokens(self.model, x)
        return logits, self.model.ice_head(tokens[:, self.model.num_prefix_tokens:])

    def no_weight_decay(self) -> set[str]:
        return {f"model.{k}" for k in self.model.no_weight_decay()}
