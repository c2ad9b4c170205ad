"""Token reorganization kernels, installed as ``ice_prune.kernels``.

``reorganize`` is the step every selection point runs: from ``x [B, N, D]`` and one score per
non-prefix token it writes ``[prefix, kept tokens, fused token]``. It is the torch op
``ice_prune::reorganize`` (``ops.py``), with Triton kernels on CUDA (``triton_reorganize.py``) and the
plain-torch reference (``reference.py``) as the CPU path and the test oracle.
"""
from .ops import KERNELS, reorganize, reorganize_macs, resolve_kernel
from .reference import reorganize_backward_reference, reorganize_reference

__all__ = [
    "KERNELS",
    "reorganize",
    "reorganize_backward_reference",
    "reorganize_macs",
    "reorganize_reference",
    "resolve_kernel",
]
