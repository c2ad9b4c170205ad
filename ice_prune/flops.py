"""Multiply-add (MAC) counting for ViTs, patched or not: fvcore with the handles it lacks.

fvcore, the counter behind the GMACs that DeiT, EViT and ICE report, skips scaled-dot-product
attention (DeiT-S: 4.25 instead of 4.60 GMACs) and does not know the library's ops
``ice_prune::reorganize`` and ``ice_prune::ice_score``. This module registers handles for them, counts
index work (argsort, topk, gather) as zero and ``index_add`` (a packed batch's fused rows) as one
multiply-add per summed element, counts
a two-operand einsum exactly, and keeps fvcore's other defaults (linear, conv, norms), so a patched
model's count includes its ICE head (an ``aten::linear``, or in eval the fused score, counted as the
linear layer it replaces) and EViT's extra [CLS] attention row.

A second counter, ``torch.utils.flop_counter.FlopCounterMode`` given the same formulas, counts at the
dispatcher instead of a JIT trace; it reports FLOPs = 2 x MACs, halved here. The two agree exactly on
timm ViTs (tests/test_flops.py), which checks the handles against an independent implementation.

>>> import timm, ice_prune
>>> ice_prune.count_flops(timm.create_model("deit_small_patch16_224")) / 1e9  # doctest: +SKIP
4.608...
"""
from __future__ import annotations

from math import prod
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ice_prune.integrations.common import WithExplanation
from ice_prune.kernels import ice_score_macs, reorganize_macs
from ice_prune.kernels.ops import reorganize_ragged_macs

# aten names the JIT tracer records for scaled-dot-product attention, on CPU and CUDA
SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)
#: index work: no multiply-adds
ZERO_OPS = ("aten::topk", "aten::argsort", "aten::sort", "aten::gather", "aten::take_along_dim")
#: a sum of source rows into the output: the fused rows of a packed selection point
#: (:func:`~ice_prune.kernels.reorganize_packed_reference`), weighted rows summed per image
INDEX_ADD_OPS = ("aten::index_add", "aten::index_add_")
REORGANIZE_OP = "ice_prune::reorganize"
REORGANIZE_RAGGED_OP = "ice_prune::reorganize_ragged"
ICE_SCORE_OP = "ice_prune::ice_score"
ICE_SCORE_TOP_CLASS_OP = "ice_prune::ice_score_top_class"
ICE_SCORE_INTO_MAP_OP = "ice_prune::ice_score_into_map"


def sdpa_macs(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """``softmax(q k^T) v``: ``Nq*Nk*d`` for ``q k^T`` plus ``Nq*Nk*dv`` for the product with ``v``,
    for every batch and head (``q [..., Nq, d]``, ``k [..., Nk, d]``, ``v [..., Nk, dv]``)."""
    *batch, nq, d = q_shape
    nk, dv = k_shape[-2], v_shape[-1]
    return prod(batch) * nq * nk * (d + dv)


def einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> Optional[int]:
    """Exact MACs of a one- or two-operand einsum: the product of the sizes of all its indices.
    ``None`` for more operands (the contraction order matters there)."""
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    if len(lhs) != len(shapes) or len(shapes) > 2 or any("." in term for term in lhs):
        return None
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs, shapes):
        sizes.update(zip(term, shape))
    return prod(sizes.values())


def index_add_macs(source_shape: Sequence[int]) -> int:
    """``index_add``: one multiply-add per source element. Where it sums weighted rows (the
    fused rows of a packed selection point) the weighting is an elementwise product, which counts
    zero, so the weighted sum counts as the dense reorganize counts its fused row."""
    return prod(source_shape)


# fvcore handles: (inputs, outputs) are torch._C.Value of the traced node


def _shape(value) -> Optional[list[int]]:
    from fvcore.nn.jit_handles import get_shape
    return get_shape(value)


def _sdpa_flop_jit(inputs: list, outputs: list) -> int:
    return sdpa_macs(_shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2]))


def _reorganize_flop_jit(inputs: list, outputs: list) -> int:
    # schema: reorganize(Tensor x, Tensor scores, int keep, int num_prefix, bool fuse, ...)
    keep, fuse = inputs[2].toIValue(), inputs[4].toIValue()
    B, _, D = _shape(inputs[0])
    return reorganize_macs(B, _shape(inputs[1])[1], D, int(keep), bool(fuse))


def _reorganize_ragged_flop_jit(inputs: list, outputs: list) -> int:
    # schema: reorganize_ragged(Tensor x, Tensor scores, Tensor keep_counts, int total,
    #                           int num_prefix, bool fuse, ...): the packed total gives the kept sum
    total, num_prefix, fuse = (inputs[i].toIValue() for i in (3, 4, 5))
    B, N, D = _shape(inputs[0])
    return reorganize_ragged_macs(B, N - int(num_prefix), D, int(total), int(num_prefix), bool(fuse))


def _index_add_flop_jit(inputs: list, outputs: list) -> int:
    # schema: index_add(Tensor self, int dim, Tensor index, Tensor source, *, Scalar alpha)
    return index_add_macs(_shape(inputs[3]))


