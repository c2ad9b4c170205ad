"""What the training scripts compute per batch, and EViT's keep-rate schedule.

:class:`ExplainTask` (``train/explain.py``) and :class:`PruneTask` (``train/prune.py``) give
:func:`ice_prune.engine.fit` its ``step`` (loss and logged metrics of one batch) and ``eval``
(metrics of one validation batch); :func:`keep_rate_schedule` the keep rate of a pruned model at
each update.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from ice_prune.engine import unwrap
from ice_prune.select import KeepRate, check_keep_rate

def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for class indices ``[B]`` or soft targets ``[B, C]`` (mixup/cutmix)."""
    if targets.dim() == 2:
        return -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    return nn.functional.cross_entropy(logits.float(), targets)


def _topk_correct(logits: Tensor, targets: Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == targets[:, None]).any(-1).float().mean().item()


class ExplainTask:
    """Explanation training of an :class:`ice_prune.head.ICEExplainer`: the ICE loss on the head's
    patch logits, plus ``cls_weight`` x cross-entropy on [CLS] (0 in the paper and official code)."""

    def __init__(self, loss_fn: nn.Module, cls_weight: float = 0.0) -> None:
        if cls_weight < 0:
            raise ValueError(f"cls_weight must be >= 0, got {cls_weight}")
        self.loss_fn, self.cls_weight = loss_fn, cls_weight

    def step(self, model: nn.Module, images: Tensor, targets: Tensor):
        cls_logits, patch_logits = model(images)
        out = self.loss_fn(patch_logits, targets)
        loss = out.loss
        if self.cls_weight:
            loss = loss + self.cls_weight * classification_loss(cls_logits, targets)
        return loss, {"class_loss": out.class_loss.item(), "bg_loss": out.bg_loss.item(),
                      "fg_fraction": out.fg_fraction.item(), "bg_active": float(out.bg_active)}

    def eval(self, model: nn.Module, images: Tensor, targets: Tensor) -> dict[str, float]:
        from ice_prune.loss import ice_image_logits

        cls_logits, patch_logits = model(images)
        out = self.loss_fn(patch_logits, targets)
        ice_logits = ice_image_logits(patch_logits, self.loss_fn.config)
        return {"ice_loss": out.loss.item(), "fg_fraction": out.fg_fraction.item(),
                "ice_acc1": _topk_correct(ice_logits, targets, 1),
                "cls_acc1": _topk_correct(cls_logits, targets, 1)}


class PruneTask:
    """Pruning fine-tuning of a patched model: cross-entropy on [CLS] plus, when the model has an ICE
    head (``method="ice"``), ``ice_weight`` x the ICE loss averaged over the selection points."""

    def __init__(self, loss_fn: Optional[nn.Module], ice_weight: float = 1.0) -> None:
        if not 0 <= ice_weight:
            raise ValueError(f"ice_weight must be >= 0, got {ice_weight}")
        self.loss_fn, self.ice_weight = loss_fn, ice_weight

    def step(self, model: nn.Module, images: Tensor, targets: Tensor):
        logits = model(images)
        ce = classification_loss(logits, targets)
        metrics = {"ce": ce.item()}
        loss = ce
        ice_logits = unwrap(model).ice_logits
        if self.loss_fn is not None and self.ice_weight and ice_logits:
            out = self.loss_fn(ice_logits, targets)
            loss = loss + self.ice_weight * out.loss
            metrics.update(ice_loss=out.loss.item(), fg_fraction=out.fg_fraction.item())
        return loss, metrics

    def eval(self, model: nn.Module, images: Tensor, targets: Tensor) -> dict[str, float]:
        logits = model(images)
        return {"loss": classification_loss(logits, targets).item(),
                "acc1": _topk_correct(logits, targets, 1), "acc5": _topk_correct(logits, targets, 5)}


def keep_rate_schedule(target: KeepRate, shrink_start: int = 0, shrink_epochs: int = 0,
                       iters_per_epoch: int = 1):
    """EViT's keep-rate schedule as a function of the global iteration.

    Rate 1 for the first ``shrink_start`` epochs, then a cosine from 1 down to ``target`` over
    ``shrink_epochs`` epochs, updated every iteration, then ``target``. EViT trains from scratch with
    ``shrink_start=10, shrink_epochs=100``; fine-tuning from a pretrained DeiT uses the target from the
    start (the defaults). A per-location ``target`` gives per-location rates.

    >>> sched = keep_rate_schedule(0.7, shrink_start=1, shrink_epochs=2, iters_per_epoch=10)
    >>> sched(0), sched(20), sched(30)
    (1.0, 0.85, 0.7)
    """
    targets = [target] if isinstance(target, numbers.Real) else list(target)
    check_keep_rate(targets, len(targets))
    if shrink_start < 0 or shrink_epochs < 0 or iters_per_epoch < 1:
        raise ValueError("shrink_start and shrink_epochs must be >= 0 and iters_per_epoch >= 1")
    start, length = shrink_start * iters_per_epoch, shrink_epochs * iters_per_epoch

    def rate(iteration: int) -> KeepRate:
        if iteration < start:
            t = 0.0
        elif iteration >= start + length:
            t = 1.0
        else:
            t = (iteration - start) / length
        cos = (math.cos(t * math.pi) + 1) * 0.5  # 1 at the start of the shrink, 0 at its end
        out = tuple(round(r + (1.0 - r) * cos, 12) for r in targets)
        return out[0] if isinstance(target, numbers.Real) else out

    return rate
