"""Triton kernels for the reorganize step: two launches forward, one backward, no host sync.

1. ``_order_kernel`` (one program per batch row): every score's rank among the row's scores by a
   tiled pairwise comparison, ``r_i = #{j : s_j > s_i or (s_j == s_i and j < i)}`` (NaN above all,
   as ``torch.sort``), which is the stable descending ``argsort``; stored as ``order[b, r_i] = i``.
   n is at most a few thousand tokens, so the n^2 comparisons are cheap next to moving the rows, and
   there is no ``topk``, ``.item()`` or ``nonzero``: the step captures into a CUDA graph.
2. ``_gather_fuse_kernel`` (one program per batch row and block of channels): copies the prefix rows
   and the kept rows ``x[P + order[r]]`` into the preallocated output and accumulates the dropped
   rows, weighted by their scores, into the fused row in fp32 (divided by the sum of the dropped
   scores for ICE's mean). Every input row is read once, every output row written once.

The backward kernel scatters through the same ``order``: each input row is written once, with its
output row's gradient or ``w_i`` times the fused row's gradient, so no atomics are needed. The score
gradient's dot products ``<g_F, x_i>`` are written per channel block and summed in torch.

Values are cast to fp32 right after loading: arithmetic on bf16 is wrong in the Triton interpreter,
and the fused row is accumulated in fp32 anyway.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import EPS

# A [BLOCK_R rows x BLOCK_D channels] tile per step, one program per batch row and 128 channels
# (B * 3 programs at D = 384). Not yet tuned on a GPU.
_BLOCK_D = 128
_BLOCK_R = 32


@triton.jit
def _order_kernel(
    s_ptr, order_ptr, n, stride_sb, stride_sn,
    KEY_FP64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + b * stride_sb
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        mi = i < n
        si = tl.load(s_row + i * stride_sn, mask=mi, other=0.0)
        if not KEY_FP64:
            si = si.to(tl.float32)
        nan_i = si != si
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(0, n, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            mj = j < n
            sj = tl.load(s_row + j * stride_sn, mask=mj, other=0.0)
            if not KEY_FP64:
                sj = sj.to(tl.float32)
            nan_j = sj != sj
            greater = (sj[None, :] > si[:, None]) | (nan_j[None, :] & ~nan_i[:, None])
            equal = (sj[None, :] == si[:, None]) | (nan_j[None, :] & nan_i[:, None])
            before = greater | (equal & (j[None, :] < i[:, None]))
            rank += tl.sum((before & mj[None, :]).to(tl.int32), axis=1)
        tl.store(order_ptr + b * n + rank, i.to(tl.int64), mask=mi)


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


@triton.jit
def _backward_kernel(
    g_ptr, x_ptr, s_ptr, order_ptr, gx_ptr, dot_ptr,
    P, n, keep, D,
    stride_gb, stride_gn, stride_gd, stride_xb, stride_xn, stride_xd, stride_sb, stride_sn,
    stride_ordb, stride_ordn, stride_gxb, stride_gxn, stride_dotb, stride_dotc,
    FUSE: tl.constexpr, NORMALIZE: tl.constexpr, EPS_: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    g_row = g_ptr + b * stride_gb + d[None, :] * stride_gd
    gx_row = gx_ptr + b * stride_gxb + d[None, :]
    order_row = order_ptr + b * stride_ordb
    s_row = s_ptr + b * stride_sb
    for r0 in range(0, P, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < P)[:, None] & md[None, :]
        tl.store(gx_row + r[:, None] * stride_gxn, tl.load(g_row + r[:, None] * stride_gn, mask=m),
                 mask=m)
    for r0 in range(0, keep, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mr = r < keep
        idx = tl.load(order_row + r * stride_ordn, mask=mr, other=0)
        m = mr[:, None] & md[None, :]
        g = tl.load(g_row + (P + r)[:, None] * stride_gn, mask=m)
        tl.store(gx_row + (P + idx)[:, None] * stride_gxn, g, mask=m)
    if FUSE:
        g_f = tl.load(g_ptr + b * stride_gb + (P + keep) * stride_gn + d * stride_gd, mask=md,
                      other=0.0).to(tl.float32)
        scale = 1.0
        if NORMALIZE:
            total = tl.zeros([BLOCK_R], dtype=tl.float32)
            for r0 in range(keep, n, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                mr = r < n
                idx = tl.load(order_row + r * stride_ordn, mask=mr, other=0)
                total += tl.load(s_row + idx * stride_sn, mask=mr, other=0.0).to(tl.float32)
            scale = 1.0 / tl.maximum(tl.sum(total, axis=0), EPS_)
        for r0 in range(keep, n, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mr = r < n
            idx = tl.load(order_row + r * stride_ordn, mask=mr, other=0)
            m = mr[:, None] & md[None, :]
            w = tl.load(s_row + idx * stride_sn, mask=mr, other=0.0).to(tl.float32) * scale
            gx = w[:, None] * g_f[None, :]
            tl.store(gx_row + (P + idx)[:, None] * stride_gxn, gx.to(gx_ptr.dtype.element_ty),
                     mask=m)
            v = tl.load(x_ptr + b * stride_xb + (P + idx)[:, None] * stride_xn
                        + d[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
            tl.store(dot_ptr + b * stride_dotb + c * stride_dotc + (r - keep),
                     tl.sum(v * g_f[None, :], axis=1), mask=mr)
    else:
        for r0 in range(keep, n, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mr = r < n
            idx = tl.load(order_row + r * stride_ordn, mask=mr, other=0)
            m = mr[:, None] & md[None, :]
            tl.store(gx_row + (P + idx)[:, None] * stride_gxn,
                     tl.zeros([BLOCK_R, BLOCK_D], dtype=gx_ptr.dtype.element_ty), mask=m)


# ``triton.jit`` made interpreted functions if TRITON_INTERPRET=1 was set before this import; then the
# kernels run on CPU tensors.
INTERPRETED = type(_order_kernel).__name__ == "InterpretedFunction"


def _block(size: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(size)))


def argsort_descending(scores: Tensor) -> Tensor:
    """``torch.argsort(scores, dim=1, descending=True, stable=True)`` in one launch."""
    B, n = scores.shape
    order = torch.empty(B, n, dtype=torch.int64, device=scores.device)
    if order.numel():
        _order_kernel[(B,)](
            scores, order, n, scores.stride(0), scores.stride(1),
            KEY_FP64=scores.dtype == torch.float64,
            BLOCK_I=_block(n, 64), BLOCK_J=_block(n, 128))
    return order


def reorganize_triton(x: Tensor, scores: Tensor, keep: int, num_prefix: int, fuse: bool,
                      normalize: bool) -> tuple[Tensor, Tensor]:
    """The forward step: ``order`` by :func:`argsort_descending`, then one gather/fuse launch."""
    B, N, D = x.shape
    n = N - num_prefix
    order = argsort_descending(scores)
    out = torch.empty(B, num_prefix + keep + int(fuse), D, dtype=x.dtype, device=x.device)
    block_d = _block(D, _BLOCK_D)
    if out.numel():
        _gather_fuse_kernel[(B, triton.cdiv(D, block_d))](
            x, scores, order, out, num_prefix, n, keep, D,
            *x.stride(), *scores.stride(), out.stride(0), out.stride(1),
            FUSE=fuse, NORMALIZE=normalize, EPS_=EPS, BLOCK_R=_BLOCK_R, BLOCK_D=block_d)
    return out, order


def reorganize_backward_triton(grad_out: Tensor, x: Tensor, scores: Tensor, order: Tensor,
                               keep: int, num_prefix: int, fuse: bool,
                               normalize: bool) -> tuple[Tensor, Tensor]:
    """Gradients to ``x`` and ``scores``; the formulas of ``reorganize_backward_reference``."""
    B, N, D = x.shape
    n = N - num_prefix
    block_d = _block(D, _BLOCK_D)
    blocks = triton.cdiv(D, block_d)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    dots = torch.empty(B, blocks, n - keep, dtype=torch.float32, device=x.device)
    if grad_x.numel():
        _backward_kernel[(B, blocks)](
            grad_out, x, scores, order, grad_x, dots, num_prefix, n, keep, D,
            *grad_out.stride(), *x.stride(), *scores.stride(), *order.stride(),
            grad_x.stride(0), grad_x.stride(1),
            dots.stride(0), dots.stride(1),
            FUSE=fuse, NORMALIZE=normalize, EPS_=EPS, BLOCK_R=_BLOCK_R, BLOCK_D=block_d)
    grad_scores = torch.zeros(B, n, dtype=torch.float32, device=scores.device)
    if fuse:
        a = dots.sum(dim=1)  # <g_F, x_i> per dropped token
        dropped = order[:, keep:]
        if normalize:
            s = scores.gather(1, dropped).float()
            total = s.sum(dim=1, keepdim=True)
            w = s / total.clamp_min(EPS)
            centred = (a - (w * a).sum(dim=1, keepdim=True)) / total.clamp_min(EPS)
            a = torch.where(total >= EPS, centred, a / EPS)
        grad_scores.scatter_(1, dropped, a)
    return grad_x, grad_scores.to(scores.dtype)
