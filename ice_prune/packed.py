"""Packed execution of a timm ViT whose images keep different token counts (``model.keep_policy``,
a :class:`~ice_prune.select.KeepPolicy`), in eval mode.

The batch runs dense until the first selection point where some image drops tokens. There each
image's count comes from its scores, one host sync (``counts.tolist()``) sizes the packed buffer,
and ``ice_prune::reorganize_ragged`` packs the images' rows, ``[prefix, kept tokens by rank, fused
token]``, into ``[total, D]`` with :class:`Segments` saying where each image lies. From there every
block runs on the packed rows: layer norms, MLP and LayerScale act on each row alone, attention runs
per image over its segment. A later selection point scores the packed non-prefix rows (ICE's head is
per token), gives each image its own count (one host sync again) and repacks
(:func:`~ice_prune.kernels.reorganize_packed_reference`). The final norm runs on the packed rows and
``forward_features`` returns each image's prefix rows, what timm's ``"token"`` pooling reads.

Nothing is padded but the ``[B, n]`` scores: an image's rows never meet another image's, so its
output does not depend on the rest of its batch (up to rounding). An image that keeps all its tokens at a point gets
no fused token there, as a dense point that keeps everything is skipped; where every image keeps
everything the batch stays dense.

Attention: on CUDA in fp16 / bf16, where torch has it (``torch.nn.attention.varlen``, torch 2.9+),
one call of the variable-length flash kernel ``varlen_attn`` over the packed rows, told
``num_splits=1`` where it takes it so that an image's result does not depend on the batch (split-KV
would choose its splits from the batch). Elsewhere (the CPU, fp32, an older torch) one call of
``F.scaled_dot_product_attention`` per run of images of one length (:attr:`Segments.runs`): each
packing lays the images out sorted by their row count (:attr:`Segments.order` says which image is
where; the counts and outputs come back in the batch's order), so a run is a slice of the rows,
viewed ``[G, L, H, d]`` as a dense batch: nothing gathered, padded or masked. A loop over the
images cost 8-10% of the forward at the cpu scale (576 calls of a few microseconds of work); buckets
of similar lengths padded and masked (the previous layout) gathered q, k and v and scattered the
output for every bucket of every block. EViT's [CLS] attention row is one segment softmax over the
packed rows (:func:`segment_cls_row`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ice_prune.integrations.common import ICEState
from ice_prune.kernels import reorganize_packed_reference, reorganize_ragged
from ice_prune.kernels.reference import row_positions


@dataclasses.dataclass
class Segments:
    """Where each image's rows lie in a packed ``[total, D]`` batch: the images in packed order,
    sorted by their row count (ties in the order they had), image ``i`` at rows
    ``offsets[i]:offsets[i + 1]``."""

    #: ``[B + 1]`` int64 row starts, on the rows' device
    offsets: Tensor
    #: rows per image, on the host
    lengths: tuple[int, ...]
    #: the batch index of each packed image; ``None`` where that is the batch's own order
    order: Optional[tuple[int, ...]] = None

    @functools.cached_property
    def cu_seqlens(self) -> Tensor:
        """``offsets`` as the int32 the variable-length kernel reads, converted once per packing."""
        return self.offsets.to(torch.int32)

    @functools.cached_property
    def longest(self) -> int:
        return max(self.lengths)

    @functools.cached_property
    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """``(first row, images, length)`` of each run of consecutive images of one length: the
        calls of :func:`bucketed_attention`, one per distinct length in a sorted layout."""
        runs, row = [], 0
        for length in self.lengths:
            if runs and runs[-1][2] == length:
                runs[-1][1] += 1
            else:
                runs.append([row, 1, length])
            row += length
        return tuple(map(tuple, runs))

    @functools.cached_property
    def position(self) -> Optional[Tensor]:
        """``[B]`` int64, the packed position of each batch image (``None`` in batch order)."""
        if self.order is None:
            return None
        position = [0] * len(self.order)
        for i, b in enumerate(self.order):
            position[b] = i
        return torch.tensor(position, device=self.offsets.device)

    def to_batch(self, values: Tensor) -> Tensor:
        """``values [B, ...]`` of the packed images in the batch's order."""
        return values if self.position is None else values.index_select(0, self.position)


