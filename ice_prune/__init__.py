"""ice_prune: ICE background-patch selection and EViT token pruning for timm Vision Transformers.

>>> import timm, ice_prune
>>> model = timm.create_model("deit_small_patch16_224")
>>> ice_prune.patch(model, keep_rate=0.7, method="ice")   # 197 -> 140 -> 100 -> 72 tokens
>>> model.keep_rate = 0.5                                 # takes effect on the next forward
"""
from ice_prune.benchmark import benchmark, benchmark_models, load_checkpoint, max_batch_size
from ice_prune.flops import count_flops
from ice_prune.head import ICEHead
from ice_prune.patch import keep_rate_schedule, patch, unpatch
from ice_prune.select import SELECTORS, register_selector, token_schedule

__version__ = "0.1.0"

__all__ = [
    "ICEHead",
    "SELECTORS",
    "benchmark",
    "benchmark_models",
    "count_flops",
    "keep_rate_schedule",
    "load_checkpoint",
    "max_batch_size",
    "patch",
    "register_selector",
    "token_schedule",
    "unpatch",
]
