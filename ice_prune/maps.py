"""Explanation maps for a timm ViT: ICE's maps and the maps it is compared against.

Every method returns one map per image on the patch grid, ``[B, gh, gw]`` (higher = more relevant to
the explained class); :func:`upsample` brings maps to the image (bilinear) and masks (nearest).
The methods live in the :data:`METHODS` registry under the names ``train/evaluate.py`` uses:

* ``ice``: ICE (Jin et al., CVPR 2023): the ICE head on the last block's output before the final norm
  gives every patch logits over C classes + background; the map is the softmax probability of the
  explained class per patch. :func:`ice_explain` also gives the per-patch prediction and the
  foreground mask (argmax is not background).
* ``raw-attention``: the last block's attention, head mean, [CLS] row over the patches (the "raw
  attention" baseline of Chefer et al. CVPR 2021 and of DINO / Naseer et al. NeurIPS 2021).
* ``rollout``: attention rollout (Abnar & Zuidema, ACL 2020) as implemented by Chefer et al.
  (``compute_rollout_attention``): per block the head-mean attention plus the identity, rows
  renormalized, multiplied from the first block to the last; the [CLS] row over the patches.
* ``gradcam``: attention GradCAM, the baseline of Chefer et al. CVPR 2021
  (``generate_attn_gradcam``): last block, each head's [CLS]-row attention weighted by the mean of
  its gradient over that row, head mean, then ReLU.
* ``generic``: Chefer et al. ICCV 2021, "Generic attention-model explainability" for self-attention
  (``generate_relevance``): ``R = I``; per block ``R += mean_h((grad * A)^+) @ R``; the [CLS] row.
* ``pm-style``: see :func:`pm_style_map`.
* ``ice-pruned``: ICE's map from a patched ICE model's own pruned forward (explain mode,
  ``model.ice_explanation``): each patch's ``1 - P(background)`` from its last scoring at a selection
  point; see :func:`pruned_forward_map`. It needs a model patched with ``method="ice"``
  (:data:`PRUNED_FORWARD_METHODS`), runs at the model's keep rate and explains no class.

Gradient methods back-propagate the explained class's logit of the model's own classifier.
Attention and its gradient are read with a forward hook on each block's ``attn.attn_drop`` (the
module timm applies to the softmax output) while ``fused_attn`` is switched off;
:func:`record_attention` restores the model on exit. A model patched by :func:`ice_prune.patch`
runs with ``keep_rate=1.0`` (every token kept, exactly the unpatched network) while it is explained,
since the maps need every patch; ``ice-pruned`` alone runs at the model's keep rate.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ice_prune.head import ICEHead, forward_with_tokens
from ice_prune.integrations.common import ICEModel
from ice_prune.loss import ice_image_logits

Target = Optional[Union[int, Tensor]]


def patch_grid(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """``(gh, gw)``: the patch grid of ``images`` under ``model.patch_embed``."""
    return tuple(model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))


@contextlib.contextmanager
def full_tokens(model: nn.Module) -> Iterator[nn.Module]:
    """Run a patched model with every token kept (``keep_rate=1.0``); unpatched models pass through."""
    if not hasattr(model, "_ice"):
        yield model
        return
    saved = model._ice.keep_rate
    model.keep_rate = 1.0
    try:
        yield model
    finally:
        model._ice.keep_rate = saved


class AttentionRecord:
    """Per block, the softmax attention ``[B, H, N, N]`` of the last forward; ``grad`` is filled by
    :func:`attention_forward` with ``backward=True``."""

    def __init__(self, num_blocks: int) -> None:
        self.attn: list[Optional[Tensor]] = [None] * num_blocks
        self.grad: list[Optional[Tensor]] = [None] * num_blocks

    def _hook(self, i: int) -> Callable:
        def hook(module, inp, out):
            self.attn[i] = out
        return hook


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[AttentionRecord]:
    """Switch off fused attention in every block and record the attention matrices (and gradients);
    the model is exactly as before on exit."""
    blocks = list(model.blocks)
    for blk in blocks:
        if not (hasattr(blk, "attn") and hasattr(blk.attn, "fused_attn") and hasattr(blk.attn, "attn_drop")):
            raise TypeError(f"{type(blk.attn).__name__} is not timm's Attention (no fused_attn / "
                            f"attn_drop): attention maps need a timm VisionTransformer block")
    rec = AttentionRecord(len(blocks))
    saved = [blk.attn.fused_attn for blk in blocks]
    handles = []
    try:
        for i, blk in enumerate(blocks):
            blk.attn.fused_attn = False
            handles.append(blk.attn.attn_drop.register_forward_hook(rec._hook(i)))
        with full_tokens(model):
            yield rec
    finally:
        for h in handles:
            h.remove()
        for blk, f in zip(blocks, saved):
            blk.attn.fused_attn = f


def _resolve_target(logits: Tensor, target: Target) -> Tensor:
    if target is None:
        return logits.argmax(-1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(logits.shape[0])
    if t.numel() != logits.shape[0] or (t < 0).any() or (t >= logits.shape[-1]).any():
        raise ValueError(f"target must be one class index or one per image in [0, {logits.shape[-1]}), "
                         f"got {target}")
    return t


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` inside, and on exit every submodule back in the mode it had (a frozen block
    in eval mode inside a model in training stays so, which ``model.train(previous)`` would undo)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def attention_forward(model: nn.Module, images: Tensor, target: Target = None,
                      backward: bool = False) -> tuple[AttentionRecord, Tensor]:
    """One eval-mode forward with attention recorded; with ``backward`` also the gradient of the
    target logits with respect to every attention matrix. Returns ``(record, target classes)``.

    Gradients come from ``torch.autograd.grad`` on the attention tensors, so the parameters' ``.grad``
    are left alone (a frozen backbone works too: the input is made to require grad).
    """
    with eval_mode(model), record_attention(model) as rec, \
            torch.enable_grad() if backward else torch.no_grad():
        logits = model(images.detach().requires_grad_(backward))
        cls = _resolve_target(logits, target)
        if backward:
            # the images are independent, so the gradient of the sum is each image's own
            rec.grad = list(torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), rec.attn))
    return rec, cls


def _cls_row(mat: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """``[B, N, N]`` (or ``[B, H, N, N]``) -> the [CLS] row over the patches on the grid."""
    row = mat[..., 0, num_prefix:]
    return row.reshape(*row.shape[:-1], *grid)


def raw_attention(model: nn.Module, images: Tensor, target: Target = None,
                  per_head: bool = False) -> Tensor:
    """Last block, [CLS] attention to each patch; head mean ``[B, gh, gw]`` or every head
    ``[B, H, gh, gw]`` with ``per_head=True`` (the VOC Jaccard protocol looks at single heads)."""
    rec, _ = attention_forward(model, images, target, backward=False)
    a = rec.attn[-1].detach()
    a = a if per_head else a.mean(1)
    return _cls_row(a, model.num_prefix_tokens, patch_grid(model, images))


def rollout(model: nn.Module, images: Tensor, target: Target = None) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020; Chefer et al.'s ``compute_rollout_attention``)."""
    rec, _ = attention_forward(model, images, target, backward=False)
    joint = None
    for a in rec.attn:
        a = a.detach().mean(1)
        a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else a @ joint
    return _cls_row(joint, model.num_prefix_tokens, patch_grid(model, images))


