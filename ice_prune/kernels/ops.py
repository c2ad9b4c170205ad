"""The library's torch ops, with their kernels and FLOP formulas.

``ice_prune::reorganize``, the reorganize step:

The op (``torch.library.custom_op``) has a fake implementation, so ``torch.compile(fullgraph=True)``
traces through it, and an autograd formula that calls the op ``ice_prune::reorganize_backward``.
Both run the kernel their ``kernel`` argument names in a registry: ``"torch"`` (the plain-torch
reference, the CPU path) or ``"triton"`` (the kernels in ``triton_reorganize.py``, on CUDA tensors,
or on CPU tensors when the Triton interpreter is on). The public function :func:`reorganize` checks
its inputs and resolves the user's choice (``"auto"`` picks Triton for CUDA tensors) to that name
once, with :func:`resolve_kernel`; the ops take the resolved name.

``ice_prune::reorganize_ragged``, the same step with a keep count per image (a ``[B]`` tensor), the
images' rows packed without padding (``[total, D]`` and ``[B + 1]`` offsets), ``total`` passed as an
int so the fake implementation can size the output: the torch reference on CPU and a Triton forward
(``triton_ragged.py``); the backward ``ice_prune::reorganize_ragged_backward`` is the torch formula
for both.

``ice_prune::ice_score``, the ICE foreground score without the logits: the same ``kernel`` names,
resolved by :func:`ice_score`, for ``ice_score_reference`` (torch, in tiles of tokens and
classes) and ``triton_ice_score``; a fake implementation and a FLOP formula, no autograd formula
(it serves inference; :func:`ice_score` refuses inputs that need a gradient).
``ice_prune::ice_score_top_class`` is the same pass returning each token's best image class and its
probability beside the score (explain mode's class information). ``ice_prune::ice_score_into_map``
(explain mode on the Triton kernel) writes the score, the selection point, the class and its
probability at each token's patch in the map's buffers, in place, from the same kernel's epilogue.
"""
from __future__ import annotations

import numbers
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .reference import (MapTarget, ice_score_reference, reorganize_backward_reference,
                        reorganize_ragged_backward_reference, reorganize_ragged_reference,
                        reorganize_reference, write_map_reference)


class Kernel(NamedTuple):
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor]]
    #: runs on tensors of this device type (besides CUDA)
    runs_on_cpu: bool


KERNELS: dict[str, Kernel] = {
    "torch": Kernel(reorganize_reference, reorganize_backward_reference, runs_on_cpu=True),
}
#: the ICE score's implementations, by the same names: ``(h, weight, bias, compute_dtype,
#: top_class=False) -> scores``, or ``(scores, top_class, top_prob)`` with ``top_class``
SCORE_KERNELS: dict[str, Callable[..., Tensor]] = {"torch": ice_score_reference}
#: the ragged reorganize step's implementations, by the same names (the backward is torch's on both)
RAGGED_KERNELS: dict[str, Kernel] = {
    "torch": Kernel(reorganize_ragged_reference, reorganize_ragged_backward_reference,
                    runs_on_cpu=True),
}
try:
    from . import triton_ice_score, triton_ragged, triton_reorganize
except ImportError:  # no Triton (CPU-only or macOS install): the torch kernel serves everything
    triton_reorganize = triton_ice_score = triton_ragged = None
else:
    RAGGED_KERNELS["triton"] = Kernel(triton_ragged.reorganize_ragged_triton,
                                      reorganize_ragged_backward_reference,
                                      runs_on_cpu=triton_reorganize.INTERPRETED)
    KERNELS["triton"] = Kernel(triton_reorganize.reorganize_triton,
                               triton_reorganize.reorganize_backward_triton,
                               runs_on_cpu=triton_reorganize.INTERPRETED)
    SCORE_KERNELS["triton"] = triton_ice_score.ice_score_triton

