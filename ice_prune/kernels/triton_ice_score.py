"""Triton kernel for the fused ICE score: ``sigmoid(logsumexp_c(W_c h) - w_bg . h)`` per token.

One program per block of ``BLOCK_T`` tokens. It loads its token tile once, rounded to the compute
dtype once, as ``NUM_K`` chunks of ``BLOCK_K`` channels covering ``D`` (at most four, so D = 384 is
three chunks of 128, no padding), then streams the head's ``C + 1`` rows in tiles of ``BLOCK_C``
classes: each tile's logits ``[BLOCK_T, BLOCK_C]`` are ``NUM_K`` ``tl.dot``\\ s of the held chunks
with the tile's weight chunks, accumulated in fp32 and folded at once into a running max and sum per
token (the online logsumexp), the background row (the last one) picked out of its tile. This is
flash attention's loop with the tokens as queries and the head's rows as keys, and no value product.
The ``[B, n, C + 1]`` logits are never written. A head too wide to hold (``NUM_K = 0``) reloads the
token chunks for every class tile instead.

With ``TOP_CLASS`` the loop also keeps each token's best image class (the running max's index; ties go
to the lowest index, as ``torch.argmax``) and writes it with its probability under the softmax over
all ``C + 1`` classes: ``score / sum_c exp(z_c - z_max)``, from values the loop has anyway. With
``EXPLAIN`` as well (explain mode's op ``ice_prune::ice_score_into_map``) the epilogue writes the
score, the selection point, the class and its probability at the token's patch in the map's
``[B, P + 1]`` buffers instead of at the token (a fused token's patch index ``P`` is the spare
column): the map from the pruned forward costs four stores a token and no launch of its own.

Inputs are rounded to the compute dtype (the autocast dtype, else the inputs' own), as autocast's
linear layer rounds them, then multiplied exactly and summed in fp32: the tokens in the kernel, the
head by the launcher (once, cached until the head changes: :func:`head_in`). In the Triton interpreter ``tl.dot`` and
casts on bf16 / fp16 are wrong, so there the launcher rounds the tokens with torch too and the kernel
computes in fp32 (``UPCAST``), the same arithmetic.

Tiles come from :data:`CONFIGS`, a table per GPU generation, compute dtype and head width, chosen
from the kernel's structure, not measured. The batch changes only ``T`` and the grid, and ``T`` is not
specialized, so a new batch size neither tunes nor compiles again. ``ICE_PRUNE_AUTOTUNE=1`` times
:data:`AUTOTUNE_CONFIGS` instead, once per head, dtype and flags (never per batch size).
"""
from __future__ import annotations

import functools
import weakref
from typing import NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import MapTarget
from .tuning import autotune_enabled

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _tokens(h_row, mt, d, D, stride_hd, COMPUTE: tl.constexpr, UPCAST: tl.constexpr):
    """Channels ``d`` of the token tile, rounded to the compute dtype: ``[BLOCK_T, BLOCK_K]``."""
    h = tl.load(h_row[:, None] + d[None, :] * stride_hd, mask=mt[:, None] & (d < D)[None, :],
                other=0.0).to(COMPUTE)
    if UPCAST:
        h = h.to(tl.float32)
    return h


@triton.jit
def _weights(w_col, mc, d, D, stride_wd, COMPUTE: tl.constexpr, UPCAST: tl.constexpr):
    """Channels ``d`` of a class tile of the head (in the compute dtype): ``[BLOCK_K, BLOCK_C]``."""
    w = tl.load(w_col + d[:, None] * stride_wd, mask=mc[None, :] & (d < D)[:, None],
                other=0.0).to(COMPUTE)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit(do_not_specialize=["T", "loc"])
