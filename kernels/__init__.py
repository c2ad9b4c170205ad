"""Token reorganization kernels, installed as ``ice_prune.kernels``.

``reorganize`` is the step every selection point runs: from ``x [B, N, D]`` and one score per
non-prefix token it writes ``[prefix, kept tokens, fused token]``. ``reference.py`` holds the plain
torch version, which is also the CPU path and the test oracle.
"""
from .reference import reorganize_reference, reorganize

__all__ = ["reorganize", "reorganize_reference"]