KERNEL_CHOICES = ("auto", "torch", "triton")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The kernel that runs for ``kernel`` (``"auto"``, ``"torch"`` or ``"triton"``) on ``device``."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNEL_CHOICES}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" and "triton" in KERNELS else "torch"
    if kernel == "triton":
        if "triton" not in KERNELS:
            raise RuntimeError("kernel='triton' needs the triton package (pip install triton); "
                               "use kernel='torch' or 'auto'")
        if device.type != "cuda" and not KERNELS["triton"].runs_on_cpu:
            raise ValueError(
                f"kernel='triton' runs on CUDA tensors, got {device.type} tensors; move the model "
                f"to a GPU, use kernel='torch' (or 'auto'), or set TRITON_INTERPRET=1 before "
                f"importing ice_prune to run the Triton interpreter on CPU (slow, for testing)")
    return kernel


@torch.library.custom_op("ice_prune::reorganize", mutates_args=())
def reorganize_op(x: Tensor, scores: Tensor, keep: int, num_prefix: int, fuse: bool,
                  normalize: bool, kernel: str) -> tuple[Tensor, Tensor]:
    """``(out, order)`` of the reorganize step by the kernel named ``kernel`` (resolved: ``"torch"``
    or ``"triton"``); see :func:`reorganize`."""
    return KERNELS[kernel].forward(x, scores, keep, num_prefix, fuse, normalize)


@reorganize_op.register_fake
def _reorganize_fake(x, scores, keep, num_prefix, fuse, normalize, kernel):
    B, N, D = x.shape
    out = x.new_empty(B, num_prefix + keep + int(fuse), D)
    order = scores.new_empty(B, N - num_prefix, dtype=torch.int64)
    return out, order


@torch.library.custom_op("ice_prune::reorganize_backward", mutates_args=())
def reorganize_backward_op(grad_out: Tensor, x: Tensor, scores: Tensor, order: Tensor, keep: int,
                           num_prefix: int, fuse: bool, normalize: bool,
                           kernel: str) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`reorganize_op` to ``x`` and ``scores``."""
    return KERNELS[kernel].backward(grad_out, x, scores, order, keep, num_prefix, fuse, normalize)


@reorganize_backward_op.register_fake
def _reorganize_backward_fake(grad_out, x, scores, order, keep, num_prefix, fuse, normalize,
                              kernel):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(scores)


def _setup_context(ctx, inputs, output) -> None:
    x, scores, keep, num_prefix, fuse, normalize, kernel = inputs
    ctx.save_for_backward(x, scores, output[1])
    ctx.args = (keep, num_prefix, fuse, normalize, kernel)


def _backward(ctx, grad_out: Tensor, grad_order: Optional[Tensor]):
    x, scores, order = ctx.saved_tensors
    grad_x, grad_scores = reorganize_backward_op(grad_out, x, scores, order, *ctx.args)
    return grad_x, grad_scores, None, None, None, None, None


reorganize_op.register_autograd(_backward, setup_context=_setup_context)


def reorganize_macs(B: int, n: int, D: int, keep: int, fuse: bool = True) -> int:
    """Multiply-adds of one reorganize step: the weighted sum of the ``n - keep`` dropped rows of
    width ``D`` into the fused row, per batch row (copies and the ranking are not arithmetic)."""
    return B * (n - keep) * D if fuse else 0


# FlopCounterMode counts FLOPs, 2 per multiply-add (as its matmul formulas do).
@register_flop_formula(torch.ops.ice_prune.reorganize)
def _reorganize_flop(x_shape, scores_shape, keep, num_prefix, fuse, *args, out_shape=None,
                     **kwargs) -> int:
    B, N, D = x_shape
    return 2 * reorganize_macs(B, N - num_prefix, D, keep, fuse)


@register_flop_formula(torch.ops.ice_prune.reorganize_backward)
def _reorganize_backward_flop(grad_shape, x_shape, scores_shape, order_shape, keep, num_prefix,
                              fuse, *args, out_shape=None, **kwargs) -> int:
    # the dropped rows' gradient w_i * g_F and the scores' dot products <g_F, x_i>
    B, N, D = x_shape
    return 2 * 2 * reorganize_macs(B, N - num_prefix, D, keep, fuse)


def _check_tokens(x: Tensor, scores: Tensor, num_prefix: int) -> tuple[int, int, int, int]:
    """``(B, N, D, n)`` of tokens ``x [B, N, D]`` with ``num_prefix`` prefix tokens and one score
    per non-prefix token; a ValueError naming the shape that does not fit."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D] tokens, got shape {tuple(x.shape)}")
    B, N, D = x.shape
    if (isinstance(num_prefix, bool) or not isinstance(num_prefix, numbers.Integral)
            or not 0 <= num_prefix < N):
        raise ValueError(f"num_prefix must be an int in [0, {N}) for {N} tokens, got {num_prefix!r}")
    n = N - num_prefix
    if scores.shape != (B, n):
        raise ValueError(
            f"scores must be [B, N - num_prefix] = [{B}, {n}] (one per non-prefix token), got "
            f"{tuple(scores.shape)}")
    return B, N, D, n


