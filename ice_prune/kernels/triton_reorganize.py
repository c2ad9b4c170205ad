"""Triton kernels for the reorganize step: one launch forward, one backward, no host sync.

Forward, ``_reorganize_kernel`` (the op's Triton forward, :func:`reorganize_triton`), one program
per batch row and block of ``BLOCK_D`` channels:

* it ranks its row's scores itself, ``BLOCK_I`` tokens at a time by tiled pairwise comparison:
  ``r_i = #{j : s_j > s_i or (s_j == s_i and j < i)}`` (NaN above all, ``-0.0 == 0.0``, as
  ``torch.sort``), the position of ``i`` in the stable descending ``argsort``. The comparisons are
  on integer keys built from the scores' bits (``_sort_keys``): for fp32 / fp16 / bf16 scores one
  int64 compare per pair, the position folded into the key; fp64 scores compare the position apart.
  Every channel block recomputes the ranks (n^2 comparisons, n ~ 200: cheap next to moving the
  rows); the block of channel 0 writes ``order[b, r_i] = i``;
* it copies the prefix rows, stores each kept row (``r_i < keep``) straight to output row
  ``P + r_i`` (a scatter: ``order`` is not read back), and accumulates the dropped rows, weighted by
  their scores, into the fused row in fp32 (in token order; divided by the sum of the dropped
  scores for ICE's mean). Every input row is read once, every output element written once.

There is no ``topk``, ``.item()`` or ``nonzero``: the step captures into a CUDA graph.
``_order_kernel`` ranks alone (:func:`argsort_descending`), for a step with no channels to move.

Tuning: the kernel runs one fixed config, ``INTERPRETER_CONFIG`` on ``NUM_WARPS`` warps (the
interpreter's too; chosen from the structure, not timed: 128 channels divide D = 384 into three
programs per row). No argument depends on the batch size (it only sets the grid), so a new batch
size does not compile again. ``ICE_PRUNE_AUTOTUNE=1`` wraps the kernel in ``triton.autotune`` over
``AUTOTUNE_CONFIGS`` instead (``BLOCK_D`` 64 / 128 / 256, ``BLOCK_I`` 32 / 64, 2 / 4 / 8 warps;
tiles wider than the row or over 128 elements a thread pruned), keyed on n, D, keep, the flags and
the dtypes, never the batch size. The first call per key then compiles and times the configs
(seconds), so it must happen before a CUDA graph capture: warm up first (``ice_prune.throughput``'s
capture runs the model three times on a side stream first, which does it). The autotuner reruns the
kernel on the real buffers, which is harmless: nothing is accumulated in global memory.

The backward kernel scatters through ``order``: each input row is written once, with its output
row's gradient or ``w_i`` times the fused row's gradient, so no atomics are needed. The score
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
from .tuning import autotune_enabled

# The backward's tiles: [BLOCK_R rows x BLOCK_D channels] per step, one program per batch row and
# 128 channels (B * 3 programs at D = 384). Not tuned.
_BLOCK_D = 128
_BLOCK_R = 32


@triton.jit
def _sort_keys(s, idx, mask, KEY_FP64: tl.constexpr):
    """int64 keys of scores ``s`` (at positions ``idx``) whose descending order is ``torch.sort``'s:
    NaN above everything, ``-0.0 == 0.0``. Integer arithmetic on the float's bits only (no float
    compare that could flush subnormals): the signed magnitude ``+-(bits & 0x7F..F)`` is in the
    float's order and maps both zeros to 0; NaN (magnitude above inf's) gets the largest key. An fp32 key
    also folds in the position, ``key * 2^32 - idx``, so keys are distinct and a larger key ranks
    first (the stable tie rule: the lower position first); fp64 keys need the position compared
    separately. Lanes outside ``mask`` get the smallest int64, below every valid key."""
    if KEY_FP64:
        bits = s.to(tl.float64).to(tl.int64, bitcast=True)
        mag = bits & 0x7FFFFFFFFFFFFFFF
        key = tl.where(bits < 0, -mag, mag)
        key = tl.where(mag > 0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF, key)
    else:
        if s.dtype == tl.bfloat16:  # bf16's bits are fp32's top half
            bits = s.to(tl.int16, bitcast=True).to(tl.int32) << 16
        else:  # fp16 widens exactly
            bits = s.to(tl.float32).to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        key32 = tl.where(bits < 0, -mag, mag)
        key32 = tl.where(mag > 0x7F800000, 0x7FFFFFFF, key32)
        key = (key32.to(tl.int64) << 32) - idx.to(tl.int64)
    return tl.where(mask, key, -9223372036854775808)


@triton.jit
def _ranks(s_row, stride_sn, n, i, ki, KEY_FP64: tl.constexpr, BLOCK_I: tl.constexpr,
           BLOCK_J: tl.constexpr):
    """``r_i = #{j : s_j > s_i or (s_j == s_i and j < i)}`` (NaN above all) for the tile ``i`` of
    positions with keys ``ki``: the position of ``i`` in the stable descending ``argsort``."""
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mj = j < n
        kj = _sort_keys(tl.load(s_row + j * stride_sn, mask=mj, other=0.0), j, mj, KEY_FP64)
        before = kj[None, :] > ki[:, None]
        if KEY_FP64:
            before = before | ((kj[None, :] == ki[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum(before.to(tl.int32), axis=1)
    return rank


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
        ki = _sort_keys(tl.load(s_row + i * stride_sn, mask=mi, other=0.0), i, mi, KEY_FP64)
        rank = _ranks(s_row, stride_sn, n, i, ki, KEY_FP64, BLOCK_I, BLOCK_J)
        tl.store(order_ptr + b * n + rank, i.to(tl.int64), mask=mi)


@triton.jit
def _reorganize_rows(
    x_row, s_row, order_row, out_base, keep, P, n, d, md, write_order,
    stride_xn, stride_sn, stride_on,
    FUSE: tl.constexpr, NORMALIZE: tl.constexpr, KEY_FP64: tl.constexpr, EPS_: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One image's rows, channels ``d`` (mask ``md``), from ``x_row`` (``[*, BLOCK_D]`` pointers of
    row 0) to the rows from ``out_base`` (a scalar pointer): the prefix copied, each kept row (rank
    ``< keep``) stored at ``P + rank``, the dropped rows weighted by their scores fused into row
    ``P + keep`` in fp32; ``order_row`` gets the stable descending order where ``write_order``.
    The dense kernel's (one keep count, a ``[B, ...]`` output) and the ragged one's (a keep count
    per image, packed rows from the image's offset)."""
    out_row = out_base + d[None, :]
    for r0 in range(0, P, BLOCK_I):
        r = r0 + tl.arange(0, BLOCK_I)
        m = (r < P)[:, None] & md[None, :]
        tl.store(out_row + r[:, None] * stride_on, tl.load(x_row + r[:, None] * stride_xn, mask=m),
                 mask=m)
    acc = tl.zeros(d.shape, dtype=tl.float32)
    total = tl.zeros([BLOCK_I], dtype=tl.float32)
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        mi = i < n
        si = tl.load(s_row + i * stride_sn, mask=mi, other=0.0)
        rank = _ranks(s_row, stride_sn, n, i, _sort_keys(si, i, mi, KEY_FP64), KEY_FP64, BLOCK_I,
                      BLOCK_J)
        tl.store(order_row + rank, i.to(tl.int64), mask=mi & write_order)
        m = mi[:, None] & md[None, :]
        v = tl.load(x_row + (P + i)[:, None] * stride_xn, mask=m, other=0.0)
        # the kept rows go straight to their output row (a scatter: order is not read back)
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
        tl.store(out_base + (P + keep) * stride_on + d, acc.to(out_base.dtype.element_ty),
                 mask=md)


