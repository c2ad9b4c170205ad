"""Token selection in Hugging Face transformers' ViT and DeiT, by class swap (:data:`INTEGRATION`).

Supported: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher`` (transformers 5:
``model.layers`` of pre-norm layers with ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``).
The same pattern as the timm integration: the model and the layers at the selection points get a
subclass of their own class, one :class:`~ice_prune.integrations.common.ICEState` is shared, and
the selectors, ICE heads and the ``ice_prune::reorganize`` op are the timm path's. The attention
itself stays transformers' (``config._attn_implementation``: eager and SDPA tested, flash attention
untested, flex attention refused); EViT's [CLS] row is one extra softmax row beside it. State-dict
keys are unchanged, plus ``ice_head.*``: ``save_pretrained`` writes them, and after
``from_pretrained`` and ``patch`` the ICE head loads from the saved file with
:func:`ice_prune.load_checkpoint`.
"""
from __future__ import annotations

import numbers
import sys
from typing import Optional

from torch import Tensor, nn

try:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as err:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError(
        "patching a Hugging Face transformers model needs the transformers package: "
        "pip install 'ice_prune[transformers]'") from err

from ice_prune.integrations.common import ICEModel, ICEState, Integration, cls_attention_row
from ice_prune.select import keep_count

#: backbone attribute of each supported class (``None``: the model is the backbone) and its prefix
#: token count ([CLS], plus DeiT's distillation token)
SUPPORTED: dict[str, tuple[Optional[str], int]] = {
    "ViTModel": (None, 1),
    "ViTForImageClassification": ("vit", 1),
    "DeiTModel": (None, 2),
    "DeiTForImageClassification": ("deit", 2),
    "DeiTForImageClassificationWithTeacher": ("deit", 2),
}


