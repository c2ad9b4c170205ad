"""What every integration shares: the per-model state that runs the selection, the knobs, and the
patch pipeline.

:func:`patch_model` checks the arguments, attaches the ICE head(s) and swaps the class of the model
and of the layers at the selection points for a subclass of their own class; one :class:`ICEState`
shared by all of them carries the knobs and runs the selection (selector, ICE head, the
``ice_prune::reorganize`` op). An integration (:mod:`.timm`, :mod:`.transformers`) supplies only
what differs per model family: an :class:`Integration` (which layers, the checks, the prefix count,
the width, the default class count) and the mixins with its layers' forward.
"""
from __future__ import annotations

import abc
import numbers
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ice_prune.head import ICEHead
from ice_prune.kernels import reorganize
from ice_prune.kernels.ops import KERNEL_CHOICES
from ice_prune.kernels.reference import MapTarget
from ice_prune.select import SELECTORS, KeepPolicy, KeepRate, Selector, check_keep_rate

PLACEMENTS = ("attn", "block")
HEADS = ("shared", "per_location")


class ICEExplanation(NamedTuple):
    """The ICE map of one pruned forward (``model.ice_explanation`` in explain mode), over the
    image's patches in row-major order, prefix tokens excluded. Each field is the ``[:, :P]`` view
    of a ``[B, P + 1]`` buffer (the last column took fused tokens' writes): ``.view(B, *grid)``
    works, ``.clone()`` copies."""

    #: ``[B, num_patches]`` fp32: ``1 - P(background)`` from the patch's last scoring as its own
    #: token (its drop point, or the last selection point for a patch kept to the end)
    foreground: Tensor
    #: ``[B, num_patches]`` int64: the index into ``locs`` of the selection point of that scoring
    point: Tensor
    #: ``(rows, columns)`` of the patch grid: ``foreground.view(B, *grid)`` is the map
    grid: tuple[int, int]
    #: ``[B, num_patches]`` int64: the best image class at that scoring (argmax of the head's ``C``
    #: image logits, background excluded; ties to the lowest index)
    top_class: Tensor
    #: ``[B, num_patches]`` fp32: that class's probability under the softmax over all ``C + 1``
    top_prob: Tensor


