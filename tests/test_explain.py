"""Explanation maps against a plain-torch re-implementation of a tiny 2-block ViT's forward, with its
attention written out by hand, and the baselines' formulas computed from those matrices; then
train/evaluate.py end to end, checked against the library on the same checkpoint."""
import importlib.util
import json
import os

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import ice_prune
from ice_prune import data
from ice_prune import metrics as M
from ice_prune.head import ICEHead
from test_evaldata import write_gtsegs

from ice_prune import maps as ex

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
    torch.testing.assert_close(ex.raw_attention(model, images), a.mean(1)[:, 0, 1:].reshape(2, 2, 2))
    torch.testing.assert_close(ex.raw_attention(model, images, per_head=True),
                               a[:, :, 0, 1:].reshape(2, 2, 2, 2))


def test_rollout_by_hand(model, images):
    _, attns, _ = reference_forward(model, images)
    eye = torch.eye(5)
    a0, a1 = (0.5 * a.detach().mean(1) + 0.5 * eye for a in attns)  # rows of A sum to 1
    expected = (a1 @ a0)[:, 0, 1:].reshape(2, 2, 2)
    torch.testing.assert_close(ex.rollout(model, images), expected)


def test_attention_gradcam(model, images):
    attns, grads, _ = grads_of_target(model, images)
    cam, g = attns[-1][:, :, 0, 1:], grads[-1][:, :, 0, 1:]          # [B, H, 4]
    w = g.mean(-1, keepdim=True)
    expected = torch.relu((cam * w).mean(1)).reshape(2, 2, 2)
    torch.testing.assert_close(ex.attention_gradcam(model, images), expected)


def test_generic_attention(model, images):
    attns, grads, _ = grads_of_target(model, images)
    expected = []
    for b in range(2):
        R = torch.eye(5)
        for a, g in zip(attns, grads):
            R = R + torch.relu(g[b] * a[b]).mean(0) @ R
        expected.append(R[0, 1:].reshape(2, 2))
    torch.testing.assert_close(ex.generic_attention(model, images), torch.stack(expected))


def test_given_target_changes_gradient_maps(model, images):
    _, _, cls = grads_of_target(model, images)
    other = (cls + 1) % C
    assert not torch.allclose(ex.generic_attention(model, images, target=other),
                              ex.generic_attention(model, images))
    with pytest.raises(ValueError, match="target"):
        ex.attention_gradcam(model, images, target=C)


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
    for method in ex.METHODS:
        ex.explain(model, images, method)
        assert model_settings(model) == settings, method
        calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(model(images), before)
        assert calls == ["attn_drop", "block 1"], method


def test_train_eval_mix_left_as_it_was(model, images):
    model.train()
    model.blocks[0].eval()  # a frozen block inside a model in training
    modes = {n: m.training for n, m in model.named_modules()}
    for method in sorted(set(ex.METHODS) - {"ice"}):
        ex.explain(model, images, method)
        assert {n: m.training for n, m in model.named_modules()} == modes, method


def test_ice_explain(model, images):
    head = ICEHead(16, C)
    with torch.no_grad():
        head.fc.weight.normal_()
    logits, _, tokens = reference_forward(model, images)
    z = head(tokens[:, 1:]).detach()                           # [B, 4, C+1]
    e = ex.ice_explain(model, images, head=head)
    torch.testing.assert_close(e.patch_logits, z.transpose(1, 2).reshape(2, C + 1, 2, 2))
    assert torch.equal(e.target, logits.argmax(-1))
    p = z.softmax(-1)
    expected = p[torch.arange(2), :, e.target].reshape(2, 2, 2)
    torch.testing.assert_close(e.class_map, expected)
    assert torch.equal(e.foreground, (z.argmax(-1) != C).reshape(2, 2, 2))
    assert torch.equal(e.prediction, z.argmax(-1).reshape(2, 2, 2))
    torch.testing.assert_close(ex.explain(model, images, "ice", target=1, head=head),
                               p[:, :, 1].reshape(2, 2, 2))


def test_ice_head_from_a_patched_model_and_full_tokens(model, images):
    ice_prune.patch(model, keep_rate=0.5, method="ice", num_classes=C, locs=(1,))
    logits, _, tokens = reference_forward(model, images)  # the unpruned network
    z = model.ice_head(tokens[:, 1:]).detach()
    e = ex.ice_explain(model, images)                  # runs with every token, keep_rate restored
    assert model.keep_rate == 0.5
    assert torch.equal(e.target, logits.argmax(-1))
    torch.testing.assert_close(e.patch_logits, z.transpose(1, 2).reshape(2, C + 1, 2, 2))
    # the baselines see every token too
    torch.testing.assert_close(ex.raw_attention(model, images),
                               reference_forward(model, images)[1][-1].detach().mean(1)[:, 0, 1:]
                               .reshape(2, 2, 2))


