"""The switch between the kernels' shipped configs (the default) and Triton's autotuner.

Both Triton kernels launch with fixed configs, chosen per GPU generation and shape class, so a
first call compiles once and times nothing, and a new batch size neither tunes nor compiles again.
``ICE_PRUNE_AUTOTUNE=1`` in the environment (read at each launch) makes them time their candidate
configs instead, once per shape key (never per batch size); that first call takes seconds and must
come before a CUDA graph capture.
"""
import os

AUTOTUNE_ENV = "ICE_PRUNE_AUTOTUNE"


def autotune_enabled() -> bool:
    """Whether ``ICE_PRUNE_AUTOTUNE`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get(AUTOTUNE_ENV, "").strip().lower() in ("1", "true", "yes")
