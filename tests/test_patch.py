"""ice_prune.patch on timm ViTs: exactness at keep rate 1, agreement with a separately written EViT /
ICE reference, token counts, prefix tokens, state dicts, run-time knobs and errors."""
import copy
import io
import math
import pickle

import pytest
import timm
import torch

import ice_prune
from ice_prune.integrations.timm import ICEBlock, ICEVisionTransformer

# (timm name, kwargs): small image sizes keep the suite fast; every family the issue names.
FAMILIES = {
    "deit_tiny": ("deit_tiny_patch16_224", dict(img_size=64)),
    "deit_small": ("deit_small_patch16_224", dict(img_size=64)),
    "deit_base": ("deit_base_patch16_224", dict(img_size=32)),
    "vit_small_augreg": ("vit_small_patch16_224", dict(img_size=64)),
    "deit3_small": ("deit3_small_patch16_224", dict(img_size=64)),  # LayerScale
    "reg4_dinov2": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, num_classes=10)),  # 5 prefix tokens
    "deit_distilled": ("deit_small_distilled_patch16_224", dict(img_size=64)),  # CLS + dist
}


def make(family, **kw):
    name, kwargs = FAMILIES[family]
    model = timm.create_model(name, pretrained=False, **{**kwargs, **kw}).eval()
    # LayerScale starts at 1e-5 (deit3) / 1 (dinov2): randomize so a dropped LayerScale shows
    for m in model.modules():
        if hasattr(m, "gamma"):
            torch.nn.init.uniform_(m.gamma, 0.5, 1.5)
    return model


def image_batch(model, batch=2):
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size)


# ----------------------------------------------------------------------------- the reference
def reference_forward(model, x, method, keep_rate, locs, placement="attn", fuse=True, head=None):
    """Deliberately plain forward with the attention matrix materialized and EViT's published rule:
    keep ceil(rate * (N - P)) tokens by head-mean [CLS] attention (or by ICE's 1 - P(background)),
    fuse the rest (EViT: attention-weighted sum; ICE: renormalized score-weighted mean), fused last."""
    P = model.num_prefix_tokens
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(t)
        B, N, C = h.shape
        qkv = a.qkv(h).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(C // a.num_heads)).softmax(dim=-1)
        o = a.proj(a.norm((attn @ v).transpose(1, 2).reshape(B, N, C)))
        t = t + blk.ls1(o)

        def select(t, normed):
            n = t.shape[1] - P
            kk = math.ceil(keep_rate * n)
            if kk >= n:
                return t
            if method == "evit":
                score = attn[:, :, 0, P:].mean(dim=1)
            else:
                p = head(normed[:, P:]).softmax(dim=-1)
                score = 1 - p[..., -1]
            idx = torch.topk(score, kk, dim=1, largest=True, sorted=True).indices
            dropped = torch.ones_like(score, dtype=torch.bool).scatter(1, idx, False)
            tokens = t[:, P:]
            kept = torch.stack([tokens[b, idx[b]] for b in range(B)])
            parts = [t[:, :P], kept]
            if fuse:
                d_tok = torch.stack([tokens[b][dropped[b]] for b in range(B)])
                w = torch.stack([score[b][dropped[b]] for b in range(B)])
                if method == "ice":
                    w = w / w.sum(dim=1, keepdim=True)
                parts.append((d_tok * w[..., None]).sum(dim=1, keepdim=True))
            return torch.cat(parts, dim=1)

        if i in locs and placement == "attn":
            t = select(t, blk.norm2(t))
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        elif i in locs:
            normed = blk.norm2(t)
            t = t + blk.ls2(blk.mlp(normed))
            t = select(t, normed)
        else:
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t))


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_rate_one_is_the_unpatched_model(family):
    model = make(family)
    x = image_batch(model)
    with torch.no_grad():
        ref = model(x)
        for method in ("ice", "evit"):
            for placement in ("attn", "block"):
                ice_prune.patch(model, keep_rate=1.0, method=method, placement=placement)
                out = model(x)
                assert (out - ref).abs().max().item() <= 1e-5, (method, placement)
                ice_prune.unpatch(model)