def sorted_layout(rows: Tensor, offsets: Tensor, lengths: tuple[int, ...],
                  order: Optional[tuple[int, ...]] = None,
                  trim: bool = False) -> tuple[Tensor, Segments]:
    """Packed ``rows`` of images at ``offsets`` (batch images ``order``, ``None``: the batch's
    order) laid out as :class:`Segments` wants them: sorted by ``lengths`` (stable), each image's
    first ``lengths[i]`` rows (``trim``: an image may hold more, dropped here). One gather of the
    rows where anything moves, none where nothing does."""
    B = len(lengths)
    perm = sorted(range(B), key=lengths.__getitem__)
    moved = perm != list(range(B))
    if not (moved or trim):
        return rows, Segments(offsets, lengths, order)
    new_lengths = tuple(lengths[i] for i in perm)
    new_order = tuple(perm) if order is None else tuple(order[i] for i in perm)
    if new_order == tuple(range(B)):
        new_order = None
    device = rows.device
    total = sum(new_lengths)
    new_offsets = F.pad(torch.tensor(new_lengths, device=device).cumsum(0), (1, 0))
    image, local = row_positions(new_offsets, total)
    first = offsets[:-1][torch.tensor(perm, device=device)] if moved else offsets[:-1]
    return (rows.index_select(0, first[image] + local),
            Segments(new_offsets, new_lengths, new_order))


def forward_features(model: nn.Module, x: Tensor) -> Tensor:
    """timm ``VisionTransformer.forward_features`` under a keep policy: ``[B, N, D]`` where every
    point kept every token (the batch stayed dense), else ``[B, P, D]``, each image's prefix rows
    after the final norm."""
    state = model._ice
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for block in model.blocks:
        # a selection point runs its own forward, dense or packed; another block needs one here
        # once the batch is packed
        x = block(x) if state.segments is None or hasattr(block, "_ice") else \
            block_forward(block, x, state.segments)
    x = model.norm(x)
    if state.segments is None:
        return x
    P, starts = state.num_prefix, state.segments.to_batch(state.segments.offsets[:-1])
    return x[starts[:, None] + torch.arange(P, device=x.device)]


def attention(attn: nn.Module, x: Tensor, segments: Segments,
              cls_row: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """timm ``Attention.forward`` on packed rows ``x [T, D]``, each image attending to its own rows;
    with ``cls_row`` also EViT's head-mean [CLS] attention row of each image, ``[T]`` fp32 (each
    image's row at its own rows)."""
    T = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(T, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(1)  # [T, H, d]
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        q, k = attn.q_norm(q), attn.k_norm(k)
        qkv = None  # the runs read the normed q and k
    if use_varlen(x, attn.head_dim):
        out = varlen_attention(q, k, v, segments, attn.scale)
    else:
        out = bucketed_attention(torch.stack((q, k, v), dim=1) if qkv is None else qkv, segments)
    out = out.reshape(T, attn.attn_dim)
    row = segment_cls_row(q, k, segments, attn.scale) if cls_row else None
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), row


def use_varlen(x: Tensor, head_dim: int) -> bool:
    """Whether :func:`attention` takes the variable-length kernel for rows like ``x``: CUDA,
    fp16 / bf16 and a head size of at most 256 in steps of 8 (flash attention's), and a torch that
    has ``varlen_attn``."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0
            and head_dim <= 256 and _varlen_attn() is not None)


@functools.lru_cache(maxsize=None)
def _varlen_attn():
    """torch's ``varlen_attn``, or ``None`` before torch 2.9; looked up once, not per block."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch before 2.9
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _batch_invariant(varlen_attn) -> dict:
    """``{"num_splits": 1}`` where ``varlen_attn`` takes it (read from its signature once)."""
    return {"num_splits": 1} if "num_splits" in inspect.signature(varlen_attn).parameters else {}


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments,
                     scale: float) -> Tensor:
    """Attention of each image over its own rows in one call of torch's ``varlen_attn``: ``q``,
    ``k``, ``v`` ``[T, H, d]`` -> ``[T, H, d]``. ``num_splits=1`` where the kernel takes it keeps
    the result independent of the batch."""
    varlen_attn = _varlen_attn()
    cu_seq, longest = segments.cu_seqlens, segments.longest
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq, cu_seq, longest,
                       longest, scale=scale, **_batch_invariant(varlen_attn))


