"""ONNX export of a patched model: the library's two ops written in standard ONNX operators.

``torch.onnx.export(model, x, dynamo=True)`` captures a patched ViT with ``torch.export``; its graph
holds the ops ``ice_prune::reorganize`` and ``ice_prune::ice_score`` (:mod:`ice_prune.kernels.ops`),
which ONNX does not know. :data:`ONNX_TRANSLATIONS` maps each to a function of standard operators
(ONNX Script, traced by the exporter), and :func:`export_onnx` passes that table:

* ``reorganize``: ``TopK`` over all non-prefix scores (descending, ties by index: the op's stable
  argsort), ``GatherND`` of the first ``keep`` token rows, and the fused token as ``MatMul`` of the
  remaining weights (renormalized for ICE) with the remaining rows; ``Concat`` of prefix, kept and
  fused tokens.
* ``ice_score``: ``MatMul`` with the head's weight, ``ReduceLogSumExp`` over the image classes minus
  the background logit, ``Sigmoid`` (the logits exist inside the ONNX graph; the op's tiling is a
  memory optimization of its torch and Triton kernels).

Everything else (the blocks, the EViT [CLS] attention row, explain mode's map: ``ScatterElements``
of each point's scores over the patches its tokens stand for) is ordinary torch that the exporter's
own library translates. Needs the ``export`` extra: ``pip install 'ice_prune[export]'`` (onnx,
onnxscript, onnxruntime).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import Tensor, nn

# Fusion weights are renormalized with the same guard as the torch kernel.
from ice_prune.integrations.common import WithExplanation
from ice_prune.kernels.reference import EPS

#: ONNX opset the translations are written in (the exporter's default opset as well)
OPSET = 18
_INT64_MAX = 2 ** 63 - 1


def _op():
    try:
        from onnxscript import opset18
    except ImportError as e:
        raise ImportError("ONNX export needs onnxscript: pip install 'ice_prune[export]' "
                          "(onnx, onnxscript, onnxruntime)") from e
    return opset18


def _ints(*values: int):
    op = _op()
    return op.Constant(value_ints=list(values))


def reorganize_onnx(x, scores, keep: int, num_prefix: int, fuse: bool, normalize: bool,
                    kernel: str = "auto"):
    """``ice_prune::reorganize`` in ONNX operators: ``(out, order)`` as the torch kernel computes
    them (``kernel`` chooses among torch and Triton kernels and means nothing here)."""
    op = _op()
    n = op.Shape(scores, start=1, end=2)
    weights, order = op.TopK(scores, n, axis=1, largest=1, sorted=1)
    tokens = op.Slice(x, _ints(num_prefix), _ints(_INT64_MAX), _ints(1))
    kept_order = op.Slice(order, _ints(0), _ints(keep), _ints(1))
    kept = op.GatherND(tokens, op.Unsqueeze(kept_order, _ints(2)), batch_dims=1)
    parts = [kept]
    if num_prefix:
        parts.insert(0, op.Slice(x, _ints(0), _ints(num_prefix), _ints(1)))
    if fuse:
        dropped_order = op.Slice(order, _ints(keep), _ints(_INT64_MAX), _ints(1))
        w = op.Cast(op.Slice(weights, _ints(keep), _ints(_INT64_MAX), _ints(1)), to=1)  # fp32
        if normalize:
            total = op.ReduceSum(w, _ints(1), keepdims=1)
            w = op.Div(w, op.Max(total, op.Constant(value_float=EPS)))
        dropped = op.Cast(op.GatherND(tokens, op.Unsqueeze(dropped_order, _ints(2)), batch_dims=1),
                          to=1)
        fused = op.MatMul(op.Unsqueeze(w, _ints(1)), dropped)  # [B, 1, D]: the weighted sum
        parts.append(op.CastLike(fused, x))
    return op.Concat(*parts, axis=1), order


def _head_scores(h, weight, bias):
    """``(image-class logits, score)`` of the ICE head, fp32: the score ``sigmoid(logsumexp(class
    logits) - background logit)`` keeps its last axis, the background logit being the last."""
    op = _op()
    logits = op.MatMul(op.Cast(h, to=1), op.Transpose(op.Cast(weight, to=1), perm=[1, 0]))
    if bias is not None:
        logits = op.Add(logits, op.Cast(bias, to=1))
    classes = op.Slice(logits, _ints(0), _ints(-1), _ints(2))
    background = op.Slice(logits, _ints(-1), _ints(_INT64_MAX), _ints(2))
    lse = op.ReduceLogSumExp(classes, _ints(2), keepdims=1)
    return classes, lse, op.Sigmoid(op.Sub(lse, background))


def ice_score_onnx(h, weight, bias=None, compute_dtype: int = 1, kernel: str = "auto"):
    """``ice_prune::ice_score`` in ONNX operators: ``sigmoid(logsumexp(class logits) - background
    logit)`` per token, fp32, the background logit last."""
    _, _, score = _head_scores(h, weight, bias)
    return _op().Squeeze(score, _ints(2))


def ice_score_top_class_onnx(h, weight, bias=None, compute_dtype: int = 1, kernel: str = "auto"):
    """``ice_prune::ice_score_top_class`` in ONNX operators: the score of :func:`ice_score_onnx`,
    the image classes' ``ArgMax`` (the first of ties, as the kernels) and its probability
    ``exp(max - logsumexp) * score``."""
    op = _op()
    classes, lse, score = _head_scores(h, weight, bias)
    top_class = op.ArgMax(classes, axis=2, keepdims=0, select_last_index=0)
    top_prob = op.Mul(op.Exp(op.Sub(op.ReduceMax(classes, _ints(2), keepdims=1), lse)), score)
    return op.Squeeze(score, _ints(2)), top_class, op.Squeeze(top_prob, _ints(2))


#: ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``
ONNX_TRANSLATIONS = {
    torch.ops.ice_prune.reorganize.default: reorganize_onnx,
    torch.ops.ice_prune.ice_score.default: ice_score_onnx,
    torch.ops.ice_prune.ice_score_top_class.default: ice_score_top_class_onnx,
}


def export_onnx(model: nn.Module, example: Tensor, path: Union[str, os.PathLike],
                dynamic_batch: bool = True, opset_version: Optional[int] = OPSET,
                explain: bool = False, **kwargs):
    """Export a (patched or plain) timm ViT to an ONNX file at ``path`` with the library's op
    translations; returns the ``torch.onnx.ONNXProgram``.

    Args:
        model: the model, in eval mode (the keep rates, fusion and method are baked into the graph:
            the token counts of each selection point are fixed by the image size).
        example: an example batch ``[B, 3, H, W]``; H and W are fixed in the graph.
        path: where to write the ``.onnx`` file.
        dynamic_batch: the batch axis of the input and output is dynamic (named ``batch``).
        explain: a model patched with ``method="ice"`` exports in explain mode (whatever
            ``model.explain`` says; the knob is left as it was), with the map as further outputs.
        kwargs: passed on to ``torch.onnx.export``.

    The graph's input is ``images``, its output ``logits``; with ``explain=True`` also
    ``foreground`` ``[batch, num_patches]`` fp32, ``point`` and ``top_class`` ``[batch,
    num_patches]`` int64 and ``top_prob`` ``[batch, num_patches]`` fp32, the fields of
    :class:`~ice_prune.integrations.common.ICEExplanation`.
    """
    _op()
    if getattr(model, "keep_policy", None) is not None:
        raise ValueError("an exported graph has fixed token counts, and a keep policy's depend on "
                         "each image: set model.keep_policy = None to export the fixed keep_rate")
    if model.training:
        raise ValueError("export the model in eval mode (model.eval()): training mode records "
                         "logits and drops paths that an exported graph does not have")
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    names = ["logits"]
    module = model
    if explain:
        if not hasattr(model, "ice_explanation"):
            raise ValueError("explain=True exports the ICE map of a patched model: patch it with "
                             "ice_prune.patch(model, method='ice') first")
        was = model.explain
        model.explain = True  # refused, naming the fix, for a model without an ICE head
        module = WithExplanation(model)
        names += ["foreground", "point", "top_class", "top_prob"]
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module, (example,), dynamo=True, custom_translation_table=ONNX_TRANSLATIONS,
                dynamic_shapes=dynamic_shapes, input_names=["images"], output_names=names,
                opset_version=opset_version, **kwargs)
    finally:
        if explain:
            model.explain = was
    program.save(os.fspath(path))
    return program