@triton.jit
def _reorganize_kernel(
    x_ptr, s_ptr, order_ptr, out_ptr,
    P, n, keep, D,
    stride_xb, stride_xn, stride_xd, stride_sb, stride_sn, stride_ob, stride_on,
    FUSE: tl.constexpr, NORMALIZE: tl.constexpr, KEY_FP64: tl.constexpr, EPS_: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The forward step in one launch; program ``(b, c)``: batch row ``b``, channels
    ``[c * BLOCK_D, (c + 1) * BLOCK_D)``. Every output element is written exactly once and nothing
    is accumulated in global memory, so a rerun (the autotuner's) is harmless."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    _reorganize_rows(x_ptr + b * stride_xb + d[None, :] * stride_xd, s_ptr + b * stride_sb,
                     order_ptr + b * n, out_ptr + b * stride_ob, keep, P, n, d, md, c == 0,
                     stride_xn, stride_sn, stride_on, FUSE, NORMALIZE, KEY_FP64, EPS_, BLOCK_I,
                     BLOCK_J)


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


# The one-launch forward's tiles: BLOCK_I tokens by BLOCK_D channels moved per step, the ranking in
# BLOCK_I x BLOCK_J comparisons. With ICE_PRUNE_AUTOTUNE=1 the autotuner picks among these (per n, D,
# keep, flags and dtypes); configs whose tile is much wider than the row, or over 128 elements a
# thread, are pruned.
_BLOCK_J = 32
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_D": bd, "BLOCK_I": bi, "BLOCK_J": _BLOCK_J}, num_warps=w)
    for bd in (64, 128, 256) for bi in (32, 64) for w in (2, 4, 8)
]
#: the config every call runs unless ICE_PRUNE_AUTOTUNE=1 (the interpreter's always), on NUM_WARPS
INTERPRETER_CONFIG = {"BLOCK_D": 128, "BLOCK_I": 32, "BLOCK_J": _BLOCK_J}
NUM_WARPS = 4
AUTOTUNE_KEY = ["n", "D", "keep", "FUSE", "NORMALIZE", "KEY_FP64"]  # + every tensor's dtype


