"""Explanation maps against a plain-torch re-implementation of a tiny 2-block ViT's forward, with its
attention written out by hand, and the baselines' formulas computed from those matrices
(train/evaluate.py and ice_prune.evaluation: test_evaluation.py)."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import ice_prune
from ice_prune.head import ICEHead

from ice_prune import maps

C = 3  # classes


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=C)
    # break the symmetry of the default zero-initialized head and cls token
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 16, 16)


def reference_forward(m, x):
    """Plain torch: returns (logits, attention per block [B, H, N, N], pre-norm tokens)."""
    B = x.shape[0]
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([m.cls_token.expand(B, -1, -1), t], 1) + m.pos_embed
    attns = []
    for blk in m.blocks:
        h = blk.norm1(t)
        H, D = blk.attn.num_heads, t.shape[-1]
        qkv = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(B, -1, 3, H, D // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, dim=-1)
        attns.append(a)
        o = (a @ v).transpose(1, 2).reshape(B, -1, D)
        t = t + blk.attn.proj(o)
        t = t + blk.mlp(blk.norm2(t))
    logits = m.head(m.norm(t)[:, 0])
    return logits, attns, t


def grads_of_target(m, x):
    logits, attns, _ = reference_forward(m, x)
    cls = logits.argmax(-1)
    grads = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), attns)
    return [a.detach() for a in attns], grads, cls


def test_reference_forward_matches_timm(model, images):
    logits, _, _ = reference_forward(model, images)
    torch.testing.assert_close(logits, model(images), atol=1e-5, rtol=1e-5)


def test_raw_attention(model, images):
    _, attns, _ = reference_forward(model, images)
    a = attns[-1].detach()
    torch.testing.assert_close(maps.raw_attention(model, images), a.mean(1)[:, 0, 1:].reshape(2, 2, 2))
    torch.testing.assert_close(maps.raw_attention(model, images, per_head=True),
                               a[:, :, 0, 1:].reshape(2, 2, 2, 2))


def test_rollout_by_hand(model, images):
    _, attns, _ = reference_forward(model, images)
    eye = torch.eye(5)
    a0, a1 = (0.5 * a.detach().mean(1) + 0.5 * eye for a in attns)  # rows of A sum to 1
    expected = (a1 @ a0)[:, 0, 1:].reshape(2, 2, 2)
    torch.testing.assert_close(maps.rollout(model, images), expected)


def test_attention_gradcam(model, images):
    attns, grads, _ = grads_of_target(model, images)
    cam, g = attns[-1][:, :, 0, 1:], grads[-1][:, :, 0, 1:]          # [B, H, 4]
    w = g.mean(-1, keepdim=True)
    expected = torch.relu((cam * w).mean(1)).reshape(2, 2, 2)
    torch.testing.assert_close(maps.attention_gradcam(model, images), expected)


def test_generic_attention(model, images):
    attns, grads, _ = grads_of_target(model, images)
    expected = []
    for b in range(2):
        R = torch.eye(5)
        for a, g in zip(attns, grads):
            R = R + torch.relu(g[b] * a[b]).mean(0) @ R
        expected.append(R[0, 1:].reshape(2, 2))
    torch.testing.assert_close(maps.generic_attention(model, images), torch.stack(expected))


def test_given_target_changes_gradient_maps(model, images):
    _, _, cls = grads_of_target(model, images)
    other = (cls + 1) % C
    assert not torch.allclose(maps.generic_attention(model, images, target=other),
                              maps.generic_attention(model, images))
    with pytest.raises(ValueError, match="target"):
        maps.attention_gradcam(model, images, target=C)


def model_settings(model):
    """What an explanation must leave as it found it: every module's mode and hooks, every block's
    fused attention, every parameter's requires_grad and grad, the keep rate of a patched model."""
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks))
                  for n, m in model.named_modules()},
        "fused_attn": [b.attn.fused_attn for b in model.blocks],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": [n for n, p in model.named_parameters() if p.grad is not None],
        "keep_rate": model.keep_rate,
        "explain": model.explain,
    }