@pytest.mark.parametrize("family", ["deit_small", "deit3_small", "reg4_dinov2", "deit_distilled"])
@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
def test_evit_matches_reference(family, keep_rate):
    model = make(family)
    x = image_batch(model)
    with torch.no_grad():
        ref = reference_forward(model, x, "evit", keep_rate, (3, 6, 9))
        ice_prune.patch(model, keep_rate=keep_rate, method="evit")
        out = model(x)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("fuse", [True, False])
def test_ice_and_evit_match_reference_placements(placement, fuse):
    model = make("deit3_small")
    x = image_batch(model, batch=3)
    for method in ("evit", "ice"):
        ice_prune.patch(model, keep_rate=0.5, method=method, placement=placement, fuse=fuse)
        head = getattr(model, "ice_head", None)
        if head is not None:  # a trained-looking head: background logits spread so scores differ
            torch.nn.init.normal_(head.fc.weight, std=0.02)
            torch.nn.init.normal_(head.fc.weight[-1], std=1.0)
        with torch.no_grad():
            out = model(x)
            ref = reference_forward(model, x, method, 0.5, (3, 6, 9), placement, fuse, head)
        assert (out - ref).abs().max().item() <= 1e-5, method
        ice_prune.unpatch(model)


def test_avg_pool_model_pools_over_kept_and_fused_tokens():
    model = timm.create_model("vit_small_patch16_224", img_size=64, global_pool="avg",
                              class_token=True, fc_norm=True).eval()
    x = image_batch(model)
    with torch.no_grad():
        ref = reference_forward(model, x, "evit", 0.5, (3, 6, 9))
        ice_prune.patch(model, keep_rate=0.5, method="evit")
        out = model(x)
    assert (out - ref).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- token counts
def traced_counts(model, x):
    with torch.no_grad():
        model(x)
    return [loc["tokens_out"] for loc in model.ice_trace["locations"]]


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_token_counts_deit_small(method):
    model = timm.create_model("deit_small_patch16_224").eval()
    ice_prune.patch(model, keep_rate=0.7, method=method, trace=True)
    x = torch.randn(1, 3, 224, 224)
    assert traced_counts(model, x) == [140, 100, 72]  # EViT's published sequence
    model.keep_rate = 0.5  # 196 -> 98+2, 99 -> 50+2, 51 -> 26+2
    assert traced_counts(model, x) == [100, 52, 28]
    model.fuse = False  # 196 -> 98+1, 98 -> 49+1, 49 -> 25+1
    assert traced_counts(model, x) == [99, 50, 26]
    # per location; the first keeps everything and records nothing: 196 -> 138+2, 139 -> 70+2
    model.keep_rate, model.fuse = (1.0, 0.7, 0.5), True
    assert traced_counts(model, x) == [140, 72]


