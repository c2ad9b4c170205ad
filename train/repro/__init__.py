"""The ICE paper's experiments in miniature, behind ``train/reproduce.py`` (``make reproduce``).

It lives beside the scripts it drives and is no part of the ``ice_prune`` library: import it with
``train/`` on ``sys.path``, as train/reproduce.py does, and it imports the sibling scripts ``prune``,
``explain``, ``pm`` and ``evaluate`` and calls their ``main(argv)``, so a run exercises exactly what
a user runs.

A run is a list of stages (:func:`plan`), each writing into ``OUT/work/<stage>`` and ending with
``done.json`` (its results), each naming the stages it reads (``after``). :func:`run` skips every
stage whose ``done.json`` exists (``fresh=True`` starts over), runs up to ``jobs`` stages at once in
processes of their own once what they read is done (the cpu scale: 2, one torch thread each; the
speed stage alone; each stage's output in ``stage.log``), and a training stage interrupted mid-way
continues from its checkpoint (``--resume`` of the training scripts). :func:`write_report` then builds ``OUT/results.json``, ``OUT/REPORT.md``
and ``OUT/figures/*.png`` from those ``done.json`` files only, beside the paper's figures
(:mod:`ice_prune.evaluation.paper`).

1. ``pretrain``: a 12-block ViT from scratch on SyntheticScenes with cross-entropy, through
   ``train/prune.py --method evit --keep-rate 1.0`` (keep rate 1 is exactly the unpruned ViT).
   At ``gpu`` scale a given DeiT-S checkpoint takes its place.
2. ``budget-<variant>-e<epochs>`` (scales with ``explain_budgets``): ICE, ICE-f and ICEv2-style
   each trained for every budget of the sweep in turn, scored on SyntheticScenes' ``mapval`` split
   after every epoch (``--map-val-images``); the budget is the first whose next doubling gains under
   ``budget_gain`` points of validation mIoU and foreground share (``summary.choose_budget``), and
   ``explain-<variant>`` is that run, evaluated once on the evaluation images; the longer budgets
   are skipped once the choice is made. ``explain-ice-ablation``: the first (shortest) ICE run,
   Table 6's ICE row beside the ablation's other rows at that budget. PM-style and the class-count
   rule's ``classes-<C>-lambda-auto-main`` rows train as long as the chosen ICE run.
   ``explain-<run>``: ICE, ICE-f, ICEv2-style and Table 6's ablation (alpha 1.0; lambda 0.5; both)
   with ``train/explain.py`` from the pretrained weights, each evaluated by
   ``train/evaluate.py explain --methods ice``; ``maps-baselines``: the attention baselines and the
   PM-style map on the pretrained model (the paper explains an unmodified DeiT-S with them);
   ``explain-pm-style``, ``explain-pm-style-pseudo``, ``explain-pm-style-no-masks``: PM-style
   training (``train/pm.py``) with the scale's 1% of ground-truth masks (SyntheticScenes), with
   ICE's pseudo masks from ``explain-ice`` on as many images, and without masks (the control), each
   scored by ``train/evaluate.py explain --methods pm-style`` and ``train/evaluate.py accuracy``.
3. ``prune-<method>-<rate>-s<seed>``: ``train/prune.py`` with ICE and EViT at each keep rate (and the
   unpruned model, ``none``, at keep rate 1 with the same budget), then ``train/evaluate.py accuracy``
   on one common validation set; ``prune-<method>-<rate>-s<seed>-e<epochs>``: the pruning curve,
   ICE and EViT at ``prune_curve_rates`` for each of ``prune_budgets`` epochs; ``speed``: parameters, GMACs and the speed-up over the unpruned model
   measured with all variants interleaved in one run; ``pruned-map-ice-<rate>-s<seed>`` (first seed):
   ICE's map from the pruned forward of the ICE pruning checkpoint at its keep rate and at keep rate
   1 (the unpruned pass of the same weights), scored by ``train/evaluate.py explain --method ice
   --methods ice-pruned``, and their agreement with the logits-unchanged check
   (``train/evaluate.py agreement``).
4. ``examples``: a grid of maps on a few validation images, and the pruned-forward maps beside the
   kept patches (``visualize.pruned_forward_rows``).
5. ``adaptive`` (SyntheticScenes scales): per-image token counts (``model.keep_policy``) against
   fixed keep rates, from the first keep rate's ICE and EViT pruning checkpoints (first seed), on
   scenes with objects of 10% to 60% of the image side: each at fixed keep rates 1 to 0.3, and ICE's
   foreground threshold and EViT's attention mass calibrated to each rate below 1 on training
   images (``ice_prune.calibrate_keep_policy``), plus ICE's packed path at fixed keep 0.5's counts
   (the bookkeeping alone); top-1, mean tokens kept per point, mean GMACs per image and img/s (all
   variants in one interleaved run, alone).

Modules: ``scales`` (:class:`Scale`, :class:`TrainSpec`, the ``smoke`` / ``cpu`` / ``gpu`` factories
in :data:`SCALES`), ``stages`` (the stages and :func:`plan`), ``runner`` (:func:`run`, one stage
after another or several at once, and :func:`collect`), ``summary`` (:func:`summarize`: the derived
tables and claims), ``report`` (:func:`render`, :func:`write_report`) and ``plots`` (the report's
figures).
"""
from .report import render, write_report
from .scales import SCALES, Scale, TrainSpec, cpu_scale, gpu_scale, smoke_scale
from .runner import collect, run
from .stages import DONE, Context, Stage, eval_argv, plan, train_argv
from .summary import summarize

__all__ = [
    "DONE",
    "SCALES",
    "Context",
    "Scale",
    "Stage",
    "TrainSpec",
    "collect",
    "cpu_scale",
    "eval_argv",
    "gpu_scale",
    "plan",
    "render",
    "run",
    "smoke_scale",
    "summarize",
    "train_argv",
    "write_report",
]
