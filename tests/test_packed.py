"""Per-image keep counts (``model.keep_policy``) on timm ViTs, run packed (``ice_prune.packed``).

Each result is checked against something written apart from the packed path: the unpatched model
(a policy that keeps every token), each image run alone (batch independence), a plain per-image
forward with the attention matrix materialized and the policy's rule worked out by hand, the dense
fixed-keep path at the same counts, and a per-image loop over the dense ``reorganize_reference``.
"""
import math

import pytest
import timm
import torch

import ice_prune
from ice_prune import KeepPolicy
from ice_prune.integrations.common import ICEModel
from ice_prune.kernels import reorganize_packed_reference, reorganize_reference

TOL = 1e-5
# scores (ICE) or cumulative attention shares (EViT) at least this far from the policy's cut
MARGIN = 1e-4


def make(method, prefix=1, **kw):
    """A small random ViT, patched: LayerScale randomized (so that a dropped one shows), q and k
    large enough for peaked attention and an ICE head with a spread background logit (so that
    the images' scores differ)."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24,
                              num_heads=2, num_classes=5, reg_tokens=prefix - 1, init_values=1.0,
                              **kw).eval()
    for m in model.modules():
        if hasattr(m, "gamma"):
            torch.nn.init.uniform_(m.gamma, 0.5, 1.5)
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.qkv.weight[:48], std=0.3)
    if method is not None:
        ice_prune.patch(model, method=method)
    if method == "ice":
        torch.nn.init.normal_(model.ice_head.fc.weight, std=0.02)
        torch.nn.init.normal_(model.ice_head.fc.weight[-1], std=1.0)
    return model


def images(batch=4):
    """Noise on a square of side 8, 16, 24, 32 pixels, zeros around: the images differ in how
    much of them is plain, so their counts differ."""
    x = torch.randn(batch, 3, 32, 32)
    for b in range(batch):
        side = 8 * (b % 4 + 1)
        x[b, :, side:] = 0
        x[b, :, :, side:] = 0
    return x


# ----------------------------------------------------------------------------- the reference
def hand_count(score, method, value, min_share, max_share):
    """``(k, margin)`` for one image's scores ``[n]``: the policy's rule written out."""
    n = score.shape[0]
    lo, hi = max(1, math.ceil(min_share * n)), max(1, math.ceil(max_share * n))
    if method == "ice":
        k, margin = int((score >= value).sum()), (score - value).abs().min().item()
    else:
        cumulative = score.sort(descending=True).values.cumsum(0)
        target = value * cumulative[-1]
        k = 1 + int((cumulative < target).sum())
        margin = ((cumulative - target).abs().min() / cumulative[-1]).item()
    return min(max(k, lo), hi), margin


def reference_forward(model, image, method, value, min_share=0.0, max_share=1.0,
                      placement="attn", fuse=True):
    """One image through the blocks with the attention matrix materialized: at each selection
    point keep the policy's count by score (ICE: ``1 - P(background)``, EViT: head-mean [CLS]
    attention), fuse the rest (ICE: renormalized score-weighted mean, EViT: attention-weighted
    sum), nothing dropped and no fused token where the count is every token. Returns
    ``(logits [1, C], counts, smallest margin to the rule's cut)``."""
    P, locs = model.num_prefix_tokens, model._ice.locs
    counts, margins = [], []
    t = model.norm_pre(model._pos_embed(model.patch_embed(image)))[0]
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(t)
        N, C = h.shape
        qkv = a.qkv(h).reshape(N, 3, a.num_heads, C // a.num_heads).permute(1, 2, 0, 3)
        q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(C // a.num_heads)).softmax(dim=-1)
        t = t + blk.ls1(a.proj(a.norm((attn @ v).transpose(0, 1).reshape(N, C))))

        def select(t, normed):
            if method == "evit":
                score = attn[:, 0, P:].mean(dim=0)
            else:
                score = 1 - model.ice_head(normed[P:]).softmax(dim=-1)[:, -1]
            n = score.shape[0]
            kk, margin = hand_count(score, method, value, min_share, max_share)
            counts.append(kk)
            margins.append(margin)
            if kk == n:
                return t
            idx = torch.topk(score, kk).indices
            dropped = torch.ones(n, dtype=torch.bool).scatter(0, idx, False)
            parts = [t[:P], t[P:][idx]]
            if fuse:
                w = score[dropped]
                if method == "ice":
                    w = w / w.sum()
                parts.append((t[P:][dropped] * w[:, None]).sum(dim=0, keepdim=True))
            return torch.cat(parts)

        if i in locs and placement == "attn":
            t = select(t, blk.norm2(t))
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        elif i in locs:
            normed = blk.norm2(t)
            t = t + blk.ls2(blk.mlp(normed))
            t = select(t, normed)
        else:
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t)[None]), counts, min(margins)


def adaptive_value(model, x, method, require=None, **kw):
    """A threshold (ICE) or mass (EViT) at least MARGIN from every image's cut at every point, the
    one whose counts differ most between the images (and that meet ``require(counts)``)."""
    candidates = [0.02 * i for i in range(50)] if method == "ice" else \
        [0.3 + 0.02 * i for i in range(35)] + [0.99]
    best, best_distinct = None, 1
    for value in candidates:
        runs = [reference_forward(model, x[b:b + 1], method, value, **kw)
                for b in range(x.shape[0])]
        counts = [r[1] for r in runs]
        distinct = len(set(map(tuple, counts)))
        if (min(r[2] for r in runs) >= MARGIN and distinct > best_distinct
                and (require is None or require(counts))):
            best, best_distinct = value, distinct
    assert best is not None, "no policy value with distinct counts and a clear margin"
    return best


def policy(method, value, **kw):
    return KeepPolicy(threshold=value, **kw) if method == "ice" else KeepPolicy(mass=value, **kw)


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("placement", ["attn", "block"])
def test_a_policy_keeping_every_token_is_the_unpatched_model(method, placement):
    model = make(None)
    x = images()
    keep_all = KeepPolicy(threshold=0.0) if method == "ice" else KeepPolicy(mass=1.0)
    with torch.no_grad():
        ref = model(x)
        ice_prune.patch(model, method=method, placement=placement, keep_policy=keep_all)
        out = model(x)
        features = model.forward_features(x)
    assert (out - ref).abs().max().item() <= TOL
    assert features.shape == (4, 17, 24)  # the dense blocks ran: nothing was packed
    n = [16, 16, 16]  # every point saw all 16 patches of every image
    assert [c.tolist() for c in model.ice_keep_counts] == [[k] * 4 for k in n]


@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("prefix", [1, 5])
def test_an_image_alone_and_in_a_batch_keeps_the_same_tokens(method, prefix):
    model = make(method, prefix)
    x = images()
    with torch.no_grad():
        model.keep_policy = policy(method, adaptive_value(model, x, method))
        batch = model(x)
        batch_counts = torch.stack(model.ice_keep_counts, dim=1)
        for b in range(x.shape[0]):
            alone = model(x[b:b + 1])
            assert torch.equal(torch.stack(model.ice_keep_counts, dim=1)[0], batch_counts[b])
            assert (alone[0] - batch[b]).abs().max().item() <= TOL, b
    assert len(set(map(tuple, batch_counts.tolist()))) > 1  # the images did keep different counts


@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("prefix", [1, 5])
def test_per_image_counts_match_a_plain_per_image_reference(method, placement, fuse, prefix):
    model = make(method, prefix)
    ice_prune.unpatch(model)
    ice_prune.patch(model, method=method, placement=placement, fuse=fuse)
    if method == "ice":
        torch.nn.init.normal_(model.ice_head.fc.weight, std=0.02)
        torch.nn.init.normal_(model.ice_head.fc.weight[-1], std=1.0)
    x = images()
    shares = dict(min_share=0.2, max_share=0.9)
    with torch.no_grad():
        value = adaptive_value(model, x, method, placement=placement, fuse=fuse, **shares)
        model.keep_policy = policy(method, value, **shares)
        out = model(x)
        counts = torch.stack(model.ice_keep_counts, dim=1).tolist()
        for b in range(x.shape[0]):
            ref, ref_counts, _ = reference_forward(model, x[b:b + 1], method, value, **shares,
                                                   placement=placement, fuse=fuse)
            assert counts[b] == ref_counts, b
            assert (out[b] - ref[0]).abs().max().item() <= TOL, b
            # the library's dense fixed-keep path, the image alone, at the same counts
            model.keep_policy = None
            n, rates = 16, []
            for k in ref_counts:
                rates.append((k - 0.5) / n)  # ceil(rate * n) == k
                n = k + int(fuse and k < n)
            model.keep_rate = rates
            dense = model(x[b:b + 1])
            assert (out[b] - dense[0]).abs().max().item() <= TOL, b
            model.keep_policy = policy(method, value, **shares)


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_a_model_with_qk_norm_matches_the_dense_path_at_its_counts(method):
    """timm's ``qk_norm=True`` (q and k layer-normed per head before attention): the packed
    attention reads the normed q and k, as timm's dense attention does."""
    model = make(method, qk_norm=True)
    for block in model.blocks:
        for norm in (block.attn.q_norm, block.attn.k_norm):
            torch.nn.init.uniform_(norm.weight, 0.5, 2.0)
            torch.nn.init.normal_(norm.bias, std=0.5)
    x = images()
    with torch.no_grad():
        value = adaptive_value(model, x, method)
        model.keep_policy = policy(method, value)
        out = model(x)
        counts = torch.stack(model.ice_keep_counts, dim=1).tolist()
        model.keep_policy = None
        for b in range(x.shape[0]):
            n, rates = 16, []
            for k in counts[b]:
                rates.append((k - 0.5) / n)  # ceil(rate * n) == k
                n = k + int(k < n)
            model.keep_rate = rates
            assert (out[b] - model(x[b:b + 1])[0]).abs().max().item() <= TOL, b


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                     num_splits=None):
    """torch's ``varlen_attn`` as its documentation states it (``[T, H, d]`` rows, int32
    cumulative sequence starts, the longest sequence), with the attention matrix materialized; it
    also checks what the packed path passes."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    bounds = cu_seq_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
    assert num_splits == 1  # split-KV would make an image's result depend on the batch
    out = torch.full_like(query, torch.nan)
    for a, b in zip(bounds, bounds[1:]):
        q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))  # [H, L, d]
        out[a:b] = ((q @ k.transpose(-2, -1) * scale).softmax(-1) @ v).transpose(0, 1)
    return out


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_the_variable_length_attention_path_matches_the_per_image_loop(method, monkeypatch):
    """CUDA's path (one ``varlen_attn`` call, EViT's row from one segment softmax), taken here
    with a stand-in for the kernel written from its documentation: the same counts and logits as
    the loop of scaled-dot-product attention."""
    from ice_prune import packed

    model = make(method, prefix=5 if method == "ice" else 1)
    x = images()
    with torch.no_grad():
        model.keep_policy = policy(method, adaptive_value(model, x, method))
        loop = model(x)
        loop_counts = [c.tolist() for c in model.ice_keep_counts]
        monkeypatch.setattr(packed, "use_varlen", lambda rows, head_dim: True)
        monkeypatch.setattr(packed, "_varlen_attn", lambda: reference_varlen)
        varlen = model(x)
    assert [c.tolist() for c in model.ice_keep_counts] == loop_counts
    assert len(set(map(tuple, zip(*loop_counts)))) > 1  # the images kept different counts
    assert (varlen - loop).abs().max().item() <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ice", "evit"])
def test_cuda_alone_and_in_a_batch(method):
    """On CUDA: fp32 with TF32 off (the per-image loop), an image alone and in a batch within 1e-4;
    bf16 (``varlen_attn`` where torch has it), the same counts and top-1."""
    from ice_prune import packed

    # a head size flash attention takes (16)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                              num_heads=2, num_classes=5).eval().cuda()
    ice_prune.patch(model, method=method)
    x = images().cuda()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        model.keep_policy = policy(method, adaptive_value(model, x, method))
        for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, None)]:
            model.to(dtype)
            batch = model(x.to(dtype)).float()
            batch_counts = torch.stack(model.ice_keep_counts, dim=1)
            for b in range(x.shape[0]):
                alone = model(x[b:b + 1].to(dtype)).float()
                assert torch.equal(torch.stack(model.ice_keep_counts, dim=1)[0], batch_counts[b])
                if tol is None:
                    assert alone[0].argmax() == batch[b].argmax(), b
                else:
                    assert (alone[0] - batch[b]).abs().max().item() <= tol, b
    print("bf16 took varlen_attn:", packed.use_varlen(x.to(torch.bfloat16), 16))


def test_sorted_layout_by_hand():
    """Images sorted by their row count (ties in their order), each its own rows, the batch order
    kept in ``order`` and given back by ``to_batch``; runs of one length are one attention call."""
    from ice_prune import packed

    lengths = (3, 1, 2, 1)  # image b's rows hold 10 * b + its row number
    offsets = torch.tensor([0, 3, 4, 6, 7])
    rows = torch.tensor([0., 1, 2, 10, 20, 21, 30])[:, None]
    out, segments = packed.sorted_layout(rows, offsets, lengths)
    assert out[:, 0].tolist() == [10, 30, 20, 21, 0, 1, 2]
    assert segments.lengths == (1, 1, 2, 3) and segments.order == (1, 3, 2, 0)
    assert segments.offsets.tolist() == [0, 1, 2, 4, 7]
    assert segments.runs == ((0, 2, 1), (2, 1, 2), (4, 1, 3))
    assert segments.to_batch(torch.tensor([1, 3, 2, 0])).tolist() == [0, 1, 2, 3]
    # a second packing composes the orders: packed image i is batch image order[i]
    again, twice = packed.sorted_layout(out, segments.offsets, (1, 1, 2, 1), segments.order,
                                        trim=True)
    assert twice.order == (1, 3, 0, 2) and twice.lengths == (1, 1, 1, 2)
    assert again[:, 0].tolist() == [10, 30, 0, 20, 21]
    assert twice.to_batch(torch.tensor([1, 3, 0, 2])).tolist() == [0, 1, 2, 3]
    # trimmed: each image's first lengths[b] rows; already sorted and untrimmed: nothing moves
    cut, trimmed = packed.sorted_layout(rows, offsets, (1, 1, 1, 1), trim=True)
    assert cut[:, 0].tolist() == [0, 10, 20, 30] and trimmed.order is None
    same, kept = packed.sorted_layout(rows, torch.tensor([0, 1, 3, 7]), (1, 2, 4))
    assert same is rows and kept.order is None and kept.to_batch(rows) is rows


@pytest.mark.parametrize("lengths", [(5, 9, 1, 3, 9, 8), (6, 6, 6), (4, 4, 9, 4)])
def test_bucketed_attention_is_each_image_alone(lengths):
    from ice_prune import packed

    torch.manual_seed(0)
    q, k, v = torch.randn(3, sum(lengths), 2, 8).unbind(0)  # [T, H, d]
    offsets = torch.tensor((0,) + lengths).cumsum(0)
    segments = packed.Segments(offsets, lengths)
    assert len(segments.runs) == len([b for b in range(len(lengths))
                                      if b == 0 or lengths[b] != lengths[b - 1]])
    out = packed.bucketed_attention(torch.stack((q, k, v), dim=1), segments)
    for b, length in enumerate(lengths):
        a = offsets[b]
        qi, ki, vi = (t[a:a + length].transpose(0, 1) for t in (q, k, v))
        alone = ((qi @ ki.transpose(-2, -1) / 8 ** 0.5).softmax(-1) @ vi).transpose(0, 1)
        assert (out[a:a + length] - alone).abs().max().item() <= 1e-6, b


def test_segment_cls_row_is_each_image_alone():
    from ice_prune import packed
    from ice_prune.integrations.common import cls_attention_row

    torch.manual_seed(0)
    lengths = (5, 9, 1, 3)
    q, k = torch.randn(2, sum(lengths), 3, 8).unbind(0)  # [T, H, d]
    offsets = torch.tensor([0, 5, 14, 15, 18])
    row = packed.segment_cls_row(q, k, packed.Segments(offsets, lengths), 0.4)
    for b, length in enumerate(lengths):
        a = offsets[b]
        alone = cls_attention_row(q[None, a:a + length].transpose(1, 2),
                                  k[None, a:a + length].transpose(1, 2), 0.4)[0]
        assert (row[a:a + length] - alone).abs().max().item() <= 1e-6, b


@pytest.mark.parametrize("method, prefix", [("ice", 5), ("evit", 1)])
def test_an_image_keeping_every_token_beside_images_that_drop(method, prefix):
    """The first point packs the batch, and an image that keeps all its tokens there gets no fused
    token, as it would alone (where the batch stays dense)."""
    model = make(method, prefix)
    x = images()

    def first_point_mixed(counts):
        return any(c[0] == 16 for c in counts) and any(c[0] < 16 for c in counts)

    with torch.no_grad():
        value = adaptive_value(model, x, method, require=first_point_mixed)
        model.keep_policy = policy(method, value)
        out = model(x)
        counts = torch.stack(model.ice_keep_counts, dim=1).tolist()
        assert first_point_mixed(counts)
        for b in range(x.shape[0]):
            ref, ref_counts, _ = reference_forward(model, x[b:b + 1], method, value)
            assert counts[b] == ref_counts
            assert (out[b] - ref[0]).abs().max().item() <= TOL, b
            assert (out[b] - model(x[b:b + 1])[0]).abs().max().item() <= TOL, b


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_equal_share_bounds_are_the_fixed_keep_rate(method):
    model = make(method)
    x = images()
    with torch.no_grad():
        model.keep_rate = 0.5
        dense = model(x)
        model.keep_policy = policy(method, 0.5, min_share=0.5, max_share=0.5)
        out = model(x)
    assert [c.tolist() for c in model.ice_keep_counts] == [[8] * 4, [5] * 4, [3] * 4]
    assert (out - dense).abs().max().item() <= TOL


def test_the_fixed_keep_path_is_untouched_by_an_unset_policy():
    model = make("ice")
    x = images()
    with torch.no_grad():
        model.keep_rate = 0.5
        before = model(x)
        model.keep_policy = KeepPolicy(threshold=0.5)
        model(x)
        model.keep_policy = None
        after = model(x)
    assert torch.equal(before, after) and model.ice_keep_counts == []


# ----------------------------------------------------------------------------- the count
def sizes_seen(counts, n=16):
    """The non-prefix tokens each point saw, from an image's counts there (fusion on)."""
    seen = []
    for k in counts:
        seen.append(n)
        n = k + int(k < n)
    return seen


