"""ice_prune.evaluation against the library on the same checkpoint and against counts done by hand,
then train/evaluate.py end to end: explain.json, the PNG grid, accuracy.json and its errors."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import timm
import torch
from PIL import Image

import ice_prune
from ice_prune import evaluation, maps
from ice_prune.evaluation import metrics
from test_evaldata import write_gtsegs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("evaluate", os.path.join(ROOT, "train", "evaluate.py"))
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8"]


def tiny_vit(num_classes):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, pretrained=False,
                             num_classes=num_classes)


def without_ice_head(state):
    return {k: v for k, v in state.items() if not k.startswith("ice_head.")}


@pytest.fixture
def gtsegs(tmp_path):
    """A gtsegs_ijcv.mat of three 32x32 images with their masks."""
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.zeros((32, 32), np.uint8) for _ in range(3)]
    masks[0][8:24, 8:24] = 1
    masks[1][:, :16] = 1
    masks[2][20:, 4:30] = 1
    path = str(tmp_path / "gtsegs_ijcv.mat")
    write_gtsegs(path, imgs, masks)
    return path


@pytest.fixture
def checkpoint(tmp_path):
    """A 5-class tiny ViT patched with ICE (a random, non-degenerate head), saved as train/ saves."""
    model = tiny_vit(5)
    ice_prune.patch(model, keep_rate=0.7, method="ice", num_classes=5)
    with torch.no_grad():
        model.ice_head.fc.weight.normal_()
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return path, model


# ---------------------------------------------------------------------------------------------
# data

def test_data_specs_and_missing_paths(tmp_path):
    assert evaluation.parse_data_spec("synthetic") == ("synthetic", None)
    assert evaluation.parse_data_spec("voc07:/data/voc") == ("voc07", "/data/voc")
    with pytest.raises(ValueError, match=r"unknown dataset kind 'coco' in 'coco:/x': use synthetic or "
                                         r"one of imagenet-seg:PATH, voc:PATH"):
        evaluation.parse_data_spec("coco:/x")
    with pytest.raises(ValueError, match="cub data needs a path: cub:PATH with PATH the CUB_200_2011 folder"):
        evaluation.parse_data_spec("cub")
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"voc data '{missing}' does not exist: PATH is the "
                                                f"folder holding VOCdevkit/VOC2012"):
        evaluation.open_dataset("voc", missing)


def test_collate_keeps_ragged_targets_a_list():
    batch = [(torch.zeros(3, 4, 4), torch.zeros(1, 4)), (torch.ones(3, 4, 4), torch.ones(2, 4))]
    images, boxes = evaluation.collate(batch)
    assert images.shape == (2, 3, 4, 4) and images[1].eq(1).all()
    assert isinstance(boxes, list) and [b.shape[0] for b in boxes] == [1, 2]
    images, labels = evaluation.collate([(torch.zeros(3, 4, 4), 2), (torch.zeros(3, 4, 4), 0)])
    assert torch.equal(labels, torch.tensor([2, 0]))


# ---------------------------------------------------------------------------------------------
# the map protocols

def test_jaccard_masks_thresholds_by_hand():
    # shares 0.55, 0.3, 0.1, 0.05: tau 0.9 keeps the top three (0.95), tau 0.8 the top two (0.85)
    patch_map = torch.tensor([[5.5, 3.0], [1.0, 0.5]])
    masks = dict(evaluation.jaccard_masks(None, None, "rollout", patch_map, (4, 4), None))
    assert list(masks) == ["mean@0.9", "mean@0.8"]
    up = torch.ones(1, 2, 2).repeat_interleave(2, 1).repeat_interleave(2, 2)[0].bool()  # [4, 4]
    expected_09 = up.clone()
    expected_09[2:, 2:] = False
    expected_08 = up.clone()
    expected_08[2:] = False
    assert torch.equal(masks["mean@0.9"], expected_09) and torch.equal(masks["mean@0.8"], expected_08)
    foreground = torch.tensor([[False, True], [True, False]])
    masks = dict(evaluation.jaccard_masks(None, None, "ice", patch_map, (4, 4), None, foreground))
    assert list(masks) == ["mask"]
    assert torch.equal(masks["mask"], foreground.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_patch_mask():
    patch_map = torch.tensor([[0.0, 1.0], [0.2, 0.9]])  # min-max normalized mean 0.525
    assert np.array_equal(evaluation.patch_mask("gradcam", patch_map), [[False, True], [False, True]])
    foreground = torch.tensor([[True, False], [False, False]])
    assert np.array_equal(evaluation.patch_mask("ice", patch_map, foreground), foreground.numpy())
    # a foreground probability: above 0.5, not Chefer's threshold (which would keep 1.0 and 0.9 only)
    probability = torch.tensor([[0.45, 0.55], [0.6, 1.0]])
    assert np.array_equal(evaluation.patch_mask("ice-pruned", probability),
                          [[False, True], [True, True]])
    masks = dict(evaluation.jaccard_masks(None, None, "ice-pruned", probability, (4, 4), None))
    assert list(masks) == ["mask"]
    assert torch.equal(masks["mask"], torch.tensor([[False, True], [True, True]])
                       .repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_map_agreement_by_hand():
    first = torch.tensor([[[0.9, 0.8], [0.2, 0.1]],    # masks {0, 1} and {0, 2}: IoU 1/3
                          [[0.1, 0.2], [0.3, 0.4]],    # both empty: they agree, IoU 1
                          [[0.7, 0.7], [0.7, 0.7]]])   # constant: no rank correlation
    second = torch.tensor([[[0.6, 0.3], [0.7, 0.2]],
                           [[0.4, 0.3], [0.2, 0.1]],
                           [[0.1, 0.9], [0.2, 0.3]]])
    iou, rho = metrics.map_agreement(first, second)
    np.testing.assert_allclose(iou, [1 / 3, 1.0, 0.25])
    # image 0: ranks (4, 3, 2, 1) and (3, 2, 4, 1): d^2 = 1 + 1 + 4 + 0, rho = 1 - 6 * 6 / 60
    np.testing.assert_allclose(rho[:2], [0.4, -1.0])
    assert np.isnan(rho[2])
    iou, _ = metrics.map_agreement(first, second, threshold=0.15)
    assert iou[1] == 0.5  # {1, 2, 3} against {0, 1, 2}
    with pytest.raises(ValueError, match="one shape"):
        metrics.map_agreement(first, second[:, 0])


def test_evaluate_maps_against_the_library(gtsegs, checkpoint):
    path, saved = checkpoint
    model = ice_prune.load_model("vit_tiny_patch16_224", path, img_size=32, patch_size=8)
    head = model.ice_head
    dataset = evaluation.open_dataset("imagenet-seg", gtsegs, image_size=32)
    res = evaluation.evaluate_maps(model, head, dataset, ("segmentation",), ["ice", "rollout"],
                                   batch_size=2)
    assert res["images"] == 3 and list(res["methods"]) == ["ice", "rollout"]
    # the figures recomputed image by image with the maps and the meter
    unpatched = tiny_vit(5)
    unpatched.load_state_dict(without_ice_head(saved.state_dict()))
    unpatched.eval()
    for method, map_fn in (("ice", lambda img: maps.ice_map(unpatched, img, head=saved.ice_head)),
                           ("rollout", lambda img: maps.rollout(unpatched, img))):
        meter = metrics.ImageNetSegMeter()
        for image, mask in dataset:
            meter.update(maps.upsample(map_fn(image[None]), (32, 32))[0], mask)
        for k, v in meter.compute().items():
            assert res["methods"][method][k] == pytest.approx(v), (method, k)


# a 4x4 patch map of mass 20: A = (1, 1) 12, B = (1, 2) 5, C = (3, 3) 3, zero elsewhere. Sorted and
# normalized its cumulative mass is 0.15, 0.4, 1.0, so tau 0.9 keeps A, B, C and tau 0.8 keeps A, B.
# Chefer's threshold (min-max, above the mean) keeps A, B, C; the component of A is A + B: the box is
# columns 1-2, row 1, [8, 8, 24, 16] in pixels with exclusive ends, [8, 8, 23, 15] inclusive.
FIXED = torch.zeros(4, 4)
FIXED[1, 1], FIXED[1, 2], FIXED[3, 3] = 12.0, 5.0, 3.0


def fixed_map(model, images, target=None):
    return FIXED.expand(images.shape[0], 4, 4).clone()


def patches(*cells):
    """The pixels of 8x8 patches ``(row, col)`` of a 32x32 image."""
    mask = np.zeros((32, 32), bool)
    for r, c in cells:
        mask[8 * r:8 * r + 8, 8 * c:8 * c + 8] = True
    return mask


def test_evaluate_maps_on_synthetic_scenes(monkeypatch):
    monkeypatch.setitem(maps.METHODS, "fixed", fixed_map)
    model = tiny_vit(5).eval()
    dataset = evaluation.open_dataset("synthetic", None, image_size=32, num_classes=5,
                                      kwargs={"length": 4, "num_classes": 3})  # kwargs win
    assert (len(dataset), dataset.num_classes, dataset[0][0].shape) == (4, 3, (3, 32, 32))
    res = evaluation.evaluate_maps(model, None, dataset, evaluation.DATASETS["synthetic"].protocols,
                                   ["rollout", "raw-attention", "fixed"], limit=3)
    assert res["images"] == 3
    for method, figures in res["methods"].items():
        assert 0 <= figures["pixel_accuracy"] <= 100 and 0 <= figures["miou"] <= 100, method
        assert all(0 <= v <= 100 for v in figures["jaccard"].values()), method
    assert set(res["methods"]["rollout"]["jaccard"]) == {"mean@0.9", "mean@0.8"}
    assert set(res["methods"]["raw-attention"]["jaccard"]) == {"mean@0.9", "mean@0.8", "best-head@0.9",
                                                               "best-head@0.8"}
    # the fixed map's foregrounds against the scenes' object masks, IoU per image averaged
    objects = [dataset[i][2].numpy() for i in range(3)]
    want = {f"mean@{tau}": 100 * np.mean([(pred & m).sum() / (pred | m).sum() for m in objects])
            for tau, pred in ((0.9, patches((1, 1), (1, 2), (3, 3))), (0.8, patches((1, 1), (1, 2))))}
    assert res["methods"]["fixed"]["jaccard"] == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown map methods \\['lrp'\\]: choose from ice,"):
        evaluation.evaluate_maps(model, None, dataset, ("segmentation",), ["rollout", "lrp"])
    with pytest.raises(ValueError, match="the ice map needs an ICE head, and there is none"):
        evaluation.evaluate_maps(model, None, dataset, ("segmentation",))  # every map: ice too
    with pytest.raises(ValueError, match="protocols must be some of"):
        evaluation.evaluate_maps(model, None, dataset, (), ["rollout"])


def test_jaccard_corloc_and_cub_of_a_known_map(monkeypatch):
    """Three images scored with the fixed map above, each figure counted by hand."""
    monkeypatch.setitem(maps.METHODS, "fixed", fixed_map)
    model = tiny_vit(3).eval()
    with torch.no_grad():  # every image's top-1 class is 2
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    images = torch.randn(3, 3, 32, 32)

    labels = [np.zeros((32, 32), np.int64) for _ in range(2)]
    labels[0][patches((1, 1), (1, 2))] = 1
    labels[1][patches((1, 1))] = 1
    labels[1][patches((3, 3))] = 2
    labels[1][:8] = 255  # void: skipped as a class
    # image 0: tau 0.9 A+B+C vs A+B 2/3, tau 0.8 A+B vs A+B 1;
    # image 1: tau 0.9 class 1 A 1/3, class 2 C 1/3; tau 0.8 class 1 A 1/2, class 2 C 0
    res = evaluation.evaluate_maps(model, None, [(images[i], torch.from_numpy(labels[i]))
                                                 for i in range(2)], ("jaccard",), ["fixed"])
    assert res["methods"]["fixed"]["jaccard"] == pytest.approx(
        {"mean@0.9": 100 * (2 / 3 + 1 / 3) / 2, "mean@0.8": 100 * (1 + (1 / 2 + 0) / 2) / 2})

    # box [8, 8, 24, 16], 128 px: IoU 1 with image 0's second box, 128 / 192 with image 1's,
    # 128 / 384 with image 2's: two hits of three
    boxes = [torch.tensor([[0.0, 0, 8, 8], [8, 8, 24, 16]]), torch.tensor([[0.0, 8, 24, 16]]),
             torch.tensor([[8.0, 8, 24, 32]])]
    res = evaluation.evaluate_maps(model, None, [(images[i], boxes[i]) for i in range(3)],
                                   ("corloc",), ["fixed"])
    assert res["methods"]["fixed"]["corloc"] == pytest.approx(100 * 2 / 3)

    # inclusive box [8, 8, 23, 15], 128 px; image 0's [8, 8, 16, 15] (72 px, inside it): IoU 72 / 128;
    # image 1's is elsewhere; image 2's is the same box. Classes 2, 2, 0 against the top-1 class 2.
    items = [(images[0], 2, torch.tensor([8.0, 8, 16, 15])), (images[1], 2, torch.tensor([0.0, 24, 7, 31])),
             (images[2], 0, torch.tensor([8.0, 8, 23, 15]))]
    res = evaluation.evaluate_maps(model, None, items, ("cub",), ["fixed"])
    assert res["methods"]["fixed"] == pytest.approx(
        {"top1_cls": 100 * 2 / 3, "gt_known_loc": 100 * 2 / 3, "top1_loc": 100 / 3, "images": 3})


def center_map(model, images, target=None):
    """A test map: highest in the middle of the patch grid, whatever the image."""
    gh, gw = maps.patch_grid(model, images)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    distance = (ys - (gh - 1) / 2) ** 2 + (xs - (gw - 1) / 2) ** 2
    return (-distance.float()).expand(images.shape[0], gh, gw).clone()


def test_a_registered_map_reaches_evaluate_maps_and_the_command_line(gtsegs, checkpoint, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setitem(maps.METHODS, "center", center_map)  # removed again after the test
    assert evaluate.parser().parse_args(["explain", "--data", "x"]).methods is None  # every map
    path, _ = checkpoint
    model = ice_prune.load_model("vit_tiny_patch16_224", path, img_size=32, patch_size=8)
    head = model.ice_head
    dataset = evaluation.open_dataset("imagenet-seg", gtsegs, image_size=32)
    every = evaluation.evaluate_maps(model, head, dataset, ("segmentation",), limit=1)
    # an unpatched model gives every map but the pruned forward's
    assert list(every["methods"]) == evaluation.default_methods(model) == [
        m for m in maps.METHODS if m not in maps.PRUNED_FORWARD_METHODS]
    assert evaluation.default_methods(model)[-1] == "center"
    pruned = ice_prune.load_model("vit_tiny_patch16_224", path, method="ice", keep_rate=0.7,
                                  img_size=32, patch_size=8)
    assert evaluation.default_methods(pruned) == list(maps.METHODS)
    res = evaluate.main(["explain", "--data", f"imagenet-seg:{gtsegs}", "--checkpoint", path, *MODEL,
                         "--methods", "center", "--out", str(tmp_path / "out"), "--grid", "0", "--quiet"])
    meter = metrics.ImageNetSegMeter()
    for image, mask in dataset:
        meter.update(maps.upsample(center_map(model, image[None]), (32, 32))[0], mask)
    assert res["methods"]["center"] == pytest.approx(meter.compute())


def pruned_checkpoint(tmp_path, keep_rate=0.5):
    """A 5-class tiny ViT pruned by ICE, with a head that tells patches apart, saved as train/prune.py
    saves."""
    model = tiny_vit(5)
    ice_prune.patch(model, keep_rate=keep_rate, method="ice", num_classes=5)
    with torch.no_grad():
        model.ice_head.fc.weight.normal_(std=0.5)
    path = str(tmp_path / "pruned.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def test_pruned_forward_maps_command_against_the_library(gtsegs, tmp_path):
    path = pruned_checkpoint(tmp_path)
    dataset = evaluation.open_dataset("imagenet-seg", gtsegs, image_size=32)
    for keep_rate in (0.5, 1.0):
        res = evaluate.main(["explain", "--data", f"imagenet-seg:{gtsegs}", "--checkpoint", path,
                             *MODEL, "--method", "ice", "--keep-rate", str(keep_rate), "--methods",
                             "ice-pruned,rollout", "--out", str(tmp_path / "out"), "--grid", "1",
                             "--quiet"])
        assert (res["method"], res["keep_rate"], list(res["methods"])) == (
            "ice", keep_rate, ["ice-pruned", "rollout"])
        model = ice_prune.load_model("vit_tiny_patch16_224", path, method="ice", keep_rate=keep_rate,
                                     img_size=32, patch_size=8)
        meter = metrics.ImageNetSegMeter()
        for image, mask in dataset:
            meter.update(maps.upsample(maps.pruned_forward_map(model, image[None]), (32, 32))[0],
                         mask)
        assert res["methods"]["ice-pruned"] == pytest.approx(meter.compute())
    with pytest.raises(ValueError, match="the ice-pruned map reads a model patched with ICE"):
        evaluate.main(["explain", "--data", f"imagenet-seg:{gtsegs}", "--checkpoint", path, *MODEL,
                       "--methods", "ice-pruned", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="the ice-pruned map reads a model patched with ICE"):
        evaluation.evaluate_maps(tiny_vit(5), None, dataset, ("segmentation",), ["ice-pruned"])


def test_agreement_command_against_a_plain_count(gtsegs, tmp_path):
    path = pruned_checkpoint(tmp_path)
    out = tmp_path / "agree"
    res = evaluate.main(["agreement", "--data", f"imagenet-seg:{gtsegs}", "--checkpoint", path,
                         *MODEL, "--keep-rate", "0.5", "--batch-size", "2", "--out", str(out),
                         "--quiet"])
    with open(out / "agreement.json") as f:
        assert json.load(f) == res
    model = ice_prune.load_model("vit_tiny_patch16_224", path, method="ice", keep_rate=0.5,
                                 img_size=32, patch_size=8)
    images = torch.stack([image for image, _ in evaluation.open_dataset("imagenet-seg", gtsegs,
                                                                        image_size=32)])
    pruned = maps.pruned_forward_map(model, images).flatten(1)
    model.keep_rate = 1.0
    reference = maps.pruned_forward_map(model, images).flatten(1)
    ious, rhos = [], []
    for a, b in zip(pruned, reference):  # each image counted here
        fa, fb = a > 0.5, b > 0.5
        ious.append(1.0 if not (fa | fb).any() else float((fa & fb).sum() / (fa | fb).sum()))
        rhos.append(scipy.stats.spearmanr(a.numpy(), b.numpy()).statistic)
    assert not torch.equal(pruned, reference)  # dropped patches were scored at earlier points
    assert (res["images"], res["keep_rate"], res["reference_keep_rate"]) == (3, 0.5, 1.0)
    assert res["foreground_iou"] == pytest.approx(100 * np.mean(ious))
    assert res["spearman"] == pytest.approx(np.mean(rhos)) and res["spearman_images"] == 3
    assert res["foreground_share"] == pytest.approx(100 * float((pruned > 0.5).float().mean()))
    assert res["reference_foreground_share"] == pytest.approx(
        100 * float((reference > 0.5).float().mean()))
    assert res["logits_identical"] and res["logits_differing_images"] == 0
    assert res["logits_max_abs_diff"] == 0.0
    with pytest.raises(ValueError, match="--reference-keep-rate 0: keep_rate must be in"):
        evaluate.main(["agreement", "--data", f"imagenet-seg:{gtsegs}", "--checkpoint", path,
                       *MODEL, "--reference-keep-rate", "0", "--out", str(out)])


def test_agreement_restores_the_model_and_counts_changed_logits(gtsegs, tmp_path, monkeypatch):
    model = ice_prune.load_model("vit_tiny_patch16_224", pruned_checkpoint(tmp_path), method="ice",
                                 keep_rate=0.5, img_size=32, patch_size=8)
    dataset = evaluation.open_dataset("imagenet-seg", gtsegs, image_size=32)
    forward = type(model).forward

    def nudged(self, x):  # explain mode that changed the output
        return forward(self, x) + (1e-6 if self.explain else 0.0)

    monkeypatch.setattr(type(model), "forward", nudged)
    res = evaluation.evaluate_agreement(model, dataset, 0.7, limit=2)
    assert (res["images"], res["reference_keep_rate"]) == (2, 0.7)
    assert not res["logits_identical"] and res["logits_differing_images"] == 2
    assert res["logits_max_abs_diff"] == pytest.approx(1e-6, rel=0.2)
    assert model.keep_rate == 0.5 and not model.explain
    with pytest.raises(ValueError, match="needs a model patched with ICE"):
        evaluation.evaluate_agreement(tiny_vit(5), dataset)


def test_format_table():
    results = {"images": 3, "methods": {
        "ice": {"miou": 50.0, "images": 3, "jaccard": {"mask": 12.346}},
        "rollout": {"miou": 40.1, "images": 3}}}
    assert evaluation.format_table(results, "voc:/data") == (
        "voc:/data (3 images)\n"
        "method | jaccard[mask] | miou\n"
        "--- | --- | ---\n"
        "ice | 12.35 | 50.00\n"
        "rollout | - | 40.10")


# ---------------------------------------------------------------------------------------------
# accuracy

class FixedLogits(torch.nn.Module):
    """Returns row ``i`` of ``logits`` for an image filled with the value ``i``."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits[images[:, 0, 0, 0].long()]


