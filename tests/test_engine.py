import os

import pytest
import timm
import torch

from ice_prune import engine


def tiny(num_classes=3):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=num_classes)


def test_save_checkpoint_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    engine.save_checkpoint(path, {"epoch": 1})
    assert os.listdir(tmp_path) == ["last.pth"]
    real_save = torch.save

    def crash(obj, f):  # the disk fills up half way through the file
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint(path, {"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path) == ["last.pth"]  # no temp file left behind
    assert torch.load(path, weights_only=False)["epoch"] == 1  # the old file is intact
    engine.save_checkpoint(path, {"epoch": 3})
    assert os.listdir(tmp_path) == ["last.pth"]
    assert torch.load(path, weights_only=False)["epoch"] == 3


@pytest.mark.parametrize("fmt", ["deit", "timm", "safetensors", "ddp"])
def test_load_weights_formats(tmp_path, fmt):
    src, dst = tiny(), tiny()
    sd = src.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = str(tmp_path / "w.safetensors")
        save_file(sd, path)
    else:
        path = str(tmp_path / "w.pth")
        obj = {"model": sd} if fmt == "deit" else sd
        if fmt == "ddp":
            obj = {"model": {f"module.{k}": v for k, v in sd.items()}}
        torch.save(obj, path)
    dst.ice_head = torch.nn.Linear(48, 4, bias=False)  # a new head may be missing from the file
    left = engine.load_weights(dst, path)
    assert left == ["ice_head.weight"]
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v)


def test_load_weights_names_the_differences(tmp_path):
    torch.save({"model": tiny(5).state_dict()}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"head.bias: checkpoint \(5,\) vs model \(3,\)"):
        engine.load_weights(tiny(3), str(tmp_path / "c.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth' does not exist"):
        engine.load_weights(tiny(3), str(tmp_path / "missing.pth"))


def test_prepare_output_refuses_to_overwrite(tmp_path):
    info = engine.DistInfo()
    out = str(tmp_path / "run")
    assert engine.prepare_output(out, False, False, info) is None
    open(os.path.join(out, "log.jsonl"), "w").close()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        engine.prepare_output(out, False, False, info)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        engine.prepare_output(out, True, False, info)
    assert engine.prepare_output(out, False, True, info) is None
    assert not os.path.exists(os.path.join(out, "log.jsonl"))


def test_resume_command():
    cmd = engine.resume_command(["train/x.py", "--lr", "1e-5", "--overwrite", "--output", "a b"])
    assert cmd.endswith("train/x.py --lr 1e-5 --output 'a b' --resume")
    assert engine.resume_command(["train/x.py"], world_size=4).startswith(
        "torchrun --nproc_per_node 4 train/x.py")


def test_bad_train_config():
    with pytest.raises(ValueError, match="amp"):
        engine.TrainConfig(output="x", amp="fp8")
    with pytest.raises(ValueError, match="ema_decay"):
        engine.TrainConfig(output="x", ema_decay=1.5)


def test_load_weights_reset_classifier_keeps_the_new_head_and_loads_the_rest(tmp_path):
    ten = tiny(10)
    torch.save({"model": ten.state_dict()}, tmp_path / "c10.pth")
    three = tiny(3)
    fresh_head = three.head.weight.clone()
    with pytest.raises(ValueError, match="--reset-classifier"):  # the error names the way out
        engine.load_weights(three, str(tmp_path / "c10.pth"))
    left = engine.load_weights(three, str(tmp_path / "c10.pth"), reset_classifier=True)
    assert sorted(left) == ["head.bias", "head.weight"]
    assert torch.equal(three.head.weight, fresh_head)  # the 3-class head stays as initialized
    for k, v in ten.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(three.state_dict()[k], v)
    assert engine.classifier_keys(three) == ("head.",)