def _prune_configs(configs, named_args, **kwargs):
    n, D = named_args["n"], named_args["D"]
    d_cap = max(64, triton.next_power_of_2(D))
    i_cap = max(32, triton.next_power_of_2(n))
    pruned = [c for c in configs
              if c.kwargs["BLOCK_D"] <= d_cap and c.kwargs["BLOCK_I"] <= i_cap
              and c.kwargs["BLOCK_I"] * c.kwargs["BLOCK_D"] <= 128 * 32 * c.num_warps]
    return pruned or configs[:1]


_reorganize_autotuned = None if INTERPRETED else triton.autotune(
    AUTOTUNE_CONFIGS, key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_configs})(_reorganize_kernel)


def reorganize_triton(x: Tensor, scores: Tensor, keep: int, num_prefix: int, fuse: bool,
                      normalize: bool) -> tuple[Tensor, Tensor]:
    """The forward step in one launch of ``_reorganize_kernel`` (the op's Triton forward). With
    ``ICE_PRUNE_AUTOTUNE=1`` the first call per (n, D, keep, flags, dtypes) autotunes the blocks:
    make it before a CUDA graph capture."""
    B, N, D = x.shape
    n = N - num_prefix
    out = torch.empty(B, num_prefix + keep + int(fuse), D, dtype=x.dtype, device=x.device)
    if not out.numel():  # no channels (or no rows): no program to write the order
        return out, argsort_descending(scores)
    order = torch.empty(B, n, dtype=torch.int64, device=x.device)
    launch_reorganize(x, scores, order, out, keep, num_prefix, fuse, normalize)
    return out, order


def kernel_arguments(x: Tensor, scores: Tensor, order: Tensor, out: Tensor, keep: int,
                     num_prefix: int, fuse: bool, normalize: bool) -> tuple[tuple, dict]:
    """``_reorganize_kernel``'s positional arguments and flags (all but the blocks) for one call:
    the batch size is in none of them (it only sets the grid)."""
    N, D = x.shape[1], x.shape[2]
    args = (x, scores, order, out, num_prefix, N - num_prefix, keep, D,
            *x.stride(), *scores.stride(), out.stride(0), out.stride(1))
    flags = dict(FUSE=fuse, NORMALIZE=normalize, KEY_FP64=scores.dtype == torch.float64, EPS_=EPS)
    return args, flags


def launch_reorganize(x: Tensor, scores: Tensor, order: Tensor, out: Tensor, keep: int,
                      num_prefix: int, fuse: bool, normalize: bool) -> None:
    """One launch of ``_reorganize_kernel`` into preallocated, contiguous ``order [B, n]`` int64 and
    ``out [B, P + keep (+1), D]`` (x's dtype), both fully overwritten; ``B * D > 0``."""
    B, D = x.shape[0], x.shape[2]
    args, flags = kernel_arguments(x, scores, order, out, keep, num_prefix, fuse, normalize)
    if not INTERPRETED and autotune_enabled():
        _reorganize_autotuned[lambda meta: (B, triton.cdiv(D, meta["BLOCK_D"]))](*args, **flags)
    else:
        _reorganize_kernel[(B, triton.cdiv(D, INTERPRETER_CONFIG["BLOCK_D"]))](
            *args, **flags, **INTERPRETER_CONFIG, num_warps=NUM_WARPS)


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
