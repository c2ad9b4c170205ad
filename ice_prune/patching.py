"""``patch()`` / ``unpatch()``: token selection inside a timm ``VisionTransformer`` by class swap.

The whole integration is ToMe's pattern: the model and the blocks at the selection points get a
subclass of their own class that overrides ``forward``; one :class:`ICEState` object is shared by all
of them and carries the knobs (``model.keep_rate = 0.5`` takes effect on the next forward). Nothing
else in the model changes, so timm's state-dict keys stay, LayerScale, q/k norm, register and
distillation tokens, and fused attention all keep working, and ``unpatch`` gives the original model
back.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ice_prune.head import ICEHead
from ice_prune.kernels import reorganize
from ice_prune.kernels.ops import KERNEL_CHOICES
from ice_prune.select import SELECTORS, KeepRate, Selector, check_keep_rate, keep_count

PLACEMENTS = ("attn", "block")
HEADS = ("shared", "per_location")

class ICEState:
    """Configuration and per-forward record shared by a patched model and its selection blocks."""

    def __init__(self, selector: Selector, locs: tuple[int, ...], placement: str,
                 keep_rate: tuple[float, ...], fuse: bool, trace: bool, kernel: str,
                 num_prefix: int, heads: Optional[list[nn.Module]]) -> None:
        self.selector = selector
        self.locs = locs
        self.placement = placement
        self.keep_rate = keep_rate
        self.fuse = fuse
        self.trace = trace
        self.kernel = kernel
        self.num_prefix = num_prefix
        self.heads = heads  # one (shared) head repeated per location, or one each; owned by the model
        # what the last forward recorded
        self.record_logits = False
        self.logits: list[Tensor] = []
        self.trace_out: Optional[dict] = None
        self._positions: Optional[Tensor] = None

    def begin(self, model: "VisionTransformer", images: Tensor) -> None:
        """Reset the per-forward record; called at the start of ``forward_features``."""
        self.record_logits = model.training or self.trace
        self.logits = []
        self._positions = None
        if self.trace:
            grid = model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
            self.trace_out = {"grid": tuple(grid), "num_prefix": self.num_prefix,
                              "patch_size": tuple(model.patch_embed.patch_size), "locations": []}

    def select(self, x: Tensor, h: Optional[Tensor], cls_attn: Optional[Tensor], keep: int,
               loc: int) -> Tensor:
        head = self.heads[loc] if self.heads is not None else None
        scores, logits = self.selector.scores(cls_attn, h, head, self.num_prefix,
                                              logits_needed=self.record_logits, kernel=self.kernel)
        if logits is not None and self.record_logits:
            self.logits.append(logits)
        out, order = reorganize(x, scores, keep, self.num_prefix, self.fuse,
                                self.selector.normalize, self.kernel)
        if self.trace:
            self._record(loc, x.shape[1], out.shape[1], keep, order, scores)
        return out

    def _record(self, loc: int, tokens_in: int, tokens_out: int, keep: int, order: Tensor,
                scores: Tensor) -> None:
        B, n = order.shape
        if self._positions is None:  # first selection: tokens are still the image's patches
            self._positions = torch.arange(n, device=order.device).expand(B, n)
            self.trace_out["num_patches"] = n
        num_patches = self.trace_out["num_patches"]
        kept = self._positions.gather(1, order[:, :keep])
        # patches that still stand as themselves; -1 marks a fused token, scattered to a spare column
        mask = torch.zeros(B, num_patches + 1, dtype=torch.bool, device=order.device)
        mask.scatter_(1, torch.where(kept >= 0, kept, num_patches), True)
        fused = self._positions.gather(1, order[:, keep:])
        self.trace_out["locations"].append({
            "block": self.locs[loc], "tokens_in": tokens_in, "tokens_out": tokens_out, "keep": keep,
            "kept": kept, "fused": fused if self.fuse else None,
            "dropped": None if self.fuse else fused, "mask": mask[:, :num_patches],
            "scores": scores.detach(), "order": order})
        if self.fuse:
            kept = torch.cat([kept, kept.new_full((B, 1), -1)], dim=1)
        self._positions = kept


class ICEVisionTransformer:
    """Mixin put in front of the model's own class by :func:`patch`."""

    _ice: ICEState

    @property
    def keep_rate(self) -> KeepRate:
        rates = self._ice.keep_rate
        return rates[0] if len(set(rates)) == 1 else rates

    @keep_rate.setter
    def keep_rate(self, value: KeepRate) -> None:
        self._ice.keep_rate = check_keep_rate(value, len(self._ice.locs))

    @property
    def fuse(self) -> bool:
        return self._ice.fuse

    @fuse.setter
    def fuse(self, value: bool) -> None:
        self._ice.fuse = bool(value)

    @property
    def trace(self) -> bool:
        return self._ice.trace

    @trace.setter
    def trace(self, value: bool) -> None:
        self._ice.trace = bool(value)

    @property
    def ice_logits(self) -> list[Tensor]:
        """ICE head logits ``[B, n, C+1]`` per selection point of the last forward (train mode or
        ``trace=True``; ``[]`` otherwise)."""
        return self._ice.logits

    @property
    def ice_trace(self) -> Optional[dict]:
        """What the last forward with ``trace=True`` kept and fused, per selection point: ``kept`` /
        ``fused`` (or ``dropped``) original patch positions (-1 for a fused token), ``mask``,
        ``scores`` and ``order`` (the reorganize step's ranking of the incoming tokens, which
        :func:`ice_prune.restore` composes)."""
        return self._ice.trace_out

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                         is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "a token-pruned ViT changes its sequence inside the blocks, so attention masks and "
                "causal attention do not apply; call ice_prune.unpatch(model) to use them")
        self._ice.begin(self, x)
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