def test_evaluate_accuracy_counts_by_hand():
    scores = torch.arange(10.0)  # class 9 first, then 8, 7, ...: top-5 is {9, 8, 7, 6, 5}
    logits = scores.expand(4, 10)
    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 2, 2)
    labels = torch.tensor([9, 6, 4, 0])  # top-1, top-5 only, neither, neither
    dataset = torch.utils.data.TensorDataset(images, labels)
    res = evaluation.evaluate_accuracy(FixedLogits(logits), dataset, batch_size=3)
    assert res == {"images": 4, "top1": 25.0, "top5": 50.0}
    assert evaluation.evaluate_accuracy(FixedLogits(logits), dataset, limit=2) == {
        "images": 2, "top1": 50.0, "top5": 100.0}


# ---------------------------------------------------------------------------------------------
# train/evaluate.py end to end

def test_explain_command(gtsegs, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = str(tmp_path / "out")
    res = evaluate.main(["explain", "--data", f"imagenet-seg:{gtsegs}", "--checkpoint", path, *MODEL,
                         "--methods", "ice,rollout", "--batch-size", "2", "--out", out, "--grid", "2",
                         "--quiet"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"imagenet-seg:{gtsegs} (3 images)\nmethod | ")
    assert "\nice | " in printed and "\nrollout | " in printed
    assert list(res) == ["data", "model", "checkpoint", "images", "methods"]
    assert (res["model"], res["checkpoint"], res["images"]) == ("vit_tiny_patch16_224", path, 3)
    with open(os.path.join(out, "explain.json")) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    assert os.path.getsize(os.path.join(out, "explain_grid.png")) > 0
    # what the library computes on the same checkpoint and data
    model = ice_prune.load_model("vit_tiny_patch16_224", path, img_size=32, patch_size=8)
    head = model.ice_head
    dataset = evaluation.open_dataset("imagenet-seg", gtsegs, image_size=32)
    # at the command's batch size: a model's CPU forward may round differently at another one, and
    # the pixels' mAP moves with any reordering of near-tied scores
    library = evaluation.evaluate_maps(model, head, dataset, ("segmentation",), ["ice"],
                                       batch_size=2)
    assert res["methods"]["ice"] == pytest.approx(library["methods"]["ice"])


def test_accuracy_command_patched_against_a_plain_count(tmp_path):
    """12 classes so that top-5 can miss; half the labels are the patched model's own predictions,
    so a model evaluated unpatched or with a fresh ICE head scores differently."""
    torch.manual_seed(0)
    num_classes = 12
    model = tiny_vit(num_classes)
    ice_prune.patch(model, keep_rate=0.5, method="ice", num_classes=num_classes)
    with torch.no_grad():
        model.ice_head.fc.weight.normal_()
        model.head.weight.normal_()  # spread the logits: pruning moves the top-1
    model.eval()
    ckpt = str(tmp_path / "ckpt.pth")
    torch.save({"model": model.state_dict()}, ckpt)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2 * num_classes)]
    os.makedirs(tmp_path / "staging" / "all")
    for j, photo in enumerate(photos):
        Image.fromarray(photo).save(tmp_path / "staging" / "all" / f"{j:02d}.png")
    staged = evaluation.open_dataset("folder", str(tmp_path / "staging"), image_size=32)
    with torch.no_grad():
        predicted = model(torch.stack([image for image, _ in staged])).argmax(-1)
    # one image in every class folder; the other half in the folder of the patched model's top-1
    labels = list(range(num_classes)) + predicted[num_classes:].tolist()
    for j, (photo, label) in enumerate(zip(photos, labels)):
        os.makedirs(tmp_path / "folder" / f"c{label:02d}", exist_ok=True)
        Image.fromarray(photo).save(tmp_path / "folder" / f"c{label:02d}" / f"{j:02d}.png")

    res = evaluate.main(["accuracy", "--data", f"folder:{tmp_path / 'folder'}", "--checkpoint", ckpt,
                         *MODEL, "--method", "ice", "--keep-rate", "0.5", "--out", str(tmp_path / "o"),
                         "--quiet"])
    with open(tmp_path / "o" / "accuracy.json") as f:
        assert json.load(f) == res
    assert (res["images"], res["method"], res["keep_rate"]) == (2 * num_classes, "ice", 0.5)
    dataset = evaluation.open_dataset("folder", str(tmp_path / "folder"), image_size=32)
    x = torch.stack([image for image, _ in dataset])
    y = torch.tensor([label for _, label in dataset])

    def top1_top5(m):
        with torch.no_grad():
            top = m(x).topk(5, -1).indices
        return (100 * (top[:, 0] == y).float().mean().item(),
                100 * (top == y[:, None]).any(-1).float().mean().item())

    assert (res["top1"], res["top5"]) == pytest.approx(top1_top5(model))
    assert res["top1"] >= 50 and res["top5"] < 100
    unpatched = tiny_vit(num_classes)
    unpatched.load_state_dict(without_ice_head(model.state_dict()))
    fresh_head = tiny_vit(num_classes)
    ice_prune.patch(fresh_head, keep_rate=0.5, method="ice", num_classes=num_classes)
    fresh_head.load_state_dict(without_ice_head(model.state_dict()), strict=False)
    for wrong in (unpatched.eval(), fresh_head.eval()):
        assert top1_top5(wrong)[0] != pytest.approx(res["top1"])