def test_token_counts_other_image_size_and_dynamic_size():
    model = timm.create_model("deit_tiny_patch16_224", img_size=384).eval()
    ice_prune.patch(model, keep_rate=0.7, trace=True)
    # 576 patches: ceil(403.2)+2=406, ceil(283.5)+2=286, ceil(199.5)+2=202
    assert traced_counts(model, torch.randn(1, 3, 384, 384)) == [406, 286, 202]
    assert ice_prune.token_schedule(577, 1, [0.7] * 3) == [406, 286, 202]

    dyn = timm.create_model("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True).eval()
    ice_prune.patch(dyn, keep_rate=0.5, method="evit", trace=True)
    assert traced_counts(dyn, torch.randn(1, 3, 64, 64)) == [10, 7, 5]  # 16 -> 8+2, 9 -> 5+2, 6 -> 3+2
    assert traced_counts(dyn, torch.randn(1, 3, 96, 64)) == [14, 9, 6]  # 24 -> 12+2, 13 -> 7+2, 8 -> 4+2
    assert dyn.ice_trace["grid"] == (6, 4)


def test_prefix_tokens_are_never_dropped_or_changed_by_selection():
    model = make("reg4_dinov2")
    ice_prune.patch(model, keep_rate=0.5, method="evit")
    P = model.num_prefix_tokens
    assert P == 5
    seen = []
    state = model._ice  # the selection step, observed through a wrapper
    orig = state.select

    def spy(x, *a, **k):
        out = orig(x, *a, **k)
        seen.append((x[:, :P].clone(), out[:, :P].clone()))
        return out

    state.select = spy
    with torch.no_grad():
        model(image_batch(model))
    assert len(seen) == 3
    for before, after in seen:
        assert torch.equal(before, after)


# ----------------------------------------------------------------------------- state and knobs
def test_state_dict_round_trip_and_unpatch():
    model = make("deit_small")
    x = image_batch(model)
    with torch.no_grad():
        plain = model(x)
    ice_prune.patch(model, keep_rate=0.7, method="ice")
    keys = set(model.state_dict())
    assert keys - set(timm.create_model("deit_small_patch16_224", img_size=64).state_dict()) == {
        "ice_head.fc.weight"}
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = ice_prune.patch(make("deit_small"), keep_rate=0.7, method="ice")
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        a, b = model(x), fresh(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain)
    ice_prune.unpatch(model)
    assert type(model).__name__ == "VisionTransformer" and not hasattr(model, "ice_head")
    with torch.no_grad():
        assert torch.equal(model(x), plain)


def test_parameter_count_of_ice_patched_deit_small():
    model = timm.create_model("deit_small_patch16_224")
    base = sum(p.numel() for p in model.parameters())
    assert round(base / 1e6, 2) == 22.05
    ice_prune.patch(model, method="ice")
    total = sum(p.numel() for p in model.parameters())
    assert total == base + 384 * 1001  # the paper's 22.4M: one shared 384 x 1001 head
    ice_prune.unpatch(model)
    ice_prune.patch(model, method="ice", heads="per_location")
    assert sum(p.numel() for p in model.parameters()) == base + 3 * 384 * 1001


def test_patched_model_pickles_and_deepcopies():
    model = ice_prune.patch(make("deit_tiny"), keep_rate=0.5)
    x = image_batch(model)
    with torch.no_grad():
        ref = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(clone(x), ref)
            clone.keep_rate = 1.0  # the copy has its own state
    assert model.keep_rate == 0.5


def test_keep_rate_knob_changes_behaviour_without_repatching():
    model = make("deit_tiny")
    x = image_batch(model)
    ice_prune.patch(model, keep_rate=0.5, method="evit")
    with torch.no_grad():
        half = model(x)
        model.keep_rate = 1.0
        full = model(x)
        ice_prune.unpatch(model)
        plain = model(x)
    assert torch.equal(full, plain) and not torch.allclose(half, plain)


def test_train_mode_gradients_reach_head_and_backbone_and_logits_recorded():
    model = make("deit_tiny").train()
    ice_prune.patch(model, keep_rate=0.5, method="ice")
    out = model(image_batch(model))
    assert [tuple(t.shape) for t in model.ice_logits] == [(2, 16, 1001), (2, 9, 1001), (2, 6, 1001)]
    (out.square().mean() + sum(t.mean() for t in model.ice_logits)).backward()
    assert model.ice_head.fc.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_evit_scores_receive_gradient_through_fusion():
    model = make("deit_tiny").train()
    ice_prune.patch(model, keep_rate=0.5, method="evit")
    state, P = model._ice, model.num_prefix_tokens
    seen = []  # per selection point: (tokens in, [CLS]-attention scores, tokens out)
    scores_of, select = state.selector.scores, state.select

    def spy_scores(*a, **k):
        scores, logits = scores_of(*a, **k)
        if scores.requires_grad:
            scores.retain_grad()
        seen.append([scores])
        return scores, logits

    def spy_select(x, *a, **k):
        out = select(x, *a, **k)
        out.retain_grad()
        seen[-1] = [x.detach(), seen[-1][0], out]
        return out

    state.selector.scores, state.select = spy_scores, spy_select
    model(image_batch(model)).square().sum().backward()
    assert len(seen) == 3
    for x, scores, out in seen:
        # the scores are the attention row itself, still in the graph back to the weights
        assert scores.requires_grad and scores.grad_fn is not None
        # fused = sum_i w_i x_i over the dropped tokens, so d loss / d w_i = <d loss / d fused, x_i>
        # for a dropped token and 0 for a kept one
        keep = out.shape[1] - P - 1
        kept = torch.topk(scores, keep, dim=1).indices
        expected = torch.einsum("bd,bnd->bn", out.grad[:, -1], x[:, P:]).scatter(1, kept, 0.0)
        assert expected.abs().amax(dim=1).min() > 0
        torch.testing.assert_close(scores.grad, expected, rtol=1e-4, atol=1e-6)


def test_batch_size_one():
    model = ice_prune.patch(make("deit_small"), keep_rate=0.7)
    with torch.no_grad():
        out = model(image_batch(model, batch=1))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_torch_compile_fullgraph_cpu():
    model = ice_prune.patch(make("deit_tiny"), keep_rate=0.5, method="ice")
    x = image_batch(model)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.allclose(compiled(x), ref, atol=1e-5)


def test_trace_and_kept_patches_picture():
    from ice_prune.visualize import kept_patches

    model = make("deit_tiny")  # 4 x 4 patches of 16 px
    ice_prune.patch(model, keep_rate=0.5, method="evit", trace=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    tr = model.ice_trace
    first, last = tr["locations"][0], tr["locations"][-1]
    assert first["kept"].shape == (1, 8) and first["fused"].shape == (1, 8)
    assert sorted(first["kept"][0].tolist() + first["fused"][0].tolist()) == list(range(16))
    # a patch stands as its own token at a later point only if it stood at the earlier one
    assert (last["mask"] <= first["mask"]).all()
    assert last["mask"].sum() == (last["kept"] >= 0).sum()
    img = kept_patches(x[0], tr)
    assert img.shape == (64, 64, 3) and img.dtype.name == "uint8"
    ref = (x[0].permute(1, 2, 0).numpy() * 255).round()
    m = last["mask"][0].reshape(4, 4)
    for r in range(4):
        for c in range(4):
            tile = img[16 * r:16 * r + 16, 16 * c:16 * c + 16].astype(float)
            if m[r, c]:
                assert (tile == ref[16 * r:16 * r + 16, 16 * c:16 * c + 16]).all()
            else:  # greyed: pulled to the grey level
                assert abs(tile.mean() - (0.25 * ref.mean() + 0.75 * 200)) < 40


def test_keep_rate_schedule_is_evits_cosine():
    sched = ice_prune.keep_rate_schedule(0.5, shrink_start=1, shrink_epochs=2, iters_per_epoch=10)
    assert sched(0) == 1.0 and sched(10) == 1.0
    assert sched(15) == pytest.approx(0.5 + 0.5 * (math.cos(math.pi / 4) + 1) / 2)
    assert sched(20) == pytest.approx(0.75)
    assert sched(30) == 0.5 and sched(1000) == 0.5
    per_loc = ice_prune.keep_rate_schedule((0.9, 0.7, 0.5), shrink_epochs=1, iters_per_epoch=4)
    assert per_loc(2) == pytest.approx((0.95, 0.85, 0.75))
    assert ice_prune.keep_rate_schedule(0.7)(0) == 0.7  # fine-tuning: the target from the start


# ----------------------------------------------------------------------------- errors
def test_bad_input_errors_name_the_problem():
    model = make("deit_tiny")
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        ice_prune.patch(torch.nn.Linear(3, 3))
    for bad in (0.0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\]"):
            ice_prune.patch(model, keep_rate=bad)
    with pytest.raises(ValueError, match="3 selection points"):
        ice_prune.patch(model, keep_rate=(0.7, 0.7))
    with pytest.raises(ValueError, match="out of range: this model has 12 blocks"):
        ice_prune.patch(model, locs=(3, 6, 12))
    with pytest.raises(ValueError, match="strictly increasing"):
        ice_prune.patch(model, locs=(6, 3, 9))
    with pytest.raises(ValueError, match="unknown method 'tome'"):
        ice_prune.patch(model, method="tome")
    with pytest.raises(ValueError, match="unknown placement 'mlp'"):
        ice_prune.patch(model, placement="mlp")
    with pytest.raises(ValueError, match="unknown heads"):
        ice_prune.patch(model, heads="each")
    with pytest.raises(ValueError, match="has no head"):
        ice_prune.patch(model, method="evit", num_classes=10)
    headless = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=0)
    with pytest.raises(ValueError, match="pass num_classes"):
        ice_prune.patch(headless)
    assert not isinstance(model, ICEVisionTransformer)  # failed patches left it untouched
    ice_prune.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        ice_prune.patch(model)
    with pytest.raises(ValueError, match="keep_rate must be"):
        model.keep_rate = 0
    with pytest.raises(ValueError, match="not patched"):
        ice_prune.unpatch(make("deit_tiny"))


def test_checkpoint_with_other_class_count_is_named():
    donor = ice_prune.patch(make("deit_tiny"), num_classes=10)
    model = ice_prune.patch(make("deit_tiny"))
    with pytest.raises(ValueError, match="predicts 10 classes .* patch with num_classes=10"):
        model.load_state_dict(donor.state_dict())


def test_patch_swaps_in_the_timm_integrations_classes():
    """patch() dispatches a timm model to ice_prune.integrations.timm: the model and the blocks at
    the selection points get its mixins, in classes made once per pair at the module level of
    ice_prune.integrations.common (so a patched model pickles)."""
    import ice_prune.integrations.common as common

    def tiny():
        return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4)

    model = ice_prune.patch(tiny(), keep_rate=0.5, method="evit")
    assert isinstance(model, ICEVisionTransformer)
    assert [isinstance(b, ICEBlock) for b in model.blocks] == [i in (3, 6, 9) for i in range(12)]
    assert type(model).__module__ == common.__name__
    assert getattr(common, type(model).__name__) is type(model)
    assert type(ice_prune.patch(tiny())) is type(model)