_CLASSES: dict[tuple[type, type], type] = {}


def attention_with_cls_row(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Attention.forward`` that also returns the head-mean [CLS] attention row ``[B, N]``.

    A modified copy of timm 1.0's ``Attention.forward`` (as ToMe copies it for its merging): keep it
    in step with timm's when timm's changes.

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


def _swap_class(obj: nn.Module, mixin: type) -> None:
    """Give ``obj`` the class ``mixin + type(obj)``, made once per pair and kept at module level so
    that pickling a patched model works."""
    base = type(obj)
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        name = f"{mixin.__name__}_{base.__name__}"
        while name in globals():
            name += "_"
        cls = type(name, (mixin, base), {"__module__": __name__, "_ice_base": base})
        globals()[name] = _CLASSES[(mixin, base)] = cls
    obj.__class__ = cls


def _check_ice_head_shapes(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A load_state_dict pre-hook: an ICE head of another class count gets an error naming the fix.
    Module-level, so a patched model still pickles."""
    own = {f"{prefix}ice_head.{k}": v for k, v in module.ice_head.state_dict().items()}
    for key, value in own.items():
        theirs = state_dict.get(key)
        if theirs is None or theirs.shape == value.shape:
            continue
        if theirs.shape[1:] == value.shape[1:]:
            raise ValueError(
                f"the checkpoint's ICE head predicts {theirs.shape[0] - 1} classes + background "
                f"but this model's predicts {value.shape[0] - 1} + background ({key}: "
                f"{tuple(theirs.shape)} vs {tuple(value.shape)}); patch with "
                f"num_classes={theirs.shape[0] - 1}")
        raise ValueError(
            f"the checkpoint's ICE head does not fit this model: {key} is {tuple(theirs.shape)} "
            f"in the checkpoint and {tuple(value.shape)} here (another embedding width or head "
            f"type); patch the matching architecture")


def _is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face transformers model: :mod:`ice_prune.integrations.transformers` patches it."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def patch(
    model: VisionTransformer,
    keep_rate: KeepRate = 0.7,
    method: str = "ice",
    locs: Sequence[int] = (3, 6, 9),
    placement: str = "attn",
    fuse: bool = True,
    heads: str = "shared",
    num_classes: Optional[int] = None,
    trace: bool = False,
    kernel: str = "auto",
) -> VisionTransformer:
    """Insert token selection into a timm ``VisionTransformer``, in place; returns the model.

    Args:
        model: a model from ``timm.create_model`` (DeiT, ViT, DeiT III, register and distilled ViTs),
            or a transformers ViT / DeiT (:mod:`ice_prune.integrations.transformers`; needs the
            ``transformers`` extra).
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
        num_classes: ICE only: image classes of the head (background is added); default the model's.
        trace: record per selection point which patches were kept and fused (``model.ice_trace``).
        kernel: the kernels of the reorganize step and of ICE's fused score (eval without
            trace): ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or
            ``"torch"``.
    """
    if not isinstance(model, VisionTransformer) and _is_transformers_model(model):
        from ice_prune.integrations import transformers as hf
        return hf.patch(model, keep_rate, method, locs, placement, fuse, heads, num_classes,
                        trace, kernel)
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
    if not isinstance(model, ICEVisionTransformer) and _is_transformers_model(model):
        from ice_prune.integrations import transformers as hf
        return hf.unpatch(model)
    if not isinstance(model, ICEVisionTransformer):
        raise ValueError("this model is not patched by ice_prune; nothing to undo")
    return uninstall(model, model.blocks)


# ---------------------------------------------------------------------------------------------
# what every integration (timm here, ice_prune.integrations.transformers) shares


def check_patch_args(method: str, placement: str, heads: str, kernel: str, locs: Sequence[int],
                     keep_rate: KeepRate, depth: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate :func:`patch`'s arguments for a model of ``depth`` blocks; returns ``(locs, one keep
    rate per location)``."""
    if method not in SELECTORS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(SELECTORS)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
    if heads not in HEADS:
        raise ValueError(f"unknown heads {heads!r}; choose one of {HEADS}")
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNEL_CHOICES}")
    locs = tuple(locs)
    if not locs or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                           for i in locs):
        raise ValueError(f"locs must be a non-empty sequence of block indices, got {locs!r}")
    if any(i < 0 or i >= depth for i in locs):
        raise ValueError(
            f"locs {locs} out of range: this model has {depth} blocks, indices 0..{depth - 1}")
    if list(locs) != sorted(set(locs)):
        raise ValueError(f"locs must be strictly increasing block indices, got {locs}; "
                         f"use {tuple(sorted(set(locs)))}")
    return locs, check_keep_rate(keep_rate, len(locs))