def attention_gradcam(model: nn.Module, images: Tensor, target: Target = None) -> Tensor:
    """Attention GradCAM of the last block (Chefer et al. CVPR 2021 baseline)."""
    rec, _ = attention_forward(model, images, target, backward=True)
    p, grid = model.num_prefix_tokens, patch_grid(model, images)
    cam = _cls_row(rec.attn[-1].detach(), p, grid)           # [B, H, gh, gw]
    grad = _cls_row(rec.grad[-1], p, grid)
    weights = grad.mean(dim=(-2, -1), keepdim=True)
    return (cam * weights).mean(1).clamp(min=0)


def generic_attention(model: nn.Module, images: Tensor, target: Target = None) -> Tensor:
    """Chefer et al. ICCV 2021: ``R = I; R += mean_h((grad * A)^+) @ R`` over the blocks."""
    rec, _ = attention_forward(model, images, target, backward=True)
    R = None
    for a, g in zip(rec.attn, rec.grad):
        cam = (g * a.detach()).clamp(min=0).mean(1)
        if R is None:
            R = torch.eye(cam.shape[-1], device=cam.device, dtype=cam.dtype).expand_as(cam).clone()
        R = R + cam @ R
    return _cls_row(R, model.num_prefix_tokens, patch_grid(model, images))


