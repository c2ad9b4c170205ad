"""ICE's adversarial normalization loss (Algorithm 1 and Eqs. 3-8 of the paper), in two modes.

Per image, with ``z_i`` the ICE head's per-patch outputs over C image classes + background (last):

* background phase: ``B_hat = alpha * mean_i z_i``, cross-entropy against the background one-hot;
* class phase: ``Y_hat`` = the mean of ``z_i`` over the patches whose argmax is not background,
  cross-entropy against the image label padded with a 0 for background (soft labels from
  mixup/cutmix work the same way);
* ``L = class_weight * L_class + bg_weight * L_bg``.

Modes (:data:`LOSS_MODES`):

* ``"paper"``: as written in the paper. ``z_i`` is the head's logit vector after instance
  normalization (Eq. 2, Algorithm 1: ``InstanceNormalization(MLP(x))`` on ``[B, N, C+1]``, i.e. each
  patch's C+1 logits normalized to zero mean and unit variance, no affine). Argmax, hence the
  decision mask, is unchanged by it; it bounds the logit scale so neither phase can win by inflating
  logits. ``Y_hat`` is the exact foreground mean; an image with no foreground patch gets
  ``Y_hat = 0`` (a uniform prediction: loss ``log(C+1)`` and no gradient). Weights
  ``lambda`` and ``1 - lambda``: the paper's ``lambda = 0.975`` (ICE-f 0.99) belongs to ImageNet's
  1000 classes, and :class:`ICELoss` derives lambda from the class count by default (below).
* ``"official"``: what the released code (Hanyang-HCC-Lab/ICE, imagenet_train) computes: raw logits
  (no instance normalization), ``Y_hat`` = foreground sum / (n_fg + 1), weights 1 and 0.025, and the
  background term switched off while fewer than 10% of the batch's patches are foreground. Its
  weights are not lambda-parametrized, so the class-count rule does not apply to it.

The class-count rule (``lambda_class="auto"``, :func:`auto_lambda`). Right after initialization the
head's outputs are near uniform over the C+1 classes. The class phase then pulls a foreground patch's
background logit down with a weight of about ``lambda / (C+1)`` (the background probability in
``Y_hat``), the background phase pushes it up with about ``(1 - lambda) * alpha * C / (C+1)``. Their
ratio ``R = (1 - lambda) * alpha * C / lambda`` is 12.8 in the paper's setting (C = 1000, lambda
0.975, alpha 0.5) but 0.13 at C = 10 with the same lambda: the background phase never wins the early
contest and the head calls every patch foreground. The rule keeps ``(1 - lambda) * C / lambda`` at
the paper's value, i.e. ``R`` at the paper's value for the same alpha::

    lambda(C) = C / (C + K),   K = 1000 * (1 - lambda_paper) / lambda_paper

which gives exactly ``lambda_paper`` at C = 1000 (0.975 for ICE, 0.99 for ICE-f), 0.886 at C = 200,
0.661 at C = 50 and 0.281 at C = 10 for ICE. alpha stays a free knob: Table 6's alpha 1.0 doubles R
at any class count, as it does in the paper at C = 1000. The rule uses nothing but the class count
and the paper's setting.

Neither mode puts a loss on the [CLS] prediction during explanation training (the official code
multiplies it by 0); pruning runs add cross-entropy on [CLS] themselves (``train/prune.py``).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


#: the class count the paper's lambdas were tuned for (ImageNet)
PAPER_NUM_CLASSES = 1000
#: ``lambda_class`` values that are words: the class-count rule and the paper's literal value
LAMBDA_RULES = ("auto", "paper")


def parse_lambda(text: str) -> Union[float, str]:
    """A command line's ``--lambda-class``: ``auto``, ``paper`` or a number in [0, 1]."""
    if text in LAMBDA_RULES:
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--lambda-class must be auto, paper or a number in [0, 1], got "
                         f"{text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--lambda-class must be in [0, 1], got {value}; auto derives it from the "
                         f"class count, paper is the paper's 0.975 (ICE-f 0.99)")
    return value