def test_ice_explain_needs_a_head(model, images):
    with pytest.raises(ValueError, match="ice_head"):
        ex.ice_explain(model, images)
    with pytest.raises(ValueError, match="target="):
        ex.ice_explain(model, images, head=ICEHead(16, C + 2))


def test_pm_style_map(model, images):
    logits, _, tokens = reference_forward(model, images)
    patch_logits = model.head(model.norm(tokens[:, 1:])).detach()  # fc_norm is Identity here
    cls = logits.argmax(-1)
    expected = patch_logits.softmax(-1)[torch.arange(2), :, cls].reshape(2, 2, 2)
    torch.testing.assert_close(ex.pm_style_map(model, images), expected)


def test_pm_style_loss_by_hand():
    # one image, two patches, two classes: P(class 0) = 3/4 on both
    logits = torch.log(torch.tensor([3.0, 1.0]))[None, :, None, None].expand(1, 2, 1, 2)
    loss = ex.pm_style_loss(logits, torch.tensor([0]), torch.tensor([[[1.0, 0.0]]]))
    expected = -(torch.log(torch.tensor(0.75)) + torch.log(torch.tensor(0.25))) / 2
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="patch_masks"):
        ex.pm_style_loss(logits, torch.tensor([0]), torch.ones(1, 2, 2))


def test_upsample_modes():
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    up = ex.upsample(m, (4, 4), mode="nearest")
    assert torch.equal(up[0], torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]))
    # bilinear, align_corners=False: pixel 1 of 4 samples source coordinate 0.25
    assert ex.upsample(m, (4, 4))[0, 0, 1].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown explanation method"):
        ex.explain(None, m, "lrp")


def test_every_method_runs_on_a_timm_model():
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, pretrained=False,
                          num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    for name in ex.METHODS:
        kw = {"head": ICEHead(192, 5)} if name == "ice" else {}
        out = ex.explain(m, x, name, size=(32, 32), **kw)
        assert out.shape == (1, 32, 32) and torch.isfinite(out).all(), name


# ---------------------------------------------------------------------------------------------
# train/evaluate.py end to end on a tiny gtsegs_ijcv.mat, a random tiny model and its ICE head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("evaluate", os.path.join(ROOT, "train", "evaluate.py"))
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8"]


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.zeros((32, 32), np.uint8) for _ in range(3)]
    masks[0][8:24, 8:24] = 1
    masks[1][:, :16] = 1
    masks[2][20:, 4:30] = 1
    mat = str(tmp_path / "gtsegs_ijcv.mat")
    write_gtsegs(mat, imgs, masks)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, pretrained=False,
                              num_classes=5)
    ice_prune.patch(model, keep_rate=0.7, method="ice", num_classes=5)
    with torch.no_grad():
        model.ice_head.fc.weight.normal_()
    ckpt = str(tmp_path / "ckpt.pth")
    torch.save({"model": model.state_dict(), "epoch": 1}, ckpt)
    return mat, ckpt, model


def test_explain_imagenet_seg(setup, tmp_path, capsys):
    mat, ckpt, model = setup
    out = str(tmp_path / "out")
    res = evaluate.main(["explain", "--data", f"imagenet-seg:{mat}", "--checkpoint", ckpt, *MODEL,
                         "--img-size", "32", "--batch-size", "2", "--out", out, "--grid", "2", "--quiet"])
    printed = capsys.readouterr().out
    assert set(res["methods"]) == set(evaluate.ALL_METHODS)
    assert "pixel_accuracy" in printed and "rollout" in printed
    with open(os.path.join(out, "explain.json")) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    assert os.path.getsize(os.path.join(out, "explain_grid.png")) > 0
    # ICE's figures recomputed from the library on the same checkpoint
    unpatched = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5)
    unpatched.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ice_head.")})
    ds = data.ImageNetSegmentation(mat, image_size=32)
    meter = M.ImageNetSegMeter()
    for img, mask in ds:
        meter.update(ex.upsample(ex.ice_map(unpatched.eval(), img[None], head=model.ice_head), (32, 32))[0], mask)
    for k, v in meter.compute().items():
        assert res["methods"]["ice"][k] == pytest.approx(v), k