@dataclass
class ICEExplanation:
    """ICE's explanation of a batch, on the patch grid.

    ``patch_logits [B, C+1, gh, gw]`` (background last), ``probs`` their softmax,
    ``prediction [B, gh, gw]`` the per-patch class (``C`` = background), ``foreground`` the mask
    ``prediction != C``, ``target [B]`` the explained class, ``class_map [B, gh, gw]`` its probability
    per patch, ``logits [B, K]`` the model's own classifier output.
    """

    logits: Tensor
    patch_logits: Tensor
    probs: Tensor
    prediction: Tensor
    foreground: Tensor
    target: Tensor
    class_map: Tensor

    @property
    def background_class(self) -> int:
        return self.patch_logits.shape[1] - 1


def find_ice_head(model: nn.Module) -> ICEHead:
    head = getattr(model, "ice_head", None)
    if isinstance(head, ICEHead):
        return head
    if head is None:
        raise ValueError("the model has no ice_head: pass head=ICEHead(...) (trained with the "
                         "adversarial normalization loss) or a model patched with method='ice'")
    raise ValueError("the model has one ICE head per selection point (heads='per_location'): pass the "
                     "explanation head explicitly with head=...")


@torch.no_grad()
def ice_explain(model: nn.Module, images: Tensor, head: Optional[ICEHead] = None,
                target: Union[Target, str] = None) -> ICEExplanation:
    """ICE's maps: the head reads the last block's output before the final norm (official code).

    ``target`` defaults to the top-1 class of the model's classifier; it indexes the head's classes,
    so a head over another class count than the classifier needs an explicit ``target``.
    ``target="ice"`` explains the class ICE itself predicts for the image: the top-1 of its
    foreground-mean class scores (:func:`ice_prune.loss.ice_image_logits`), for a head whose model
    has no classifier trained on the head's classes.
    """
    head = find_ice_head(model) if head is None else head
    with eval_mode(model), full_tokens(model):
        logits, tokens = forward_with_tokens(model, images)
    if target is None and logits.shape[-1] != head.num_classes:
        raise ValueError(f"the classifier has {logits.shape[-1]} classes but the ICE head "
                         f"{head.num_classes}: pass target= (a class of the head) explicitly, or "
                         f"target='ice' for ICE's own prediction")
    grid = patch_grid(model, images)
    z = head(tokens[:, model.num_prefix_tokens:])                      # [B, n, C+1]
    patch_logits = z.transpose(1, 2).reshape(z.shape[0], z.shape[-1], *grid)
    probs = patch_logits.softmax(1)
    prediction = patch_logits.argmax(1)
    if isinstance(target, str):
        if target != "ice":
            raise ValueError(f"target must be a class index, one per image, None (the classifier's "
                             f"top-1) or 'ice' (ICE's own prediction), got {target!r}")
        cls = ice_image_logits(z).argmax(-1)
    else:
        cls = _resolve_target(logits if target is None else z[:, 0, :-1], target)
    class_map = probs.gather(1, cls[:, None, None, None].expand(-1, 1, *grid))[:, 0]
    return ICEExplanation(logits=logits, patch_logits=patch_logits, probs=probs,
                          prediction=prediction, foreground=prediction != head.num_classes,
                          target=cls, class_map=class_map)