class WithExplanation(nn.Module):
    """A patched ICE model in explain mode whose forward returns the logits and the map's tensors,
    ``(logits, foreground, point, top_class, top_prob)``: for tools that read only a module's
    outputs (an ONNX export; a JIT trace, which drops the work that no output reads)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        logits = self.model(images)
        e = self.model.ice_explanation
        return logits, e.foreground, e.point, e.top_class, e.top_prob


class ICEState:
    """Configuration and per-forward record shared by a patched model and its selection blocks."""

    def __init__(self, selector: Selector, locs: tuple[int, ...], placement: str,
                 keep_rate: tuple[float, ...], fuse: bool, trace: bool, explain: bool,
                 kernel: str, num_prefix: int, heads: Optional[list[nn.Module]],
                 keep_policy: Optional[KeepPolicy] = None) -> None:
        self.selector = selector
        self.locs = locs
        self.placement = placement
        self.keep_rate = keep_rate
        self.keep_policy = keep_policy  # per-image counts (ice_prune.packed) instead of keep_rate
        self.fuse = fuse
        self.trace = trace
        self.explain = explain
        self.kernel = kernel
        self.num_prefix = num_prefix
        self.heads = heads  # one (shared) head repeated per location, or one each; owned by the model
        # what the last forward recorded
        self.record_logits = False
        self.logits: list[Tensor] = []
        self.trace_out: Optional[dict] = None
        self.explanation: Optional[ICEExplanation] = None
        self.keep_counts: list[Tensor] = []
        # under a keep policy, where each image's rows lie once the batch is packed (else None)
        self.segments = None
        # under a masked keep policy, which rows are still tokens once a point has run (else None)
        self.padded = None
        self._grid: tuple[int, int] = (0, 0)
        # with trace or explain: the original patch index of each current non-prefix token,
        # num_patches for a fused token (which stands for no single patch)
        self._patches: Optional[Tensor] = None
        self._fused_patch: Optional[Tensor] = None  # [B, 1] of num_patches: a fused token's index
        self._num_patches = 0
        # explain: the last score, scoring point, top class and its probability of each patch,
        # plus a spare column for fused tokens, so that every point writes every token it scores
        # (no data-dependent shapes, no host sync): from the score kernel's epilogue, or scattered
        self._foreground: Optional[Tensor] = None
        self._point: Optional[Tensor] = None

    def begin(self, training: bool, grid: tuple[int, int], patch_size: tuple[int, int]) -> None:
        """Reset the per-forward record; an integration calls it at the start of the model's forward
        with the images' patch ``grid`` (rows, columns) and ``patch_size``. Only training keeps the
        head's logits (the ICE loss reads them): a trace records the token order and scores, so an
        eval forward with ``trace=True`` still runs the fused score."""
        self.record_logits = training
        self.logits = []
        self.keep_counts = []
        self.segments = self.padded = None
        self._grid = tuple(grid)
        self._patches = self._foreground = self._point = self.explanation = None
        if self.trace:
            self.trace_out = {"grid": tuple(grid), "num_prefix": self.num_prefix,
                              "patch_size": tuple(patch_size), "locations": []}

    def skips(self, keep: int, n: int) -> bool:
        """Whether the selection point keeping ``keep`` of ``n`` tokens runs as the original layer:
        nothing to drop and nothing to score (explain mode scores at every point)."""
        return keep >= n and not self.explain

    def select(self, x: Tensor, h: Optional[Tensor], cls_attn: Optional[Tensor], keep: int,
               loc: int) -> Tensor:
        """Score the non-prefix tokens of ``x`` and keep ``keep`` of them (``x`` itself where
        ``keep`` is all of them: an explain-mode point that only scores)."""
        B, n = x.shape[0], x.shape[1] - self.num_prefix
        selects = keep < n
        head = self.heads[loc] if self.heads is not None else None
        record_logits = self.record_logits and selects
        if (self.trace or self.explain) and self._patches is None:
            # the first point: the tokens are still the image's patches; P = n stands for a
            # fused token (both views of one arange)
            patches = torch.arange(n + 1, device=x.device)
            self._patches, self._fused_patch = patches[:n].expand(B, n), patches[n:].expand(B, 1)
            self._num_patches = n
            if self.trace:
                self.trace_out["num_patches"] = n
        into = self._map_target(loc) if self.explain else None
        scores, logits = self.selector.scores(cls_attn, h, head, self.num_prefix,
                                              logits_needed=record_logits, kernel=self.kernel,
                                              into=into)
        if logits is not None and record_logits:
            self.logits.append(logits)
        if self.explain and loc == len(self.locs) - 1:  # explain mode runs every point
            P = self._num_patches  # the spare column P (fused tokens) is left out
            self.explanation = ICEExplanation(self._foreground[:, :P], self._point[:, :P],
                                              self._grid, self._top_class[:, :P],
                                              self._top_prob[:, :P])
        if not selects:
            return x
        out, order = reorganize(x, scores, keep, self.num_prefix, self.fuse,
                                self.selector.normalize, self.kernel)
        if self._patches is not None:
            kept = self._patches.gather(1, order[:, :keep])
            if self.trace:
                self._record(loc, x.shape[1], out.shape[1], keep, order, scores, kept)
            if self.fuse:
                kept = torch.cat([kept, self._fused_patch], dim=1)
            self._patches = kept
        return out

    def _map_target(self, loc: int) -> MapTarget:
        """Where this point's scores go: each token's patch in the map's ``[B, P + 1]`` buffers (a
        fused token's ``P`` is a spare column). Every patch is its own token at the first point,
        which writes them all, so the buffers start empty; a later point overwrites an earlier one,
        so each patch ends with its last scoring. Written by the score op itself (the Triton
        kernel's epilogue) or by scatters after it."""
        index = self._patches
        if self._foreground is None:  # the first point of a forward
            shape = (index.shape[0], self._num_patches + 1)
            self._foreground = torch.empty(shape, dtype=torch.float32, device=index.device)
            self._point = torch.empty(shape, dtype=torch.int64, device=index.device)
            self._top_class = torch.empty_like(self._point)
            self._top_prob = torch.empty_like(self._foreground)
        return MapTarget(index, loc, self._foreground, self._point, self._top_class,
                         self._top_prob)

    def _record(self, loc: int, tokens_in: int, tokens_out: int, keep: int, order: Tensor,
                scores: Tensor, kept: Tensor) -> None:
        B, P = order.shape[0], self._num_patches
        # patches that still stand as themselves; a fused token's index P is a spare column
        mask = torch.zeros(B, P + 1, dtype=torch.bool, device=order.device)
        mask.scatter_(1, kept, True)
        fused = self._patches.gather(1, order[:, keep:])
        fused = torch.where(fused < P, fused, -1)  # -1 marks a fused token in the trace
        self.trace_out["locations"].append({
            "block": self.locs[loc], "tokens_in": tokens_in, "tokens_out": tokens_out, "keep": keep,
            "kept": torch.where(kept < P, kept, -1), "fused": fused if self.fuse else None,
            "dropped": None if self.fuse else fused, "mask": mask[:, :P],
            "scores": scores.detach(), "order": order})


class ICEModel:
    """The knobs of a patched model, shared by every integration's model mixin."""

    _ice: ICEState

    @property
    def keep_rate(self) -> KeepRate:
        rates = self._ice.keep_rate
        return rates[0] if len(set(rates)) == 1 else rates

    @keep_rate.setter
    def keep_rate(self, value: KeepRate) -> None:
        self._ice.keep_rate = check_keep_rate(value, len(self._ice.locs))

    @property
    def keep_policy(self) -> Optional[KeepPolicy]:
        """Per-image keep counts (eval mode; :mod:`ice_prune.packed`, or :mod:`ice_prune.masked`
        with ``masked=True``), or ``None`` for the fixed ``keep_rate``."""
        return self._ice.keep_policy

    @keep_policy.setter
    def keep_policy(self, value: Optional[KeepPolicy]) -> None:
        state = self._ice
        check_keep_policy(value, state.selector, state.trace, state.explain,
                          self._keep_policy_refusal(self, state.locs))
        state.keep_policy = value

    @staticmethod
    def _keep_policy_refusal(model: nn.Module, locs: Sequence[int]) -> Optional[str]:
        """Why ``model`` (patched at ``locs``) cannot run a keep policy; ``None`` where it can."""
        return (f"keep_policy (per-image keep counts) runs on timm VisionTransformers only, not "
                f"on {type(model).__name__}; use keep_policy=None (the fixed keep_rate)")

    @property
    def ice_keep_counts(self) -> list[Tensor]:
        """Under a keep policy, the ``[B]`` int64 tokens each image kept at each selection point of
        the last forward (``[]`` without a policy)."""
        return self._ice.keep_counts

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
        check_keep_policy(self._ice.keep_policy, self._ice.selector, value, self._ice.explain)
        self._ice.trace = bool(value)

    @property
    def explain(self) -> bool:
        return self._ice.explain

    @explain.setter
    def explain(self, value: bool) -> None:
        _check_explain(self._ice.selector, value)
        check_keep_policy(self._ice.keep_policy, self._ice.selector, self._ice.trace, value)
        self._ice.explain = bool(value)

    @property
    def ice_explanation(self) -> Optional[ICEExplanation]:
        """The ICE map of the last forward with ``explain=True`` (``None`` otherwise): an
        :class:`ICEExplanation`. Each forward makes new tensors, except a CUDA-graph replay, which
        writes over the captured ones: read or clone them before the next replay."""
        return self._ice.explanation

    @property
    def ice_logits(self) -> list[Tensor]:
        """ICE head logits ``[B, n, C+1]`` per selection point that dropped tokens in the last
        forward, in train mode, for the ICE loss; ``[]`` in eval, with or without ``trace`` (under
        ``torch.no_grad()`` ICE's fused score never makes them)."""
        return self._ice.logits

    @property
    def ice_trace(self) -> Optional[dict]:
        """What the last forward with ``trace=True`` kept and fused, per selection point: ``kept`` /
        ``fused`` (or ``dropped``) original patch positions (-1 for a fused token), ``mask``,
        ``scores`` and ``order`` (the reorganize step's ranking of the incoming tokens, which
        :func:`ice_prune.restore` composes). It holds no head logits, so a traced eval forward
        still runs ICE's fused score."""
        return self._ice.trace_out


_CLASSES: dict[tuple[type, type], type] = {}


def cls_attention_row(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """EViT's score: the head-mean [CLS] attention row ``softmax(q_cls k^T * scale)``, ``[B, N]``
    fp32, from ``q``, ``k`` ``[B, H, N, d]``; the attention itself runs elsewhere (fused).

    ``k`` is usually a view of a projection laid out ``[B, N, H, d]`` (timm's fused qkv,
    transformers' k_proj), where a plain ``q_cls @ k^T`` batched over ``(B, H)`` copies all of K
    first (``matmul`` cannot fold the two batch dims). Here the heads stay side by side: K viewed
    ``[B, N, H * d]`` times the block-diagonal ``[B, H * d, H]`` of ``q_cls``, no copy, H times the
    row's multiply-adds (``B * N * D * H``, about 1e-4 of a block's). ``k`` in another layout
    (contiguous per head, e.g. after a k norm) takes the plain product, which copies nothing.
    """
    B, H, N, d = k.shape
    q_cls = q[:, :, 0] * scale  # [B, H, d]
    k_heads = k.transpose(1, 2)  # [B, N, H, d]
    if k_heads.stride(3) == 1 and k_heads.stride(2) == d:  # [B, N, H * d] is a view
        # q_blocks[b, h * d + i, h'] = q_cls[b, h, i] if h == h' else 0
        q_blocks = torch.diag_embed(q_cls.transpose(1, 2), dim1=1, dim2=3).reshape(B, H * d, H)
        logits = torch.matmul(k_heads.reshape(B, N, H * d), q_blocks)  # [B, N, H]
        # fp32 scores: in bf16 many near-equal attention values tie and the ranking degrades
        return logits.float().softmax(dim=1).mean(dim=2)
    logits = q_cls[:, :, None] @ k.transpose(-2, -1)  # [B, H, 1, N]
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0]


def check_keep_policy(policy: Optional[KeepPolicy], selector: Selector, trace: bool, explain: bool,
                      refusal: Optional[str] = None) -> None:
    """Raise where ``policy`` cannot run with these settings; ``refusal``: the model's reason, if
    any (:meth:`ICEModel._keep_policy_refusal`)."""
    if policy is None:
        return
    if not isinstance(policy, KeepPolicy):
        raise TypeError(f"keep_policy must be an ice_prune.KeepPolicy or None, got "
                        f"{type(policy).__name__}")
    if refusal is not None:
        raise ValueError(refusal)
    if policy.threshold is not None and selector.name != "ice":
        raise ValueError(f"KeepPolicy(threshold=...) keeps the tokens ICE's head calls foreground; "
                         f"method={selector.name!r} has no ICE head: patch with method='ice', or "
                         f"use KeepPolicy(mass=...) for EViT")
    if policy.mass is not None and selector.name != "evit":
        raise ValueError(f"KeepPolicy(mass=...) keeps a share of the [CLS] attention (EViT); "
                         f"method={selector.name!r} scores otherwise: patch with method='evit', or "
                         f"use KeepPolicy(threshold=...) for ICE")
    if trace or explain:
        raise ValueError("keep_policy does not run with trace or explain (so neither with "
                         "ice_prune.restore nor the map): set model.trace = False and "
                         "model.explain = False, or model.keep_policy = None")


def _check_explain(selector: Selector, explain: bool) -> None:
    if explain and not selector.needs_head:
        raise ValueError(f"explain=True reads the ICE head's scores, and method={selector.name!r} "
                         f"has no ICE head; patch with method='ice' for the map")


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


# ---------------------------------------------------------------------------------------------
# the patch pipeline: every step but what an Integration supplies


class Integration(abc.ABC):
    """What a model family supplies to :func:`patch_model` and :func:`unpatch_model`."""

    #: the mixin put in front of the model's class (an :class:`ICEModel`)
    model_mixin: type
    #: the mixin put in front of the class of the layers at the selection points
    layer_mixin: type

    @abc.abstractmethod
    def check_model(self, model: nn.Module) -> None:
        """Raise for a model this integration cannot patch, naming what it supports."""

    @abc.abstractmethod
    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The model's blocks, in order: ``locs`` index them."""

    @abc.abstractmethod
    def check_layer(self, i: int, layer: nn.Module) -> None:
        """Raise for a layer at selection point ``i`` that the layer mixin cannot run."""

    @abc.abstractmethod
    def num_prefix(self, model: nn.Module) -> int:
        """Prefix tokens ([CLS], registers, distillation) at the start of the sequence."""

    @abc.abstractmethod
    def embed_dim(self, model: nn.Module) -> int:
        """Token width, the ICE head's input."""

    @abc.abstractmethod
    def num_classes(self, model: nn.Module) -> Optional[int]:
        """The ICE head's image classes when ``patch`` gets none (``None``: the model has none)."""

    def model_state_names(self, model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` as saved by the family's own tools, with the model's own key names."""
        return state


def patch_model(integration: Integration, model: nn.Module, *, keep_rate: KeepRate, method: str,
                locs: Sequence[int], placement: str, fuse: bool, heads: str,
                num_classes: Optional[int], trace: bool, explain: bool,
                kernel: str, keep_policy: Optional[KeepPolicy] = None) -> nn.Module:
    """:func:`ice_prune.patch` (its arguments are documented there) for a model of
    ``integration``'s family: the checks, the ICE head(s) and the class swap of the model and of its
    layers at ``locs``, all sharing one :class:`ICEState`. In place; returns the model."""
    if isinstance(model, ICEModel):
        raise RuntimeError(
            "this model is already patched; change model.keep_rate / model.keep_policy / "
            "model.fuse / model.trace / model.explain in place, or call ice_prune.unpatch(model) "
            "before patching with other settings")
    integration.check_model(model)
    layers = integration.layers(model)
    locs, rates = _check_args(method, placement, heads, kernel, locs, keep_rate, len(layers))
    for i in locs:
        integration.check_layer(i, layers[i])
    selector = SELECTORS[method]()
    _check_explain(selector, explain)
    check_keep_policy(keep_policy, selector, trace, explain,
                      integration.model_mixin._keep_policy_refusal(model, locs))
    head_list = _attach_heads(model, selector, heads, num_classes, integration, len(locs), method)
    state = ICEState(selector, locs, placement, rates, bool(fuse), bool(trace), bool(explain),
                     kernel, integration.num_prefix(model), head_list, keep_policy)
    model._ice = state
    _swap_class(model, integration.model_mixin)
    for j, i in enumerate(locs):
        layer = layers[i]
        layer._ice, layer._ice_loc = state, j
        _swap_class(layer, integration.layer_mixin)
    if head_list is not None:
        model._ice_hook = model.register_load_state_dict_pre_hook(_check_ice_head_shapes)
    return model


def unpatch_model(integration: Integration, model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: original classes, no ICE head or state. Returns the model."""
    if not isinstance(model, ICEModel):
        raise ValueError("this model is not patched by ice_prune; nothing to undo")
    layers = integration.layers(model)
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


def _check_args(method: str, placement: str, heads: str, kernel: str, locs: Sequence[int],
                keep_rate: KeepRate, depth: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate :func:`patch_model`'s arguments for a model of ``depth`` blocks; returns ``(locs,
    one keep rate per location)``."""
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


def _attach_heads(model: nn.Module, selector: Selector, heads: str, num_classes: Optional[int],
                  integration: Integration, num_locs: int,
                  method: str) -> Optional[list[nn.Module]]:
    """Give ``model`` its ICE head(s) (``model.ice_head``: one shared, or a ModuleList per location)
    when the selector needs one; returns one head per location, or None. ``num_classes`` as
    :func:`patch_model` got it: ``None`` takes the integration's default, a value is refused for a
    selector without a head."""
    if not selector.needs_head:
        if num_classes is not None:
            raise ValueError(f"num_classes sets the ICE head's classes; method={method!r} has no "
                             f"head")
        return None
    if num_classes is None:
        num_classes = integration.num_classes(model)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 1:
        raise ValueError(f"the ICE head needs the number of image classes; {type(model).__name__} "
                         f"has num_classes={num_classes!r}: pass num_classes=C to patch()")
    ref, dim = next(model.parameters()), integration.embed_dim(model)

    def new() -> ICEHead:
        return ICEHead(dim, int(num_classes)).to(ref.device, ref.dtype)

    if heads == "shared":
        model.ice_head = new()
        return [model.ice_head] * num_locs
    model.ice_head = nn.ModuleList(new() for _ in range(num_locs))
    return list(model.ice_head)