def test_checkpoint_heads(tmp_path):
    mlp = ice_prune.ICEHead(16, 4, hidden_dim=8)
    head = evaluate.head_from_state(mlp.state_dict())
    assert head.hidden_dim == 8 and head.num_classes == 4
    torch.testing.assert_close(head(torch.ones(2, 16)), mlp(torch.ones(2, 16)))
    assert evaluate.head_from_state(ice_prune.ICEHead(16, 7).state_dict()).num_classes == 7
    with pytest.raises(ValueError, match="per-location"):
        evaluate.head_from_state({"0.fc.weight": torch.zeros(5, 16)})


def test_explain_errors(setup, tmp_path):
    mat, ckpt, _ = setup
    with pytest.raises(SystemExit, match="unknown --data"):
        evaluate.main(["explain", "--data", "coco:/x", *MODEL])
    with pytest.raises(SystemExit, match="unknown --methods"):
        evaluate.main(["explain", "--data", f"imagenet-seg:{mat}", "--methods", "ice,lrp", *MODEL])
    with pytest.raises(SystemExit, match="no image-class labels"):
        evaluate.main(["accuracy", "--data", f"imagenet-seg:{mat}", *MODEL])
    with pytest.raises(SystemExit, match="ICE head"):
        evaluate.main(["explain", "--data", f"imagenet-seg:{mat}", "--methods", "ice", *MODEL,
                       "--out", str(tmp_path)])


class FakeScenes(torch.utils.data.Dataset):
    """Stands in for SyntheticScenes (another issue's dataset) with its item layout."""

    def __init__(self, num_classes, img_size, split, return_mask, length=3):
        assert (split, return_mask) == ("val", True)
        self.num_classes, self.img_size, self.length = num_classes, img_size, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        mask = torch.zeros(self.img_size, self.img_size, dtype=torch.bool)
        mask[4 * i: 16 + 4 * i, 8:24] = True
        return torch.randn(3, self.img_size, self.img_size), i % self.num_classes, mask


def test_explain_synthetic_code_path(setup, tmp_path, monkeypatch):
    _, ckpt, _ = setup
    monkeypatch.setattr(data, "SyntheticScenes", FakeScenes, raising=False)
    res = evaluate.main(["explain", "--data", "synthetic", "--data-kwargs", '{"length": 2}', "--checkpoint",
                         ckpt, *MODEL, "--out", str(tmp_path / "o"), "--quiet"])
    assert res["images"] == 2
    for m, r in res["methods"].items():
        assert 0 <= r["pixel_accuracy"] <= 100 and 0 <= r["miou"] <= 100, m
        assert all(0 <= v <= 100 for v in r["jaccard"].values()), m
    assert set(res["methods"]["raw-attention"]["jaccard"]) == {"mean@0.9", "mean@0.8", "best-head@0.9",
                                                                "best-head@0.8"}
    assert set(res["methods"]["ice"]["jaccard"]) == {"mask"}


def test_evaluate_explain_on_synthetic_scenes(tmp_path):
    res = evaluate.main(["explain", "--data", "synthetic", "--data-kwargs", '{"length": 4}', *MODEL,
                         "--methods", "rollout,raw-attention", "--out", str(tmp_path), "--quiet"])
    assert res["images"] == 4 and set(res["methods"]) == {"rollout", "raw-attention"}
    for r in res["methods"].values():
        assert 0 <= r["pixel_accuracy"] <= 100 and 0 <= r["miou"] <= 100
    assert os.path.isfile(tmp_path / "explain.json") and os.path.isfile(tmp_path / "explain_grid.png")


def test_accuracy_patched(setup, tmp_path):
    mat, ckpt, model = setup
    # an ImageFolder of 4 images in 2 classes
    for c in ("a", "b"):
        os.makedirs(tmp_path / "folder" / c)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(tmp_path / "folder" / c / f"{i}.png")
    res = evaluate.main(["accuracy", "--data", f"folder:{tmp_path / 'folder'}", "--checkpoint", ckpt, *MODEL,
                         "--method", "ice", "--keep-rate", "0.5", "--out", str(tmp_path / "o"), "--quiet"])
    # reference: the patched model itself on the same transformed images
    ds = torchvision.datasets.ImageFolder(str(tmp_path / "folder"), transform=timm.data.create_transform(32))
    model.eval().keep_rate = 0.5
    x = torch.stack([ds[i][0] for i in range(4)])
    y = torch.tensor([ds[i][1] for i in range(4)])
    with torch.no_grad():
        top = model(x).topk(5, -1).indices
    assert res["top1"] == pytest.approx(100 * (top[:, 0] == y).float().mean().item())
    assert res["top5"] == pytest.approx(100 * (top == y[:, None]).any(-1).float().mean().item())
