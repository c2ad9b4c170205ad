"""ice_prune.checkpoint: weights-only loading everywhere, the --trust-checkpoint opt-in, releases,
safetensors and this project's own checkpoints, and one clear error per damaged file."""
import argparse
import importlib.util
import os
import pathlib
import random
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.scheduler import create_scheduler_v2

import ice_prune
from ice_prune import checkpoint
from ice_prune.training import engine
from ice_prune.checkpoint import CheckpointError, UnsafeCheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = '{"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}'
TRAIN = ["--model", "vit_tiny_patch16_224", "--model-kwargs", KW, "--img-size", "32",
         "--workers", "0", "--no-progress", "--drop-path", "0", "--mixup", "0", "--cutmix", "0",
         "--smoothing", "0", "--synthetic-train", "16", "--synthetic-val", "8", "--batch-size", "8",
         "--epochs", "1"]
REFUSED = (r"(?s)^checkpoint '.*\.pth' was not loaded: it needs full unpickling, which would "
           r"import and call (io|builtins)\.open.*--trust-checkpoint \(trust=True")


def script(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


explain = script("train/explain.py", "explain")
prune = script("train/prune.py", "prune")
pm = script("train/pm.py", "pm")
evaluate = script("train/evaluate.py", "evaluate")
bench = script("bench/throughput.py", "bench_throughput")


def tiny(num_classes=10, **kw):
    """The model TRAIN builds (train/ scripts at 10 SyntheticScenes classes)."""
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                num_classes=num_classes)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kw})


class Payload:
    """What a malicious checkpoint carries: unpickling it creates ``path`` (it could run anything)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def booby_trapped(tmp_path):
    """``(checkpoint, marker)``: a DeiT-style release of ``tiny()`` whose unpickling creates
    ``marker``."""
    marker = tmp_path / "pwned"
    path = tmp_path / "trapped.pth"
    torch.save({"model": tiny().state_dict(), "epoch": 1, "extra": Payload(marker)}, path)
    return str(path), marker


# ---------------------------------------------------------------------------------------------
# a checkpoint that runs code when unpickled: refused everywhere, loaded only when trusted


def test_library_functions_refuse_a_pickled_payload_and_load_it_when_trusted(booby_trapped):
    path, marker = booby_trapped
    for load in (checkpoint.read_checkpoint, checkpoint.read_state_dict,
                 lambda p: ice_prune.load_checkpoint(tiny(), p),
                 lambda p: ice_prune.load_model("vit_tiny_patch16_224", p, img_size=32,
                                                patch_size=8, embed_dim=48, depth=2, num_heads=3)):
        with pytest.raises(UnsafeCheckpointError, match=REFUSED):
            load(path)
        assert not marker.exists()
    model = tiny()
    assert ice_prune.load_checkpoint(model, path, trust=True) == []
    assert marker.exists()  # the opt-in unpickles in full: the payload ran
    marker.unlink()
    state = checkpoint.read_state_dict(path, trust=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model = ice_prune.load_model("vit_tiny_patch16_224", path, trust=True, img_size=32,
                                 patch_size=8, embed_dim=48, depth=2, num_heads=3)
    assert not hasattr(model, "ice_head") and marker.exists()


def test_a_legacy_format_payload_is_refused_too(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "old.pth"
    torch.save({"model": tiny().state_dict(), "x": Payload(marker)}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        checkpoint.read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("train", [explain, prune], ids=["explain", "prune"])
def test_training_checkpoint_refuses_a_payload(booby_trapped, tmp_path, train):
    path, marker = booby_trapped
    extra = ["--locs", "1"] if train is prune else []
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        train.main(TRAIN + extra + ["--checkpoint", path, "--output", str(tmp_path / "o")])
    assert not marker.exists()
    train.main(TRAIN + extra + ["--checkpoint", path, "--trust-checkpoint",
                                "--output", str(tmp_path / "trusted")])
    assert marker.exists()


def test_pm_pseudo_mask_checkpoint_refuses_a_payload(tmp_path):
    marker, path = tmp_path / "pwned", str(tmp_path / "ice.pth")
    ice = tiny()
    ice_prune.patch(ice, keep_rate=1.0, method="ice", locs=[1])
    torch.save({"model": ice.state_dict(), "x": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        pm.main(TRAIN + ["--pseudo-masks", f"ice:{path}", "--output", str(tmp_path / "o")])
    assert not marker.exists()


def test_resume_refuses_a_payload(tmp_path):
    out, marker = str(tmp_path / "run"), tmp_path / "pwned"
    explain.main(TRAIN + ["--output", out])
    last = os.path.join(out, engine.CHECKPOINT)
    ckpt = checkpoint.read_checkpoint(last)
    ckpt["meta"]["note"] = Payload(marker)
    torch.save(ckpt, last)
    resume = TRAIN[:-1] + ["2", "--output", out, "--resume"]
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        explain.main(resume)
    assert not marker.exists()
    explain.main(resume + ["--trust-checkpoint"])
    assert marker.exists() and checkpoint.read_checkpoint(last)["epoch"] == 2


def test_evaluate_refuses_a_payload(booby_trapped, tmp_path):
    path, marker = booby_trapped
    argv = ["accuracy", "--data", "synthetic", "--data-kwargs", '{"length": 4}', "--checkpoint",
            path, "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8",
            "--model-kwargs", '{"embed_dim": 48, "depth": 2, "num_heads": 3}', "--quiet",
            "--out", str(tmp_path / "eval")]
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        evaluate.main(argv)
    assert not marker.exists()
    assert evaluate.main(argv + ["--trust-checkpoint"])["images"] == 4
    assert marker.exists()


def test_benchmark_refuses_a_payload(tmp_path):
    marker, path = tmp_path / "pwned", str(tmp_path / "trapped.pth")
    src = timm.create_model("vit_tiny_patch16_224", img_size=32)
    torch.save({"model": src.state_dict(), "x": Payload(marker)}, path)
    argv = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--keep-rates", "0.5",
            "--checkpoint", path]
    # the command line: one line naming the file and the opt-in, exit status 2, nothing created
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "throughput.py")] + argv,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 2 and res.stderr.startswith("error: checkpoint ")
    assert "--trust-checkpoint" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        bench.build_variants(bench.parse_args(argv))
    assert not marker.exists()
    models, _ = bench.build_variants(bench.parse_args(argv + ["--trust-checkpoint"]))
    assert marker.exists() and torch.equal(models["ice@0.5"].pos_embed, src.pos_embed)


# ---------------------------------------------------------------------------------------------
# what loads without the opt-in


def deit_release(model, **extra):
    """The layout of DeiT's (and EViT's) training checkpoints: weights, optimizer, scheduler and
    scaler state, the epoch and the argparse Namespace of the run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler = create_scheduler_v2(optimizer, sched="cosine", num_epochs=300)[0]
    args = argparse.Namespace(model="deit_small_patch16_224", lr=5e-4, epochs=300, smoothing=0.1,
                              data_path="/datasets01/imagenet_full_size/061417/", dist_url="env://",
                              input_size=224, output_dir="/checkpoint/deit", resume="",
                              eval=False, repeated_aug=True, mixup=0.8, drop_path=0.1)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": 299,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
            "args": args, **extra}


