"""ice_prune.load_model against models built by hand (timm.create_model, load_state_dict, patch) from
the same checkpoint, for timm and transformers models, and its errors for checkpoints that do not fit."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import ice_prune
from ice_prune import maps
from ice_prune.head import ICEHead

ARCH = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
LOCS = dict(locs=(1, 2))


def tiny(num_classes=5):
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **ARCH)


def load(checkpoint, **kwargs):
    return ice_prune.load_model("vit_tiny_patch16_224", checkpoint, **ARCH, **kwargs)


def save(model, path):
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return str(path)


def randomize(head):
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    return head


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_a_pruned_model_is_the_one_built_by_hand(tmp_path, x, method):
    saved = ice_prune.patch(tiny(), keep_rate=0.5, method=method, **LOCS)
    if method == "ice":
        randomize(saved.ice_head)  # a head that selects other tokens than a fresh one
    path = save(saved, tmp_path / "pruned.pth")

    model = load(path, method=method, keep_rate=0.5, patch_kwargs=LOCS)
    by_hand = ice_prune.patch(tiny(), keep_rate=0.5, method=method, **LOCS)
    by_hand.load_state_dict(torch.load(path)["model"])
    assert not model.training and model.num_classes == 5  # the classes from head.weight
    assert model.state_dict().keys() == by_hand.state_dict().keys()
    torch.testing.assert_close(outputs(model, x), outputs(by_hand, x), atol=0, rtol=0)
    assert model.keep_rate == 0.5


@pytest.mark.parametrize("hidden", [None, 8], ids=["ice", "ice-f"])
def test_the_explanation_head_is_the_saved_one(tmp_path, x, hidden):
    saved = tiny()
    saved.ice_head = randomize(ICEHead(48, 5, hidden_dim=hidden))  # as train/explain.py saves it
    state = saved.state_dict()
    save_file(state, str(tmp_path / "explain.safetensors"))
    for path in (save(saved, tmp_path / "explain.pth"), tmp_path / "explain.safetensors"):
        model = load(path)
        assert not hasattr(model, "_ice") and not model.training  # unpatched, eval mode
        head = model.ice_head
        assert isinstance(head, ICEHead) and (head.num_classes, head.hidden_dim) == (5, hidden)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert model.state_dict().keys() == state.keys()
        by_hand = tiny()
        by_hand.load_state_dict({k: v for k, v in state.items() if not k.startswith("ice_head.")})
        torch.testing.assert_close(ice_prune.explain(model, x, "ice"),
                                   maps.ice_map(by_hand.eval(), x, head=saved.ice_head.eval()),
                                   atol=0, rtol=0)
    assert not hasattr(load(save(tiny(), tmp_path / "plain.pth")), "ice_head")


def test_without_a_checkpoint_the_model_is_timms(x):
    torch.manual_seed(3)
    model = ice_prune.load_model("vit_tiny_patch16_224", num_classes=3, **ARCH)
    torch.manual_seed(3)
    by_hand = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **ARCH)
    torch.testing.assert_close(outputs(model, x), outputs(by_hand, x), atol=0, rtol=0)
    assert not hasattr(model, "ice_head")


def test_a_checkpoint_without_ice_head(tmp_path, x):
    """method='ice' from a release keeps a fresh head (training); require_head refuses it
    (evaluation); a selector without a head ignores a checkpoint's."""
    release = tiny()
    path = save(release, tmp_path / "release.pth")
    torch.manual_seed(1)
    model = load(path, method="ice", keep_rate=0.7, patch_kwargs=LOCS)
    torch.manual_seed(1)
    fresh = ice_prune.patch(tiny(), keep_rate=0.7, method="ice", **LOCS)
    assert torch.equal(model.ice_head.fc.weight, fresh.ice_head.fc.weight)
    assert model.ice_head.num_classes == 5
    assert all(torch.equal(model.state_dict()[k], v) for k, v in release.state_dict().items())
    with pytest.raises(ValueError, match=r"method 'ice' prunes with the ICE head, and there is none "
                                         r"\(the checkpoint has no ice_head\.\* keys\)"):
        load(path, method="ice", require_head=True)

    with_head = tiny()
    with_head.ice_head = randomize(ICEHead(48, 5))
    evit = load(save(with_head, tmp_path / "explain.pth"), method="evit", keep_rate=0.5,
                patch_kwargs=LOCS)
    assert not hasattr(evit, "ice_head")
    by_hand = ice_prune.patch(tiny(), keep_rate=0.5, method="evit", **LOCS)
    by_hand.load_state_dict({k: v for k, v in with_head.state_dict().items()
                             if not k.startswith("ice_head.")})
    torch.testing.assert_close(outputs(evit, x), outputs(by_hand, x), atol=0, rtol=0)


