"""PM-style training: train/pm.py, ice_prune.training.tasks.PMStyleTask / PatchClassifier / ICEPseudoMasks and
ice_prune.data.PartialMasks / mask_selection, with a tiny ViT on SyntheticScenes on CPU."""
import importlib.util
import json
import os

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import default_collate

from ice_prune.data import MaskedTarget, PartialMasks, SyntheticScenes, mask_selection
from ice_prune.head import ICEHead
from ice_prune.maps import pm_style_loss
from ice_prune.training.tasks import ICEPseudoMasks, PatchClassifier, PMStyleTask, classification_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {"patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}
BASE = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(ARCH), "--img-size", "32",
        "--workers", "0", "--no-progress", "--drop-path", "0", "--mixup", "0", "--cutmix", "0",
        "--log-every", "1", "--lr", "3e-3", "--num-classes", "4"]
# the defaults train/pm.py and train/prune.py do not share, made the same
RECIPE = ["--epochs", "2", "--batch-size", "8", "--synthetic-train", "32", "--synthetic-val", "8",
          "--min-lr", "1e-5", "--weight-decay", "0.05"]
GRID = (4, 4)


def script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "train", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_model(num_classes=4, **arch):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                             img_size=32, **{**ARCH, **arch})


def scenes(n=8, **kwargs):
    return SyntheticScenes(num_classes=4, img_size=32, length=n, **kwargs)


def batch(dataset, masked, dataset_masks=True):
    data = PartialMasks(dataset, GRID, masked, dataset_masks=dataset_masks)
    images, targets = default_collate([data[i] for i in range(len(data))])
    return images, targets


def checkpoint(ckpt_dir):
    return torch.load(os.path.join(ckpt_dir, "last.pth"), map_location="cpu", weights_only=False)


def test_partial_masks_batch_and_move_as_masked_targets():
    images, targets = batch(scenes(), [1, 6])
    assert isinstance(targets, MaskedTarget)
    assert images.shape == (8, 3, 32, 32) and targets.label.dtype == torch.long
    assert targets.has_mask.tolist() == [i in (1, 6) for i in range(8)]
    # each patch's foreground fraction of the exact mask; zeros without a mask
    _, _, mask = scenes().sample(6)
    expected = mask.float().reshape(4, 8, 4, 8).mean((1, 3))
    torch.testing.assert_close(targets.patch_mask[6], expected)
    assert targets.patch_mask[6].max() > 0 and not targets.patch_mask[0].any()
    assert targets.label.tolist() == [scenes().label(i) for i in range(8)]
    moved = targets.to("cpu", non_blocking=True)
    assert isinstance(moved, MaskedTarget) and torch.equal(moved.patch_mask, targets.patch_mask)


def test_mask_selection_counts_seeds_and_errors():
    for n, fraction in [(2000, 0.01), (1000, 0.0125), (16, 0.25), (7, 1.0), (50, 0.0)]:
        chosen = mask_selection(n, fraction, seed=3)
        assert len(chosen) == int(np.floor(fraction * n + 0.5))
        assert len(set(chosen.tolist())) == len(chosen) and all(0 <= i < n for i in chosen)
        assert list(chosen) == sorted(chosen)
    assert np.array_equal(mask_selection(2000, 0.01, 3), mask_selection(2000, 0.01, 3))
    assert not np.array_equal(mask_selection(2000, 0.01, 3), mask_selection(2000, 0.01, 4))
    for fraction in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"mask fraction must be in \[0, 1\]"):
            mask_selection(100, fraction)
    with pytest.raises(ValueError, match="rounds to 0 images"):
        mask_selection(16, 0.01)


def test_dataset_without_masks_is_an_error_unless_the_step_makes_them():
    plain = torch.utils.data.TensorDataset(torch.zeros(4, 3, 32, 32), torch.arange(4))
    with pytest.raises(ValueError, match=r"gives no masks \(its items are \(image, label\)\)"):
        PartialMasks(plain, GRID, [0])
    PartialMasks(plain, GRID, [])  # no image should carry one: plain fine-tuning
    image, target = PartialMasks(plain, GRID, [2], dataset_masks=False)[2]
    assert bool(target.has_mask) and not target.patch_mask.any()