def dense_rates(counts):
    """Keep rates with which the dense fixed-keep path keeps exactly ``counts`` at the points."""
    return [(k - 0.5) / n for k, n in zip(counts, sizes_seen(counts))]  # ceil(rate * n) == k


def scoring_macs(model, method, placement, n, packed=False):
    """The cost of scoring ``n`` non-prefix tokens at a point that then keeps them all: a dense
    point keeping every token skips it, a policy cannot (the scores give the count). ICE: its head
    on each token and, with EViT's placement, the norm2 the head reads (5 per element, as fvcore
    counts a layer norm); EViT: the [CLS] row against the prefix and the n tokens, H multiply-adds
    per key element on a dense batch (the block-diagonal product of ``cls_attention_row``), one on
    a packed one (``packed.segment_cls_row``)."""
    P, D = model.num_prefix_tokens, model.embed_dim
    if method == "ice":
        head = n * D * model.ice_head.fc.out_features
        return head + (5 * D * (P + n) if placement == "attn" else 0)
    return (1 if packed else model.blocks[0].attn.num_heads) * D * (P + n)


@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("prefix", [1, 5])
def test_count_flops_on_images_is_each_image_alone_at_its_counts(method, placement, prefix):
    """``count_flops(images=x)`` of a policy is the sum over the images of the dense fixed-keep
    path's count, the image alone at its own counts, plus the scoring at the points where it kept
    every token (which the dense path skips). Both counters; the fused rows of the packed points
    (``index_add``) and the scores of the packed rows are where they could differ."""
    model = make(method, prefix)
    ice_prune.unpatch(model)
    ice_prune.patch(model, method=method, placement=placement)
    if method == "ice":
        torch.nn.init.normal_(model.ice_head.fc.weight, std=0.02)
        torch.nn.init.normal_(model.ice_head.fc.weight[-1], std=1.0)
    x = images()

    def both_terms(counts):
        """Some image keeps every token at a point, and some image drops tokens at a point after
        the batch was packed (fused rows summed by the packed reorganize)."""
        drops = [[k < n for k, n in zip(c, sizes_seen(c))] for c in counts]
        first = min((i for d in drops for i, dropped in enumerate(d) if dropped), default=None)
        return (any(not all(d) for d in drops) and first is not None
                and any(any(d[first + 1:]) for d in drops))

    with torch.no_grad():
        value = adaptive_value(model, x, method, require=both_terms, placement=placement)
        model.keep_policy = policy(method, value)
        model(x)
        counts = torch.stack(model.ice_keep_counts, dim=1).tolist()
    assert both_terms(counts) and len(set(map(tuple, counts))) > 1
    # the first point where an image drops packs the batch; the points after it score packed rows
    first = min(i for c in counts for i, (k, n) in enumerate(zip(c, sizes_seen(c))) if k < n)
    keep_all = [(n, i > first) for c in counts for i, (k, n) in enumerate(zip(c, sizes_seen(c)))
                if k == n]
    # EViT's [CLS] row on packed rows: one multiply-add per key element, H on the dense path
    H, D, P = model.blocks[0].attn.num_heads, model.embed_dim, model.num_prefix_tokens
    packed_drops = sum(P + n for c in counts for i, (k, n) in enumerate(zip(c, sizes_seen(c)))
                       if i > first and k < n)
    for counter in ("fvcore", "torch"):
        got = ice_prune.count_flops(model, images=x, counter=counter)
        expected = sum(scoring_macs(model, method, placement, n, p) for n, p in keep_all)
        if method == "evit":  # the dense path alone counts the row H times where it drops
            expected -= (H - 1) * D * packed_drops
        model.keep_policy = None
        for b in range(x.shape[0]):
            model.keep_rate = dense_rates(counts[b])
            expected += ice_prune.count_flops(model, images=x[b:b + 1], counter=counter)
        model.keep_policy = policy(method, value)
        assert got == expected, counter


