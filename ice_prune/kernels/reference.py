"""Plain torch: the reorganize step (dense and ragged) and the fused ICE score, the CPU paths and
the oracles for the Triton kernels."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# Fusion weights are renormalized over the dropped tokens (ICE); a sum of near-zero scores must not
# divide by zero.
EPS = 1e-12


def reorganize_reference(
    x: Tensor,
    scores: Tensor,
    keep: int,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` highest-scoring non-prefix tokens and fuse the rest into one token.

    Args:
        x: ``[B, N, D]`` tokens, the first ``num_prefix`` of them prefix tokens (never touched).
        scores: ``[B, N - num_prefix]`` one score per non-prefix token; also the fusion weights.
        keep: how many non-prefix tokens to keep, ``0 < keep <= N - num_prefix``.
        num_prefix: number of prefix tokens (CLS, registers, distillation).
        fuse: append one token fusing the dropped ones (EViT's inattentive-token fusion).
        normalize: fusion weights renormalized over the dropped tokens (ICE's score-weighted
            mean) instead of used as they are (EViT's attention-weighted sum).

    Returns:
        ``out``: ``[B, num_prefix + keep (+ 1 if fuse), D]``, kept tokens in descending score order,
        fused token last.
        ``order``: ``[B, N - num_prefix]`` int64, non-prefix positions sorted by descending score:
        the first ``keep`` were kept, the rest dropped (and fused).
    """
    B, N, D = x.shape
    n = N - num_prefix
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    tokens = x[:, num_prefix:]
    kept = tokens.gather(1, order[:, :keep, None].expand(B, keep, D))
    parts = [x[:, :num_prefix], kept]
    if fuse:
        dropped = order[:, keep:]
        w = scores.gather(1, dropped)
        if normalize:
            w = w / w.sum(dim=1, keepdim=True).clamp_min(EPS)
        dropped_tokens = tokens.gather(1, dropped[..., None].expand(B, n - keep, D))
        fused = torch.einsum("bn,bnd->bd", w.to(torch.float32), dropped_tokens.to(torch.float32))
        parts.append(fused.to(x.dtype)[:, None])
    return torch.cat(parts, dim=1), order