def _ice_score_kernel(
    h_ptr, w_ptr, bias_ptr, out_ptr, top_class_ptr, top_prob_ptr, patch_ptr, map_ptr, point_ptr,
    T, n, C, D, loc,
    stride_hb, stride_hn, stride_hd, stride_wc, stride_wd, stride_bias, stride_pb, stride_pn,
    stride_map,
    HAS_BIAS: tl.constexpr, TOP_CLASS: tl.constexpr, EXPLAIN: tl.constexpr, COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
):
    # token indices in int32 (the launcher refuses T >= MAX_TOKENS): a 64-bit division is a called
    # routine on NVIDIA GPUs, with a stack frame; offsets in int64
    t32 = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = t32 < T
    image32 = t32 // n  # the token's image and position in it
    image, pos = image32.to(tl.int64), (t32 - image32 * n).to(tl.int64)
    t = t32.to(tl.int64)
    h_row = h_ptr + image * stride_hb + pos * stride_hn
    k = tl.arange(0, BLOCK_K)
    # the token tile, loaded and rounded once, held across the class loop
    if NUM_K >= 1:
        h0 = _tokens(h_row, mt, k, D, stride_hd, COMPUTE, UPCAST)
    if NUM_K >= 2:
        h1 = _tokens(h_row, mt, BLOCK_K + k, D, stride_hd, COMPUTE, UPCAST)
    if NUM_K >= 3:
        h2 = _tokens(h_row, mt, 2 * BLOCK_K + k, D, stride_hd, COMPUTE, UPCAST)
    if NUM_K >= 4:
        h3 = _tokens(h_row, mt, 3 * BLOCK_K + k, D, stride_hd, COMPUTE, UPCAST)
    run_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    background = tl.zeros([BLOCK_T], dtype=tl.float32)
    top = tl.zeros([BLOCK_T], dtype=tl.int32)
    for c0 in range(0, C + 1, BLOCK_C):  # C image classes, then the background row C
        c = c0 + tl.arange(0, BLOCK_C)
        mc = c <= C
        w_col = w_ptr + c[None, :] * stride_wc
        logits = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        if NUM_K == 0:
            for d0 in range(0, D, BLOCK_K):
                logits = tl.dot(_tokens(h_row, mt, d0 + k, D, stride_hd, COMPUTE, UPCAST),
                                _weights(w_col, mc, d0 + k, D, stride_wd, COMPUTE, UPCAST),
                                logits, input_precision=INPUT_PRECISION)
        else:
            logits = tl.dot(h0, _weights(w_col, mc, k, D, stride_wd, COMPUTE, UPCAST), logits,
                            input_precision=INPUT_PRECISION)
            if NUM_K >= 2:
                logits = tl.dot(h1, _weights(w_col, mc, BLOCK_K + k, D, stride_wd, COMPUTE, UPCAST),
                                logits, input_precision=INPUT_PRECISION)
            if NUM_K >= 3:
                logits = tl.dot(h2, _weights(w_col, mc, 2 * BLOCK_K + k, D, stride_wd, COMPUTE,
                                             UPCAST), logits, input_precision=INPUT_PRECISION)
            if NUM_K >= 4:
                logits = tl.dot(h3, _weights(w_col, mc, 3 * BLOCK_K + k, D, stride_wd, COMPUTE,
                                             UPCAST), logits, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c * stride_bias, mask=mc, other=0.0).to(COMPUTE)
            logits += bias.to(tl.float32)[None, :]
        background += tl.sum(tl.where((c == C)[None, :], logits, 0.0), axis=1)
        z = tl.where((c < C)[None, :], logits, float("-inf"))
        if TOP_CLASS:
            tile_max, tile_arg = tl.max(z, axis=1, return_indices=True,
                                        return_indices_tie_break_left=True)
            # strictly greater: an equal max in a later tile has a higher index
            top = tl.where(tile_max > run_max, c0 + tile_arg, top)
        else:
            tile_max = tl.max(z, axis=1)
        # every tile but a last one holding only the background row has a class, so the running
        # max is finite from the first tile on and exp(-inf - max) is 0, never NaN
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    # sigmoid(z) through exp(-|z|) <= 1: no overflow at any logit scale
    z = run_max + tl.log(run_sum) - background
    e = tl.exp(-tl.abs(z))
    score = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    tl.store(out_ptr + t, score, mask=mt)
    if TOP_CLASS:
        if EXPLAIN:  # at the token's patch in the map (a fused token's: the spare column P)
            patch = tl.load(patch_ptr + image * stride_pb + pos * stride_pn, mask=mt, other=0)
            dst = image * stride_map + patch
            tl.store(map_ptr + dst, score, mask=mt)
            tl.store(point_ptr + dst, tl.zeros([BLOCK_T], dtype=tl.int64) + loc, mask=mt)
        else:
            dst = t
        # P(top) = P(foreground) * P(top | image classes) = score * exp(z_max - lse) = score / run_sum
        tl.store(top_class_ptr + dst, top.to(tl.int64), mask=mt)
        tl.store(top_prob_ptr + dst, score / run_sum, mask=mt)