# ----------------------------------------------------------------------------- the pieces
def _loop(rows, scores, offsets, counts, P, fuse, normalize):
    parts, out_offsets = [], [0]
    for b, k in enumerate(counts.tolist()):
        x = rows[offsets[b]:offsets[b + 1]][None]
        n = x.shape[1] - P
        out = x if k == n else reorganize_reference(x, scores[b:b + 1, :n], k, P, fuse,
                                                    normalize)[0]
        if k == n:  # nothing dropped: the same rows, in rank order
            order = torch.argsort(scores[b, :n], descending=True, stable=True)
            out = torch.cat([x[:, :P], x[:, P:][:, order]], dim=1)
        parts.append(out[0])
        out_offsets.append(out_offsets[-1] + out.shape[1])
    return torch.cat(parts), torch.tensor(out_offsets)


@pytest.mark.parametrize("P", [1, 5])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_reorganize_packed_matches_the_per_image_loop(P, fuse, normalize):
    sizes = [7, 3, 12, 1, 9]
    counts = torch.tensor([4, 3, 1, 1, 9])  # two images keep all their tokens
    D, n_max = 6, max(sizes)
    offsets = torch.tensor([0] + [P + n for n in sizes]).cumsum(0)
    rows = torch.randn(int(offsets[-1]), D)
    scores = torch.rand(len(sizes), n_max)
    scores[0, 1] = scores[0, 4]  # a tie ranks the lower row first
    total = sum(P + k + int(fuse and k < n) for k, n in zip(counts.tolist(), sizes))
    out, out_offsets = reorganize_packed_reference(rows, scores, offsets, counts, total, P, fuse,
                                                   normalize)
    expected, expected_offsets = _loop(rows, scores, offsets, counts, P, fuse, normalize)
    assert torch.equal(out_offsets, expected_offsets)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", [KeepPolicy(threshold=0.5, min_share=0.2, max_share=0.8),
                                  KeepPolicy(mass=0.6, min_share=0.1)])
