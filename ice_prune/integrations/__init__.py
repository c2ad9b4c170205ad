"""Integrations of token selection per model family, ToMe-style: :mod:`.timm` (timm's
``VisionTransformer``) and :mod:`.transformers` (Hugging Face ViT and DeiT, behind the
``transformers`` extra). ``ice_prune.patch`` dispatches on the model's type; every integration
shares :class:`.common.ICEState` (selectors, ICE heads, the reorganize op) and the knobs
of :class:`.common.ICEModel`."""
