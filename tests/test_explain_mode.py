"""Explain mode: one pruned forward also leaves the ICE map over the full patch grid
(``model.ice_explanation``). Checked against a plain forward written here, which applies the head by
hand at each selection point and reads each patch at its last scoring."""
import math

import pytest
import timm
import torch

import ice_prune

LOCS = (1, 2, 3)


def tiny(name="vit_tiny_patch16_224", **kw):
    """A 4-block ViT on 32 px images of 8 px patches: a 4 x 4 grid."""
    return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=4,
                             num_classes=5, **kw).eval()


def patched(model=None, keep_rate=0.5, **kw):
    model = ice_prune.patch(model if model is not None else tiny(), keep_rate=keep_rate,
                            method="ice", locs=LOCS, explain=True, **kw)
    with torch.no_grad():  # a head that separates tokens (the fresh one scores them all alike)
        for p in model.ice_head.parameters():
            p.normal_(std=0.05)
    return model


def head_at(model, j):
    return model.ice_head[j] if isinstance(model.ice_head, torch.nn.ModuleList) else model.ice_head


def plain_map(model, x, keep_rate, placement="attn", fuse=True):
    """``(logits, foreground [B, H*W], point [B, H*W])`` by a plain forward of the patched model's
    weights: at each point the head's ``1 - softmax(.)[bg]`` of every token, written over the patch
    the token stands for (a fused token stands for none), then top-k and the score-weighted mean of
    the dropped tokens, image by image."""
    P = model.num_prefix_tokens
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    B, n0 = t.shape[0], t.shape[1] - P
    fg = torch.full((B, n0), float("nan"), dtype=torch.float64)
    point = torch.full((B, n0), -1, dtype=torch.int64)
    patches = [list(range(n0)) for _ in range(B)]  # per image: each token's patch, None if fused

    def select(t, normed, j):
        score = 1 - head_at(model, j)(normed[:, P:]).double().softmax(dim=-1)[..., -1]
        for b in range(B):
            for r, patch in enumerate(patches[b]):
                if patch is not None:
                    fg[b, patch], point[b, patch] = score[b, r], j
        n = t.shape[1] - P
        k = math.ceil(keep_rate * n)
        if k >= n:
            return t
        rows = []
        for b in range(B):
            idx = torch.topk(score[b], k).indices
            dropped = [r for r in range(n) if r not in idx.tolist()]
            row = [t[b, :P], t[b, P:][idx]]
            if fuse:
                w = score[b, dropped] / score[b, dropped].sum()
                row.append((t[b, P:][dropped].double() * w[:, None]).sum(0, keepdim=True).float())
            rows.append(torch.cat(row))
            patches[b] = [patches[b][r] for r in idx.tolist()] + ([None] if fuse else [])
        return torch.stack(rows)

    for i, blk in enumerate(model.blocks):
        t = t + blk.ls1(blk.attn(blk.norm1(t)))
        if i in LOCS and placement == "attn":
            t = select(t, blk.norm2(t), LOCS.index(i))
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        elif i in LOCS:
            normed = blk.norm2(t)
            t = select(t + blk.ls2(blk.mlp(normed)), normed, LOCS.index(i))
        else:
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t)), fg.float(), point


def check_against_plain(model, x, keep_rate, **kw):
    with torch.no_grad():
        logits = model(x)
        ref_logits, ref_fg, ref_point = plain_map(model, x, keep_rate, **kw)
    e = model.ice_explanation
    assert e.foreground.dtype == torch.float32 and e.point.dtype == torch.int64
    assert e.foreground.shape == e.point.shape == (x.shape[0], 16) and e.grid == (4, 4)
    assert e.foreground.view(-1, *e.grid).shape == e.point.view(-1, *e.grid).shape == (len(x), 4, 4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)  # the same tokens were kept
    torch.testing.assert_close(e.foreground, ref_fg, atol=1e-5, rtol=0)
    assert torch.equal(e.point, ref_point)
    return e


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
def test_map_matches_plain_recomputation(placement, fuse, keep_rate):
    model = patched(keep_rate=keep_rate, placement=placement, fuse=fuse)
    e = check_against_plain(model, torch.randn(3, 3, 32, 32), keep_rate, placement=placement,
                            fuse=fuse)
    assert set(e.point.unique().tolist()) == {0, 1, 2}  # dropped at each point, or kept to the end


