"""The library's kernels and the torch ops that call them.

They live inside the package because transformers probes ``import kernels``, which must not find
(and register a second time) a top-level ``kernels/`` folder of this repository.

``reorganize`` is the step every selection point runs: from ``x [B, N, D]`` and one score per
non-prefix token it writes ``[prefix, kept tokens, fused token]``. It is the torch op
``ice_prune::reorganize`` (``ops.py``), with Triton kernels on CUDA (``triton_reorganize.py``) and the
plain-torch reference (``reference.py``) as the CPU path and the test oracle.

``reorganize_ragged`` is the same step with a keep count per image: the images' rows packed without
padding, with per-image offsets (the op ``ice_prune::reorganize_ragged``).
``reorganize_packed_reference`` takes an already packed batch in (plain torch, the later selection
points of a packed forward).

``ice_score`` is ICE's foreground score ``1 - P(background)`` per token from the tokens and the head's
weight, without the ``[B, n, C + 1]`` logits: the op ``ice_prune::ice_score`` (with ``top_class=True``
its twin ``ice_prune::ice_score_top_class``, which also returns each token's best image class and its
probability), one Triton kernel on CUDA (``triton_ice_score.py``) and a torch path tiled over tokens
and classes (``reference.py``).

The Triton kernels launch with shipped configs; ``ICE_PRUNE_AUTOTUNE=1`` autotunes the dense
reorganize and the ICE score instead (``tuning.py``).
"""
from .ops import (KERNELS, RAGGED_KERNELS, SCORE_KERNELS, ice_score, ice_score_macs, reorganize,
                  reorganize_macs, reorganize_ragged, reorganize_ragged_macs, resolve_kernel)
from .reference import (ice_score_reference, ragged_offsets, reorganize_backward_reference,
                        reorganize_packed_reference, reorganize_ragged_backward_reference,
                        reorganize_ragged_reference, reorganize_reference)

__all__ = [
    "KERNELS",
    "RAGGED_KERNELS",
    "SCORE_KERNELS",
    "ice_score",
    "ice_score_macs",
    "ice_score_reference",
    "reorganize",
    "reorganize_backward_reference",
    "ragged_offsets",
    "reorganize_macs",
    "reorganize_packed_reference",
    "reorganize_ragged",
    "reorganize_ragged_backward_reference",
    "reorganize_ragged_macs",
    "reorganize_ragged_reference",
    "reorganize_reference",
    "resolve_kernel",
]
