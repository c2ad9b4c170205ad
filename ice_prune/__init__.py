"""ice_prune: ICE background-patch selection and EViT token pruning for timm Vision Transformers.

>>> import timm, ice_prune
>>> model = timm.create_model("deit_small_patch16_224")
>>> ice_prune.patch(model, keep_rate=0.7, method="ice")   # 197 -> 140 -> 100 -> 72 tokens
>>> model.keep_rate = 0.5                                 # takes effect on the next forward
>>> maps = ice_prune.explain(model, images, "ice")        # or "rollout", "gradcam", "generic", ...
>>> pruned = ice_prune.load_model("deit_small_patch16_224", "runs/ice-0.7/last.pth", method="ice")

This namespace is the core: patching and its selectors, heads, loss and kernels, maps, ``restore``,
checkpoints and ``load_model`` (a model with its ICE head and checkpoint, ready to run), the
measurements, and ``calibrate_keep_policy`` (the ICE threshold or EViT mass whose per-image counts
cost what a fixed keep rate costs, on a set of images). The training and evaluation harness behind
``train/`` lives in the subpackages :mod:`ice_prune.data`, :mod:`ice_prune.training` and
:mod:`ice_prune.evaluation`, imported on first use (``import ice_prune`` loads none of them);
:mod:`ice_prune.export` needs the ``export`` extra.
"""
import importlib

from ice_prune.calibration import calibrate_keep_policy
from ice_prune.checkpoint import load_checkpoint
from ice_prune.flops import count_flops
from ice_prune.head import ICEHead
from ice_prune.loss import ICELoss
from ice_prune.maps import explain
from ice_prune.models import load_model
from ice_prune.patching import patch, unpatch
from ice_prune.select import KeepPolicy, keep_rate_schedule, register_selector, token_schedule
from ice_prune.throughput import benchmark, benchmark_models, latency, max_batch_size
from ice_prune.token_grid import restore

__version__ = "0.1.0"

__all__ = [
    "ICEHead",
    "ICELoss",
    "KeepPolicy",
    "benchmark",
    "benchmark_models",
    "calibrate_keep_policy",
    "count_flops",
    "explain",
    "keep_rate_schedule",
    "latency",
    "load_checkpoint",
    "load_model",
    "max_batch_size",
    "patch",
    "register_selector",
    "restore",
    "token_schedule",
    "unpatch",
]

_LAZY_SUBPACKAGES = ("data", "evaluation", "export", "training")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
