"""ice_prune.restore: pruned tokens back on the full patch grid, checked against the trace's recorded
positions, against a plain re-computation of which token each patch ends up in, and against explain
mode's map of the same forward."""
import pytest
import timm
import torch

import ice_prune

MODELS = {
    "deit_tiny": ("deit_tiny_patch16_224", dict(img_size=96)),  # 36 patches, 1 prefix token
    "reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=84, num_classes=10)),  # 5 prefix
    "distilled": ("deit_small_distilled_patch16_224", dict(img_size=96)),  # CLS + dist
}


def traced(name, method, keep_rate, fuse=True, batch=3):
    timm_name, kwargs = MODELS[name]
    model = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    ice_prune.patch(model, keep_rate=keep_rate, method=method, fuse=fuse, trace=True)
    x = torch.randn(batch, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        tokens = model.forward_features(x)
    return model, tokens, model.ice_trace


def plain_sources(trace, b):
    """Which final token each patch reads, by following sets of patches through the points.

    Each token is the set of patches it stands for; at a point the tokens are ranked by the recorded
    scores (descending, ties by position), the first ``keep`` stay in that order and the union of the
    rest becomes one new token appended last (or is lost without fusion)."""
    gh, gw = trace["grid"]
    tokens = [{p} for p in range(gh * gw)]
    for loc in trace["locations"]:
        scores = loc["scores"][b].tolist()
        ranked = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))
        kept = [tokens[i] for i in ranked[:loc["keep"]]]
        dropped = set().union(*(tokens[i] for i in ranked[loc["keep"]:]))
        tokens = kept + ([dropped] if loc["fused"] is not None else [])
    sources = [-1] * (gh * gw)
    for j, members in enumerate(tokens):
        for p in members:
            sources[p] = j
    return sources


@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("name", list(MODELS))
def test_restore_matches_plain_recomputation_and_trace(name, method):
    model, tokens, trace = traced(name, method, keep_rate=0.6)
    P, (gh, gw) = model.num_prefix_tokens, trace["grid"]
    assert len(trace["locations"]) == 3
    out = ice_prune.restore(tokens, trace)
    assert out.shape == (tokens.shape[0], P + gh * gw, tokens.shape[2])
    assert torch.equal(out[:, :P], tokens[:, :P])  # prefix tokens stay in place
    # the composed cases occur: an earlier fused token kept at a later point, or fused again
    kept_again = sum(int((loc["kept"] < 0).sum()) for loc in trace["locations"])
    fused_again = sum(int((loc["fused"] < 0).sum()) for loc in trace["locations"])
    assert fused_again > 0
    if method == "evit":
        assert kept_again > 0
    for b in range(tokens.shape[0]):
        sources = plain_sources(trace, b)
        assert min(sources) >= 0  # with fusion every patch reads some token
        for p, j in enumerate(sources):
            assert torch.equal(out[b, P + p], tokens[b, P + j])
        # the trace's own record of the last point: kept patches in place, its fused patches
        # (those still standing before it) read the last token
        last = trace["locations"][-1]
        for j, p in enumerate(last["kept"][b].tolist()):
            if p >= 0:
                assert torch.equal(out[b, P + p], tokens[b, P + j])
        for p in last["fused"][b].tolist():
            if p >= 0:
                assert torch.equal(out[b, P + p], tokens[b, -1])


@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("name", ["deit_tiny", "reg4"])
def test_restore_without_fusion_gives_zeros_at_dropped_patches(name, method):
    model, tokens, trace = traced(name, method, keep_rate=0.5, fuse=False)
    P = model.num_prefix_tokens
    out = ice_prune.restore(tokens, trace)
    assert torch.equal(out[:, :P], tokens[:, :P])
    mask = trace["locations"][-1]["mask"]
    for b in range(tokens.shape[0]):
        sources = plain_sources(trace, b)
        for p, j in enumerate(sources):
            assert (j >= 0) == bool(mask[b, p])
            expected = tokens[b, P + j] if j >= 0 else torch.zeros(tokens.shape[2])
            assert torch.equal(out[b, P + p], expected)
    assert (out[:, P:].abs().sum(-1) == 0).sum() == (~mask).sum()


@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("name", ["deit_tiny", "distilled"])
def test_restore_is_identity_at_keep_rate_one(name, method):
    model, tokens, trace = traced(name, method, keep_rate=1.0)
    assert trace["locations"] == []
    assert torch.equal(ice_prune.restore(tokens, trace), tokens)


def test_restore_reads_the_tokens_of_the_traced_forward():
    model, tokens, trace = traced("deit_tiny", "evit", keep_rate=0.5)
    with pytest.raises(ValueError, match="the trace ends with"):
        ice_prune.restore(tokens[:, :-1], trace)
    with pytest.raises(ValueError, match="batch"):
        ice_prune.restore(tokens[:1], trace)
    with pytest.raises(ValueError, match="model.trace = True"):
        ice_prune.restore(tokens, None)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
def test_restore_and_explanation_agree_on_the_fused_score_path(keep_rate, fuse, monkeypatch):
    """One eval forward with ``trace=True`` and ``explain=True`` runs ICE's fused score (the
    head's linear layer is never called, no logits kept), and restore's tokens and the map index
    the same patches: a patch kept to the end gets its own token in restore and the last point in
    the map; a patch dropped at point j reads what the trace says and has point j, its score from
    that point."""
    locs = (1, 2, 3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=4, num_classes=5).eval()
    ice_prune.patch(model, keep_rate=keep_rate, method="ice", locs=locs, fuse=fuse, trace=True,
                    explain=True)
    with torch.no_grad():  # a head that separates tokens (the fresh one scores them all alike)
        model.ice_head.fc.weight.normal_(std=0.05)
    fc_calls, fused_calls = [], []
    model.ice_head.fc.register_forward_hook(lambda *a: fc_calls.append(1))
    score = ice_prune.select.ice_score
    monkeypatch.setattr(ice_prune.select, "ice_score",
                        lambda *a, **k: fused_calls.append(1) or score(*a, **k))
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(3, 3, 32, 32))
    trace, e = model.ice_trace, model.ice_explanation
    assert fc_calls == [] and len(fused_calls) == len(locs) and model.ice_logits == []
    out = ice_prune.restore(tokens, trace)
    P, last = model.num_prefix_tokens, len(locs) - 1
    assert len(trace["locations"]) == len(locs)
    for b in range(tokens.shape[0]):
        seen = set()
        for j, loc in enumerate(trace["locations"]):
            order, scores, keep = loc["order"][b], loc["scores"][b], loc["keep"]
            gone = loc["fused"] if fuse else loc["dropped"]
            for r, p in enumerate(gone[b].tolist(), start=keep):  # dropped here, rank r
                if p >= 0:
                    assert int(e.point[b, p]) == j and float(e.foreground[b, p]) == scores[order[r]]
                    seen.add(p)
            if j < last:
                continue
            for r, p in enumerate(loc["kept"][b].tolist()):  # kept to the end, at final rank r
                if p >= 0:
                    assert torch.equal(out[b, P + p], tokens[b, P + r])
                    assert int(e.point[b, p]) == last
                    assert float(e.foreground[b, p]) == scores[order[r]]
                    seen.add(p)
        assert seen == set(range(16))  # every patch: kept to the end or dropped at one point
        for p, j in enumerate(plain_sources(trace, b)):  # restore of the dropped ones
            expected = tokens[b, P + j] if j >= 0 else torch.zeros(tokens.shape[2])
            assert torch.equal(out[b, P + p], expected)