def test_steps_lower_the_mask_loss_on_masked_images():
    torch.manual_seed(0)
    net = PatchClassifier(tiny_model()).eval()  # no dropout: the same batch, the same function
    task = PMStyleTask(4)
    images, targets = batch(scenes(), [0, 3, 5])
    has = targets.has_mask

    def mask_loss():
        with torch.no_grad():
            return pm_style_loss(net(images)[1][has], targets.label[has], targets.patch_mask[has]).item()

    before = mask_loss()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(10):
        loss, metrics = task.step(net, images, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["mask_share"] == 3 / 8
    assert mask_loss() < 0.8 * before


def test_unmasked_images_train_on_cross_entropy_alone():
    torch.manual_seed(0)
    model = tiny_model().eval()
    net = PatchClassifier(model)
    task = PMStyleTask(4, mask_weight=2.0)
    images, targets = batch(scenes(), [2, 5])
    images.requires_grad_(True)
    loss, ce, mask_loss = task.losses(net, images, targets)
    plain_ce = classification_loss(model(images), targets.label)
    torch.testing.assert_close(ce, plain_ce, rtol=0, atol=0)
    torch.testing.assert_close(loss, ce + 2.0 * mask_loss)
    (grad,) = torch.autograd.grad(loss, images)
    (grad_ce,) = torch.autograd.grad(plain_ce, images)
    # images are independent in a ViT: an unmasked image's gradient is its cross-entropy's alone
    unmasked = ~targets.has_mask
    torch.testing.assert_close(grad[unmasked], grad_ce[unmasked], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(grad[targets.has_mask], grad_ce[targets.has_mask])
    # whatever an unmasked image's patch_mask holds is never read
    noisy = targets._replace(patch_mask=torch.where(unmasked[:, None, None], torch.rand(8, 4, 4),
                                                    targets.patch_mask))
    torch.testing.assert_close(task.losses(net, images, noisy)[0], loss, rtol=0, atol=0)
    # a batch without a masked image is plain cross-entropy, bit for bit
    none = targets._replace(has_mask=torch.zeros(8, dtype=torch.bool))
    loss, ce, mask_loss = task.losses(net, images, none)
    assert mask_loss is None and torch.equal(loss, plain_ce)


@pytest.mark.parametrize("smoothing", ["0", "0.1"])
def test_mask_fraction_zero_trains_exactly_like_plain_fine_tuning(tmp_path, smoothing):
    """train/pm.py --mask-fraction 0 against train/prune.py --method evit --keep-rate 1.0, the
    project's plain cross-entropy fine-tuning (keep rate 1 runs the original blocks): same weights."""
    args = BASE + RECIPE + ["--smoothing", smoothing]
    script("pm").main(args + ["--mask-fraction", "0", "--output", str(tmp_path / "pm")])
    script("prune").main(args + ["--method", "evit", "--keep-rate", "1.0", "--locs", "1", "2",
                                 "--output", str(tmp_path / "ce")])
    ours, plain = checkpoint(tmp_path / "pm"), checkpoint(tmp_path / "ce")
    assert ours["meta"]["masked_images"] == 0 and ours["num_updates"] == plain["num_updates"] == 8
    assert ours["model"].keys() == plain["model"].keys()
    assert all(torch.equal(ours["model"][k], plain["model"][k]) for k in plain["model"])
    # and the test has teeth: 25% masks train other weights from the same start
    script("pm").main(args + ["--mask-fraction", "0.25", "--output", str(tmp_path / "masked")])
    masked = checkpoint(tmp_path / "masked")["model"]
    assert not torch.equal(masked["head.weight"], plain["model"]["head.weight"])


def test_pm_run_keeps_timm_keys_and_uses_the_fraction_it_was_given(tmp_path):
    out = tmp_path / "pm"
    script("pm").main(BASE + RECIPE + ["--mask-fraction", "0.25", "--mask-seed", "5",
                                       "--output", str(out)])
    ckpt = checkpoint(out)
    # no parameter added: exactly timm's keys and shapes
    reference = tiny_model().state_dict()
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in reference.items()}
    assert len(list(PatchClassifier(tiny_model()).parameters())) == len(reference)
    meta = ckpt["meta"]
    assert meta["kind"] == "pm-style" and meta["mask_source"] == "dataset"
    assert (meta["train_images"], meta["masked_images"], meta["mask_seed"]) == (32, 8, 5)
    assert meta["masked_indices"] == mask_selection(32, 0.25, 5).tolist()
    # counted: the wrapped training set carries exactly that many masks, on those images
    data = PartialMasks(SyntheticScenes(num_classes=4, img_size=32, length=32), GRID,
                        meta["masked_indices"])
    flags = [bool(data[i][1].has_mask) for i in range(32)]
    assert sum(flags) == 8 and [i for i, f in enumerate(flags) if f] == meta["masked_indices"]
    # and training saw them: 32 images in 4 full batches per epoch, a quarter of them masked
    with open(out / "log.jsonl") as f:
        epochs = [r for r in map(json.loads, f) if "train" in r]
    assert [r["train"]["mask_share"] for r in epochs] == pytest.approx([0.25, 0.25])
    assert epochs[-1]["train"]["mask_loss_per_image"] > 0 and "mask_loss" in epochs[-1]["val"]


def save_ice_checkpoint(path, num_classes=4, **arch):
    torch.manual_seed(1)
    model = tiny_model(num_classes, **arch)
    model.ice_head = ICEHead(model.embed_dim, num_classes)
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def ice_foreground(model, head_weight, images):
    """ICE's foreground in plain torch: the patches whose argmax over the linear head's classes on
    the last block's output (before the final norm) is not the background, the last class."""
    tokens = []
    hook = model.norm.register_forward_hook(lambda m, inp, out: tokens.append(inp[0]))
    with torch.no_grad():
        model.eval()(images)
    hook.remove()
    z = tokens[0][:, model.num_prefix_tokens:] @ head_weight.T
    return (z.argmax(-1) != head_weight.shape[0] - 1).float().reshape(len(images), *GRID)


def test_pseudo_masks_are_ice_foregrounds_and_replace_the_dataset_masks(tmp_path):
    path = save_ice_checkpoint(tmp_path / "ice.pth")
    torch.manual_seed(2)
    student = tiny_model()
    pseudo = ICEPseudoMasks.from_checkpoint(path, student, "vit_tiny_patch16_224",
                                            {**ARCH, "img_size": 32})
    images, targets = batch(scenes(), [1, 4, 7], dataset_masks=False)
    state = torch.load(path, weights_only=True)["model"]
    teacher = tiny_model()
    teacher.load_state_dict({k: v for k, v in state.items() if not k.startswith("ice_head.")})
    expected = ice_foreground(teacher, state["ice_head.fc.weight"], images[targets.has_mask])
    # the masks tell the teacher from the untrained student
    assert 0 < expected.mean() < 1
    assert not torch.equal(expected, ice_foreground(student, state["ice_head.fc.weight"],
                                                    images[targets.has_mask]))
    task = PMStyleTask(4, pseudo_masks=pseudo)
    assert torch.equal(task.masks(images, targets), expected)
    net = PatchClassifier(student).eval()
    _, _, mask_loss = task.losses(net, images, targets)
    with torch.no_grad():
        patch_logits = net(images)[1][targets.has_mask]
    torch.testing.assert_close(mask_loss.detach(), pm_style_loss(
        patch_logits, targets.label[targets.has_mask], expected))

    out = tmp_path / "pm"
    script("pm").main(BASE + RECIPE + ["--mask-fraction", "0.25", "--pseudo-masks", f"ice:{path}",
                                       "--output", str(out)])
    meta = checkpoint(out)["meta"]
    assert meta["mask_source"] == f"ice:{path}" and meta["masked_images"] == 8


def test_bad_input_gets_a_clear_error(tmp_path):
    pm = script("pm")
    args = BASE + RECIPE + ["--output", str(tmp_path / "run")]
    for fraction in ("1.5", "-0.1"):
        with pytest.raises(ValueError, match=r"--mask-fraction must be in \[0, 1\], got"):
            pm.main(args + ["--mask-fraction", fraction])
    with pytest.raises(ValueError, match="--mixup and --cutmix mix images but not their masks"):
        pm.main(args + ["--mixup", "0.8"])
    with pytest.raises(ValueError, match="--pseudo-masks must be ice:CHECKPOINT"):
        pm.main(args + ["--pseudo-masks", "gradcam:x.pth"])
    # a pseudo-mask checkpoint of another architecture, of another class count, without a head
    other = save_ice_checkpoint(tmp_path / "wide.pth", embed_dim=24, num_heads=2)
    with pytest.raises(ValueError, match="is not a vit_tiny_patch16_224 like the model being "
                                         "trained"):
        pm.main(args + ["--pseudo-masks", f"ice:{other}"])
    deeper = save_ice_checkpoint(tmp_path / "deep.pth", depth=6)
    with pytest.raises(ValueError, match="another architecture"):
        pm.main(args + ["--pseudo-masks", f"ice:{deeper}"])
    ten = save_ice_checkpoint(tmp_path / "ten.pth", num_classes=10)
    with pytest.raises(ValueError, match="ICE head over 10 classes, the model being trained 4"):
        pm.main(args + ["--pseudo-masks", f"ice:{ten}"])
    headless = tmp_path / "plain.pth"
    torch.save({"model": tiny_model().state_dict()}, headless)
    with pytest.raises(ValueError, match=r"has no ICE head \(ice_head\.\* keys\)"):
        pm.main(args + ["--pseudo-masks", f"ice:{headless}"])
    # a dataset without masks while the fraction is positive (an ImageFolder has none)
    from PIL import Image
    for c in ("a", "b"):
        os.makedirs(tmp_path / "folder" / "train" / c)
        for i in range(2):
            Image.new("RGB", (32, 32), (i * 90, 40, 200)).save(tmp_path / "folder" / "train" / c / f"{i}.png")
    folder = [a for a in args if a not in ("--num-classes", "4")]
    folder[folder.index("--output") + 1] = str(tmp_path / "folder-run")
    with pytest.raises(ValueError, match="ImageFolder gives no masks"):
        pm.main(folder + ["--data", f"imagefolder:{tmp_path / 'folder'}", "--mask-fraction", "0.5"])
