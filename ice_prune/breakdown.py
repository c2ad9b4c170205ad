"""Where a forward's time goes: time and multiply-adds per kind of work, to compare a pruned
model's speed-up with its MAC ratio kind by kind.

A pruned ViT's speed-up falls short of its MAC ratio. :func:`breakdown` splits one forward into

* ``matmul``: linear layers and the patch embedding's convolution (GEMMs; cuBLAS / CUTLASS kernels,
  ``aten::addmm`` / ``mm`` / ``bmm``, inductor's mm templates),
* ``attention``: scaled-dot-product attention (flash, memory-efficient or cuDNN kernels),
* ``selection``: the library's ops (``ice_prune::reorganize``, ``ice_prune::ice_score``) and
  everything they launch,
* ``other``: the rest (norms, GELU, residual adds, copies, EViT's [CLS] row softmax, ...),

with the time of each from ``torch.profiler`` (device time of the kernels each op launched on a GPU,
self CPU time on a CPU) and the MACs of each from ``FlopCounterMode`` with :mod:`ice_prune.flops`'s
formulas. Between a baseline and a pruned model, a kind whose time ratio is below its MAC ratio is
where the speed-up is lost (a GEMM on fewer rows runs below peak, attention on 141 tokens pads to
the kernel's tiles); time in ``selection`` and ``other`` that the baseline lacks is overhead.

Names are matched by pattern (:func:`kind_of`): a kernel no pattern knows counts as ``other``, so
read ``top`` (the longest ops of each kind) before trusting a split.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

import torch
from torch import Tensor, nn

KINDS = ("matmul", "attention", "selection", "other")

_ATTENTION = re.compile(r"scaled_dot_product|flash|fmha|sdpa|attention", re.IGNORECASE)
_MATMUL = re.compile(
    r"gemm|xmma|cutlass|cublas|conv|matmul|linear|triton_tem_"
    r"|(^|[^a-z])(aten::)?(add)?b?mm([^a-z]|$)", re.IGNORECASE)
_SELECTION = re.compile(r"ice_prune|_reorganize_kernel|_ice_score_kernel|_order_kernel")


def kind_of(name: str) -> str:
    """The kind of work of an op or kernel named ``name`` (see the module's docstring)."""
    if _SELECTION.search(name):
        return "selection"
    if _ATTENTION.search(name):
        return "attention"
    if _MATMUL.search(name):
        return "matmul"
    return "other"


def mac_breakdown(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Multiply-adds of ``model(x)`` per kind (FlopCounterMode, with :mod:`ice_prune.flops`'s
    formulas; the total is :func:`ice_prune.count_flops` with ``counter="torch"``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ice_prune.flops import torch_formulas
    with FlopCounterMode(display=False, custom_mapping=torch_formulas()) as counter:
        model(x)
    macs = dict.fromkeys(KINDS, 0)
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op)
        # a layer norm's count is fvcore's estimate of its elementwise work: not a GEMM
        kind = "other" if "layer_norm" in name else kind_of(name)
        macs[kind] += flops // 2
    return macs


def _kind_in_tree(event) -> str:
    """An op's kind; an op called inside one of the library's ops is selection work."""
    parent = event.cpu_parent
    while parent is not None:
        if _SELECTION.search(parent.name):
            return "selection"
        parent = parent.cpu_parent
    return kind_of(event.name)


def time_breakdown(model: nn.Module, x: Tensor, reps: int = 5,
                   warmup: int = 2) -> tuple[dict[str, float], dict[str, list]]:
    """Milliseconds per forward of ``model(x)`` per kind, and the five longest ops of each kind
    (``[name, ms per forward]``). On CUDA the device time of the kernels each op launched, on a CPU
    each op's self time; ``warmup`` forwards first (compilation, autotuning), then ``reps``
    profiled."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x.device.type == "cuda"
    for _ in range(warmup):
        model(x)
    if cuda:
        torch.cuda.synchronize(x.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            model(x)
        if cuda:
            torch.cuda.synchronize(x.device)
    per_op: dict[tuple[str, str], float] = defaultdict(float)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            per_op[_kind_in_tree(event), event.name] += us / 1e3 / reps
    times = dict.fromkeys(KINDS, 0.0)
    top: dict[str, list] = {kind: [] for kind in KINDS}
    for (kind, name), ms in sorted(per_op.items(), key=lambda item: -item[1]):
        times[kind] += ms
        if len(top[kind]) < 5:
            top[kind].append([name, ms])
    return times, top


def breakdown(model: nn.Module, x: Tensor, reps: int = 5, warmup: int = 2,
              macs: Optional[dict[str, int]] = None) -> dict:
    """``{"ms": {kind: ms}, "macs": {kind: MACs}, "top": {kind: [[op, ms], ...]}, "total_ms"}`` of
    one forward of ``model(x)`` in eval mode without gradients. ``macs``: counted already (e.g. on
    the eager model of a compiled one: the counter does not see inside a compiled graph)."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            if macs is None:
                macs = mac_breakdown(model, x)
            times, top = time_breakdown(model, x, reps, warmup)
    finally:
        model.train(was_training)
    return {"ms": times, "macs": macs, "top": top, "total_ms": sum(times.values())}


def compare(base: dict, pruned: dict) -> dict[str, dict[str, Optional[float]]]:
    """Per kind and in total: the pruned model's speed-up over ``base`` (time ratio) beside its MAC
    ratio, and the milliseconds it adds or saves. ``None`` where either side is zero (work that only
    one model does, like the selection)."""

    def ratio(a: float, b: float) -> Optional[float]:
        return a / b if a and b else None

    rows = {}
    for kind in KINDS + ("total",):
        if kind == "total":
            t0, t1 = base["total_ms"], pruned["total_ms"]
            m0, m1 = sum(base["macs"].values()), sum(pruned["macs"].values())
        else:
            t0, t1 = base["ms"][kind], pruned["ms"][kind]
            m0, m1 = base["macs"][kind], pruned["macs"][kind]
        rows[kind] = {"base_ms": t0, "ms": t1, "speedup": ratio(t0, t1),
                      "mac_ratio": ratio(m0, m1), "delta_ms": t1 - t0}
    return rows