def test_per_location_heads():
    model = patched(heads="per_location")
    check_against_plain(model, torch.randn(2, 3, 32, 32), 0.5)


@pytest.mark.parametrize("kind", ["registers", "distilled"])
def test_prefix_tokens_are_not_in_the_map(kind):
    model = (tiny(reg_tokens=4, no_embed_class=True) if kind == "registers"
             else tiny("deit_tiny_distilled_patch16_224"))
    assert model.num_prefix_tokens == (5 if kind == "registers" else 2)
    check_against_plain(patched(model), torch.randn(2, 3, 32, 32), 0.5)


def test_keep_rate_one_scores_every_patch_at_the_last_point_and_changes_nothing():
    base = tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unpatched = base(x)
        # the tokens the last point's head reads, from the unpatched blocks
        t = base.norm_pre(base._pos_embed(base.patch_embed(x)))
        for blk in base.blocks[:LOCS[-1]]:
            t = blk(t)
        last = base.blocks[LOCS[-1]]
        h = last.norm2(t + last.ls1(last.attn(last.norm1(t))))
        model = patched(base, keep_rate=1.0)
        out = model(x)
        want = 1 - model.ice_head(h[:, 1:]).double().softmax(dim=-1)[..., -1]
    e = model.ice_explanation
    assert torch.equal(out, unpatched)
    torch.testing.assert_close(e.foreground, want.float(), atol=1e-5, rtol=0)
    assert (e.point == len(LOCS) - 1).all()
    model.train()  # the training loss sees no extra logits where nothing is selected
    model(x)
    assert model.ice_logits == [] and model.ice_explanation.foreground.shape == (2, 16)


def test_batch_independence():
    model = patched()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(x)
        together = model.ice_explanation
        for b in range(4):
            model(x[b:b + 1])
            alone = model.ice_explanation
            torch.testing.assert_close(alone.foreground, together.foreground[b:b + 1], atol=1e-5,
                                       rtol=0)
            assert torch.equal(alone.point, together.point[b:b + 1])


def test_fused_and_logits_score_paths_agree():
    model = patched()
    x = torch.randn(3, 3, 32, 32)
    calls = []
    hook = model.ice_head.fc.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(x)  # eval, no trace, no grad: the fused score, no logits
        fused = model.ice_explanation
        assert calls == [] and model.ice_logits == []
        with torch.enable_grad():  # autograd through the head: the logits path
            model(x)
        unfused = model.ice_explanation
    hook.remove()
    assert len(calls) == len(LOCS) and model.ice_logits == []
    torch.testing.assert_close(fused.foreground, unfused.foreground, atol=1e-5, rtol=0)
    assert torch.equal(fused.point, unfused.point)


@pytest.mark.parametrize("keep_rate", [0.5, 1.0])
@pytest.mark.parametrize("config", [{}, {"heads": "per_location"}, {"trace": True},
                                    {"placement": "block", "fuse": False}], ids=str)
def test_logits_bit_identical_with_explain_on_and_off(keep_rate, config):
    model = patched(keep_rate=keep_rate, **config)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        on = model(x)
        assert model.ice_explanation is not None
        model.explain = False
        off = model(x)
        assert model.ice_explanation is None
    assert torch.equal(on, off)


