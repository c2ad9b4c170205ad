"""``patch()`` / ``unpatch()``: token selection inside a Vision Transformer, by class swap.

``patch`` dispatches on the model's type to an integration, ToMe-style:
:mod:`ice_prune.integrations.timm` (timm's ``VisionTransformer``) or
:mod:`ice_prune.integrations.transformers` (Hugging Face ViT / DeiT, imported only for such a model:
it needs the ``transformers`` extra), and runs the pipeline they share,
:func:`ice_prune.integrations.common.patch_model`. Nothing else in the model changes: its state-dict
keys stay (plus ``ice_head.*``) and ``unpatch`` gives the original model back.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from ice_prune.integrations import timm as timm_integration
from ice_prune.integrations.common import Integration, patch_model, unpatch_model
from ice_prune.select import KeepPolicy, KeepRate

__all__ = ["patch", "unpatch"]


def integration_of(model: nn.Module) -> Integration:
    """The integration that patches ``model``: transformers' for a Hugging Face model, else timm's
    (which names what it supports when ``model`` is neither)."""
    if any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        from ice_prune.integrations import transformers
        return transformers.INTEGRATION
    return timm_integration.INTEGRATION


def patch(
    model: nn.Module,
    keep_rate: KeepRate = 0.7,
    method: str = "ice",
    locs: Sequence[int] = (3, 6, 9),
    placement: str = "attn",
    fuse: bool = True,
    heads: str = "shared",
    num_classes: Optional[int] = None,
    trace: bool = False,
    explain: bool = False,
    kernel: str = "auto",
    keep_policy: Optional[KeepPolicy] = None,
) -> nn.Module:
    """Insert token selection into a Vision Transformer, in place; returns the model.

    Args:
        model: a timm ``VisionTransformer`` from ``timm.create_model`` (DeiT, ViT, DeiT III,
            register and distilled ViTs; :mod:`ice_prune.integrations.timm`), or a transformers ViT /
            DeiT (:mod:`ice_prune.integrations.transformers`; needs the ``transformers`` extra).
        keep_rate: fraction of non-prefix tokens kept at each selection point, ``ceil(rate * n)``
            (EViT's rule): one float for all points or one per point. Change it later with
            ``model.keep_rate = ...``.
        method: ``"ice"`` (ICE head background score) or ``"evit"`` ([CLS] attention).
        locs: block indices (from 0) where selection happens; the paper's 4th, 7th and 10th blocks.
        placement: ``"attn"`` selects inside the block after the attention residual, before the MLP
            (EViT's); ``"block"`` after the whole block.
        fuse: fuse the dropped tokens into one token appended last.
        heads: ICE only: one head ``"shared"`` by all points (the paper's 22.4M params for DeiT-S)
            or one ``"per_location"``.
        num_classes: ICE only: image classes of the head (background is added); default the model's
            (a transformers ``ViTModel`` / ``DeiTModel`` backbone has none: pass it).
        trace: record per selection point which patches were kept and fused (``model.ice_trace``,
            what :func:`ice_prune.restore` reads); it records no head logits, so an eval forward
            keeps ICE's fused score.
        explain: ICE only: every selection point scores all its tokens, even where it keeps them
            all, and each forward leaves the ICE map over the full patch grid in
            ``model.ice_explanation`` (an :class:`~ice_prune.integrations.common.ICEExplanation`),
            with no second pass and the same logits. Toggle with ``model.explain = ...``.
        kernel: the kernels of the reorganize step and of ICE's fused score (eval, no
            gradient): ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or
            ``"torch"``.
        keep_policy: a :class:`~ice_prune.select.KeepPolicy` keeps a number of tokens per image
            instead of ``keep_rate`` (ICE: ``threshold``, EViT: ``mass``), the batch run packed from
            the first point that drops tokens (:mod:`ice_prune.packed`). timm models with
            ``global_pool="token"``, eval mode, without ``trace`` / ``explain``. ``None``: the fixed
            ``keep_rate``. Change it later with ``model.keep_policy = ...``.
    """
    return patch_model(integration_of(model), model, keep_rate=keep_rate, method=method, locs=locs,
                       placement=placement, fuse=fuse, heads=heads, num_classes=num_classes,
                       trace=trace, explain=explain, kernel=kernel, keep_policy=keep_policy)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original classes, no ICE head, the original outputs. Returns the model."""
    return unpatch_model(integration_of(model), model)
