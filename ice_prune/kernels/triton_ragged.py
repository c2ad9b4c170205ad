"""Triton kernel for the ragged reorganize step: a keep count per image, the images packed.

``_reorganize_ragged_kernel`` (:func:`reorganize_ragged_triton`), one program per image and block
of ``BLOCK_D`` channels, runs the dense kernel's per-image body (``triton_reorganize.
_reorganize_rows``: the same stable descending rank, prefix copy, kept rows stored by rank, dropped
rows fused in fp32) with the image's keep count read from ``keep_ptr`` and its rows written from its
offset in the packed output: kept row ``offset_b + P + rank``, fused row ``offset_b + P + keep_b``. The offsets are a
cumulative sum computed in torch beforehand; nothing syncs with the host, and an image's rows are
computed from that image alone.

One fixed config (``CONFIG`` on ``NUM_WARPS`` warps, the dense kernel's); no argument depends on the
batch size or the packed total, so neither compiles again. The backward is the torch reference's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import EPS, ragged_offsets
from .triton_reorganize import INTERPRETER_CONFIG, NUM_WARPS, _reorganize_rows, argsort_descending

CONFIG = INTERPRETER_CONFIG


@triton.jit
def _reorganize_ragged_kernel(
    x_ptr, s_ptr, keep_ptr, offsets_ptr, order_ptr, out_ptr,
    P, n, D,
    stride_xb, stride_xn, stride_xd, stride_sb, stride_sn, stride_on,
    FUSE: tl.constexpr, NORMALIZE: tl.constexpr, KEY_FP64: tl.constexpr, EPS_: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(b, c)``: image ``b``, channels ``[c * BLOCK_D, (c + 1) * BLOCK_D)``, its rows
    from its offset in the packed output with its own keep count. Every output element is written
    exactly once."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    keep = tl.load(keep_ptr + b).to(tl.int64)
    start = tl.load(offsets_ptr + b)
    _reorganize_rows(x_ptr + b * stride_xb + d[None, :] * stride_xd, s_ptr + b * stride_sb,
                     order_ptr + b * n, out_ptr + start * stride_on, keep, P, n, d, md, c == 0,
                     stride_xn, stride_sn, stride_on, FUSE, NORMALIZE, KEY_FP64, EPS_, BLOCK_I,
                     BLOCK_J)


def reorganize_ragged_triton(x: Tensor, scores: Tensor, keep_counts: Tensor, total: int,
                             num_prefix: int, fuse: bool,
                             normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The ragged forward in one launch; the contract of ``reorganize_ragged_reference``."""
    B, N, D = x.shape
    n = N - num_prefix
    offsets = ragged_offsets(keep_counts, num_prefix, fuse)
    out = torch.empty(total, D, dtype=x.dtype, device=x.device)
    if not out.numel():  # no channels (or no rows): no program to write the order
        return out, offsets, argsort_descending(scores)
    order = torch.empty(B, n, dtype=torch.int64, device=x.device)
    _reorganize_ragged_kernel[(B, triton.cdiv(D, CONFIG["BLOCK_D"]))](
        x, scores, keep_counts, offsets, order, out, num_prefix, n, D,
        *x.stride(), *scores.stride(), out.stride(0),
        FUSE=fuse, NORMALIZE=normalize, KEY_FP64=scores.dtype == torch.float64, EPS_=EPS,
        **CONFIG, num_warps=NUM_WARPS)
    return out, offsets, order