def reorganize(
    x: Tensor,
    scores: Tensor,
    keep: int,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The reorganize step through the op ``ice_prune::reorganize``.

    Same contract as :func:`~ice_prune.kernels.reference.reorganize_reference` (``out [B, P + keep
    (+1), D]`` with the kept tokens in descending score order and the fused token last, and ``order
    [B, n]`` int64, the stable descending argsort of ``scores``); differentiable in ``x`` and
    ``scores``. ``kernel``: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or
    ``"torch"``.
    """
    B, N, D, n = _check_tokens(x, scores, num_prefix)
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or not 0 < keep <= n:
        raise ValueError(f"keep must be an int in [1, {n}] (of {n} non-prefix tokens), got {keep!r}")
    if not x.is_floating_point() or not scores.is_floating_point():
        raise TypeError(f"x and scores must be floating point, got {x.dtype} and {scores.dtype}")
    if x.device != scores.device:
        raise ValueError(f"x and scores must be on one device, got {x.device} and {scores.device}")
    return reorganize_op(x, scores, int(keep), int(num_prefix), bool(fuse), bool(normalize),
                         resolve_kernel(kernel, x.device))



@torch.library.custom_op("ice_prune::reorganize_ragged", mutates_args=())
def reorganize_ragged_op(x: Tensor, scores: Tensor, keep_counts: Tensor, total: int,
                         num_prefix: int, fuse: bool, normalize: bool,
                         kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, offsets, order)`` of the ragged reorganize step by the kernel named ``kernel``
    (resolved); see :func:`reorganize_ragged`."""
    return RAGGED_KERNELS[kernel].forward(x, scores, keep_counts, total, num_prefix, fuse,
                                          normalize)


@reorganize_ragged_op.register_fake
def _reorganize_ragged_fake(x, scores, keep_counts, total, num_prefix, fuse, normalize, kernel):
    B, N, D = x.shape
    rows = x.new_empty(total, D)
    offsets = keep_counts.new_empty(B + 1, dtype=torch.int64)
    order = scores.new_empty(B, N - num_prefix, dtype=torch.int64)
    return rows, offsets, order


@torch.library.custom_op("ice_prune::reorganize_ragged_backward", mutates_args=())
def reorganize_ragged_backward_op(grad_rows: Tensor, x: Tensor, scores: Tensor,
                                  keep_counts: Tensor, offsets: Tensor, order: Tensor,
                                  num_prefix: int, fuse: bool, normalize: bool,
                                  kernel: str) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`reorganize_ragged_op` to ``x`` and ``scores``."""
    return RAGGED_KERNELS[kernel].backward(grad_rows, x, scores, keep_counts, offsets, order,
                                           num_prefix, fuse, normalize)


@reorganize_ragged_backward_op.register_fake
def _reorganize_ragged_backward_fake(grad_rows, x, scores, keep_counts, offsets, order, num_prefix,
                                     fuse, normalize, kernel):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(scores)


def _ragged_setup_context(ctx, inputs, output) -> None:
    x, scores, keep_counts, total, num_prefix, fuse, normalize, kernel = inputs
    ctx.save_for_backward(x, scores, keep_counts, output[1], output[2])
    ctx.args = (num_prefix, fuse, normalize, kernel)


def _ragged_backward(ctx, grad_rows: Tensor, grad_offsets: Optional[Tensor],
                     grad_order: Optional[Tensor]):
    x, scores, keep_counts, offsets, order = ctx.saved_tensors
    grad_x, grad_scores = reorganize_ragged_backward_op(grad_rows.contiguous(), x, scores,
                                                        keep_counts, offsets, order, *ctx.args)
    return grad_x, grad_scores, None, None, None, None, None, None


reorganize_ragged_op.register_autograd(_ragged_backward, setup_context=_ragged_setup_context)


def reorganize_ragged_macs(B: int, n: int, D: int, total: int, num_prefix: int,
                           fuse: bool = True) -> int:
    """Multiply-adds of one ragged reorganize step that packs ``total`` rows: the weighted sums of
    the ``B * n - sum_b keep_b`` dropped rows into the fused rows."""
    if not fuse:
        return 0
    kept = total - B * (num_prefix + 1)
    return (B * n - kept) * D


@register_flop_formula(torch.ops.ice_prune.reorganize_ragged)
def _reorganize_ragged_flop(x_shape, scores_shape, keep_counts_shape, total, num_prefix, fuse,
                            *args, out_shape=None, **kwargs) -> int:
    B, N, D = x_shape
    return 2 * reorganize_ragged_macs(B, N - num_prefix, D, total, num_prefix, fuse)


def reorganize_ragged(
    x: Tensor,
    scores: Tensor,
    keep_counts: Tensor,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
    total: Optional[int] = None,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """The reorganize step with a keep count per image through the op
    ``ice_prune::reorganize_ragged``, the images packed without padding.

    Contract of :func:`~ice_prune.kernels.reference.reorganize_ragged_reference`: ``rows [total,
    D]``, per image ``[prefix, kept tokens in descending score order, fused token]``, image ``b``'s
    rows ``rows[offsets[b]:offsets[b + 1]]`` (``offsets [B + 1]`` int64) equal to
    :func:`reorganize` of that image alone with ``keep = keep_counts[b]``, and ``order [B, n]``
    int64; differentiable in ``x`` and ``scores``.

    ``total``: the packed row count ``sum_b P + keep_counts[b] (+ 1)``, the one host sync of the
    step, which sizes the output; without it the count is read here (the same sync) and the keep
    counts are checked to lie in ``[1, n]``. A caller that passes it promises both; on CPU tensors
    they are checked anyway. ``kernel``: ``"auto"`` (Triton on CUDA tensors, torch otherwise),
    ``"triton"`` or ``"torch"``.
    """
    B, N, D, n = _check_tokens(x, scores, num_prefix)
    if keep_counts.shape != (B,) or keep_counts.is_floating_point() or keep_counts.is_complex():
        raise ValueError(f"keep_counts must be [B] = [{B}] integers (tokens kept per image), got "
                         f"{keep_counts.dtype} of shape {tuple(keep_counts.shape)}")
    if not x.is_floating_point() or not scores.is_floating_point():
        raise TypeError(f"x and scores must be floating point, got {x.dtype} and {scores.dtype}")
    if x.device != scores.device or x.device != keep_counts.device:
        raise ValueError(f"x, scores and keep_counts must be on one device, got {x.device}, "
                         f"{scores.device} and {keep_counts.device}")
    keep_counts = keep_counts.to(torch.int64)
    expected = None
    if total is None or x.device.type == "cpu":
        if B:
            low, high, kept = torch.stack([keep_counts.min(), keep_counts.max(),
                                           keep_counts.sum()]).tolist()
        else:
            low, high, kept = 1, n, 0
        if not 1 <= low <= high <= n:
            raise ValueError(f"keep_counts must lie in [1, {n}] (of {n} non-prefix tokens), got "
                             f"values in [{low}, {high}]")
        expected = kept + B * (num_prefix + int(fuse))
    if total is None:
        total = expected
    elif (isinstance(total, bool) or not isinstance(total, numbers.Integral)
          or (expected is not None and total != expected)):
        raise ValueError(f"total must be the packed row count sum_b P + keep_counts[b] (+ 1 if "
                         f"fuse) = {expected if expected is not None else 'an int'}, got {total!r}")
    return reorganize_ragged_op(x, scores, keep_counts, int(total), int(num_prefix), bool(fuse),
                                bool(normalize), resolve_kernel(kernel, x.device))

#: dtypes the Triton ICE score computes in (fp64 goes to the torch kernel under ``"auto"``)
TRITON_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("ice_prune::ice_score", mutates_args=())
def ice_score_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], compute_dtype: torch.dtype,
                 kernel: str) -> Tensor:
    """``[B, n]`` fp32 foreground scores by the kernel named ``kernel`` (resolved: ``"torch"`` or
    ``"triton"``); see :func:`ice_score`."""
    return SCORE_KERNELS[kernel](h, weight, bias, compute_dtype)


@ice_score_op.register_fake
def _ice_score_fake(h, weight, bias, compute_dtype, kernel):
    return h.new_empty(h.shape[:2], dtype=torch.float32)


@torch.library.custom_op("ice_prune::ice_score_top_class", mutates_args=())
def ice_score_top_class_op(h: Tensor, weight: Tensor, bias: Optional[Tensor],
                           compute_dtype: torch.dtype, kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(scores [B, n] fp32, top_class [B, n] int64, top_prob [B, n] fp32)``: the foreground scores
    of :func:`ice_score_op` (the same values) and each token's best image class with its
    probability, from the same pass; see :func:`ice_score`."""
    return SCORE_KERNELS[kernel](h, weight, bias, compute_dtype, top_class=True)


@ice_score_top_class_op.register_fake
def _ice_score_top_class_fake(h, weight, bias, compute_dtype, kernel):
    shape = h.shape[:2]
    return (h.new_empty(shape, dtype=torch.float32), h.new_empty(shape, dtype=torch.int64),
            h.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op("ice_prune::ice_score_into_map",
                         mutates_args=("foreground", "point", "top_class", "top_prob"))
def ice_score_into_map_op(h: Tensor, weight: Tensor, bias: Optional[Tensor],
                          compute_dtype: torch.dtype, kernel: str, patches: Tensor, loc: int,
                          foreground: Tensor, point: Tensor, top_class: Tensor,
                          top_prob: Tensor) -> Tensor:
    """``[B, n]`` fp32 scores (:func:`ice_score_op`), and each token's score, ``loc``, best image
    class and its probability written at its patch (``patches [B, n]``) in the map's ``[B, P + 1]``
    buffers, in place (:class:`~ice_prune.kernels.reference.MapTarget`)."""
    into = MapTarget(patches, loc, foreground, point, top_class, top_prob)
    if kernel == "triton":
        return SCORE_KERNELS[kernel](h, weight, bias, compute_dtype, into=into)
    scores, *top = SCORE_KERNELS[kernel](h, weight, bias, compute_dtype, top_class=True)
    write_map_reference(into, scores, *top)
    return scores


@ice_score_into_map_op.register_fake
def _ice_score_into_map_fake(h, weight, bias, compute_dtype, kernel, patches, loc, foreground,
                             point, top_class, top_prob):
    return h.new_empty(h.shape[:2], dtype=torch.float32)


def ice_score_macs(B: int, n: int, D: int, C: int) -> int:
    """Multiply-adds of the ICE score of ``B x n`` tokens of width ``D`` under a head of ``C`` classes
    plus background: the ``C + 1`` logits per token, as the linear layer it replaces counts them
    (the exponentials and the top class, like every elementwise op, count zero)."""
    return B * n * D * (C + 1)


@register_flop_formula([torch.ops.ice_prune.ice_score, torch.ops.ice_prune.ice_score_top_class,
                        torch.ops.ice_prune.ice_score_into_map])
def _ice_score_flop(h_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    B, n, D = h_shape
    return 2 * ice_score_macs(B, n, D, weight_shape[0] - 1)


def ice_score(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    kernel: str = "auto",
    top_class: bool = False,
    into: Optional[MapTarget] = None,
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """ICE's foreground score ``1 - P(background)`` of every token through the op
    ``ice_prune::ice_score``, without materializing the head's logits.

    ``sigmoid(logsumexp_c(W_c h + b_c) - (w_bg . h + b_bg))`` over the image classes ``c < C``, the
    background being the weight's last row: the value of
    ``ice_prune.select.foreground_score(F.linear(h, weight, bias))``.

    Args:
        h: ``[B, n, D]`` tokens (any strides).
        weight: ``[C + 1, D]`` the head's last linear layer, background last (``C >= 1``).
        bias: ``[C + 1]`` or ``None``.
        kernel: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.
        top_class: also return each token's best image class (the argmax over the ``C`` image
            logits, background excluded; ties to the lowest index, as ``torch.argmax``) and its
            probability under the softmax over all ``C + 1`` classes, from the same pass (the op
            ``ice_prune::ice_score_top_class``; the scores are the same values).
        into: explain mode's map (:class:`~ice_prune.kernels.reference.MapTarget`): write each
            token's score, ``into.loc``, top class and its probability at its patch in the map's
            buffers, in place, and return the scores. The Triton kernel writes them from its
            epilogue (the op ``ice_prune::ice_score_into_map``, no launch of its own); the torch
            kernel runs ``ice_prune::ice_score_top_class`` and scatters them.

    Returns:
        ``[B, n]`` fp32 scores; with ``top_class`` the tuple ``(scores, top_class [B, n] int64,
        top_prob [B, n] fp32)``. Inputs are rounded to the autocast dtype inside an autocast region
        (as ``nn.Linear`` rounds them), else computed in their own dtype, with fp32 accumulation.

    Inference only: there is no backward, and inputs that need a gradient raise; compute
    ``foreground_score(head(h))`` there.
    """
    if h.dim() != 3:
        raise ValueError(f"h must be [B, n, D] tokens, got shape {tuple(h.shape)}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[2] or weight.shape[0] < 2:
        raise ValueError(
            f"weight must be [C + 1, D] = [classes + background, {h.shape[2]}] with C >= 1, got "
            f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [C + 1] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    tensors = (h, weight) if bias is None else (h, weight, bias)
    if not all(t.is_floating_point() for t in tensors):
        raise TypeError(f"h, weight and bias must be floating point, got "
                        f"{[t.dtype for t in tensors]}")
    if any(t.device != h.device for t in tensors):
        raise ValueError(f"h, weight and bias must be on one device, got "
                         f"{[str(t.device) for t in tensors]}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "ice_score has no backward (it serves inference); where gradients are needed compute "
            "ice_prune.select.foreground_score(head(h)), or call it under torch.no_grad()")
    if torch.is_autocast_enabled(h.device.type):
        compute_dtype = torch.get_autocast_dtype(h.device.type)
    else:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    resolved = resolve_kernel(kernel, h.device)
    if resolved == "triton" and compute_dtype not in TRITON_SCORE_DTYPES:
        if kernel != "auto":
            raise TypeError(f"kernel='triton' computes the ICE score in {TRITON_SCORE_DTYPES}, got "
                            f"{compute_dtype}; use kernel='torch' or 'auto'")
        resolved = "torch"
    if into is not None:
        if resolved == "triton":
            return ice_score_into_map_op(h, weight, bias, compute_dtype, resolved, *into)
        scores, *top = ice_score_top_class_op(h, weight, bias, compute_dtype, resolved)
        write_map_reference(into, scores, *top)
        return scores
    if top_class:
        return ice_score_top_class_op(h, weight, bias, compute_dtype, resolved)
    return ice_score_op(h, weight, bias, compute_dtype, resolved)