@pytest.mark.parametrize("fmt", ["deit", "deit-legacy-format", "model_ema", "timm", "plain", "ddp",
                                 "safetensors", "safetensors-named-pth"])
def test_releases_and_state_dicts_load_without_the_opt_in(tmp_path, fmt):
    src = tiny()
    sd = src.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt.startswith("safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "deit-legacy-format":  # torch.save before PyTorch 1.6
        torch.save(deit_release(src), path, _use_new_zipfile_serialization=False)
    else:
        obj = {"deit": lambda: deit_release(src), "plain": lambda: sd,
               "model_ema": lambda: {"model_ema": sd, "epoch": 3},
               "timm": lambda: {"state_dict": sd, "arch": "vit_tiny_patch16_224", "epoch": 3,
                                "args": argparse.Namespace(lr=0.1), "metric": 81.2},
               "ddp": lambda: {"model": {f"module.{k}": v for k, v in sd.items()}}}[fmt]()
        torch.save(obj, path)
    dst = tiny()
    dst.ice_head = torch.nn.Linear(48, 11, bias=False)  # a new ICE head may be missing from it
    left = ice_prune.load_checkpoint(dst, path, optional_prefixes=("ice_head.",))
    assert left == ["ice_head.weight"]
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v), k
    if fmt == "deit":
        release = checkpoint.read_checkpoint(path)
        assert release["epoch"] == 299 and release["args"].model == "deit_small_patch16_224"


def test_a_deit_release_starts_training_without_the_opt_in(tmp_path):
    """Every weight after training at lr 1e-9 is the release's within 1e-5 (the steps move it by
    about 5e-7). The script seeds timm's init as the tests do, so the release is moved off that init
    by noise: a model left at its init would be 1e-2 or more away in every tensor."""
    src = tiny()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(deit_release(src), tmp_path / "deit.pth")
    release = src.state_dict()
    torch.manual_seed(0)
    init = tiny().state_dict()
    assert min((init[k] - v).abs().max() for k, v in release.items()) > 1e-2
    out = str(tmp_path / "run")
    explain.main(TRAIN + ["--checkpoint", str(tmp_path / "deit.pth"), "--lr", "1e-9",
                          "--output", out])
    trained = checkpoint.read_state_dict(os.path.join(out, engine.CHECKPOINT))
    moved = {k: float((trained[k] - v).abs().max()) for k, v in release.items()}
    assert max(moved.values()) < 1e-5, sorted(moved.items(), key=lambda kv: -kv[1])[:3]