def test_counts_of_padded_scores_are_each_image_alone(rule):
    sizes = torch.tensor([7, 3, 12, 1])
    scores = torch.rand(4, 12)
    got = rule.keep_counts(scores, sizes)
    alone = torch.cat([rule.keep_counts(scores[b:b + 1, :n]) for b, n in enumerate(sizes.tolist())])
    assert torch.equal(got, alone)


# ----------------------------------------------------------------------------- refusals
def test_refusals_name_the_fix():
    x = images(2)
    for method, wrong, fix in (("evit", KeepPolicy(threshold=0.5), "method='ice'"),
                               ("ice", KeepPolicy(mass=0.5), "method='evit'")):
        model = make(None)
        with pytest.raises(ValueError, match=fix):
            ice_prune.patch(model, method=method, keep_policy=wrong)
        assert not isinstance(model, ICEModel)  # refused before patching
        ice_prune.patch(model, method=method)
        with pytest.raises(ValueError, match=fix):
            model.keep_policy = wrong
    with pytest.raises(TypeError, match="KeepPolicy"):
        model.keep_policy = 0.5

    model = make("ice")
    model.keep_policy = KeepPolicy(threshold=0.5)
    model.train()
    with pytest.raises(ValueError, match=r"eval mode.*model.eval\(\)"):
        model(x)
    model.eval()
    for knob in ("trace", "explain"):
        with pytest.raises(ValueError, match="trace or explain"):
            setattr(model, knob, True)
    model.keep_policy = None
    model.trace = True
    with pytest.raises(ValueError, match="model.trace = False"):
        model.keep_policy = KeepPolicy(threshold=0.5)
    with pytest.raises(ValueError, match="trace or explain"):
        ice_prune.patch(make(None), trace=True, keep_policy=KeepPolicy(threshold=0.5))

    with pytest.raises(ValueError, match="global_pool='token'"):
        ice_prune.patch(make(None, global_pool="avg"), keep_policy=KeepPolicy(threshold=0.5))
    model = make("ice")
    model.keep_policy = KeepPolicy(threshold=0.5)
    model.reset_classifier(5, global_pool="avg")
    with pytest.raises(ValueError, match="global_pool='token'"):
        model(x)


def test_onnx_export_is_refused(tmp_path):
    pytest.importorskip("onnxscript")
    from ice_prune.export import export_onnx
    model = make("ice")
    model.keep_policy = KeepPolicy(threshold=0.5)
    with pytest.raises(ValueError, match="model.keep_policy = None"):
        export_onnx(model, images(1), tmp_path / "model.onnx")


def test_transformers_models_are_refused():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                    num_hidden_layers=4, num_attention_heads=2,
                                    intermediate_size=64, num_labels=5)
    model = transformers.ViTForImageClassification(config).eval()
    with pytest.raises(ValueError, match="timm VisionTransformers only"):
        ice_prune.patch(model, method="evit", locs=(1, 2), keep_policy=KeepPolicy(mass=0.7))
    ice_prune.patch(model, method="evit", locs=(1, 2))
    with pytest.raises(ValueError, match="timm VisionTransformers only"):
        model.keep_policy = KeepPolicy(mass=0.7)
