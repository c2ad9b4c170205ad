"""The reorganize step's forward in two Triton launches, the comparison point of
bench/test_kernels.py for the library's one-launch ``_reorganize_kernel``.

``order`` first (:func:`ice_prune.kernels.triton_reorganize.argsort_descending`, the library's
``_order_kernel``), then ``_gather_fuse_kernel`` reads it back to gather the kept rows and sum the
dropped ones into the fused row. Same contract as
:func:`~ice_prune.kernels.reference.reorganize_reference`; tests/test_kernels.py checks it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ice_prune.kernels.reference import EPS
from ice_prune.kernels.triton_reorganize import argsort_descending

# [BLOCK_R rows x BLOCK_D channels] per step, one program per batch row and BLOCK_D channels
BLOCK_R = 32
BLOCK_D_MAX = 128


@triton.jit
def _gather_fuse_kernel(
    x_ptr, s_ptr, order_ptr, out_ptr,
    P, n, keep, D,
    stride_xb, stride_xn, stride_xd, stride_sb, stride_sn, stride_ob, stride_on,
    FUSE: tl.constexpr, NORMALIZE: tl.constexpr, EPS_: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    x_row = x_ptr + b * stride_xb + d[None, :] * stride_xd
    out_row = out_ptr + b * stride_ob + d[None, :]
    order_row = order_ptr + b * n
    for r0 in range(0, P, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < P)[:, None] & md[None, :]
        v = tl.load(x_row + r[:, None] * stride_xn, mask=m)
        tl.store(out_row + r[:, None] * stride_on, v, mask=m)
    for r0 in range(0, keep, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mr = r < keep
        idx = tl.load(order_row + r, mask=mr, other=0)
        m = mr[:, None] & md[None, :]
        v = tl.load(x_row + (P + idx)[:, None] * stride_xn, mask=m)
        tl.store(out_row + (P + r)[:, None] * stride_on, v, mask=m)
    if FUSE:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(keep, n, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mr = r < n
            idx = tl.load(order_row + r, mask=mr, other=0)
            w = tl.load(s_ptr + b * stride_sb + idx * stride_sn, mask=mr, other=0.0).to(tl.float32)
            v = tl.load(x_row + (P + idx)[:, None] * stride_xn, mask=mr[:, None] & md[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * v, axis=0)
            total += w
        if NORMALIZE:
            acc = acc / tl.maximum(tl.sum(total, axis=0), EPS_)
        tl.store(out_ptr + b * stride_ob + (P + keep) * stride_on + d,
                 acc.to(out_ptr.dtype.element_ty), mask=md)


def reorganize_triton_two_launch(x: Tensor, scores: Tensor, keep: int, num_prefix: int, fuse: bool,
                                 normalize: bool) -> tuple[Tensor, Tensor]:
    """``(out, order)`` of the reorganize step: ``order`` by ``argsort_descending``, then one
    gather/fuse launch reading it back."""
    B, N, D = x.shape
    order = argsort_descending(scores)
    out = torch.empty(B, num_prefix + keep + int(fuse), D, dtype=x.dtype, device=x.device)
    block_d = min(BLOCK_D_MAX, max(16, triton.next_power_of_2(D)))
    if out.numel():
        _gather_fuse_kernel[(B, triton.cdiv(D, block_d))](
            x, scores, order, out, num_prefix, N - num_prefix, keep, D,
            *x.stride(), *scores.stride(), out.stride(0), out.stride(1),
            FUSE=fuse, NORMALIZE=normalize, EPS_=EPS, BLOCK_R=BLOCK_R, BLOCK_D=block_d)
    return out, order
