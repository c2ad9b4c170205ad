import pytest
import timm
import torch

import ice_prune
from ice_prune.head import HEAD_VARIANTS, ICEExplainer, ICEHead, forward_with_tokens, set_trainable


def tiny(num_classes=5, depth=4):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=48, depth=depth, num_heads=3, num_classes=num_classes)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_variants_build_the_documented_heads():
    model = tiny()
    ice = HEAD_VARIANTS["ice"].build(model, 5)
    assert isinstance(ice.fc, torch.nn.Linear) and ice.fc.bias is None
    assert ice.fc.weight.shape == (6, 48)
    mlp = HEAD_VARIANTS["ice-f"].build(model, 5)
    assert [type(m).__name__ for m in mlp.fc] == ["Linear", "GELU", "Linear"]
    assert mlp.fc[0].weight.shape == (4 * 48, 48) and mlp.fc[2].weight.shape == (6, 4 * 48)
    assert HEAD_VARIANTS["ice"].lambda_class == 0.975 and HEAD_VARIANTS["ice-f"].lambda_class == 0.99


@pytest.mark.parametrize("variant, expected_blocks", [("ice", {0, 1, 2, 3}), ("ice-f", set()),
                                                      ("icev2-style", {2, 3})])
def test_set_trainable(variant, expected_blocks):
    model = tiny()
    v = HEAD_VARIANTS[variant]
    explainer = ICEExplainer(model, v.build(model, 5))
    set_trainable(model, explainer.head, v.trainable_blocks)
    names = trainable(model)
    blocks = {int(n.split(".")[1]) for n in names if n.startswith("blocks.")}
    assert blocks == expected_blocks
    assert {n for n in names if n.startswith("ice_head.")} == \
        {f"ice_head.{n}" for n, _ in explainer.head.named_parameters()}
    # the [CLS] path after the blocks gets no ICE gradient: frozen unless asked for
    assert not any(n.startswith(("head.", "norm.")) for n in names)
    assert ("pos_embed" in names) == (variant == "ice")
    set_trainable(model, explainer.head, v.trainable_blocks, train_classifier=True)
    assert "head.weight" in trainable(model)


def test_set_trainable_rejects_out_of_range_blocks():
    model = tiny(depth=4)
    with pytest.raises(ValueError, match=r"trainable_blocks must be in \[0, 4\]"):
        set_trainable(model, ICEHead(48, 5), 5)


def test_explainer_reads_pre_norm_patch_tokens_and_keys_fit_a_patched_model():
    model = tiny().eval()
    explainer = ICEExplainer(model, HEAD_VARIANTS["ice"].build(model, 5))
    x = torch.randn(2, 3, 32, 32)
    cls_logits, patch_logits = explainer(x)
    with torch.no_grad():  # the blocks run by hand: the last one's output, before the final norm
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks:
            t = blk(t)
        w = explainer.head.fc.weight
        torch.testing.assert_close(patch_logits, t[:, 1:] @ w.T)
        assert not torch.allclose(patch_logits, model.norm(t)[:, 1:] @ w.T, atol=1e-3)
        torch.testing.assert_close(cls_logits, model.forward_head(model.norm(t)))
    assert cls_logits.shape == (2, 5) and patch_logits.shape == (2, 16, 6)
    torch.testing.assert_close(forward_with_tokens(model, x)[1], t)
    # the explanation checkpoint loads into a model patched for ICE pruning, head included
    pruned = ice_prune.patch(tiny(), keep_rate=0.5, method="ice", locs=(1, 2))
    pruned.load_state_dict(model.state_dict())
    torch.testing.assert_close(pruned.ice_head.fc.weight, explainer.head.fc.weight)