class ICETransformersModel(ICEModel):
    """Mixin put in front of the transformers model's class: the knobs of the timm path."""

    def forward(self, pixel_values: Optional[Tensor] = None, *args, **kwargs):
        if kwargs.get("attention_mask") is not None:
            raise ValueError(
                "a token-pruned ViT changes its sequence inside the layers, so attention masks do "
                "not apply; call ice_prune.unpatch(model) to use them")
        if kwargs.get("output_attentions"):
            raise ValueError(
                "output_attentions is not available on a token-pruned ViT (the selection layers "
                "compute only EViT's [CLS] row); call ice_prune.unpatch(model) to get attentions")
        _check_attn_implementation(self.config)
        p = self.config.patch_size
        p = (p, p) if isinstance(p, numbers.Integral) else tuple(p)
        grid = (pixel_values.shape[-2] // p[0], pixel_values.shape[-1] // p[1])
        self._ice.begin(self.training, grid, p)
        return super().forward(pixel_values, *args, **kwargs)


class ICETransformersLayer:
    """Mixin for ``ViTLayer`` / ``DeiTLayer`` at selection points."""

    _ice: ICEState
    _ice_loc: int

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        state, loc = self._ice, self._ice_loc
        x = hidden_states
        n = x.shape[1] - state.num_prefix
        keep = keep_count(state.keep_rate[loc], n)
        if state.skips(keep, n):  # nothing to drop or score: exactly the original layer
            return super().forward(x, attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError("attention masks are not supported on a token-pruned ViT")
        y, cls_attn = attention_with_cls_row(self.attention, self.layernorm_before(x),
                                             state.selector.needs_cls_attn, **kwargs)
        x = self.dropout(y) + x
        if state.placement == "attn":  # EViT: the MLP already runs on the reduced sequence
            h = self.layernorm_after(x) if state.selector.needs_head else None
            kept = state.select(x, h, cls_attn, keep, loc)
            # an explain-mode point that keeps every token returns x itself: h is its norm
            h = h if kept is x and h is not None else self.layernorm_after(kept)
            return self.dropout(self.mlp(h)) + kept
        h = self.layernorm_after(x)
        x = self.dropout(self.mlp(h)) + x
        return state.select(x, h, cls_attn, keep, loc)


def attention_with_cls_row(attn: nn.Module, x: Tensor, cls_row: bool = True,
                           **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers 5 ``ViTAttention`` / ``DeiTAttention.forward`` that also returns the head-mean
    [CLS] attention row ``[B, N]`` (``None`` without ``cls_row``).

    A copy of transformers' forward (keep it in step): the attention runs through transformers' own
    attention function for ``config._attn_implementation`` (eager, SDPA, ...); the [CLS] row is one
    extra ``softmax(q_cls k^T * scaling)``, not the full matrix.
    """
    input_shape = x.shape[:-1]
    hidden_shape = (*input_shape, -1, attn.head_dim)
    q = attn.q_proj(x).view(hidden_shape).transpose(1, 2)
    k = attn.k_proj(x).view(hidden_shape).transpose(1, 2)
    v = attn.v_proj(x).view(hidden_shape).transpose(1, 2)
    cls_attn = None
    if cls_row:
        cls_attn = cls_attention_row(q, k, attn.scaling)
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, eager)
    out, _ = attention_interface(attn, q, k, v, None,
                                 dropout=0.0 if not attn.training else attn.attention_dropout,
                                 scaling=attn.scaling, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return attn.o_proj(out), cls_attn


def _check_attn_implementation(config) -> None:
    """Flex attention gets a ``BlockMask`` built for the full sequence by the model, which no longer
    fits the layers after a selection point."""
    if config._attn_implementation == "flex_attention":
        raise ValueError(
            "attn_implementation='flex_attention' builds one BlockMask for the full token sequence, "
            "which the shorter sequences after a selection point do not fit; use 'sdpa' or 'eager' "
            "(model.set_attn_implementation('sdpa'))")


def _backbone(model: nn.Module) -> tuple[nn.Module, int]:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED and cls.__module__.startswith("transformers."):
            attr, num_prefix = SUPPORTED[cls.__name__]
            return (model if attr is None else getattr(model, attr)), num_prefix
    raise TypeError(
        f"ice_prune.patch supports the transformers classes {sorted(SUPPORTED)}, got "
        f"{type(model).__name__}")


class TransformersIntegration(Integration):
    """The classes of :data:`SUPPORTED`, with transformers 5's attention layout at the selection
    points."""

    model_mixin = ICETransformersModel
    layer_mixin = ICETransformersLayer

    def check_model(self, model: nn.Module) -> None:
        _backbone(model)
        _check_attn_implementation(model.config)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _backbone(model)[0].layers

    def check_layer(self, i: int, layer: nn.Module) -> None:
        attn = getattr(layer, "attention", None)
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise TypeError(
                f"layer {i} has no q_proj / k_proj / v_proj / o_proj attention; ice_prune "
                f"supports the transformers 5 layout of ViT and DeiT "
                f"(pip install 'ice_prune[transformers]')")

    def num_prefix(self, model: nn.Module) -> int:
        return _backbone(model)[1]

    def embed_dim(self, model: nn.Module) -> int:
        return model.config.hidden_size

    def num_classes(self, model: nn.Module) -> Optional[int]:
        """A classifier's ``config.num_labels``; a backbone (``ViTModel`` / ``DeiTModel``) has none:
        ``patch`` needs ``num_classes`` for its ICE head."""
        return None if _backbone(model)[0] is model else model.config.num_labels

    def model_state_names(self, model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``save_pretrained`` writes ViT's ``vit.encoder.layer.0.attention.attention.query`` for
        the model's ``vit.layers.0.attention.q_proj``: transformers' conversion mapping, reverted."""
        from transformers.core_model_loading import revert_weight_conversion

        ours = model.state_dict()
        name_of = {id(v): k for k, v in ours.items()}  # a renamed weight is the same tensor
        saved = revert_weight_conversion(model, dict(ours))
        renames = {k: name_of[id(v)] for k, v in saved.items() if id(v) in name_of}
        return {renames.get(k, k): v for k, v in state.items()}


INTEGRATION = TransformersIntegration()