def _ice_score_flop_jit(inputs: list, outputs: list) -> int:
    # schema: ice_score(Tensor h, Tensor weight, Tensor? bias, ScalarType compute_dtype, str kernel)
    B, n, D = _shape(inputs[0])
    return ice_score_macs(B, n, D, _shape(inputs[1])[0] - 1)


def _einsum_flop_jit(inputs: list, outputs: list) -> int:
    from fvcore.nn.jit_handles import einsum_flop_jit
    equation = inputs[0].toIValue()
    shapes = [_shape(v) for v in inputs[1].node().inputs()]
    macs = einsum_macs(equation, shapes)
    # fvcore's own handle rounds through np.einsum_path's printed float: only for 3+ operands
    return einsum_flop_jit(inputs, outputs) if macs is None else macs


def fvcore_handles() -> dict[str, Optional[Callable]]:
    """The op handles :func:`flop_analysis` adds to fvcore's defaults (``None``: counts zero)."""
    handles: dict[str, Optional[Callable]] = {name: _sdpa_flop_jit for name in SDPA_OPS}
    handles.update({name: None for name in ZERO_OPS})
    handles[REORGANIZE_OP] = _reorganize_flop_jit
    handles[REORGANIZE_RAGGED_OP] = _reorganize_ragged_flop_jit
    handles.update({name: _index_add_flop_jit for name in INDEX_ADD_OPS})
    handles[ICE_SCORE_OP] = _ice_score_flop_jit
    handles[ICE_SCORE_TOP_CLASS_OP] = _ice_score_flop_jit  # the same head product, same schema
    handles[ICE_SCORE_INTO_MAP_OP] = _ice_score_flop_jit  # the same, the map's buffers after
    handles["aten::einsum"] = _einsum_flop_jit
    return handles


def flop_analysis(model: nn.Module, inputs: Any):
    """An fvcore ``FlopCountAnalysis`` with the handles of :func:`fvcore_handles` (counts are MACs);
    use it for per-module or per-operator breakdowns."""
    from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**fvcore_handles())
    analysis.unsupported_ops_warnings(False)  # elementwise ops (add, gelu, softmax) count zero
    analysis.uncalled_modules_warnings(False)
    return analysis


# FlopCounterMode formulas: they get shapes for tensors and the values of other arguments; FLOPs


def _sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_macs(query, key, value)


def _index_add_flop(self, dim, index, source, *args, out_shape=None, **kwargs) -> int:
    return 2 * index_add_macs(source)


def _layer_norm_flop(input, normalized_shape, weight=None, *args, out_shape=None, **kwargs) -> int:
    # fvcore's estimate for a norm: 5 operations per element with affine parameters, 4 without
    return 2 * prod(input) * (5 if weight is not None else 4)


def torch_formulas() -> dict:
    """Formulas :func:`count_flops` with ``counter="torch"`` adds to FlopCounterMode's registry:
    the CPU flash attention it lacks, layer norm and ``index_add`` (as fvcore counts them). The
    library's ops register their own formulas (``ice_prune.kernels``)."""
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop,
            aten.native_layer_norm: _layer_norm_flop,
            aten.index_add: _index_add_flop, aten.index_add_: _index_add_flop}


def _count_fvcore(model: nn.Module, x: Tensor) -> int:
    if getattr(model, "explain", False) is True:
        # the map as outputs: a point that keeps every token uses its scores only for the map,
        # and a JIT trace drops the work no output reads
        model = WithExplanation(model)
    return int(flop_analysis(model, (x,)).total())


def _count_torch(model: nn.Module, x: Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=torch_formulas()) as counter:
        model(x)
    return counter.get_total_flops() // 2


COUNTERS: dict[str, Callable[[nn.Module, Tensor], int]] = {
    "fvcore": _count_fvcore,
    "torch": _count_torch,
}


def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1,
                counter: str = "fvcore", images: Optional[Tensor] = None) -> int:
    """Multiply-adds (MACs, as the papers report them) of one forward pass in eval mode.

    Args:
        model: a timm ViT, patched by :func:`ice_prune.patch` or not (any traceable module works).
        input_size: ``(C, H, W)`` of one image.
        batch_size: images in the forward pass; the count is for the whole batch.
        counter: ``"fvcore"`` (JIT trace, the papers' tool) or ``"torch"`` (FlopCounterMode).
        images: ``[B, C, H, W]``, real images to count on instead of random ones of
            ``input_size`` (``batch_size`` and ``input_size`` are then not used). A model that keeps a
            number of tokens per image (``keep_policy``) costs what its images make it keep: divide
            the count by ``B`` for the mean per image. A masked policy
            (``KeepPolicy(masked=True)``, :mod:`ice_prune.masked`) computes every row of every
            block whatever it keeps, and that is what it counts: the unpruned model plus the
            selection steps, not the FLOPs the masking saves on paper.
    """
    if counter not in COUNTERS:
        raise ValueError(f"unknown counter {counter!r}; choose one of {sorted(COUNTERS)}")
    ref = next(model.parameters())
    if images is not None:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images)}")
        x = images.to(device=ref.device, dtype=ref.dtype)
    elif len(input_size) != 3:
        raise ValueError(f"input_size is (channels, height, width) of one image, got {input_size!r}")
    else:
        x = torch.randn(batch_size, *input_size, device=ref.device, dtype=ref.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return COUNTERS[counter](model, x)
    finally:
        model.train(was_training)
