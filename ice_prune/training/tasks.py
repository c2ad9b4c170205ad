"""What the training scripts compute per batch.

:class:`ExplainTask` (``train/explain.py``), :class:`PruneTask` (``train/prune.py``) and
:class:`PMStyleTask` (``train/pm.py``) give :func:`ice_prune.training.engine.fit` its ``step`` (loss and
logged metrics of one batch) and ``eval`` (metrics of one validation batch).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ice_prune.checkpoint import split_ice_head
from ice_prune.data import MaskedTarget
from ice_prune.head import ICEHead, forward_with_tokens
from ice_prune.maps import ice_explain, patch_grid, pm_classify_patches, pm_style_loss
from ice_prune.models import load_model
from ice_prune.training.engine import unwrap

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


class MapValidation:
    """ICE's map scored during training, on images with masks that are not the evaluation images:
    ``MapValidation(model, dataset, images)(num_updates)`` gives ``{"map_val": {...}}`` for the
    epoch's record (:func:`ice_prune.training.engine.fit`'s ``epoch_end``).

    ``model`` is the timm ViT carrying its head (``model.ice_head``); ``dataset`` yields ``(image,
    label, mask)`` (SyntheticScenes' ``"mapval"`` split with ``return_mask=True``); its first
    ``images`` items are scored. The figures, in percent, are those of the evaluation:
    :func:`ice_prune.evaluation.evaluate_maps` with the ``segmentation`` protocol on the ``ice`` map
    (``miou``, ``pixel_accuracy``, ``map``), and ``fg_share``, the share of the images' patches whose
    ICE argmax is not background; ``images`` and ``updates`` (optimizer steps so far) with them.
    ``ice_target``: as evaluate_maps' (``"ice"`` for a head whose classifier was not trained on its
    classes)."""

    def __init__(self, model: nn.Module, dataset, images: int, batch_size: int = 32,
                 ice_target: str = "classifier") -> None:
        if images < 1:
            raise ValueError(f"images must be >= 1, got {images}")
        self.model, self.dataset, self.images = model, dataset, min(images, len(dataset))
        self.batch_size, self.ice_target = batch_size, ice_target

    @torch.no_grad()
    def __call__(self, num_updates: int) -> dict:
        from ice_prune.evaluation import evaluate_maps

        head = self.model.ice_head
        scores = evaluate_maps(self.model, head, self.dataset, ["segmentation"], ["ice"],
                               batch_size=self.batch_size, limit=self.images,
                               ice_target=self.ice_target)["methods"]["ice"]
        device = next(self.model.parameters()).device
        foreground = patches = 0
        for start in range(0, self.images, self.batch_size):
            batch = torch.stack([self.dataset[i][0]
                                 for i in range(start, min(start + self.batch_size, self.images))])
            fg = ice_explain(self.model, batch.to(device), head=head, target="ice").foreground
            foreground, patches = foreground + int(fg.sum()), patches + fg.numel()
        return {"map_val": {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
                            "map": scores["map"], "fg_share": 100 * foreground / patches,
                            "images": self.images, "updates": num_updates}}


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


class PatchClassifier(nn.Module):
    """A timm ViT as PM-style training sees it: ``forward(x) -> ([CLS] logits [B, K], patch logits
    [B, K, gh, gw])`` from one forward pass, the patch logits being the model's own classifier on
    every patch token (:func:`ice_prune.maps.pm_classify_patches`, what the ``pm-style`` map reads).

    No parameter of its own: ``model.state_dict()`` keeps exactly timm's keys. It is the module the
    training loop (and DistributedDataParallel) runs; checkpoints save ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, tokens = forward_with_tokens(self.model, x)
        return logits, pm_classify_patches(self.model, tokens, patch_grid(self.model, x))

    def no_weight_decay(self) -> set[str]:
        # the optimizer groups parameters by their names under this module
        return {f"model.{k}" for k in self.model.no_weight_decay()}


class ICEPseudoMasks:
    """Pseudo masks from a trained ICE model: ``masks(images) -> [B, gh, gw]`` float, 1 on the
    patches whose ICE argmax is not background (:func:`ice_prune.maps.ice_explain`'s
    ``foreground``), computed without gradients on the images the step trains on.

    :meth:`from_checkpoint` loads a ``train/explain.py`` checkpoint and checks that it fits the
    model being trained (architecture, patch grid and class count)."""

    def __init__(self, model: nn.Module, head: ICEHead) -> None:
        self.model, self.head = model.eval(), head.eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: str, student: nn.Module, model_name: str,
                        model_kwargs: Optional[dict] = None, trust: bool = False
                        ) -> "ICEPseudoMasks":
        """The ICE model of ``checkpoint`` built as ``model_name`` with ``model_kwargs`` (those of the
        model being trained, ``student``); ValueError when it is another architecture, has no ICE
        head, or another class count than ``student``'s classifier. ``trust=True``: unpickle the file
        fully (only for a file you trust; see ice_prune.checkpoint)."""
        where = f"pseudo-mask checkpoint {checkpoint!r}"
        try:
            teacher = load_model(model_name, checkpoint, trust=trust, **(model_kwargs or {}))
        except ValueError as e:
            raise ValueError(f"{where} is not a {model_name} like the model being trained "
                             f"(another architecture): {e}") from None
        head = getattr(teacher, "ice_head", None)
        if head is None:
            raise ValueError(f"{where} has no ICE head (ice_head.* keys): give a train/explain.py "
                             f"--variant ice checkpoint")
        if head.num_classes != student.num_classes:
            raise ValueError(f"{where} has an ICE head over {head.num_classes} classes, the model "
                             f"being trained {student.num_classes}: its pseudo masks are for another "
                             f"class count")
        mine = {k: tuple(v.shape) for k, v in student.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in split_ice_head(teacher.state_dict())[0].items()}
        if mine != theirs:
            differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ValueError(f"{where} is another architecture than the model being trained "
                             f"(differing weights: {', '.join(differ[:5])})")
        return cls(teacher, head)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        ref = next(self.model.parameters())
        if ref.device != images.device:
            self.model.to(images.device)
            self.head.to(images.device)
        # the foreground does not depend on the explained class: "ice" skips the classifier's check
        return ice_explain(self.model, images, head=self.head, target="ice").foreground.float()