def _aten_ops(fn, *args):
    """The aten ops ``fn(*args)`` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        out = fn(*args)
    return out, rec.ops


@pytest.mark.parametrize("layout", ["qkv_view", "per_head"])
def test_cls_attention_row_equals_the_full_matrix_without_copying_k(layout):
    """EViT's score against the head-mean first row of the full attention matrix, written out;
    K laid out as a fused qkv projection's view ([B, N, H, d] under the hood) or contiguous per
    head: no op copies K (a plain q_cls @ K^T batched over (B, H) clones the view)."""
    from ice_prune.integrations.common import cls_attention_row
    B, N, H, d = 3, 17, 4, 8
    qkv = torch.randn(B, N, 3, H, d)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d] views, as timm's Attention
    if layout == "per_head":
        k = k.contiguous()
    scale = d ** -0.5
    q64, k64 = q.double(), k.double()
    want = torch.stack([torch.stack([(q64[b, h] @ k64[b, h].T * scale).softmax(-1)[0]
                                     for h in range(H)]).mean(0) for b in range(B)])
    got, ops = _aten_ops(cls_attention_row, q, k, scale)
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    assert got.dtype == torch.float32 and got.shape == (B, N)
    assert not [op for op in ops if "clone" in op or "copy" in op], ops
    # the copy this avoids: the plain product of the qkv view
    _, plain_ops = _aten_ops(lambda: q[:, :, :1] @ qkv.permute(2, 0, 3, 1, 4)[1].transpose(-2, -1))
    assert any("clone" in op or "copy" in op for op in plain_ops)


@pytest.mark.parametrize("method", ["evit", "ice"])
def test_compiled_graph_has_no_copies_around_selection(method):
    """torch.compile captures a patched model whole (no graph break), and its inference graph
    copies no tensor: the selection's ops read the blocks' outputs in place."""
    from torch._functorch.aot_autograd import aot_module_simplified
    torch._dynamo.reset()
    model = ice_prune.patch(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8,
                                              num_classes=4).eval(), keep_rate=0.5, method=method)
    graphs = []

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=lambda g, _: graphs.append(g) or g)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    (graph,) = graphs
    ops = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert ops.count("ice_prune.reorganize.default") == 3
    assert not [op for op in ops if "clone" in op or "copy" in op], ops