def ice_map(model: nn.Module, images: Tensor, target: Target = None,
            head: Optional[ICEHead] = None) -> Tensor:
    return ice_explain(model, images, head=head, target=target).class_map


@torch.no_grad()
def pruned_forward_map(model: nn.Module, images: Tensor, target: Target = None) -> Tensor:
    """ICE's map from the pruned forward of a model patched with ``method="ice"``, ``[B, gh, gw]``:
    one eval-mode forward at the model's keep rate in explain mode (switched on for the call and
    restored after), each patch's ``1 - P(background)`` from its last scoring as its own token
    (``model.ice_explanation.foreground``). The map is a foreground probability, the same for every
    class: ``target`` is accepted and ignored. At ``keep_rate=1.0`` it is the head on every patch at
    the last selection point."""
    if not isinstance(model, ICEModel):
        raise ValueError("the ice-pruned map reads a model patched with method='ice' "
                         "(ice_prune.patch or ice_prune.load_model(..., method='ice')); this one is "
                         "not patched")
    saved = model.explain
    model.explain = True  # refused, with the reason, for a selector without an ICE head
    try:
        with eval_mode(model):
            model(images)
        explanation = model.ice_explanation
    finally:
        model.explain = saved
    return explanation.foreground.view(-1, *explanation.grid)


def pm_classify_patches(model: nn.Module, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """The model's own classifier (final ``norm``, ``fc_norm``, ``head_drop``, ``head``) applied to
    every patch token of ``tokens [B, N, D]`` (the last block's output before the final norm, as
    :func:`ice_prune.head.forward_with_tokens` gives it): ``[B, K, gh, gw]`` logits, with gradients
    when the tokens have them (PM-style training, :class:`ice_prune.training.tasks.PMStyleTask`)."""
    x = model.head(model.head_drop(model.fc_norm(model.norm(tokens[:, model.num_prefix_tokens:]))))
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)


