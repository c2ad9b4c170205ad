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

# Tokens per program, classes per tile, channels per dot step, and the launch shape: the config the
# interpreter runs, and the first of the autotuner's on a GPU. DeiT-S with the 1001-way head is
# T = B * n tokens x 1001 classes x D = 384.
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


#: (BLOCK_T, BLOCK_C, BLOCK_D, num_warps, num_stages) the autotuner tries on a GPU: the fixed config
#: first, then wider token or class tiles (fewer reloads of the weight or the tokens), narrower ones,
#: deeper pipelines. BLOCK_T stays a multiple of 64 per 4 warps (Hopper's warp-group MMA needs it) and
#: the fp32 accumulator ``[BLOCK_T, BLOCK_C]`` at most 64 values a thread; none spills registers at
#: DeiT-S's shape (tests/test_kernels_aot.py).
AUTOTUNE_SHAPES = [
    (_BLOCK_T, _BLOCK_C, _BLOCK_D, _NUM_WARPS, _NUM_STAGES),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (64, 256, 32, 8, 4),
    (128, 64, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 8, 4),
]
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_C": bc, "BLOCK_D": bd}, num_warps=w, num_stages=st)
    for bt, bc, bd, w, st in AUTOTUNE_SHAPES
]
#: the autotuner times the configs again for a new value of these (and of the tensors' dtypes)
AUTOTUNE_KEY = ["T", "C", "D", "HAS_BIAS", "COMPUTE", "INPUT_PRECISION"]


def _prune_configs(configs, named_args, **kwargs):
    """Clamp each config's tiles to the problem (at least 16, as tl.dot needs), then drop repeats:
    a small batch or head gets the narrower tiles it can fill."""
    T, C, D = named_args["T"], named_args["C"], named_args["D"]
    seen, pruned = set(), []
    for config in configs:
        tiles = {"BLOCK_T": _block(T, config.kwargs["BLOCK_T"]),
                 "BLOCK_C": _block(C + 1, config.kwargs["BLOCK_C"]),
                 "BLOCK_D": _block(D, config.kwargs["BLOCK_D"])}
        key = (*tiles.values(), config.num_warps, config.num_stages)
        if key not in seen:
            seen.add(key)
            pruned.append(triton.Config(tiles, num_warps=config.num_warps,
                                        num_stages=config.num_stages))
    return pruned


if INTERPRETED:
    _ice_score_launch = _ice_score_kernel
else:  # a config out of shared memory (fp32 tiles) is skipped by the autotuner
    _ice_score_launch = triton.autotune(
        AUTOTUNE_CONFIGS, key=AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_configs})(_ice_score_kernel)


def input_precision(compute_dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting (``torch.backends.cuda.matmul.allow_tf32``), so the
    kernel is as exact as ``nn.Linear`` would be; bf16 / fp16 products are exact in fp32 anyway."""
    if compute_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def ice_score_triton(h: Tensor, weight: Tensor, bias: Optional[Tensor],
                     compute_dtype: torch.dtype) -> Tensor:
    """Scores ``[B, n]`` fp32 from tokens ``h [B, n, D]`` and the head's last layer ``weight
    [C + 1, D]`` (background last) and ``bias [C + 1]`` or ``None``; any strides. On a GPU the first
    call per (T, C, D, flags, dtypes) autotunes the tiles (make it before a CUDA graph capture; the
    library's capture and benchmarks warm up first); every score is written once per run, so the
    autotuner's reruns are harmless."""
    B, n, D = h.shape
    C = weight.shape[0] - 1
    T = B * n
    out = torch.empty(B, n, dtype=torch.float32, device=h.device)
    if T == 0:
        return out
    if INTERPRETED:  # round with torch: the interpreter's bf16 / fp16 casts are wrong
        h, weight = h.to(compute_dtype), weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    fixed = {}
    if INTERPRETED:  # one config: autotuning does not work in the interpreter
        fixed = dict(BLOCK_T=_block(T, _BLOCK_T), BLOCK_C=_block(C + 1, _BLOCK_C),
                     BLOCK_D=_block(D, _BLOCK_D), num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
    _ice_score_launch[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](
        h, weight, weight if bias is None else bias, out,
        T, n, C, D,
        *h.stride(), *weight.stride(), 0 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, COMPUTE=_TL_DTYPES[compute_dtype], UPCAST=INTERPRETED,
        INPUT_PRECISION=input_precision(compute_dtype), **fixed)
    return out
