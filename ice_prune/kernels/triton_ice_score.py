"""Triton kernel for the fused ICE score: ``sigmoid(logsumexp_c(W_c h) - w_bg . h)`` per token.

One program per block of ``BLOCK_T`` tokens walks the head's ``C + 1`` rows in tiles of ``BLOCK_C``:
each tile's logits ``[BLOCK_T, BLOCK_C]`` are a ``tl.dot`` over ``D`` in chunks of ``BLOCK_D``,
accumulated in fp32 and folded at once into a running max and sum per token (the online logsumexp),
the background row (the last one) picked out of its tile. The ``[B, n, C + 1]`` logits are never
written: the kernel reads the tokens and the weight and writes one fp32 score per token.

Inputs are rounded to the compute dtype (the autocast dtype, else the inputs' own) in the kernel, as
autocast's linear layer rounds them, then multiplied exactly and summed in fp32. In the Triton
interpreter ``tl.dot`` and casts on bf16 / fp16 are wrong, so there the launcher rounds the inputs
with torch and the kernel computes in fp32 (``UPCAST``), the same arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tokens per program, classes per tile, channels per dot step, and the launch shape. Not yet tuned on
# a GPU: DeiT-S with the 1001-way head is T = B * n tokens x 1001 classes x D = 384.
_BLOCK_T = 64
_BLOCK_C = 128
_BLOCK_D = 64
_NUM_WARPS = 4
_NUM_STAGES = 3

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _ice_score_kernel(
    h_ptr, w_ptr, bias_ptr, out_ptr,
    T, n, C, D,
    stride_hb, stride_hn, stride_hd, stride_wc, stride_wd, stride_bias,
    HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = t < T
    h_row = h_ptr + (t // n) * stride_hb + (t % n) * stride_hn
    run_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    background = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, C + 1, BLOCK_C):  # C image classes, then the background row C
        c = c0 + tl.arange(0, BLOCK_C)
        mc = c <= C
        logits = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            md = d < D
            h = tl.load(h_row[:, None] + d[None, :] * stride_hd, mask=mt[:, None] & md[None, :],
                        other=0.0).to(COMPUTE)
            w = tl.load(w_ptr + c[None, :] * stride_wc + d[:, None] * stride_wd,
                        mask=mc[None, :] & md[:, None], other=0.0).to(COMPUTE)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            logits = tl.dot(h, w, logits, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c * stride_bias, mask=mc, other=0.0).to(COMPUTE)
            logits += bias.to(tl.float32)[None, :]
        background += tl.sum(tl.where((c == C)[None, :], logits, 0.0), axis=1)
        z = tl.where((c < C)[None, :], logits, float("-inf"))
        # every tile but a last one holding only the background row has a class, so the running
        # max is finite from the first tile on and exp(-inf - max) is 0, never NaN
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    # sigmoid(z) through exp(-|z|) <= 1: no overflow at any logit scale
    z = run_max + tl.log(run_sum) - background
    e = tl.exp(-tl.abs(z))
    score = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    tl.store(out_ptr + t, score, mask=mt)


# ``triton.jit`` made an interpreted function if TRITON_INTERPRET=1 was set before this import.
INTERPRETED = type(_ice_score_kernel).__name__ == "InterpretedFunction"


def _block(size: int, cap: int) -> int:
    # tl.dot needs every tile dimension >= 16
    return min(cap, max(16, triton.next_power_of_2(size)))


def input_precision(compute_dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting (``torch.backends.cuda.matmul.allow_tf32``), so the
    kernel is as exact as ``nn.Linear`` would be; bf16 / fp16 products are exact in fp32 anyway."""
    if compute_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def ice_score_triton(h: Tensor, weight: Tensor, bias: Optional[Tensor],
                     compute_dtype: torch.dtype) -> Tensor:
    """Scores ``[B, n]`` fp32 from tokens ``h [B, n, D]`` and the head's last layer ``weight
    [C + 1, D]`` (background last) and ``bias [C + 1]`` or ``None``; any strides."""
    B, n, D = h.shape
    C = weight.shape[0] - 1
    T = B * n
    out = torch.empty(B, n, dtype=torch.float32, device=h.device)
    if T == 0:
        return out
    if INTERPRETED:  # round with torch: the interpreter's bf16 / fp16 casts are wrong
        h, weight = h.to(compute_dtype), weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    block_t = _block(T, _BLOCK_T)
    _ice_score_kernel[(triton.cdiv(T, block_t),)](
        h, weight, weight if bias is None else bias, out,
        T, n, C, D,
        *h.stride(), *weight.stride(), 0 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, COMPUTE=_TL_DTYPES[compute_dtype], UPCAST=INTERPRETED,
        INPUT_PRECISION=input_precision(compute_dtype),
        BLOCK_T=block_t, BLOCK_C=_block(C + 1, _BLOCK_C), BLOCK_D=_block(D, _BLOCK_D),
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
    return out
