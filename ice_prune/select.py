"""Token selectors: which tokens a selection point keeps.

A selector turns what a block has already computed into one score per non-prefix token:

* ``evit``: the head-mean attention of the [CLS] query to each token (EViT, Liang et al. ICLR 2022),
  computed as one extra softmax row beside timm's fused attention. Dropped tokens are fused as their
  attention-weighted sum, not renormalized.
* ``ice``: ``1 - P(background)`` under the ICE head applied to the tokens the MLP reads (the block's
  ``norm2`` output). Dropped tokens are fused as their score-weighted mean. Where nothing needs the
  head's logits (no training loss, no trace, no gradient) the score comes from the fused op
  ``ice_prune::ice_score``, which never writes the ``[B, n, C + 1]`` logits
  (:func:`fused_foreground_score`).

New selectors register with :func:`register_selector`; ``patch(method=...)`` looks them up here.
The keep/fuse step the scores feed is the ``ice_prune::reorganize`` op in :mod:`ice_prune.kernels`;
how many tokens a point keeps is :func:`keep_count` (:func:`token_schedule` for a whole model,
:func:`keep_rate_schedule` for EViT's keep rate during training), or, with a count per image,
:class:`KeepPolicy` (ICE's foreground threshold or EViT's attention mass, within bounds), whose counts
feed the ragged op ``ice_prune::reorganize_ragged``.
"""
from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ice_prune.head import ICEHead
from ice_prune.kernels import ice_score
from ice_prune.kernels.reference import MapTarget, write_map_reference

SELECTORS: dict[str, type["Selector"]] = {}

KeepRate = Union[float, Sequence[float]]


def register_selector(name: str) -> Callable[[type["Selector"]], type["Selector"]]:
    def wrap(cls: type["Selector"]) -> type["Selector"]:
        cls.name = name
        SELECTORS[name] = cls
        return cls

    return wrap


