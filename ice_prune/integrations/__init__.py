"""Integrations of token selection per model family, ToMe-style: ``transformers`` (Hugging Face ViT
and DeiT). The timm integration is :mod:`ice_prune.patching`; ``ice_prune.patch`` dispatches on the
model's type. Each integration reuses the selectors, ICE heads, reorganize op and knobs."""