class PMStyleTask:
    """PM-style explanation training: the ViT's own classifier learns to read every patch.

    What the PM paper's abstract states (Kang, Heo & Choe, Pattern Recognition Letters 2024): a
    patch-level mask prediction from the ViT's features in one forward pass, no extra parameters,
    fewer than 1% of the training images carry a mask, pseudo masks for weakly-supervised
    localization. What it does not state, and what is therefore ours: the loss, the layer, the
    weighting and the threshold. Here, per batch of a :class:`PatchClassifier` and targets
    :class:`ice_prune.data.MaskedTarget`:

    ``loss = CE([CLS] logits, labels) + mask_weight * pm_style_loss(patch logits of the masked
    images, their labels, their patch masks)``

    * cross-entropy on [CLS] for every image, with label ``smoothing`` as timm's ``Mixup`` applies
      it with mixing off (the soft targets ``train/prune.py`` trains on), hard labels at 0;
    * the mask loss (:func:`ice_prune.maps.pm_style_loss`, binary cross-entropy of each patch's
      class probability against its foreground fraction) on the images that carry a mask only,
      averaged over them, so its scale does not shrink with the mask fraction; a batch without a
      masked image trains on cross-entropy alone, exactly plain fine-tuning;
    * with ``pseudo_masks`` (e.g. :class:`ICEPseudoMasks`) the masked images' masks are made from the
      images themselves and the dataset's are never read.

    Logged per batch: ``ce``; ``mask_share`` (images with a mask / batch size) and
    ``mask_loss_per_image`` (the mask loss summed over the masked images / batch size). Their epoch
    means are the share of training images that carried a mask and, divided by each other, the mean
    mask loss per masked image. Evaluation: ``ce``, ``acc1``, and ``mask_loss`` where the images have
    masks.
    """

    def __init__(self, num_classes: int, mask_weight: float = 1.0, smoothing: float = 0.0,
                 pseudo_masks: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        if num_classes < 2:
            raise ValueError(f"PM-style training needs at least 2 classes, got {num_classes}")
        if not mask_weight >= 0:
            raise ValueError(f"mask_weight must be >= 0, got {mask_weight}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.num_classes, self.mask_weight, self.smoothing = num_classes, mask_weight, smoothing
        self.pseudo_masks = pseudo_masks

    def classification_targets(self, labels: Tensor) -> Tensor:
        if not self.smoothing:
            return labels
        from timm.data.mixup import mixup_target

        return mixup_target(labels, self.num_classes, 1.0, self.smoothing)

    def masks(self, images: Tensor, targets: MaskedTarget) -> Tensor:
        """The patch masks ``[M, gh, gw]`` of the batch's M masked images."""
        chosen = targets.has_mask
        if self.pseudo_masks is not None:
            return self.pseudo_masks(images[chosen])
        return targets.patch_mask[chosen]

    def losses(self, model: nn.Module, images: Tensor, targets: MaskedTarget
               ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(loss, cross-entropy, mask loss or None)`` of a batch."""
        labels, _, has_mask = targets
        cls_logits, patch_logits = model(images)
        ce = classification_loss(cls_logits, self.classification_targets(labels))
        if not has_mask.any():
            return ce, ce, None
        mask_loss = pm_style_loss(patch_logits[has_mask], labels[has_mask],
                                  self.masks(images, targets))
        return ce + self.mask_weight * mask_loss, ce, mask_loss

    def step(self, model: nn.Module, images: Tensor, targets: MaskedTarget):
        loss, ce, mask_loss = self.losses(model, images, targets)
        masked = int(targets.has_mask.sum())
        total = 0.0 if mask_loss is None else mask_loss.item() * masked
        return loss, {"ce": ce.item(), "mask_share": masked / images.shape[0],
                      "mask_loss_per_image": total / images.shape[0]}

    def eval(self, model: nn.Module, images: Tensor, targets: MaskedTarget) -> dict[str, float]:
        labels, _, has_mask = targets
        cls_logits, patch_logits = model(images)
        out = {"ce": nn.functional.cross_entropy(cls_logits.float(), labels).item(),
               "acc1": _topk_correct(cls_logits, labels, 1)}
        if has_mask.all():
            out["mask_loss"] = pm_style_loss(patch_logits, labels, self.masks(images, targets)).item()
        return out