def bucketed_attention(qkv: Tensor, segments: Segments) -> Tensor:
    """Attention of each image over its own rows, ``qkv [T, 3, H, d]`` (q, k and v of each row, as
    timm's projection gives them) -> ``[T, H, d]``: one call of scaled-dot-product attention per run
    of images of one length (:attr:`Segments.runs`), the run's rows viewed as a ``[G, L]`` batch.
    Each image keeps its own result up to rounding, whatever else is in the batch. (A Python loop
    over the images costs more than their attention at small sizes: 9 blocks of 64 images are 576
    calls; one slice of ``qkv`` per run, not three of q, k and v, saves 11-25% of the call's time
    at the cpu scale.)"""
    runs = segments.runs
    outs = []
    for part, (_, G, L) in zip(qkv.split([G * L for _, G, L in runs]), runs):
        q, k, v = part.view(G, L, *qkv.shape[1:]).permute(2, 0, 3, 1, 4).unbind(0)  # [G, H, L, d]
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
                    .reshape(G * L, *qkv.shape[2:]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def segment_cls_row(q: Tensor, k: Tensor, segments: Segments, scale: float) -> Tensor:
    """EViT's head-mean [CLS] attention row of every image of a packed batch at once: ``q``, ``k``
    ``[T, H, d]`` -> ``[T]`` fp32, each image's softmax over its own rows (a segment softmax: the
    per-image max and sum gathered back to the rows), what
    :func:`~ice_prune.integrations.common.cls_attention_row` gives for
    each image alone."""
    starts = segments.offsets[:-1]
    image = torch.repeat_interleave(torch.arange(len(segments.lengths), device=q.device),
                                    segments.offsets.diff(), output_size=q.shape[0])
    # [T, H] fp32 as EViT's; an einsum, so that the FLOP counters see its T * H * d multiply-adds
    logits = torch.einsum("thd,thd->th", q[starts][image].float() * scale, k.float())
    H = logits.shape[1]
    peak = logits.new_full((len(segments.lengths), H), -torch.inf)
    peak = peak.scatter_reduce(0, image[:, None].expand_as(logits), logits, "amax")
    e = (logits - peak[image]).exp()
    # scatter_add, not index_add: the FLOP counters take index_add for a packed point's fused rows
    total = e.new_zeros(peak.shape).scatter_add_(0, image[:, None].expand_as(e), e)
    return (e / total[image]).mean(dim=1)


def block_forward(block: nn.Module, x: Tensor, segments: Segments) -> Tensor:
    """timm ``Block.forward`` on packed rows ``x [T, D]``."""
    x = x + block.drop_path1(block.ls1(attention(block.attn, block.norm1(x), segments)[0]))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def selection_block_forward(block: nn.Module, x: Tensor, state: ICEState, loc: int) -> Tensor:
    """A selection point's block (:class:`~ice_prune.integrations.timm.ICEBlock`) on packed rows:
    the block, with :func:`select` at the state's placement."""
    return selection_block(block, x, state, loc,
                           lambda attn, t, cls_row: attention(attn, t, state.segments, cls_row),
                           select)


def selection_block(block: nn.Module, x: Tensor, state: ICEState, loc: int,
                    attend: Callable[[nn.Module, Tensor, bool], tuple[Tensor, Optional[Tensor]]],
                    choose: Callable[..., Tensor]) -> Tensor:
    """timm ``Block.forward`` with a selection point at the state's placement, for a batch laid out
    as ``attend`` (``(attn, x, cls_row) -> (out, [CLS] row or None)``) and ``choose`` (``select(state,
    x, h, cls_attn, loc)``) read it: packed here, padded and masked in :mod:`ice_prune.masked`."""
    y, cls_attn = attend(block.attn, block.norm1(x), state.selector.needs_cls_attn)
    x = x + block.drop_path1(block.ls1(y))
    if state.placement == "attn":
        h = block.norm2(x) if state.selector.needs_head else None
        x = choose(state, x, h, cls_attn, loc)
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    h = block.norm2(x)
    x = x + block.drop_path2(block.ls2(block.mlp(h)))
    return choose(state, x, h, cls_attn, loc)


def pack(state: ICEState, x: Tensor, h: Optional[Tensor], cls_attn: Optional[Tensor],
         loc: int) -> Tensor:
    """A selection point on the dense batch ``x [B, N, D]``: each image keeps the count the policy
    gives it, the rows packed (``state.segments`` set) unless every image keeps every token (then
    ``x`` itself, still dense)."""
    P = state.num_prefix
    n = x.shape[1] - P
    scores = _scores(state, h, cls_attn, P, loc)
    counts = state.keep_policy.keep_counts(scores)
    state.keep_counts.append(counts)
    keep = counts.tolist()  # the point's one host sync: the packed size, the attention loop
    if all(k == n for k in keep):
        return x
    fused = [int(state.fuse and k < n) for k in keep]
    rows, offsets, _ = reorganize_ragged(x, scores, counts, P, state.fuse,
                                         state.selector.normalize,
                                         total=sum(keep) + len(keep) * (P + int(state.fuse)),
                                         kernel=state.kernel)
    lengths = tuple(P + k + f for k, f in zip(keep, fused))
    # images that dropped nothing have no fused row: trimmed from their slot
    rows, state.segments = sorted_layout(rows, offsets, lengths, trim=state.fuse and not all(fused))
    return rows


def select(state: ICEState, x: Tensor, h: Optional[Tensor], cls_attn: Optional[Tensor],
           loc: int) -> Tensor:
    """A selection point on packed rows ``x [T, D]``: each image keeps the count the policy gives
    it; ``state.segments`` follows."""
    P, segments = state.num_prefix, state.segments
    n = [length - P for length in segments.lengths]
    sizes = segments.offsets.diff() - P
    image, token = row_positions(F.pad(sizes.cumsum(0), (1, 0)), sum(n))
    rows = segments.offsets[image] + P + token  # the non-prefix rows: only they are scored
    row_scores = _scores(state, None if h is None else h.index_select(0, rows)[None],
                         None if cls_attn is None else cls_attn[rows][None], 0, loc)[0]
    # [B, n_max], each image's scores in its row, zeros beyond
    scores = row_scores.new_zeros(len(n), max(n)).index_put_((image, token), row_scores)
    counts = state.keep_policy.keep_counts(scores, sizes)
    state.keep_counts.append(segments.to_batch(counts))
    keep = counts.tolist()  # the point's one host sync
    if keep == n:
        return x
    lengths = tuple(P + k + int(state.fuse and k < m) for k, m in zip(keep, n))
    x, offsets = reorganize_packed_reference(x, scores, segments.offsets, counts, sum(lengths), P,
                                             state.fuse, state.selector.normalize,
                                             dropped=sum(n) - sum(keep))
    x, state.segments = sorted_layout(x, offsets, lengths, segments.order)
    return x


def _scores(state: ICEState, h: Optional[Tensor], cls_attn: Optional[Tensor], num_prefix: int,
            loc: int) -> Tensor:
    head = state.heads[loc] if state.heads is not None else None
    return state.selector.scores(cls_attn, h, head, num_prefix, logits_needed=False,
                                 kernel=state.kernel)[0]


