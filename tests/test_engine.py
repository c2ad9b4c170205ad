import os

import pytest

from ice_prune.training import engine


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