def test_own_checkpoints_are_plain_and_state_dicts_load_strictly(tmp_path):
    out = str(tmp_path / "run")
    explain.main(TRAIN + ["--output", out])
    last = os.path.join(out, engine.CHECKPOINT)
    ckpt = torch.load(last, weights_only=True)  # no allowed globals at all
    assert ckpt["epoch"] == 1 and ckpt["args"]["output"] == out and ckpt["meta"]["variant"] == "ice"
    assert isinstance(ckpt["rng"][0]["numpy"]["state"]["key"], torch.Tensor)
    model = tiny()
    with pytest.raises(ValueError, match=r"not in the model: ice_head.fc.weight"):
        ice_prune.load_checkpoint(model, last)
    ice_prune.load_checkpoint(model, last, strict=False)
    assert torch.equal(model.pos_embed, ckpt["model"]["pos_embed"])


def test_rng_state_round_trip():
    engine.seed_everything(3)
    state = engine.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    engine.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_a_checkpoint_written_before_the_plain_rng_states_still_resumes(tmp_path):
    """Older checkpoints hold numpy's RNG state as np.random.get_state()'s tuple (an ndarray): they
    load without the opt-in (numpy's array globals are allowed) and continue the same way."""
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    explain.main(TRAIN + ["--output", new])
    shutil.copytree(new, old)
    last = os.path.join(old, engine.CHECKPOINT)
    ckpt = checkpoint.read_checkpoint(last)
    for rng in ckpt["rng"]:
        state = rng["numpy"]
        key = state["state"]["key"].numpy().astype(np.uint32)
        np.random.set_state({**state, "state": {**state["state"], "key": key}})
        rng["numpy"] = np.random.get_state()  # ('MT19937', ndarray, pos, has_gauss, gauss)
    torch.save(ckpt, last)
    for out in (new, old):
        explain.main(TRAIN[:-1] + ["2", "--output", out, "--resume"])
    a = checkpoint.read_state_dict(os.path.join(new, engine.CHECKPOINT))
    b = checkpoint.read_state_dict(last)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_numpy_1_array_pickles_load(tmp_path):
    """numpy 1 names its array constructor numpy.core.multiarray, numpy 2 numpy._core.multiarray."""
    path = tmp_path / "np1.pth"
    torch.save({"rng": np.random.get_state()}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    state = checkpoint.read_checkpoint(path)["rng"]
    assert state[0] == "MT19937" and np.array_equal(state[1], np.random.get_state()[1])


def test_plain():
    meta = {"a": np.float32(0.5), "b": np.arange(3), "c": (1, [2, None]),
            "d": pathlib.PurePosixPath("/x/y"),
            "e": torch.ones(2), 1: True}
    out = checkpoint.plain(meta)
    assert out["a"] == 0.5 and type(out["a"]) is float and out["b"] == [0, 1, 2]
    assert out["c"] == (1, [2, None]) and out["d"] == "/x/y" and out[1] is True
    assert torch.equal(out["e"], torch.ones(2))


def test_save_checkpoint_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    checkpoint.save_checkpoint(path, {"epoch": 1})
    assert os.listdir(tmp_path) == ["last.pth"]
    real_save = torch.save

    def crash(obj, f):  # the disk fills up half way through the file
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, {"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path) == ["last.pth"]  # no temp file left behind
    assert checkpoint.read_checkpoint(path)["epoch"] == 1  # the old file is intact
    checkpoint.save_checkpoint(path, {"epoch": 3})
    assert os.listdir(tmp_path) == ["last.pth"]
    assert checkpoint.read_checkpoint(path)["epoch"] == 3


# ---------------------------------------------------------------------------------------------
# damaged or wrong files: one error naming the file and what is wrong


def write_damaged(tmp_path, kind):
    good = tmp_path / "good.pth"
    torch.save({"model": tiny().state_dict()}, good)
    data = good.read_bytes()
    path = tmp_path / {"bad-header-safetensors": "w.safetensors",
                       "bad-json-safetensors": "w.safetensors",
                       "truncated-safetensors": "w.safetensors"}.get(kind, "w.pth")
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "truncated-legacy":
        torch.save({"model": tiny().state_dict()}, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "text":
        path.write_text("<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>\n")
    elif kind == "plain-text":
        path.write_text("model.pth\n")
    elif kind == "lfs-pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 88\n")
    elif kind == "bad-header-safetensors":  # a header length larger than any file
        path.write_bytes(struct.pack("<Q", 10**12) + b'{"w": 1}')
    elif kind == "bad-json-safetensors":
        path.write_bytes(struct.pack("<Q", 8) + b"{not json")
    elif kind == "truncated-safetensors":
        save_file({"w": torch.ones(100)}, str(path))
        path.write_bytes(path.read_bytes()[:-50])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "no-state-dict":
        torch.save([1, 2, 3], path)
    elif kind == "directory":
        path.mkdir()
    return path


DAMAGED = {
    "truncated": r"is truncated or damaged \(PytorchStreamReader failed reading zip archive.*"
                 r"download or copy it again",
    "truncated-legacy": r"is truncated or damaged \(it ends too early\)",
    "text": r"is a text file \(HTML or XML\), not weights: it begins '<!DOCTYPE html>'; a download "
            r"that returned a web page\?",
    "lfs-pointer": r"is a Git LFS pointer, not the file it points to: it begins "
                   r"'version https://git-lfs.github.com/spec/v1'; fetch it with git lfs pull",
    "plain-text": r"is a text file, not weights: it begins 'model.pth'",
    "bad-header-safetensors": r"is not a valid safetensors file \(.*header too large\)",
    "bad-json-safetensors": r"is not a valid safetensors file \(.*invalid JSON in header",
    "truncated-safetensors": r"is not a valid safetensors file \(.*incomplete metadata",
    "empty": r"is empty \(0 bytes\): a download or copy that did not finish\? fetch it again",
    "binary": r"is not a PyTorch file \(torch.save\) or safetensors: it begins with the bytes",
    "no-state-dict": r"holds no state dict \(a list\): expected a dict of tensors",
    "directory": r"is a directory, not a file",
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_damaged_files_get_one_clear_error(tmp_path, kind):
    path = write_damaged(tmp_path, kind)
    match = f"^checkpoint {str(path)!r} " + DAMAGED[kind]
    with pytest.raises(CheckpointError, match=match) as info:
        ice_prune.load_checkpoint(tiny(), path)
    assert "--trust-checkpoint" not in str(info.value)  # trusting a broken file would not help
    with pytest.raises(CheckpointError, match=match):
        checkpoint.read_state_dict(path, trust=True)


def test_missing_file_and_another_architecture(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope.pth' does not exist"):
        ice_prune.load_checkpoint(tiny(), tmp_path / "nope.pth")
    torch.save({"model": tiny(embed_dim=96).state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"(?s)checkpoint '.*wide.pth' does not fit this model "
                                         r"\(VisionTransformer, 10 classes\):\n  shapes differ: "
                                         r"cls_token: checkpoint \(1, 1, 96\) vs model \(1, 1, 48\)"
                                         r".*--model"):
        ice_prune.load_checkpoint(tiny(), tmp_path / "wide.pth")
    torch.save({"model": tiny(depth=1).state_dict()}, tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"missing in the checkpoint: blocks\.1\."):
        ice_prune.load_checkpoint(tiny(), tmp_path / "shallow.pth")


def test_reset_classifier_keeps_the_new_head_and_loads_the_rest(tmp_path):
    ten = tiny(10)
    torch.save({"model": ten.state_dict()}, tmp_path / "c10.pth")
    three = tiny(3)
    fresh_head = three.head.weight.clone()
    with pytest.raises(ValueError, match=r"head.bias: checkpoint \(10,\) vs model \(3,\)(?s:.*)"
                                         r"--reset-classifier"):  # the error names the way out
        ice_prune.load_checkpoint(three, tmp_path / "c10.pth")
    left = ice_prune.load_checkpoint(three, tmp_path / "c10.pth", reset_classifier=True)
    assert sorted(left) == ["head.bias", "head.weight"]
    assert torch.equal(three.head.weight, fresh_head)  # the 3-class head stays as initialized
    for k, v in ten.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(three.state_dict()[k], v)
    assert checkpoint.classifier_keys(three) == ("head.",)


def test_a_damaged_checkpoint_ends_a_script_in_one_line(tmp_path):
    path = write_damaged(tmp_path, "truncated")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train", "evaluate.py"), "accuracy",
                          "--data", "synthetic", "--checkpoint", str(path), "--quiet"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        f"error: checkpoint {str(path)!r} is truncated or damaged (PytorchStreamReader failed "
        f"reading zip archive: failed finding central directory): download or copy it again"]
