"""Integrations of token selection per model family, ToMe-style: :mod:`.timm` (timm's
``VisionTransformer``) and :mod:`.transformers` (Hugging Face ViT and DeiT, behind the
``transformers`` extra). Each supplies an :class:`.common.Integration` (what differs per family)
and the mixins with its layers' forward; ``ice_prune.patch`` dispatches on the model's type to one
and runs the shared pipeline, :func:`.common.patch_model`."""