def auto_lambda(num_classes: int, paper_lambda: float = 0.975,
                paper_num_classes: int = PAPER_NUM_CLASSES) -> float:
    """The class weight for ``num_classes`` classes that keeps the paper's balance of the two phases:
    ``C / (C + K)`` with ``K = paper_num_classes * (1 - paper_lambda) / paper_lambda`` (see the
    module docstring). ``auto_lambda(1000) == 0.975``; ``auto_lambda(1000, 0.99) == 0.99`` (ICE-f)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 1:
        raise ValueError(f"the class-count rule needs the number of image classes (>= 1), got "
                         f"{num_classes!r}")
    if isinstance(paper_lambda, bool) or not isinstance(paper_lambda, numbers.Real) \
            or not 0.0 < paper_lambda < 1.0:
        raise ValueError(f"paper_lambda must be in (0, 1), got {paper_lambda!r}")
    k = paper_num_classes * (1.0 - paper_lambda) / paper_lambda
    return num_classes / (num_classes + k)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Settings of the adversarial normalization loss; see :data:`LOSS_MODES` for the two presets."""

    alpha: float = 0.5  # background scale of Eq. 3
    class_weight: float = 0.975  # lambda_class
    bg_weight: float = 0.025  # 1 - lambda_class
    instance_norm: bool = True  # normalize each patch's logits over its C+1 classes (Eq. 2)
    fg_denominator_offset: int = 0  # the official code divides the foreground sum by n_fg + 1
    min_fg_fraction: float = 0.0  # background term off while the batch's foreground share is below
    eps: float = 1e-5  # instance norm epsilon (torch's InstanceNorm default)
    # class-count rule: when set, the weights are lambda = auto_lambda(C, lambda_reference) and
    # 1 - lambda for the C of the logits, and class_weight / bg_weight are not used
    lambda_reference: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("alpha", "class_weight", "bg_weight", "min_fg_fraction", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
                raise ValueError(f"loss {name} must be a real number, got {value!r}")
        if not self.alpha > 0:
            raise ValueError(f"loss alpha (background scale) must be > 0, got {self.alpha}; "
                             f"the paper uses 0.5")
        for name in ("class_weight", "bg_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss {name} must be >= 0, got {getattr(self, name)}")
        if self.class_weight == 0 and self.bg_weight == 0:
            raise ValueError("class_weight and bg_weight are both 0: the loss would be constant")
        if not 0.0 <= self.min_fg_fraction <= 1.0:
            raise ValueError(f"min_fg_fraction must be in [0, 1], got {self.min_fg_fraction}")
        if self.lambda_reference is not None:
            auto_lambda(1, self.lambda_reference)  # validates the reference
        if self.fg_denominator_offset not in (0, 1):
            raise ValueError(f"fg_denominator_offset must be 0 (paper) or 1 (official code), got "
                             f"{self.fg_denominator_offset}")

    def with_lambda(self, lambda_class: float) -> "LossConfig":
        """Paper parametrization: ``L = lambda * L_class + (1 - lambda) * L_bg``."""
        if isinstance(lambda_class, bool) or not isinstance(lambda_class, numbers.Real) \
                or not 0.0 <= lambda_class <= 1.0:
            raise ValueError(f"lambda_class must be in [0, 1], got {lambda_class!r}; the paper uses "
                             f"0.975 (ICE) and 0.99 (ICE-f)")
        return dataclasses.replace(self, class_weight=float(lambda_class),
                                   bg_weight=1.0 - float(lambda_class), lambda_reference=None)

    def with_auto_lambda(self, paper_lambda: float = 0.975) -> "LossConfig":
        """The class-count rule: ``lambda = auto_lambda(C, paper_lambda)`` for the logits' C."""
        auto_lambda(1, paper_lambda)
        return dataclasses.replace(self, lambda_reference=float(paper_lambda))

    def weights(self, num_classes: int) -> tuple[float, float]:
        """``(class_weight, bg_weight)`` for a head with ``num_classes`` image classes."""
        if self.lambda_reference is None:
            return self.class_weight, self.bg_weight
        lam = auto_lambda(num_classes, self.lambda_reference)
        return lam, 1.0 - lam


LOSS_MODES: dict[str, LossConfig] = {
    "paper": LossConfig(alpha=0.5, class_weight=0.975, bg_weight=0.025, instance_norm=True,
                        fg_denominator_offset=0, min_fg_fraction=0.0),
    "official": LossConfig(alpha=0.5, class_weight=1.0, bg_weight=0.025, instance_norm=False,
                           fg_denominator_offset=1, min_fg_fraction=0.1),
}


class LossOutput(NamedTuple):
    loss: Tensor  # weighted total, what backward() runs on
    class_loss: Tensor  # L_class (unweighted)
    bg_loss: Tensor  # L_bg (unweighted)
    fg_fraction: Tensor  # share of the batch's patches whose argmax is not background
    bg_active: bool  # whether the background term counted (official mode's 10% switch)


def _soft_targets(target: Tensor, num_classes: int, batch: int) -> Tensor:
    if target.dim() == 1:
        if target.dtype.is_floating_point:
            raise ValueError("integer class indices or [B, C] soft labels expected, got float [B]")
        if target.numel() and (target.min() < 0 or target.max() >= num_classes):
            raise ValueError(f"class labels must be in [0, {num_classes - 1}] for a head with "
                             f"{num_classes} classes + background, got {target.min().item()}.."
                             f"{target.max().item()}")
        target = F.one_hot(target, num_classes).float()
    if target.shape != (batch, num_classes):
        raise ValueError(f"targets of shape {tuple(target.shape)} do not fit logits with {batch} "
                         f"images and {num_classes} classes + background; expected [B] or "
                         f"[B, {num_classes}]")
    return target


def soft_cross_entropy(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of ``-sum_c target_c log softmax(pred)_c``."""
    return -(target * F.log_softmax(pred, dim=-1)).sum(-1).mean()


def adversarial_normalization_loss(logits: Tensor, target: Tensor,
                                   config: LossConfig = LOSS_MODES["paper"]) -> LossOutput:
    """The ICE loss of per-patch logits ``[B, N, C+1]`` (background last) for image labels ``target``
    (``[B]`` class indices or ``[B, C]`` soft labels, e.g. from timm's Mixup)."""
    if logits.dim() != 3 or logits.shape[-1] < 2:
        raise ValueError(f"ICE logits must be [B, N, C+1] with C >= 1, got {tuple(logits.shape)}")
    B, N, K = logits.shape
    C = K - 1
    y = _soft_targets(target, C, B).to(torch.float32)
    z = logits.float()  # the loss runs in fp32 whatever the autocast dtype
    if config.instance_norm:
        z = F.layer_norm(z, (K,), eps=config.eps)  # == InstanceNorm1d on [B, N, C+1]: per patch
    fg = z.argmax(dim=-1) != C  # decision mask D_i of Eq. 5 (not differentiable)
    n_fg = fg.sum(dim=1, keepdim=True)
    fg_fraction = fg.float().mean()

    background = torch.full((B,), C, dtype=torch.long, device=z.device)
    bg_loss = F.cross_entropy(config.alpha * z.mean(dim=1), background)

    fg_sum = (z * fg.unsqueeze(-1)).sum(dim=1)
    y_hat = fg_sum / (n_fg + config.fg_denominator_offset).clamp_min(1)
    class_loss = soft_cross_entropy(y_hat, F.pad(y, (0, 1)))

    class_weight, bg_weight = config.weights(C)
    bg_active = bool(fg_fraction >= config.min_fg_fraction)
    loss = class_weight * class_loss
    if bg_active:
        loss = loss + bg_weight * bg_loss
    return LossOutput(loss, class_loss.detach(), bg_loss.detach(), fg_fraction.detach(), bg_active)


class ICELoss(nn.Module):
    """Adversarial normalization as a module: ``ICELoss("paper")`` or ``ICELoss("official")``, any
    field of :class:`LossConfig` overridable.

    ``lambda_class`` (paper mode): ``"auto"`` (the default) derives lambda from the class count of the
    logits by :func:`auto_lambda`, giving ``paper_lambda`` at 1000 classes; ``"paper"`` is the
    paper's literal ``paper_lambda`` at any class count; a number fixes it. ``paper_lambda`` is the
    variant's value in the paper: 0.975 for ICE, 0.99 for ICE-f. Explicit ``class_weight`` /
    ``bg_weight`` overrides fix the weights instead. ``resolved_lambda(C)`` says what a run uses.

    ``forward`` takes one logits tensor ``[B, N, C+1]`` or a list of them (a pruned model's selection
    points, each with its own N); a list gives the mean of the per-point losses.
    """

    def __init__(self, mode: str = "paper", lambda_class: Union[float, str, None] = None,
                 paper_lambda: float = 0.975, **overrides) -> None:
        super().__init__()
        if mode not in LOSS_MODES:
            raise ValueError(f"unknown ICE loss mode {mode!r}; choose one of {sorted(LOSS_MODES)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(LossConfig)}
        if unknown:
            raise TypeError(f"unknown ICE loss settings {sorted(unknown)}")
        fixed_weights = {"class_weight", "bg_weight"} & set(overrides)
        if lambda_class is not None and fixed_weights:
            raise ValueError(f"give lambda_class or {sorted(fixed_weights)}, not both")
        lambda_parametrized = mode == "paper"
        if lambda_class is not None and not lambda_parametrized:
            raise ValueError(f"lambda_class={lambda_class!r} sets the paper mode's weights "
                             f"(lambda, 1 - lambda); the {mode!r} mode's weights "
                             f"({LOSS_MODES[mode].class_weight:g}, {LOSS_MODES[mode].bg_weight:g}) are "
                             f"not lambda-parametrized: use mode 'paper' or leave lambda_class unset")
        if lambda_class is None:
            lambda_class = "auto" if lambda_parametrized and not fixed_weights else None
        config = dataclasses.replace(LOSS_MODES[mode], **overrides)
        if lambda_class == "auto":
            config = config.with_auto_lambda(paper_lambda)
        elif lambda_class == "paper":
            config = config.with_lambda(paper_lambda)
        elif isinstance(lambda_class, str):
            raise ValueError(f"lambda_class must be a number in [0, 1] or one of {LAMBDA_RULES}, got "
                             f"{lambda_class!r}")
        elif lambda_class is not None:
            config = config.with_lambda(lambda_class)
        self.mode = mode
        self.lambda_rule = lambda_class if isinstance(lambda_class, str) else (
            "fixed" if lambda_parametrized else mode)
        self.config = config

    def resolved_lambda(self, num_classes: int) -> float:
        """The class weight this loss uses for ``num_classes`` image classes."""
        return self.config.weights(num_classes)[0]

    def forward(self, logits, target: Tensor) -> LossOutput:
        if isinstance(logits, Tensor):
            return adversarial_normalization_loss(logits, target, self.config)
        if not logits:
            raise ValueError("no ICE logits: was the model patched with method='ice' and run in "
                             "train mode?")
        outs = [adversarial_normalization_loss(z, target, self.config) for z in logits]
        n = len(outs)
        return LossOutput(sum(o.loss for o in outs) / n, sum(o.class_loss for o in outs) / n,
                          sum(o.bg_loss for o in outs) / n, sum(o.fg_fraction for o in outs) / n,
                          all(o.bg_active for o in outs))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, {self.config}"


@torch.no_grad()
def ice_image_logits(logits: Tensor, config: LossConfig = LOSS_MODES["paper"]) -> Tensor:
    """Image-level class scores ``[B, C]`` read off the ICE head: the class-phase vector ``Y_hat``
    without its background entry (the mean over all patches for an image with no foreground patch)."""
    z = logits.float()
    if config.instance_norm:
        z = F.layer_norm(z, (z.shape[-1],), eps=config.eps)
    fg = (z.argmax(dim=-1) != z.shape[-1] - 1).unsqueeze(-1)
    n_fg = fg.sum(dim=1)
    y_hat = torch.where(n_fg > 0, (z * fg).sum(dim=1) / n_fg.clamp_min(1), z.mean(dim=1))
    return y_hat[:, :-1]