@torch.no_grad()
def pm_patch_logits(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits [B, K], patch_logits [B, K, gh, gw])``: the model's own classifier (final norm,
    ``fc_norm``, ``head``) applied to every patch token (:func:`pm_classify_patches`)."""
    with full_tokens(model):
        logits, tokens = forward_with_tokens(model, images)
    return logits, pm_classify_patches(model, tokens, patch_grid(model, images))


def pm_style_map(model: nn.Module, images: Tensor, target: Target = None) -> Tensor:
    """PM-style map: per-patch softmax probability of the explained class under the model's own
    classifier head, applied to each patch token after the final norm (no extra parameters).

    Named "PM-style" because only the abstract of the PM paper (Kang, Heo & Choe, Pattern Recognition
    Letters 2024) is available. Known from it: a patch-level mask prediction from ViT features, one
    forward pass, class-dependent and probabilistic, no extra parameters, trained with little
    locality supervision (< 1% of ImageNet-1k, pseudo masks for WSOL). Not known: which layer's tokens
    and which normalization it reads, the loss, how masks enter training, and the threshold; what is
    here is the parameter-free reading of that description (our choice: the last block's tokens
    through the model's final norm and classifier, the classifier that reads [CLS]). Untrained, it
    is the model as it is; ``train/pm.py`` (:class:`ice_prune.training.tasks.PMStyleTask`) trains it with
    :func:`pm_style_loss` on a few masks. The map has no threshold: the evaluation protocols
    binarize it as they do every map.
    """
    with eval_mode(model):
        logits, patch_logits = pm_patch_logits(model, images)
    cls = _resolve_target(logits, target)
    probs = patch_logits.softmax(1)
    return probs.gather(1, cls[:, None, None, None].expand(-1, 1, *probs.shape[-2:]))[:, 0]


def pm_style_loss(patch_logits: Tensor, labels: Tensor, patch_masks: Tensor) -> Tensor:
    """The patch-level mask loss of PM-style training (our choice: the abstract gives none).

    Binary cross-entropy between each patch's probability of the image class ``p = softmax(z)[y]``
    (``patch_logits [B, K, gh, gw]``, the quantity :func:`pm_style_map` reads) and the patch's
    foreground fraction ``patch_masks [B, gh, gw]`` in [0, 1], averaged over the patches and images
    given: ``-mean(m log p + (1 - m) log(1 - p))``. ``log(1 - p)`` is computed as ``logsumexp`` of the
    other classes' logits minus that of all, finite however sure the patch is. Computed in float32.
    So the map is trained to be what it is read as: the probability that the patch shows the class.
    """
    if patch_masks.shape != patch_logits.shape[:1] + patch_logits.shape[2:]:
        raise ValueError(f"patch_masks {tuple(patch_masks.shape)} must be [B, gh, gw] matching "
                         f"patch_logits {tuple(patch_logits.shape)}")
    if patch_logits.shape[1] < 2:
        raise ValueError("pm_style_loss needs at least 2 classes: with one, every patch has "
                         "probability 1 for it")
    z = patch_logits.float()
    index = labels[:, None, None, None].expand(-1, 1, *z.shape[2:])
    log_all = z.logsumexp(1)
    logp = z.gather(1, index)[:, 0] - log_all
    log1mp = z.scatter(1, index, float("-inf")).logsumexp(1) - log_all
    m = patch_masks.float()
    return -(m * logp + (1 - m) * log1mp).mean()


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """``[B, gh, gw]`` -> ``[B, H, W]``: ``mode="bilinear"`` for maps (as Chefer et al.,
    ``align_corners=False``), ``"nearest"`` for masks and class predictions."""
    x = maps[:, None].float()
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")[:, 0].to(maps.dtype)
    return F.interpolate(x, size=size, mode=mode, align_corners=False)[:, 0]


MapFn = Callable[..., Tensor]

#: method name -> ``fn(model, images, target=None, **kw) -> [B, gh, gw]``
METHODS: dict[str, MapFn] = {
    "ice": ice_map,
    "raw-attention": raw_attention,
    "rollout": rollout,
    "gradcam": attention_gradcam,
    "generic": generic_attention,
    "pm-style": pm_style_map,
    "ice-pruned": pruned_forward_map,
}

def gives_pruned_forward_maps(model: nn.Module) -> bool:
    """Whether ``model`` gives the :data:`PRUNED_FORWARD_METHODS` maps: patched with an ICE head."""
    return isinstance(model, ICEModel) and model._ice.selector.needs_head


#: the maps read from a patched ICE model's own forward, not from any model: a foreground
#: probability, whose mask is the map above :data:`FOREGROUND_THRESHOLD`
PRUNED_FORWARD_METHODS = ("ice-pruned",)
#: a foreground probability's mask: ``1 - P(background) > 0.5``, the patches the head deems more
#: likely foreground than background (not quite ICE's argmax rule, which compares the background
#: with each class alone)
FOREGROUND_THRESHOLD = 0.5


def explain(model: nn.Module, images: Tensor, method: str = "ice", target: Target = None,
            size: Optional[tuple[int, int]] = None, **kwargs) -> Tensor:
    """The ``method`` map of ``images`` for ``target`` (default: the model's top-1 class),
    ``[B, gh, gw]``, or upsampled (bilinear) to ``size``."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {sorted(METHODS)}")
    maps = METHODS[method](model, images, target=target, **kwargs)
    return maps if size is None else upsample(maps, size)
