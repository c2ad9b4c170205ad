"""Triton kernel for the ragged reorganize step: a keep count per image, the images packed.

``_reorganize_ragged_kernel`` (:func:`reorganize_ragged_triton`), one program per image and block
of ``BLOCK_D`` channels, is ``triton_reorganize._reorganize_kernel`` with the image's keep count
read from ``keep_ptr`` and its rows written from its offset in the packed output: it ranks the
image's scores itself (the same stable descending rank), copies the prefix rows, stores each kept
row (rank ``< keep_b``) to packed row ``offset_b + P + rank`` and accumulates the dropped rows,
weighted by their scores, into the fused row ``offset_b + P + keep_b`` in fp32. The offsets are a
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
from .triton_reorganize import (INTERPRETER_CONFIG, NUM_WARPS, _ranks, _sort_keys,
                                argsort_descending)

CONFIG = INTERPRETER_CONFIG


@triton.jit
def _reorganize_ragged_kernel(
    x_ptr, s_ptr, keep_ptr, offsets_ptr, order_ptr, out_ptr,
    P, n, D,
    stride_xb, stride_xn, stride_xd, stride_sb, stride_sn, stride_on,
    FUSE: tl.constexpr, NORMALIZE: tl.constexpr, KEY_FP64: tl.constexpr, EPS_: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(b, c)``: image ``b``, channels ``[c * BLOCK_D, (c + 1) * BLOCK_D)``. Every output
    element is written exactly once."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    keep = tl.load(keep_ptr + b).to(tl.int64)
    start = tl.load(offsets_ptr + b)
    d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    x_row = x_ptr + b * stride_xb + d[None, :] * stride_xd
    out_row = out_ptr + start * stride_on + d[None, :]
    s_row = s_ptr + b * stride_sb
    for r0 in range(0, P, BLOCK_I):
        r = r0 + tl.arange(0, BLOCK_I)
        m = (r < P)[:, None] & md[None, :]
        tl.store(out_row + r[:, None] * stride_on, tl.load(x_row + r[:, None] * stride_xn, mask=m),
                 mask=m)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    total = tl.zeros([BLOCK_I], dtype=tl.float32)
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        mi = i < n
        si = tl.load(s_row + i * stride_sn, mask=mi, other=0.0)
        rank = _ranks(s_row, stride_sn, n, i, _sort_keys(si, i, mi, KEY_FP64), KEY_FP64, BLOCK_I,
                      BLOCK_J)
        tl.store(order_ptr + b * n + rank, i.to(tl.int64), mask=mi & (c == 0))
        m = mi[:, None] & md[None, :]
        v = tl.load(x_row + (P + i)[:, None] * stride_xn, mask=m, other=0.0)
        tl.store(out_row + (P + rank)[:, None] * stride_on, v, mask=m & (rank < keep)[:, None])
        if FUSE:
            dropped = mi & (rank >= keep)
            w = tl.where(dropped, si.to(tl.float32), 0.0)
            # where, not only w = 0: a kept row may hold inf, and 0 * inf is NaN
            acc += tl.sum(tl.where(dropped[:, None], w[:, None] * v.to(tl.float32), 0.0), axis=0)
            total += w
    if FUSE:
        if NORMALIZE:
            acc = acc / tl.maximum(tl.sum(total, axis=0), EPS_)
        tl.store(out_ptr + (start + P + keep) * stride_on + d, acc.to(out_ptr.dtype.element_ty),
                 mask=md)


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