def test_model_left_as_it_was(model, images):
    ice_prune.patch(model, keep_rate=0.5, method="ice", num_classes=C, locs=(1,))
    model.train()  # every dropout rate is 0: the output is the same as in eval mode
    model.patch_embed.requires_grad_(False)  # partly frozen
    model.blocks[0].attn.fused_attn, model.blocks[1].attn.fused_attn = False, True
    calls = []  # the user's own hooks, one where the maps hook in (attn_drop)
    model.blocks[0].attn.attn_drop.register_forward_hook(lambda *a: calls.append("attn_drop"))
    model.blocks[1].register_forward_pre_hook(lambda *a: calls.append("block 1"))
    with torch.no_grad():
        before = model(images)
    settings = model_settings(model)
    assert settings["fused_attn"] == [False, True] and settings["keep_rate"] == 0.5
    for method in maps.METHODS:
        maps.explain(model, images, method)
        assert model_settings(model) == settings, method
        calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(model(images), before)
        assert calls == ["attn_drop", "block 1"], method


def test_train_eval_mix_left_as_it_was(model, images):
    model.train()
    model.blocks[0].eval()  # a frozen block inside a model in training
    modes = {n: m.training for n, m in model.named_modules()}
    for method in sorted(set(maps.METHODS) - {"ice", *maps.PRUNED_FORWARD_METHODS}):
        maps.explain(model, images, method)
        assert {n: m.training for n, m in model.named_modules()} == modes, method


def test_ice_explain(model, images):
    head = ICEHead(16, C)
    with torch.no_grad():
        head.fc.weight.normal_()
    logits, _, tokens = reference_forward(model, images)
    z = head(tokens[:, 1:]).detach()                           # [B, 4, C+1]
    e = maps.ice_explain(model, images, head=head)
    torch.testing.assert_close(e.patch_logits, z.transpose(1, 2).reshape(2, C + 1, 2, 2))
    assert torch.equal(e.target, logits.argmax(-1))
    p = z.softmax(-1)
    expected = p[torch.arange(2), :, e.target].reshape(2, 2, 2)
    torch.testing.assert_close(e.class_map, expected)
    assert torch.equal(e.foreground, (z.argmax(-1) != C).reshape(2, 2, 2))
    assert torch.equal(e.prediction, z.argmax(-1).reshape(2, 2, 2))
    torch.testing.assert_close(maps.explain(model, images, "ice", target=1, head=head),
                               p[:, :, 1].reshape(2, 2, 2))


def test_ice_head_from_a_patched_model_and_full_tokens(model, images):
    ice_prune.patch(model, keep_rate=0.5, method="ice", num_classes=C, locs=(1,))
    logits, _, tokens = reference_forward(model, images)  # the unpruned network
    z = model.ice_head(tokens[:, 1:]).detach()
    e = maps.ice_explain(model, images)                  # runs with every token, keep_rate restored
    assert model.keep_rate == 0.5
    assert torch.equal(e.target, logits.argmax(-1))
    torch.testing.assert_close(e.patch_logits, z.transpose(1, 2).reshape(2, C + 1, 2, 2))
    # the baselines see every token too
    torch.testing.assert_close(maps.raw_attention(model, images),
                               reference_forward(model, images)[1][-1].detach().mean(1)[:, 0, 1:]
                               .reshape(2, 2, 2))


def test_ice_explain_needs_a_head(model, images):
    with pytest.raises(ValueError, match="ice_head"):
        maps.ice_explain(model, images)
    with pytest.raises(ValueError, match="target="):
        maps.ice_explain(model, images, head=ICEHead(16, C + 2))


def test_pm_style_map(model, images):
    logits, _, tokens = reference_forward(model, images)
    patch_logits = model.head(model.norm(tokens[:, 1:])).detach()  # fc_norm is Identity here
    cls = logits.argmax(-1)
    expected = patch_logits.softmax(-1)[torch.arange(2), :, cls].reshape(2, 2, 2)
    torch.testing.assert_close(maps.pm_style_map(model, images), expected)


def test_pm_style_loss_by_hand():
    # one image, two patches, two classes: P(class 0) = 3/4 on both
    logits = torch.log(torch.tensor([3.0, 1.0]))[None, :, None, None].expand(1, 2, 1, 2)
    loss = maps.pm_style_loss(logits, torch.tensor([0]), torch.tensor([[[1.0, 0.0]]]))
    expected = -(torch.log(torch.tensor(0.75)) + torch.log(torch.tensor(0.25))) / 2
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="patch_masks"):
        maps.pm_style_loss(logits, torch.tensor([0]), torch.ones(1, 2, 2))


