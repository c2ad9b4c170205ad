"""ice_prune: ICE background-patch selection and EViT token pruning for timm Vision Transformers.

>>> import timm, ice_prune
>>> model = timm.create_model("deit_small_patch16_224")
>>> ice_prune.patch(model, keep_rate=0.7, method="ice")   # 197 -> 140 -> 100 -> 72 tokens
>>> model.keep_rate = 0.5                                 # takes effect on the next forward
>>> maps = ice_prune.explain(model, images, "ice")        # or "rollout", "gradcam", "generic", ...

Modules: ``patching`` (patch / unpatch, dispatching to ``integrations.timm`` or, behind the
``transformers`` extra, ``integrations.transformers``), ``select`` (selectors), ``head``, ``loss``,
``maps`` (explanation maps), ``evaluation`` (map and accuracy protocols), ``metrics``, ``data``,
``flops``, ``throughput``, ``breakdown`` (time and MACs per kind of work), ``checkpoint`` (safe
loading: weights only unless trusted), ``engine`` (training loops), ``tasks`` (per-batch training
steps, keep-rate schedule), ``cli`` (the training scripts' arguments), ``paper`` (the ICE paper's
figures), ``visualize``, ``token_grid`` (``restore``: pruned tokens back on the full patch grid for
dense heads), ``export`` (ONNX export; needs the ``export`` extra, so it is not imported here).
"""
from ice_prune.throughput import benchmark, benchmark_models, latency, max_batch_size
from ice_prune.checkpoint import load_checkpoint
from ice_prune.data import SyntheticScenes
from ice_prune.maps import explain
from ice_prune.flops import count_flops
from ice_prune.head import HEAD_VARIANTS, ICEExplainer, ICEHead
from ice_prune.loss import LOSS_MODES, ICELoss
from ice_prune.tasks import keep_rate_schedule
from ice_prune.patching import patch, unpatch
from ice_prune.select import SELECTORS, register_selector, token_schedule
from ice_prune.token_grid import restore

__version__ = "0.1.0"

__all__ = [
    "HEAD_VARIANTS",
    "ICEExplainer",
    "ICEHead",
    "ICELoss",
    "LOSS_MODES",
    "SELECTORS",
    "SyntheticScenes",
    "benchmark",
    "benchmark_models",
    "count_flops",
    "explain",
    "keep_rate_schedule",
    "latency",
    "load_checkpoint",
    "max_batch_size",
    "patch",
    "register_selector",
    "restore",
    "token_schedule",
    "unpatch",
]
