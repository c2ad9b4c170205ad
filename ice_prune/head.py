"""ICE heads: per-patch classifiers over ``num_classes`` image classes plus one background class.

* ``ICEHead(dim, num_classes)``: ``Linear(dim, num_classes + 1, bias=False)``, the head of ICE and the
  selector head for pruning (DeiT-S: 384 x 1001 = 0.38M parameters, the paper's 22.4M in all).
* ``ICEHead(dim, num_classes, hidden_dim=...)``: a two-layer GELU MLP, the head of ICE-f (frozen
  backbone, only the head trains).

The background class is the last output. Scores for pruning are ``1 - P(background)``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


class ICEHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, hidden_dim: Optional[int] = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ICEHead needs num_classes >= 1 image classes, got {num_classes}")
        self.dim = dim
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        if hidden_dim is None:
            self.fc = nn.Linear(dim, num_classes + 1, bias=False)
        else:
            self.fc = nn.Sequential(
                nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_classes + 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., dim] -> [..., num_classes + 1]`` logits, background last."""
        return self.fc(x)

    def extra_repr(self) -> str:
        kind = "linear" if self.hidden_dim is None else f"mlp(hidden={self.hidden_dim})"
        return f"dim={self.dim}, num_classes={self.num_classes} + background, {kind}"


def forward_with_tokens(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a timm ViT (patched or not) once; return ``(logits, tokens)`` where ``tokens [B, N, D]`` is
    the last block's output before the final norm, which ICE's explanation head reads (as in the
    official code). The sequence is ``[prefix, patches]`` or, on a pruned model, ``[prefix, kept, fused]``.
    """
    captured: list[Tensor] = []
    handle = model.norm.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured[-1]
