"""train/explain.py --map-val-images: ICE's map scored on SyntheticScenes' mapval split every epoch,
checked against the evaluation protocol run by hand on the saved checkpoint."""
import importlib.util
import json
import os

import pytest
import torch

import ice_prune
from ice_prune.checkpoint import read_checkpoint
from ice_prune.data import SyntheticScenes
from ice_prune.evaluation import evaluate_maps
from ice_prune.maps import ice_explain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_KW = {"patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}
ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL_KW), "--img-size", "32",
        "--workers", "0", "--no-progress", "--drop-path", "0", "--mixup", "0", "--cutmix", "0",
        "--smoothing", "0", "--log-every", "1", "--lr", "3e-3", "--synthetic-train", "32",
        "--synthetic-val", "8", "--batch-size", "8", "--epochs", "2", "--overwrite"]


def explain():
    spec = importlib.util.spec_from_file_location("explain", os.path.join(ROOT, "train", "explain.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def epochs(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "train" in r]


def test_map_val_records_match_the_evaluation_on_the_checkpoint(tmp_path):
    script = explain()
    scored, off = str(tmp_path / "scored"), str(tmp_path / "off")
    script.main(ARGS + ["--output", scored, "--map-val-images", "4"])
    records = epochs(scored)
    assert [r["map_val"]["updates"] for r in records] == [4, 8]  # 32 images / batch 8 per epoch
    for r in records:
        assert set(r["map_val"]) == {"miou", "pixel_accuracy", "map", "fg_share", "images", "updates"}
        assert r["map_val"]["images"] == 4 and 0 <= r["map_val"]["fg_share"] <= 100

    # an independent recomputation after training: the checkpoint loaded afresh, evaluate_maps'
    # segmentation protocol on the first 4 images of the mapval split (seed 0, the run's scenes)
    model = ice_prune.load_model("vit_tiny_patch16_224", os.path.join(scored, "last.pth"),
                                 img_size=32, **MODEL_KW)
    data = SyntheticScenes(num_classes=10, img_size=32, length=4, split="mapval", seed=0,
                           return_mask=True)
    ref = evaluate_maps(model, model.ice_head, data, ["segmentation"], ["ice"])["methods"]["ice"]
    last = records[-1]["map_val"]
    assert last["miou"] == pytest.approx(ref["miou"], abs=1e-9)
    assert last["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"], abs=1e-9)
    assert last["map"] == pytest.approx(ref["map"], abs=1e-9)
    with torch.no_grad():
        fg = ice_explain(model, torch.stack([data[i][0] for i in range(4)]), target="ice").foreground
    assert last["fg_share"] == pytest.approx(100 * fg.float().mean().item(), abs=1e-9)
    # the evaluation images (the val split) would score otherwise: the record is not theirs
    val = SyntheticScenes(num_classes=10, img_size=32, length=4, split="val", seed=0, return_mask=True)
    assert evaluate_maps(model, model.ice_head, val, ["segmentation"], ["ice"])["methods"]["ice"][
        "miou"] != pytest.approx(last["miou"], abs=1e-6)

    # off: no record, and the checkpoint a run without the flag writes, byte for byte (same folder,
    # so the arguments it stores agree); scoring maps never changes the training
    script.main(ARGS + ["--output", off, "--map-val-images", "0"])
    with open(os.path.join(off, "last.pth"), "rb") as f:
        off_bytes = f.read()
    assert not any("map_val" in r for r in epochs(off))
    script.main(ARGS + ["--output", off])
    with open(os.path.join(off, "last.pth"), "rb") as f:
        assert f.read() == off_bytes
    assert not any("map_val" in r for r in epochs(off))
    a, b = read_checkpoint(os.path.join(scored, "last.pth")), read_checkpoint(os.path.join(off, "last.pth"))
    assert a["num_updates"] == b["num_updates"] == 8 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("extra, match", [
    (["--data", "imagefolder:/nonexistent", "--map-val-images", "4"], "--map-val-images.*--data synthetic"),
    (["--map-val-images", "-1"], "--map-val-images must be >= 0"),
])
def test_map_val_bad_arguments(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        explain().main(ARGS + ["--output", str(tmp_path / "run")] + extra)