def test_the_head_class_count_and_layout_come_from_the_checkpoint(tmp_path, x):
    one_class = ice_prune.patch(tiny(), keep_rate=0.5, method="ice", num_classes=1, **LOCS)
    model = load(save(one_class, tmp_path / "one.pth"), method="ice", keep_rate=0.5,
                 patch_kwargs=LOCS)
    assert model.num_classes == 5 and model.ice_head.num_classes == 1
    per_location = ice_prune.patch(tiny(), keep_rate=0.5, method="ice", heads="per_location",
                                   **LOCS)
    randomize(per_location.ice_head)
    path = save(per_location, tmp_path / "per_location.pth")
    model = load(path, method="ice", keep_rate=0.5, patch_kwargs=LOCS)
    assert isinstance(model.ice_head, torch.nn.ModuleList) and len(model.ice_head) == 2
    torch.testing.assert_close(outputs(model, x), outputs(per_location, x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="one ICE head per selection point, which selects tokens "
                                         "but cannot explain"):
        load(path)


def test_an_mlp_head_only_explains(tmp_path):
    saved = tiny()
    saved.ice_head = ICEHead(48, 5, hidden_dim=8)
    path = save(saved, tmp_path / "ice-f.pth")
    with pytest.raises(ValueError, match=r"method 'ice' prunes with a linear ICE head; the "
                                         r"checkpoint's is an MLP \(ICE-f, hidden 8\), which only "
                                         r"explains"):
        load(path, method="ice")


def test_a_checkpoint_that_does_not_fit(tmp_path):
    path = save(tiny(), tmp_path / "c5.pth")
    with pytest.raises(ValueError, match=r"(?s)^checkpoint '.*c5\.pth' does not fit this model "
                                         r"\(VisionTransformer, 5 classes\):\n  shapes differ: "
                                         r"pos_embed: checkpoint \(1, 17, 48\) vs model \(1, 5, 48\)"):
        ice_prune.load_model("vit_tiny_patch16_224", path, **{**ARCH, "patch_size": 16})
    with pytest.raises(ValueError, match=r"^the state dict does not fit this model(?s:.*)"
                                         r"missing in the checkpoint: blocks\.3\."):
        load({k: v for k, v in torch.load(path)["model"].items() if not k.startswith("blocks.3.")})
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*missing\.pth' does not exist"):
        load(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(5, 48\) vs model \(3, 48\)"
                                         r"(?s:.*)--reset-classifier"):
        load(path, num_classes=3)
    with pytest.raises(TypeError, match="give a timm model name"):
        ice_prune.load_model(tiny(), path, num_classes=3)


def test_reset_classifier_keeps_new_heads(tmp_path):
    saved = ice_prune.patch(tiny(5), keep_rate=0.5, method="ice", **LOCS)
    randomize(saved.ice_head)
    path = save(saved, tmp_path / "c5.pth")
    torch.manual_seed(2)
    model = load(path, method="ice", keep_rate=0.5, patch_kwargs=LOCS, num_classes=3,
                 reset_classifier=True)
    torch.manual_seed(2)
    fresh = ice_prune.patch(tiny(3), keep_rate=0.5, method="ice", **LOCS)
    for k, v in model.state_dict().items():
        reference = fresh if k.startswith(("head.", "ice_head.")) else saved
        assert torch.equal(v, reference.state_dict()[k]), k
    assert not hasattr(load(path, num_classes=3, reset_classifier=True), "ice_head")


def test_a_model_instance_and_its_device_and_dtype(tmp_path, x):
    saved = tiny()
    saved.ice_head = randomize(ICEHead(48, 5))
    path = save(saved, tmp_path / "explain.pth")
    model = ice_prune.load_model(tiny().to(torch.float64), path)
    assert model.ice_head.fc.weight.dtype == torch.float64
    assert torch.equal(model.ice_head.fc.weight, saved.ice_head.fc.weight.double())


def test_exported():
    assert "load_model" in ice_prune.__all__


transformers = pytest.importorskip("transformers")
HF = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
          intermediate_size=64, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)


@pytest.mark.parametrize("cls", ["ViTForImageClassification", "ViTModel"])
def test_a_transformers_model_round_trip(tmp_path, x, cls):
    """save_pretrained of a patched model, then from_pretrained and load_model: the patched outputs
    back; a backbone without classes takes the ICE head's class count from the checkpoint."""
    cls = getattr(transformers, cls)
    model = cls(transformers.ViTConfig(**HF, num_labels=5)).eval()
    ice_prune.patch(model, keep_rate=0.5, method="ice", num_classes=5, **LOCS)
    randomize(model.ice_head)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = model(x)[0]
    loaded = ice_prune.load_model(cls.from_pretrained(tmp_path), tmp_path / "model.safetensors",
                                  method="ice", keep_rate=0.5, patch_kwargs=LOCS)
    assert loaded.ice_head.num_classes == 5 and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], ref, atol=0, rtol=0)
    explainer = ice_prune.load_model(cls.from_pretrained(tmp_path), tmp_path / "model.safetensors")
    assert torch.equal(explainer.ice_head.fc.weight, model.ice_head.fc.weight)