def test_accuracy_command_on_synthetic_scenes(tmp_path):
    # as train/repro runs it: --data-kwargs name the class count and the seed
    res = evaluate.main(["accuracy", "--data", "synthetic", "--data-kwargs",
                         '{"length": 3, "num_classes": 4, "seed": 0}', *MODEL, "--model-kwargs",
                         '{"num_classes": 4}', "--out", str(tmp_path), "--quiet"])
    assert res["images"] == 3 and res["method"] is None and 0 <= res["top1"] <= res["top5"] <= 100


def test_command_line_errors(gtsegs, checkpoint, tmp_path):
    path, _ = checkpoint
    out = ["--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="unknown dataset kind 'coco'"):
        evaluate.main(["explain", "--data", "coco:/x", *MODEL, *out])
    with pytest.raises(ValueError, match="imagenet-seg data needs a path: imagenet-seg:PATH"):
        evaluate.main(["explain", "--data", "imagenet-seg", *MODEL, *out])
    with pytest.raises(FileNotFoundError, match="imagenet-seg data '/nowhere/gt.mat' does not exist"):
        evaluate.main(["explain", "--data", "imagenet-seg:/nowhere/gt.mat", "--checkpoint", path, *MODEL,
                       *out])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        evaluate.main(["explain", "--data", f"imagenet-seg:{gtsegs}", "--checkpoint",
                       str(tmp_path / "missing.pth"), *MODEL, *out])
    with pytest.raises(ValueError, match=r"unknown map methods \['lrp'\]: choose from "
                                         + ",".join(maps.METHODS)):
        evaluate.main(["explain", "--data", f"imagenet-seg:{gtsegs}", "--methods", "ice,lrp", *MODEL, *out])
    with pytest.raises(ValueError, match="the ice map needs an ICE head, and there is none: the "
                                         "checkpoint has no ice_head"):
        evaluate.main(["explain", "--data", f"imagenet-seg:{gtsegs}", "--methods", "ice", *MODEL, *out])
    with pytest.raises(ValueError, match="--data folder has no masks or boxes to explain against"):
        evaluate.main(["explain", "--data", f"folder:{tmp_path}", *MODEL, *out])
    with pytest.raises(ValueError, match="--data imagenet-seg has no image-class labels; accuracy needs "
                                         "one of synthetic, cub, folder"):
        evaluate.main(["accuracy", "--data", f"imagenet-seg:{gtsegs}", *MODEL, *out])
    with pytest.raises(ValueError, match="--model-kwargs is not JSON"):
        evaluate.main(["accuracy", "--data", "synthetic", *MODEL, "--model-kwargs", "{depth: 2}", *out])


def test_script_reports_errors_in_one_line():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train", "evaluate.py"), "explain",
                          "--data", "coco:/x"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "error: unknown dataset kind 'coco' in 'coco:/x'" in run.stderr