def attach_heads(model: nn.Module, selector: Selector, heads: str, num_classes, dim: int,
                 num_locs: int, method: str, given: bool) -> Optional[list[nn.Module]]:
    """Give ``model`` its ICE head(s) (``model.ice_head``: one shared, or a ModuleList per location)
    when the selector needs one; returns one head per location, or None. ``given``: the caller
    passed ``num_classes`` (refused for a selector without a head)."""
    if not selector.needs_head:
        if given:
            raise ValueError(f"num_classes sets the ICE head's classes; method={method!r} has no "
                             f"head")
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 1:
        raise ValueError(f"the ICE head needs the number of image classes; {type(model).__name__} "
                         f"has num_classes={num_classes!r}: pass num_classes=C to patch()")
    ref = next(model.parameters())

    def new() -> ICEHead:
        return ICEHead(dim, int(num_classes)).to(ref.device, ref.dtype)

    if heads == "shared":
        model.ice_head = new()
        return [model.ice_head] * num_locs
    model.ice_head = nn.ModuleList(new() for _ in range(num_locs))
    return list(model.ice_head)


def install(model: nn.Module, model_mixin: type, layers: Sequence[nn.Module], layer_mixin: type,
            state: ICEState) -> nn.Module:
    """The class swap: ``model`` and its layers at ``state.locs`` get the integration's subclasses,
    all sharing ``state``; an ICE head's shapes are checked when a state dict loads."""
    model._ice = state
    _swap_class(model, model_mixin)
    for j, i in enumerate(state.locs):
        layer = layers[i]
        layer._ice, layer._ice_loc = state, j
        _swap_class(layer, layer_mixin)
    if state.heads is not None:
        model._ice_hook = model.register_load_state_dict_pre_hook(_check_ice_head_shapes)
    return model


def uninstall(model: nn.Module, layers: Sequence[nn.Module]) -> nn.Module:
    """Undo :func:`install`: original classes, no ICE head or state. Returns the model."""
    for i in model._ice.locs:
        layer = layers[i]
        layer.__class__ = type(layer)._ice_base
        del layer._ice, layer._ice_loc
    if hasattr(model, "_ice_hook"):
        model._ice_hook.remove()
        del model._ice_hook
    if hasattr(model, "ice_head"):
        del model.ice_head
    del model._ice
    model.__class__ = type(model)._ice_base
    return model