# ``triton.jit`` made an interpreted function if TRITON_INTERPRET=1 was set before this import.
INTERPRETED = type(_ice_score_kernel).__name__ == "InterpretedFunction"


class ScoreConfig(NamedTuple):
    """Tiles and launch shape of the score kernel."""

    block_t: int  # tokens per program: 64 rows per warp group for Hopper's warp-group MMA
    block_c: int  # classes per tile of the streamed weight (clamped to C + 1)
    num_warps: int
    num_stages: int  # weight tiles in flight (the software pipeline's depth)
    hold: bool = True  # the token tile held across the class loop, else reloaded per class tile


#: The shipped configs, ``(arch, kind, max width, config)``: the first row whose GPU generation
#: (major compute capability; ``None``: any), compute kind (:func:`compute_kind`) and width (``D``
#: rounded up to the held tile's chunks, :func:`held_chunks`; ``None``: any) match. Chosen from the
#: kernel's structure, not timed. On Hopper the held token tile (``BLOCK_T x D``) and two weight
#: tiles (``BLOCK_C x D``) fill most of a block's 227 KiB of shared memory: 128 x 384 + 2 x 64 x 384
#: bf16 = 192 KiB at DeiT-S's width, 128 tokens on two warp groups, the accumulator 32 fp32 values a
#: thread. Wider heads hold fewer tokens; fp32 under TF32 halves the tiles; on Ampere (99 KiB on
#: sm_86 / sm_89) 64 x 64 tiles fit. Exact fp32 (no tensor cores), wider heads and other GPUs reload
#: the tokens per class tile. tests/test_kernels_aot.py compiles every row ahead of time.
CONFIGS: list[tuple[Optional[int], str, Optional[int], ScoreConfig]] = [
    (9, "16-bit", 384, ScoreConfig(128, 64, 8, 2)),
    (9, "16-bit", 768, ScoreConfig(64, 32, 8, 2)),
    (9, "tf32", 384, ScoreConfig(64, 32, 4, 2)),
    (8, "16-bit", 384, ScoreConfig(64, 64, 4, 2)),
    (None, "16-bit", None, ScoreConfig(64, 64, 4, 2, hold=False)),
    (None, "tf32", None, ScoreConfig(64, 32, 4, 2, hold=False)),
    (None, "ieee", None, ScoreConfig(64, 32, 4, 2, hold=False)),
]

#: ``ICE_PRUNE_AUTOTUNE=1``: the autotuner times these (tiles clamped to the head) once per
#: :data:`AUTOTUNE_KEY`; configs out of shared memory are skipped.
AUTOTUNE_CONFIGS = [
    ScoreConfig(128, 64, 8, 2), ScoreConfig(128, 32, 8, 3), ScoreConfig(64, 64, 4, 2),
    ScoreConfig(64, 32, 8, 2), ScoreConfig(64, 32, 4, 3), ScoreConfig(128, 64, 8, 3, hold=False),
    ScoreConfig(64, 64, 4, 2, hold=False),
]
#: no ``T``: a new batch size reuses the tuned config (the tensors' dtypes are part of the key too)
AUTOTUNE_KEY = ["C", "D", "HAS_BIAS", "TOP_CLASS", "EXPLAIN", "COMPUTE", "INPUT_PRECISION"]

# a held token tile has at most this many chunks (h0 .. h3 in the kernel)
_MAX_CHUNKS = 4
# the channels per step of a reloaded token tile, per compute dtype bytes
_STREAM_K = {2: 64, 4: 32}


def _block(size: int, cap: int) -> int:
    # tl.dot needs every tile dimension >= 16
    return min(cap, max(16, triton.next_power_of_2(size)))


def compute_kind(compute_dtype: torch.dtype, precision: str) -> str:
    """``"16-bit"`` (bf16 / fp16), ``"tf32"`` or ``"ieee"`` (fp32 without tensor cores)."""
    return "16-bit" if compute_dtype != torch.float32 else precision