def test_fullgraph_compile_gives_the_same_map():
    torch._dynamo.reset()
    model = patched()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_logits = model(x)
        ref = model.ice_explanation
        logits = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    e = model.ice_explanation
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(e.foreground, ref.foreground, atol=1e-5, rtol=0)
    assert torch.equal(e.point, ref.point) and e.grid == (4, 4)


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit-distilled"])
def test_transformers_gives_the_timm_models_map(distilled):
    pytest.importorskip("transformers")
    from test_transformers import pair

    tm, hf = pair(distilled)  # the same network in both libraries
    x = torch.randn(3, 3, 32, 32)
    patched(tm)
    ice_prune.patch(hf, keep_rate=0.5, method="ice", locs=LOCS, explain=True)
    hf.ice_head.load_state_dict(tm.ice_head.state_dict())
    e_t = check_against_plain(tm, x, 0.5)
    with torch.no_grad():
        on = hf(x).logits
        e_h = hf.ice_explanation
        hf.explain = False
        off = hf(x).logits
    assert torch.equal(on, off)
    torch.testing.assert_close(e_h.foreground, e_t.foreground, atol=1e-5, rtol=0)
    assert torch.equal(e_h.point, e_t.point) and e_h.grid == e_t.grid


def test_evit_is_refused_with_the_fix():
    model = tiny()
    with pytest.raises(ValueError, match="method='ice'"):
        ice_prune.patch(model, method="evit", locs=LOCS, explain=True)
    assert type(model) is timm.models.vision_transformer.VisionTransformer  # left as it was
    ice_prune.patch(model, method="evit", locs=LOCS)
    with pytest.raises(ValueError, match="method='ice'"):
        model.explain = True
    assert model.explain is False


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops a forward dispatches (views and metadata excluded): a GPU runs one or more
    launches for each."""

    FREE = ("view", "expand", "slice", "select", "unsqueeze", "squeeze", "alias", "t.", "detach",
            "empty", "_unsafe_view", "as_strided", "transpose", "permute", "split")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not str(func).split("aten.")[-1].startswith(self.FREE):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_the_map_adds_few_ops_to_the_pruned_forward(kernel):
    """What explain mode dispatches beyond the pruned forward's own ops, counted: on the Triton
    kernel the score op writes the map itself, so the map adds only the patch bookkeeping (an arange
    at the first point; a gather and a cat per point that drops tokens), and on the torch
    path one scatter per field per point besides (the map's four buffers are created empty, and the
    fields are views: no fills, no copies at the end). The score op of each point is swapped, not
    added."""
    model = patched(kernel=kernel)
    x = torch.randn(2, 3, 32, 32)
    counts = {}
    with torch.no_grad():
        for explain in (False, True):
            model.explain = explain
            model(x)  # warm
            with _OpCounter() as counter:
                model(x)
            counts[explain] = counter.ops
    plain, explained = counts[False], counts[True]
    swapped = "ice_prune.ice_score_into_map" if kernel == "triton" else "ice_prune.ice_score_top_class"
    assert sum(op.startswith("ice_prune.ice_score.") for op in plain) == len(LOCS)
    assert sum(op.startswith(swapped) for op in explained) == len(LOCS)
    scatters = 0 if kernel == "triton" else 4 * len(LOCS)
    assert len(explained) - len(plain) == 1 + 2 * len(LOCS) + scatters, (
        sorted(set(explained) - set(plain)), len(explained), len(plain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_explain_mode_captures_in_a_cuda_graph():
    """One forward captured as a CUDA graph (the benchmark's capture): each replay writes the
    logits and the map (Triton kernel: from the score op's epilogue) over the captured tensors, and
    they equal an eager forward's on the same images. The head's cast is made in the warm-up and
    read from the cache inside the capture."""
    from ice_prune.throughput import _capture_cuda_graph

    model = patched(tiny().cuda())
    with torch.no_grad():
        replay = _capture_cuda_graph(model, torch.randn(2, 3, 32, 32, device="cuda"))
        captured = model.ice_explanation
        for seed in (1, 2):
            x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda()
            logits = replay(x)
            torch.cuda.synchronize()
            got = [logits.clone()] + [field.clone() for field in captured[:2] + captured[3:]]
            want_logits = model(x)
            e = model.ice_explanation
            torch.testing.assert_close(got[0], want_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(got[1], e.foreground, atol=1e-5, rtol=0)
            assert torch.equal(got[2], e.point) and torch.equal(got[3], e.top_class)
            torch.testing.assert_close(got[4], e.top_prob, atol=1e-5, rtol=0)
            assert set(got[2].unique().tolist()) == {0, 1, 2}