def reorganize_backward_reference(
    grad_out: Tensor,
    x: Tensor,
    scores: Tensor,
    order: Tensor,
    keep: int,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`reorganize_reference` to ``x`` and ``scores``, written out by hand.

    It is the CPU backward of the op and the formula the Triton backward kernel implements; the tests
    check it against autograd through :func:`reorganize_reference`. With ``F`` the fused row, ``g_F``
    its gradient, ``a_i = <g_F, x_i>`` and ``S`` the sum of the dropped scores:

    * each input row gets its output row's gradient (kept) or ``w_i g_F`` (dropped; 0 without fusion);
    * a dropped score gets ``a_i`` (EViT, ``w_i = s_i``) or ``(a_i - sum_j w_j a_j) / S``
      (ICE, ``w_i = s_i / S``); kept scores get 0 (the ranking is piecewise constant).
    """
    B, N, D = x.shape
    n = N - num_prefix
    grad_x = torch.empty_like(x)
    grad_x[:, :num_prefix] = grad_out[:, :num_prefix]
    # inverse permutation: input row P + order[r] came from output row P + r
    rows = order[..., None].expand(B, n, D)
    grad_tokens = torch.zeros(B, n, D, dtype=torch.float32, device=x.device)
    grad_tokens.scatter_(1, rows[:, :keep], grad_out[:, num_prefix:num_prefix + keep].float())
    grad_scores = torch.zeros(B, n, dtype=torch.float32, device=scores.device)
    if fuse:
        dropped = order[:, keep:]
        g_f = grad_out[:, num_prefix + keep].float()  # [B, D]
        s = scores.gather(1, dropped).float()
        total = s.sum(dim=1, keepdim=True)
        w = s / total.clamp_min(EPS) if normalize else s
        grad_tokens.scatter_(1, rows[:, keep:], w[..., None] * g_f[:, None])
        dropped_tokens = x[:, num_prefix:].gather(1, rows[:, keep:]).float()
        a = torch.einsum("bd,bnd->bn", g_f, dropped_tokens)
        if normalize:
            # clamp_min passes the gradient to S only where S >= EPS, else w_i = s_i / EPS
            centred = (a - (w * a).sum(dim=1, keepdim=True)) / total.clamp_min(EPS)
            a = torch.where(total >= EPS, centred, a / EPS)
        grad_scores.scatter_(1, dropped, a)
    grad_x[:, num_prefix:] = grad_tokens.to(x.dtype)
    return grad_x, grad_scores.to(scores.dtype)



def ragged_offsets(keep_counts: Tensor, num_prefix: int, fuse: bool) -> Tensor:
    """``[B + 1]`` int64 row starts of each image in the packed output of
    :func:`reorganize_ragged_reference`: image ``b`` has ``num_prefix + keep_counts[b] (+ 1)`` rows."""
    rows = keep_counts.to(torch.int64) + (num_prefix + int(fuse))
    return F.pad(rows.cumsum(0), (1, 0))


def row_positions(offsets: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """``(image, position within the image)``, ``[total]`` int64 each, of the rows of images packed
    at ``offsets`` (``[B + 1]`` row starts; ``total`` the rows, so no host sync)."""
    device = offsets.device
    image = torch.repeat_interleave(torch.arange(offsets.shape[0] - 1, device=device),
                                    offsets.diff(), output_size=total)
    return image, torch.arange(total, device=device) - offsets[image]


def _packed_source(keep_counts: Tensor, offsets: Tensor, total: int, num_prefix: int,
                   n: int) -> Tensor:
    """``[total]`` int64: each packed row's row in the flat dense layout ``[B * (P + n + 1)]`` of
    ``[prefix, tokens by rank, fused]`` per image (built with ``total``, without a host sync)."""
    image, local = row_positions(offsets, total)
    kept_end = num_prefix + keep_counts.to(torch.int64)[image]
    position = torch.where(local < kept_end, local, num_prefix + n)
    return image * (num_prefix + n + 1) + position


def reorganize_ragged_reference(
    x: Tensor,
    scores: Tensor,
    keep_counts: Tensor,
    total: int,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`reorganize_reference` with a keep count per image, the images packed without padding.

    Args:
        x: ``[B, N, D]`` tokens, the first ``num_prefix`` of them prefix tokens.
        scores: ``[B, N - num_prefix]`` one score per non-prefix token; also the fusion weights.
        keep_counts: ``[B]`` integer, non-prefix tokens kept per image, each in ``[1, N - P]``.
        total: the packed row count, ``sum_b num_prefix + keep_counts[b] (+ 1 if fuse)``.
        num_prefix, fuse, normalize: as :func:`reorganize_reference`.

    Returns:
        ``rows``: ``[total, D]``, per image ``[prefix, kept tokens in descending score order, fused
        token]``, images in batch order; image ``b``'s rows are what :func:`reorganize_reference`
        gives for that image alone with ``keep = keep_counts[b]``.
        ``offsets``: ``[B + 1]`` int64, image ``b``'s rows are ``rows[offsets[b]:offsets[b + 1]]``.
        ``order``: ``[B, N - num_prefix]`` int64, the stable descending argsort of ``scores``.

    The fused row is summed in fp32 (fp64 for fp64 tokens), in rank order (``index_add_``). Only
    the rows that land in the output and the dropped rows are read, each once (no ``[B, n, D]``
    ranked copy of the batch), and ``total`` gives the dropped count without a host sync.
    """
    B, N, D = x.shape
    P, n = num_prefix, N - num_prefix
    acc = torch.promote_types(x.dtype, torch.float32)
    keep = keep_counts.to(torch.int64)
    offsets = ragged_offsets(keep_counts, P, fuse)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    flat = x.reshape(B * N, D)
    image, local = row_positions(offsets, total)
    token = order[image, (local - P).clamp(0, max(n - 1, 0))]
    # prefix, then kept tokens by rank; a fused slot reads a stand-in row, overwritten below
    rows = flat.index_select(0, image * N + torch.where(local < P, local, P + token))
    if fuse:
        drops = n - keep
        dropped = B * n - (total - B * (P + 1))
        drop_image, drop_local = row_positions(F.pad(drops.cumsum(0), (1, 0)), dropped)
        drop_rank = keep[drop_image] + drop_local
        drop_token = order[drop_image, drop_rank]
        w = scores[drop_image, drop_token]
        if normalize:
            w = w / w.new_zeros(B).index_add_(0, drop_image, w).clamp_min(EPS)[drop_image]
        terms = w.to(acc)[:, None] * flat.index_select(0, drop_image * N + P + drop_token).to(acc)
        fused = terms.new_zeros(B, D).index_add_(0, drop_image, terms)
        rows.index_copy_(0, offsets[1:] - 1, fused.to(x.dtype))
    return rows, offsets, order


def reorganize_ragged_backward_reference(
    grad_rows: Tensor,
    x: Tensor,
    scores: Tensor,
    keep_counts: Tensor,
    offsets: Tensor,
    order: Tensor,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`reorganize_ragged_reference` to ``x`` and ``scores``: the formulas of
    :func:`reorganize_backward_reference`, per image with its own keep count."""
    B, N, D = x.shape
    n = N - num_prefix
    acc = torch.promote_types(x.dtype, torch.float32)
    source = _packed_source(keep_counts, offsets, grad_rows.shape[0], num_prefix, n)
    grad_dense = grad_rows.new_zeros(B * (N + 1), D).index_copy_(0, source, grad_rows)
    grad_dense = grad_dense.view(B, N + 1, D)
    grad_ranked = grad_dense[:, num_prefix:N].to(acc)  # the dropped positions hold zeros
    grad_scores = torch.zeros(B, n, dtype=acc, device=scores.device)
    if fuse:
        dropped = torch.arange(n, device=x.device) >= keep_counts[:, None]
        g_f = grad_dense[:, N].to(acc)  # [B, D]
        s = torch.where(dropped, scores.gather(1, order).to(acc), 0)
        total = s.sum(dim=1, keepdim=True)
        w = s / total.clamp_min(EPS) if normalize else s
        grad_ranked = torch.where(dropped[..., None], w[..., None] * g_f[:, None], grad_ranked)
        ranked = x[:, num_prefix:].gather(1, order[..., None].expand(B, n, D)).to(acc)
        a = torch.where(dropped, torch.einsum("bd,bnd->bn", g_f, ranked), 0)
        if normalize:
            # clamp_min passes the gradient to S only where S >= EPS, else w_i = s_i / EPS
            centred = (a - (w * a).sum(dim=1, keepdim=True)) / total.clamp_min(EPS)
            a = torch.where(dropped, torch.where(total >= EPS, centred, a / EPS), 0)
        grad_scores.scatter_(1, order, a)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_x[:, :num_prefix] = grad_dense[:, :num_prefix]
    grad_tokens = torch.zeros(B, n, D, dtype=acc, device=x.device)
    grad_tokens.scatter_(1, order[..., None].expand(B, n, D), grad_ranked)
    grad_x[:, num_prefix:] = grad_tokens.to(x.dtype)
    return grad_x, grad_scores.to(scores.dtype)


def reorganize_packed_reference(
    rows: Tensor,
    scores: Tensor,
    offsets: Tensor,
    keep_counts: Tensor,
    total: int,
    num_prefix: int,
    fuse: bool = True,
    normalize: bool = False,
    dropped: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """The reorganize step on an already packed batch: images of different token counts, each
    keeping its own count, packed in and packed out, nothing padded but the scores.

    Args:
        rows: ``[T, D]``, image ``b``'s rows ``rows[offsets[b]:offsets[b + 1]]``, its first
            ``num_prefix`` the prefix tokens, the other ``n_b`` its non-prefix tokens.
        scores: ``[B, n_max]``, image ``b``'s scores (also the fusion weights) in the first ``n_b``
            columns of its row, in the order of its rows; the columns beyond are ignored.
        offsets: ``[B + 1]`` int64 row starts.
        keep_counts: ``[B]`` integer, non-prefix tokens kept per image, each in ``[1, n_b]``.
        total: the output row count, ``sum_b num_prefix + keep_counts[b] (+ 1 where fuse and
            keep_counts[b] < n_b)``: the caller's host sync.
        num_prefix, fuse, normalize: as :func:`reorganize_reference`.
        dropped: the rows dropped in all, ``sum_b n_b - keep_counts[b]``, from the caller's host
            sync; read from ``keep_counts`` (a host sync) when not given.

    Returns:
        ``rows``: ``[total, D]``, per image ``[prefix, kept tokens in descending score order (ties
        to the lower row), fused token]``: what :func:`reorganize_reference` gives for that image
        alone with ``keep = keep_counts[b]``. An image that keeps all its tokens drops nothing and
        gets no fused row (as a dense selection point that keeps everything is skipped).
        ``offsets``: ``[B + 1]`` int64 row starts of the output.

    The fused rows are summed in fp32 (fp64 for fp64 rows).
    """
    T, D = rows.shape
    B, n_max = scores.shape
    device = rows.device
    acc = torch.promote_types(rows.dtype, torch.float32)
    sizes = offsets.diff() - num_prefix  # [B] non-prefix tokens per image
    rank = torch.arange(n_max, device=device)
    padding = rank >= sizes[:, None]
    order = torch.argsort(scores.masked_fill(padding, float("-inf")), dim=1, descending=True,
                          stable=True)  # padding ranks last
    keep = keep_counts.to(torch.int64)
    kept_end = num_prefix + keep
    lengths = kept_end + (keep < sizes).to(torch.int64) * int(fuse)
    out_offsets = F.pad(lengths.cumsum(0), (1, 0))
    image, local = row_positions(out_offsets, total)
    token = order[image, (local - num_prefix).clamp(0, max(n_max - 1, 0))]
    source = offsets[image] + torch.where(local < num_prefix, local, num_prefix + token)
    if fuse:
        w = torch.where((rank >= keep[:, None]) & ~padding, scores.gather(1, order), 0)
        if normalize:
            w = w / w.sum(dim=1, keepdim=True).clamp_min(EPS)
        # the dropped tokens alone, image by image in rank order: ranks keep[b] .. n_b - 1
        drops = sizes - keep
        if dropped is None:
            dropped = int(drops.sum())
        drop_image, drop_local = row_positions(F.pad(drops.cumsum(0), (1, 0)), dropped)
        drop_rank = keep[drop_image] + drop_local
        drop_row = offsets[drop_image] + num_prefix + order[drop_image, drop_rank]
        terms = w[drop_image, drop_rank].to(acc)[:, None] * rows.index_select(0, drop_row).to(acc)
        # one multiply-add per dropped element, as the dense reorganize counts its fused row
        fused = terms.new_zeros(B, D).index_add_(0, drop_image, terms).to(rows.dtype)
        source = torch.where(local >= kept_end[image], T + image, source)
        rows = torch.cat([rows, fused])
    return rows.index_select(0, source), out_offsets

# The torch ICE score's logits are computed in tiles of about this many (token, class) pairs. On a CPU
# 1 MiB of fp32 per thread (about 260 tokens of a 1001-way head), a tile that stays in cache where
# the whole logits would not; each op of a tile is a barrier for torch's threads, so tiles grow with
# the thread count. On a GPU, where the Triton kernel is the fast path, 64 MiB.
ICE_SCORE_CHUNK_CPU_PER_THREAD = 1 << 18
ICE_SCORE_CHUNK_OTHER = 1 << 24
# a tile holds at least this many tokens; fewer classes per tile where C + 1 classes do not fit
ICE_SCORE_MIN_TOKENS = 32


def default_chunk(device: torch.device) -> int:
    """(token, class) pairs per tile of :func:`ice_score_reference` on ``device``."""
    if device.type == "cpu":
        return ICE_SCORE_CHUNK_CPU_PER_THREAD * torch.get_num_threads()
    return ICE_SCORE_CHUNK_OTHER


class MapTarget(NamedTuple):
    """Where explain mode's score op writes (:func:`ice_score_triton`'s ``into``): ``patches
    [B, n]`` int64, the patch of each token (``P`` for a fused token), and the map's ``[B, P + 1]``
    buffers, all of one row stride: the score (fp32), the selection point ``loc`` (int64), the
    best image class (int64) and its probability (fp32)."""

    patches: Tensor
    loc: int
    foreground: Tensor
    point: Tensor
    top_class: Tensor
    top_prob: Tensor


def write_map_reference(into: MapTarget, scores: Tensor, top_class: Tensor,
                        top_prob: Tensor) -> None:
    """Write each token's score, ``into.loc``, top class and its probability at the token's patch
    in ``into``'s buffers, in place: what the Triton kernel's ``EXPLAIN`` epilogue writes (a later
    point overwrites an earlier one; fused tokens land in the spare column ``P``)."""
    index = into.patches
    into.foreground.scatter_(1, index, scores.detach().float())
    into.point.scatter_(1, index, into.loc)
    into.top_class.scatter_(1, index, top_class)
    into.top_prob.scatter_(1, index, top_prob.detach().float())


def ice_score_reference(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
    top_class: bool = False,
    chunk: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """ICE's foreground score ``1 - P(background)`` per token, without the ``[B, n, C + 1]`` logits.

    ``sigmoid(logsumexp_c(W_c h + b_c) - (w_bg . h + b_bg))`` for the image classes ``c < C`` and the
    background row ``C`` (the last). The logits are computed a tile of tokens by a chunk of classes
    at a time, about ``chunk`` (token, class) pairs, the chunks of a tile folded into a running
    logsumexp, so the extra memory is one tile whatever ``B * n`` and ``C`` are (and one fp32 copy
    of the tokens where they are not contiguous fp32). With ``C + 1`` classes in one chunk, the
    usual case, a tile is ``foreground_score(F.linear(h_tile, weight, bias))``.

    Args:
        h: ``[B, n, D]`` tokens.
        weight: ``[C + 1, D]`` the head's (last) linear layer, background last.
        bias: ``[C + 1]`` or ``None``.
        compute_dtype: the inputs are rounded to it (as autocast rounds a linear layer's inputs), then
            multiplied and summed in fp32; default the promoted dtype of ``h`` and ``weight``.
        top_class: also return each token's best image class (ties to the lowest index) and its
            probability under the softmax over all ``C + 1`` classes.
        chunk: (token, class) pairs per tile; default :func:`default_chunk` of the device.

    Returns:
        ``[B, n]`` fp32 scores; with ``top_class`` the tuple ``(scores, top_class [B, n] int64,
        top_prob [B, n] fp32)``, the scores the same values.
    """
    if compute_dtype is None:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    if chunk is None:
        chunk = default_chunk(h.device)
    B, n, D = h.shape
    T, classes = B * n, weight.shape[0]  # classes = C + 1
    tokens_step = max(1, chunk // classes)
    classes_step = classes
    if tokens_step < min(T, ICE_SCORE_MIN_TOKENS):  # a huge head: chunk the classes too
        tokens_step = min(T, ICE_SCORE_MIN_TOKENS)
        classes_step = max(1, chunk // tokens_step)

    def rounded(t: Tensor) -> Tensor:
        return t.to(compute_dtype).float()

    out = torch.empty(T, dtype=torch.float32, device=h.device)
    if top_class:
        top = torch.empty(T, dtype=torch.int64, device=h.device)
        top_prob = torch.empty(T, dtype=torch.float32, device=h.device)
    # explicit dtypes: an autocast region around the call must not recast the fp32 arithmetic
    with torch.autocast(h.device.type, enabled=False):
        x, w = rounded(h).reshape(T, D), rounded(weight)
        b = None if bias is None else rounded(bias)
        for t0 in range(0, T, tokens_step):
            tile = x[t0:t0 + tokens_step]
            lse = best = best_logit = None
            for c0 in range(0, classes, classes_step):
                c1 = min(c0 + classes_step, classes)
                logits = F.linear(tile, w[c0:c1], None if b is None else b[c0:c1])
                if c1 == classes:  # the last chunk ends with the background row
                    background, logits = logits[:, -1], logits[:, :-1]
                if logits.shape[1]:
                    part = logits.logsumexp(dim=-1)
                    lse = part if lse is None else torch.logaddexp(lse, part)
                    if top_class:
                        arg = logits.argmax(dim=-1)
                        value = logits.gather(1, arg[:, None])[:, 0]
                        if best is None:
                            best, best_logit = arg + c0, value
                        else:  # strictly greater: a tie keeps the earlier chunk's lower index
                            better = value > best_logit
                            best = torch.where(better, arg + c0, best)
                            best_logit = torch.where(better, value, best_logit)
            score = torch.sigmoid(lse - background)
            out[t0:t0 + tokens_step] = score
            if top_class:
                # P(top) = P(foreground) * P(top | image classes)
                top[t0:t0 + tokens_step] = best
                top_prob[t0:t0 + tokens_step] = score * torch.exp(best_logit - lse)
    if top_class:
        return out.view(B, n), top.view(B, n), top_prob.view(B, n)
    return out.view(B, n)