def test_upsample_modes():
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    up = maps.upsample(m, (4, 4), mode="nearest")
    assert torch.equal(up[0], torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]))
    # bilinear, align_corners=False: pixel 1 of 4 samples source coordinate 0.25
    assert maps.upsample(m, (4, 4))[0, 0, 1].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown explanation method"):
        maps.explain(None, m, "lrp")


def test_every_method_runs_on_a_timm_model():
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, pretrained=False,
                          num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    patched = ice_prune.patch(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                                pretrained=False, num_classes=5), method="ice")
    for name in maps.METHODS:
        kw = {"head": ICEHead(192, 5)} if name == "ice" else {}
        explained = patched if name in maps.PRUNED_FORWARD_METHODS else m
        out = maps.explain(explained, x, name, size=(32, 32), **kw)
        assert out.shape == (1, 32, 32) and torch.isfinite(out).all(), name



def test_ice_explain_can_explain_ices_own_prediction(model, images):
    head = ICEHead(16, C)
    with torch.no_grad():
        head.fc.weight.normal_()
    _, _, tokens = reference_forward(model, images)
    z = head(tokens[:, 1:]).detach()                                   # [B, 4, C+1]
    # ICE's own image class, written out: instance-normalize each patch's logits, average the
    # foreground patches' class scores (all patches if none is foreground), take the top-1
    expected = []
    for b in range(z.shape[0]):
        zn = (z[b] - z[b].mean(-1, keepdim=True)) / torch.sqrt(z[b].var(-1, unbiased=False,
                                                                           keepdim=True) + 1e-5)
        fg = zn.argmax(-1) != C
        picked = zn[fg] if fg.any() else zn
        expected.append(int(picked.mean(0)[:C].argmax()))
    e = maps.ice_explain(model, images, head=head, target="ice")
    assert e.target.tolist() == expected
    p = z.softmax(-1)
    torch.testing.assert_close(e.class_map, p[torch.arange(2), :, e.target].reshape(2, 2, 2))
    with pytest.raises(ValueError, match="'ice' \\(ICE's own prediction\\)"):
        maps.ice_explain(model, images, head=head, target="classifier")


def test_pruned_forward_map(model, images):
    ice_prune.patch(model, keep_rate=0.5, method="ice", num_classes=C, locs=(0, 1))
    with torch.no_grad():
        model.ice_head.fc.weight.normal_()
    model.train()
    got = maps.explain(model, images, "ice-pruned")
    assert got.shape == (2, 2, 2)
    assert not model.explain and model.training and model.keep_rate == 0.5  # restored
    # the map of a forward in explain mode, which leaves the logits as they are
    with torch.no_grad():
        plain = model.eval()(images)
        model.explain = True
        logits = model(images)
        model.explain = False
    assert torch.equal(logits, plain)
    assert torch.equal(got, model.ice_explanation.foreground.view(2, 2, 2))
    assert torch.equal(maps.explain(model, images, "ice-pruned", target=1), got)  # any class
    # keep rate 1: the head on every patch at the last point (block 1, after attention)
    model.keep_rate = 1.0
    with torch.no_grad():
        t = model.blocks[0](model._pos_embed(model.patch_embed(images)))
        blk = model.blocks[1]
        t = t + blk.attn(blk.norm1(t))
        expected = 1 - model.ice_head(blk.norm2(t)[:, 1:]).softmax(-1)[..., -1]
    torch.testing.assert_close(maps.pruned_forward_map(model, images), expected.view(2, 2, 2))
    assert maps.gives_pruned_forward_maps(model)


def test_pruned_forward_map_needs_a_model_patched_with_ice(model, images):
    with pytest.raises(ValueError, match="patched with method='ice'.*not patched"):
        maps.pruned_forward_map(model, images)
    assert not maps.gives_pruned_forward_maps(model)
    ice_prune.patch(model, keep_rate=0.5, method="evit", locs=(1,))
    with pytest.raises(ValueError, match="has no ICE head"):
        maps.pruned_forward_map(model, images)
    assert not model.explain and not maps.gives_pruned_forward_maps(model)