def held_chunks(D: int) -> tuple[int, int]:
    """``(BLOCK_K, NUM_K)`` of a held token tile: at most four chunks, a power of two each, covering
    ``D`` with the least padding, on a tie the chunk nearest 128 channels: 384 = 3 x 128,
    192 = 3 x 64, 768 = 3 x 256, 1000 -> 4 x 256."""
    blocks = (16 << i for i in range(max(1, D.bit_length())))
    return min(((block, -(-D // block)) for block in blocks if -(-D // block) <= _MAX_CHUNKS),
               key=lambda bc: (bc[0] * bc[1], abs(bc[0].bit_length() - 8)))


def config_for(arch: int, kind: str, D: int) -> ScoreConfig:
    """The shipped config for a GPU of major compute capability ``arch``, a compute ``kind`` and a
    head of width ``D``."""
    block_k, num_k = held_chunks(D)
    for row_arch, row_kind, max_width, config in CONFIGS:
        if (row_arch in (None, arch) and row_kind == kind
                and (max_width is None or block_k * num_k <= max_width)):
            return config
    raise LookupError(f"no ICE score config for arch {arch}, {kind}, D = {D}")


@functools.lru_cache(maxsize=None)
def _arch(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _meta(config: ScoreConfig, C: int, D: int, itemsize: int) -> dict:
    """The kernel's tile constants and launch options for ``config`` at this head."""
    block_k, num_k = held_chunks(D) if config.hold else (_block(D, _STREAM_K[itemsize]), 0)
    return dict(BLOCK_T=config.block_t, BLOCK_C=_block(C + 1, config.block_c), BLOCK_K=block_k,
                NUM_K=num_k, num_warps=config.num_warps, num_stages=config.num_stages)


def _tuning_config(config: ScoreConfig) -> triton.Config:
    return triton.Config({"BLOCK_T": config.block_t, "BLOCK_C": config.block_c, "HOLD": config.hold},
                         num_warps=config.num_warps, num_stages=config.num_stages)


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner's configs at this head: D in chunks, BLOCK_C clamped, repeats dropped."""
    C, D = named_args["C"], named_args["D"]
    itemsize = 4 if kwargs["COMPUTE"] == tl.float32 else 2
    seen, pruned = set(), []
    for c in configs:
        config = ScoreConfig(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages,
                             c.kwargs["HOLD"])
        meta = _meta(config, C, D, itemsize)
        key = tuple(meta.values())
        if key not in seen:
            seen.add(key)
            warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
            pruned.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return pruned


_ice_score_autotuned = None if INTERPRETED else triton.autotune(
    [_tuning_config(c) for c in AUTOTUNE_CONFIGS], key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_configs})(_ice_score_kernel)


def input_precision(compute_dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting (``torch.backends.cuda.matmul.allow_tf32``), so the
    kernel is as exact as ``nn.Linear`` would be; bf16 / fp16 products are exact in fp32 anyway."""
    if compute_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


#: tokens per call the kernel indexes (int32; a 64-bit division is a called routine on the GPU)
MAX_TOKENS = 2 ** 31

#: ``id(param) -> (weak reference to it, (version, storage, dtype), its copy)``, see :func:`head_in`
_HEAD_CASTS: dict[int, tuple] = {}


def head_in(param: Tensor, dtype: torch.dtype) -> Tensor:
    """``param`` in ``dtype``, contiguous: the head's weight or bias as the kernel reads it. The copy
    is made once and kept for ``param`` until ``param`` changes (in place: an optimizer step,
    ``copy_``, ``load_state_dict``, which bump its ``_version``; or its storage, ``.to()`` of the
    module), as autocast caches its casts of parameters: every selection point of a forward, and
    every forward, then reads the same copy instead of casting the ``[C + 1, D]`` weight again
    (a launch and a pass over it per call). Not cached: inference tensors (no version to tell a
    change by) and a copy made while a CUDA graph is captured (it lives in the graph's pool). The
    copy goes with the parameter."""
    if param.dtype == dtype and param.is_contiguous():
        return param
    if param.is_inference():
        return param.to(dtype, memory_format=torch.contiguous_format)
    key = (param._version, param.data_ptr(), dtype)
    hit = _HEAD_CASTS.get(id(param))
    if hit is not None and hit[0]() is param and hit[1] == key:
        return hit[2]
    cast = param.detach().to(dtype, memory_format=torch.contiguous_format)
    if not (param.is_cuda and torch.cuda.is_current_stream_capturing()):
        if hit is None or hit[0]() is not param:  # forget the copy with the parameter
            weakref.finalize(param, _HEAD_CASTS.pop, id(param), None)
        _HEAD_CASTS[id(param)] = (weakref.ref(param), key, cast)
    return cast


def kernel_arguments(h: Tensor, weight: Tensor, bias: Optional[Tensor], compute_dtype: torch.dtype,
                     out: Tensor, top: Tensor, top_prob: Tensor,
                     into: Optional[MapTarget] = None) -> tuple[tuple, dict]:
    """The kernel's positional arguments and flags (all but the tiles) for one call. The head goes
    in the compute dtype, contiguous (:func:`head_in`: one copy, kept until the head changes)
    instead of every program converting all of it (the tokens too in the interpreter, whose bf16 / fp16 casts are wrong). With ``into``
    the class and probability go to its buffers (``top`` and ``top_prob`` are ignored)."""
    B, n, D = h.shape
    if INTERPRETED:
        h = h.to(compute_dtype)
    weight = head_in(weight, compute_dtype)
    bias = None if bias is None else head_in(bias, compute_dtype)
    if into is None:  # ``out`` stands in for the map's pointers, which the kernel never reads
        patches, fg, point, loc, map_strides = out, out, out, 0, (0, 0, 0)
    else:
        patches, fg, point, loc = into.patches, into.foreground, into.point, into.loc
        top, top_prob = into.top_class, into.top_prob
        map_strides = (*patches.stride(), fg.stride(0))
    args = (h, weight, weight if bias is None else bias, out, top, top_prob, patches, fg, point,
            B * n, n, weight.shape[0] - 1, D, loc,
            *h.stride(), *weight.stride(), 0 if bias is None else bias.stride(0), *map_strides)
    flags = dict(HAS_BIAS=bias is not None, TOP_CLASS=top is not out, EXPLAIN=into is not None,
                 COMPUTE=_TL_DTYPES[compute_dtype], UPCAST=INTERPRETED,
                 INPUT_PRECISION=input_precision(compute_dtype))
    return args, flags


def ice_score_triton(h: Tensor, weight: Tensor, bias: Optional[Tensor], compute_dtype: torch.dtype,
                     top_class: bool = False, config: Optional[ScoreConfig] = None,
                     into: Optional[MapTarget] = None) -> Union[Tensor, tuple[Tensor, ...]]:
    """Scores ``[B, n]`` fp32 from tokens ``h [B, n, D]`` (any strides) and the head's last layer
    ``weight [C + 1, D]`` (background last) and ``bias [C + 1]`` or ``None``; with ``top_class``
    the tuple ``(scores, top_class [B, n] int64, top_prob [B, n] fp32)``; with ``into`` the scores,
    the score, point, class and probability written at each token's patch in its buffers.
    ``config`` overrides the table (and ``ICE_PRUNE_AUTOTUNE``)."""
    B, n, D = h.shape
    T, C = B * n, weight.shape[0] - 1
    if T >= MAX_TOKENS:
        raise ValueError(f"the Triton ICE score takes fewer than {MAX_TOKENS} tokens (int32 "
                         f"indices), got B * n = {T}; score the batch in parts")
    out = torch.empty(B, n, dtype=torch.float32, device=h.device)
    top_class = top_class and into is None
    # without top_class the kernel writes neither: ``out`` stands in for their pointers
    top = torch.empty(B, n, dtype=torch.int64, device=h.device) if top_class else out
    top_prob = torch.empty_like(out) if top_class else out
    result = (out, top, top_prob) if top_class else out
    if T == 0:
        return result
    args, flags = kernel_arguments(h, weight, bias, compute_dtype, out, top, top_prob, into)
    if config is None and not INTERPRETED and autotune_enabled():
        _ice_score_autotuned[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](*args, **flags)
        return result
    if config is None:
        # the interpreter runs Hopper's table: the path the tests care most about
        arch = 9 if INTERPRETED else _arch(h.device)
        config = config_for(arch, compute_kind(compute_dtype, flags["INPUT_PRECISION"]), D)
    meta = _meta(config, C, D, torch.finfo(compute_dtype).bits // 8)
    _ice_score_kernel[(triton.cdiv(T, meta["BLOCK_T"]),)](*args, **flags, **meta)
    return result