class Selector(abc.ABC):
    """Scores tokens at a selection point. Stateless: parameters (the ICE head) live on the model."""

    name: str = ""
    #: the selector reads the [CLS] attention row, so the block computes it
    needs_cls_attn: bool = False
    #: the selector reads the MLP's input (norm2 output) through an ICE head
    needs_head: bool = False
    #: fusion weights renormalized over the dropped tokens (mean) or used as they are (sum)
    normalize: bool = False

    @abc.abstractmethod
    def scores(self, cls_attn: Optional[Tensor], h: Tensor, head: Optional[nn.Module],
               num_prefix: int, logits_needed: bool = True, kernel: str = "auto",
               into: Optional[MapTarget] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Return ``(scores [B, n], head logits [B, n, C+1] or None)`` for the non-prefix tokens.

        ``logits_needed``: the caller keeps the logits (the training loss, a trace); without it a
        selector may skip computing them. ``kernel``: the patch's kernel choice, for selectors
        that run one of the library's ops. ``into`` (selectors with a head; explain mode): also
        write each token's score, the point, its best image class and that class's probability
        (:func:`top_class_of`) at its patch in the map's buffers
        (:class:`~ice_prune.kernels.reference.MapTarget`).
        """


@register_selector("evit")
class EViTSelector(Selector):
    needs_cls_attn = True
    normalize = False

    def scores(self, cls_attn, h, head, num_prefix, logits_needed=True, kernel="auto", into=None):
        if into is not None:
            raise ValueError("EViT scores tokens by attention: it has no classes")
        return cls_attn[:, num_prefix:], None


@register_selector("ice")
class ICESelector(Selector):
    needs_head = True
    normalize = True

    def scores(self, cls_attn, h, head, num_prefix, logits_needed=True, kernel="auto", into=None):
        tokens = h[:, num_prefix:]
        if not logits_needed:
            fused = fused_foreground_score(head, tokens, kernel, into=into)
            if fused is not None:
                return fused, None
        logits = head(tokens)
        scores = foreground_score(logits)
        if into is not None:
            write_map_reference(into, scores, *top_class_of(logits.detach()))
        return scores, logits


def foreground_score(logits: Tensor) -> Tensor:
    """``1 - softmax(logits)[..., -1]`` (background is the last class), computed without cancellation.

    ``1 - p_bg = sigmoid(logsumexp(class logits) - background logit)``: the same value, exact even when
    ``p_bg`` rounds to 1.
    """
    return torch.sigmoid(torch.logsumexp(logits[..., :-1], dim=-1) - logits[..., -1])


def top_class_of(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(top_class int64, top_prob fp32)`` of head logits ``[..., C + 1]``: the best image class
    (argmax over the first ``C``, background excluded; ties to the lowest index) and its probability
    under the softmax over all ``C + 1``, what ``ice_score(..., top_class=True)`` returns beside the
    scores."""
    z = logits.float()
    top = z[..., :-1].argmax(dim=-1)
    return top, z.softmax(dim=-1).gather(-1, top[..., None])[..., 0]


def fused_foreground_score(head: nn.Module, tokens: Tensor, kernel: str = "auto",
                           top_class: bool = False, into: Optional[MapTarget] = None
                           ) -> Union[Tensor, tuple[Tensor, ...], None]:
    """:func:`foreground_score` of ``head(tokens)`` through the fused op ``ice_prune::ice_score``
    (fp32 scores, no ``[B, n, C + 1]`` logits), or ``None`` where the op does not apply. With
    ``top_class``, ``(scores, top_class, top_prob)``; with ``into``, the scores, the map written
    (:func:`ice_prune.kernels.ice_score`).

    It applies to an :class:`~ice_prune.head.ICEHead`, an ``nn.Linear`` or an ``nn.Sequential``
    ending in one, whose output is the ``C + 1 >= 2`` logits. An MLP head runs its first layers in
    torch and fuses the last linear layer (the hidden activations are computed either way; the
    logits and their logsumexp are what the op saves). ``None`` for any other module (its forward
    may do anything) and where a gradient is needed (the op has no backward): the caller computes
    the logits.
    """
    if torch.is_grad_enabled() and (tokens.requires_grad
                                    or any(p.requires_grad for p in head.parameters())):
        return None
    fc = head.fc if isinstance(head, ICEHead) and type(head).forward is ICEHead.forward else head
    if isinstance(fc, nn.Linear):
        layers, last = (), fc
    elif type(fc) is nn.Sequential and len(fc) > 0:
        layers, last = tuple(fc)[:-1], fc[-1]
    else:
        return None
    if (not isinstance(last, nn.Linear) or type(last).forward is not nn.Linear.forward
            or last.out_features < 2):
        return None
    for layer in layers:
        tokens = layer(tokens)
    return ice_score(tokens, last.weight, last.bias, kernel, top_class, into)


def keep_count(keep_rate: float, n: int) -> int:
    """EViT's rule: of ``n`` non-prefix tokens keep ``ceil(keep_rate * n)``."""
    return math.ceil(keep_rate * n)


def check_keep_rate(keep_rate: KeepRate, num_locs: int) -> tuple[float, ...]:
    """One keep rate per selection point from a float or a sequence; bad values raise."""
    rates = [keep_rate] if isinstance(keep_rate, numbers.Real) else list(keep_rate)
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 < r <= 1.0:
            raise ValueError(
                f"keep_rate must be in (0, 1] (the fraction of tokens kept at each selection point), "
                f"got {keep_rate!r}; use 1.0 to keep every token")
    if len(rates) == 1:
        rates = rates * num_locs
    if len(rates) != num_locs:
        raise ValueError(
            f"keep_rate has {len(rates)} values but there are {num_locs} selection points (locs); "
            f"give one float for all of them or exactly {num_locs} values")
    return tuple(float(r) for r in rates)


def token_schedule(num_tokens: int, num_prefix: int, keep_rates: Sequence[float],
                   fuse: bool = True) -> list[int]:
    """Sequence length after each selection point, from ``num_tokens`` (prefix included) at the start.

    DeiT-S at 0.7 with fusion: ``token_schedule(197, 1, [0.7] * 3) == [140, 100, 72]``.
    """
    out, n = [], num_tokens - num_prefix
    for rate in keep_rates:
        k = keep_count(rate, n)
        if k < n:
            n = k + int(fuse)
        out.append(num_prefix + n)
    return out


def keep_rate_schedule(target: KeepRate, shrink_start: int = 0, shrink_epochs: int = 0,
                       iters_per_epoch: int = 1):
    """EViT's keep-rate schedule as a function of the global iteration.

    Rate 1 for the first ``shrink_start`` epochs, then a cosine from 1 down to ``target`` over
    ``shrink_epochs`` epochs, updated every iteration, then ``target``. EViT trains from scratch with
    ``shrink_start=10, shrink_epochs=100``; fine-tuning from a pretrained DeiT uses the target from the
    start (the defaults). A per-location ``target`` gives per-location rates.

    >>> sched = keep_rate_schedule(0.7, shrink_start=1, shrink_epochs=2, iters_per_epoch=10)
    >>> sched(0), sched(20), sched(30)
    (1.0, 0.85, 0.7)
    """
    targets = [target] if isinstance(target, numbers.Real) else list(target)
    check_keep_rate(targets, len(targets))
    if shrink_start < 0 or shrink_epochs < 0 or iters_per_epoch < 1:
        raise ValueError("shrink_start and shrink_epochs must be >= 0 and iters_per_epoch >= 1")
    start, length = shrink_start * iters_per_epoch, shrink_epochs * iters_per_epoch

    def rate(iteration: int) -> KeepRate:
        if iteration < start:
            t = 0.0
        elif iteration >= start + length:
            t = 1.0
        else:
            t = (iteration - start) / length
        cos = (math.cos(t * math.pi) + 1) * 0.5  # 1 at the start of the shrink, 0 at its end
        out = tuple(round(r + (1.0 - r) * cos, 12) for r in targets)
        return out[0] if isinstance(target, numbers.Real) else out

    return rate


def keep_bounds(n: int, min_share: float, max_share: float) -> tuple[int, int]:
    """``(lo, hi)``: a per-image policy keeps between ``ceil(min_share * n)`` (at least one) and
    ``ceil(max_share * n)`` of ``n`` non-prefix tokens, rounded as :func:`keep_count` rounds."""
    return max(1, keep_count(min_share, n)), max(1, keep_count(max_share, n))


def _bounds(scores: Tensor, min_share: float, max_share: float,
            sizes: Optional[Tensor]) -> tuple[Union[int, Tensor], Union[int, Tensor]]:
    """:func:`keep_bounds` of ``scores [B, n]``'s ``n``, or per image of ``sizes [B]`` (on the
    device, in float64: the same rounding as ``math.ceil``)."""
    if sizes is None:
        return keep_bounds(scores.shape[1], min_share, max_share)
    n = sizes.to(torch.float64)
    return tuple(torch.ceil(share * n).to(torch.int64).clamp_min(1)
                 for share in (min_share, max_share))


def _padding(scores: Tensor, sizes: Optional[Tensor]) -> Optional[Tensor]:
    """``[B, n]`` bool, the columns past each image's ``sizes[b]`` tokens; ``None`` without sizes."""
    if sizes is None:
        return None
    return torch.arange(scores.shape[1], device=scores.device) >= sizes[:, None]


def threshold_keep_counts(scores: Tensor, threshold: float, min_share: float = 0.0,
                          max_share: float = 1.0, sizes: Optional[Tensor] = None) -> Tensor:
    """ICE's per-image rule: ``[B]`` int64, how many of each image's tokens score ``>= threshold``
    (foreground probability ``1 - P(background)``), clamped to :func:`keep_bounds`. The kept tokens
    are the top-k by score (ties to the lower position), k the clamped count. No host sync.

    ``sizes``: ``[B]`` int64, image ``b`` has only its first ``sizes[b]`` columns of ``scores`` (the
    rest is padding, ignored); its count is then that of ``scores[b:b + 1, :sizes[b]]`` alone."""
    lo, hi = _bounds(scores, min_share, max_share, sizes)
    passed = scores >= threshold
    padding = _padding(scores, sizes)
    if padding is not None:
        passed = passed & ~padding
    return passed.sum(dim=1).clamp(lo, hi)


def mass_keep_counts(attn: Tensor, mass: float, min_share: float = 0.0,
                     max_share: float = 1.0, sizes: Optional[Tensor] = None) -> Tensor:
    """EViT's per-image rule: ``[B]`` int64, the fewest top-attention tokens whose [CLS] attention
    holds ``mass`` of the image's attention to its ``n`` non-prefix tokens (``attn [B, n]``),
    clamped to :func:`keep_bounds`. No host sync. ``sizes`` as :func:`threshold_keep_counts`."""
    lo, hi = _bounds(attn, min_share, max_share, sizes)
    padding = _padding(attn, sizes)
    if padding is not None:  # zeros rank last and add nothing to the cumulative sums
        attn = attn.masked_fill(padding, 0)
    ranked = attn.float().sort(dim=1, descending=True, stable=True).values
    cumulative = ranked.cumsum(dim=1)
    # k = 1 + #{j : the top j hold less than the target}; a target above the rounded sum (mass 1)
    # gives n + 1, clamped to hi <= n
    below = cumulative < mass * cumulative[:, -1:]
    return (below.sum(dim=1) + 1).clamp(lo, hi)


@dataclass(frozen=True)
class KeepPolicy:
    """How many tokens each image keeps at a selection point, from its scores there.

    Exactly one of ``threshold`` (ICE: keep the tokens whose foreground probability is
    ``>= threshold``, :func:`threshold_keep_counts`) and ``mass`` (EViT: the fewest tokens holding
    ``mass`` of the [CLS] attention, :func:`mass_keep_counts`). Each image keeps between
    ``ceil(min_share * n)`` (at least one) and ``ceil(max_share * n)`` of its ``n`` non-prefix
    tokens.

    ``masked``: run the policy padded and masked (:mod:`ice_prune.masked`), as A-ViT-style code
    does, instead of packed (:mod:`ice_prune.packed`). The batch keeps its ``[B, N, D]`` shape and
    every image keeps the same tokens as packed and gives the same outputs, but its dropped tokens
    are only masked out of attention: every block still computes all ``N`` rows. It saves FLOPs on
    paper and no time; it is there to be measured beside the packed run (bench/throughput.py
    ``--masked``).
    """

    threshold: Optional[float] = None
    mass: Optional[float] = None
    min_share: float = 0.0
    max_share: float = 1.0
    masked: bool = False

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.mass is None):
            raise ValueError("KeepPolicy needs exactly one of threshold (ICE: keep tokens whose "
                             "foreground probability passes it) and mass (EViT: keep the tokens "
                             f"holding that share of the [CLS] attention), got threshold="
                             f"{self.threshold!r}, mass={self.mass!r}")
        if self.threshold is not None and not _real_in(self.threshold, 0.0, 1.0):
            raise ValueError(f"threshold is a foreground probability in [0, 1], got "
                             f"{self.threshold!r}")
        if self.mass is not None and not (_real_in(self.mass, 0.0, 1.0) and self.mass > 0):
            raise ValueError(f"mass is a share of the [CLS] attention in (0, 1], got {self.mass!r}")
        if not _real_in(self.min_share, 0.0, 1.0):
            raise ValueError(f"min_share must be in [0, 1], got {self.min_share!r}")
        if not (_real_in(self.max_share, 0.0, 1.0) and self.max_share > 0):
            raise ValueError(f"max_share must be in (0, 1], got {self.max_share!r}")
        if self.min_share > self.max_share:
            raise ValueError(f"min_share ({self.min_share}) must not exceed max_share "
                             f"({self.max_share})")
        if not isinstance(self.masked, bool):
            raise TypeError(f"masked is True (run the policy padded and masked, for comparison) "
                            f"or False (packed, the fast path), got {self.masked!r}")

    def keep_counts(self, scores: Tensor, sizes: Optional[Tensor] = None) -> Tensor:
        """``[B]`` int64 tokens kept per image from the scores ``[B, n]`` of the non-prefix tokens
        (ICE foreground probabilities for ``threshold``, [CLS] attention for ``mass``).

        ``sizes``: ``[B]`` int64 where the images have different token counts (a packed batch):
        image ``b``'s scores are its row's first ``sizes[b]`` columns, the rest padding."""
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, n] (one per non-prefix token), got shape "
                             f"{tuple(scores.shape)}")
        if self.threshold is not None:
            return threshold_keep_counts(scores, self.threshold, self.min_share, self.max_share,
                                         sizes)
        return mass_keep_counts(scores, self.mass, self.min_share, self.max_share, sizes)


def _real_in(value, lo: float, hi: float) -> bool:
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and lo <= value <= hi)
