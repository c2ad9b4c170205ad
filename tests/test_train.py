"""The train/ scripts end to end on SyntheticScenes with a tiny ViT on CPU."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import timm
import torch

from ice_prune.checkpoint import read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = '{"patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}'
BASE = ["--model", "vit_tiny_patch16_224", "--model-kwargs", KW, "--img-size", "32",
        "--workers", "0", "--no-progress", "--drop-path", "0", "--mixup", "0", "--cutmix", "0",
        "--smoothing", "0", "--log-every", "1", "--lr", "3e-3"]


def script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "train", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out):
    return read_checkpoint(os.path.join(out, "last.pth"))["model"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def free_port():
    """A port nothing listens on: bound to port 0, the system picks one (a fixed port collides with
    another run of the suite on the same machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_explain_lowers_the_loss_and_moves_the_foreground_fraction(tmp_path):
    explain = script("explain")
    out = str(tmp_path / "a")
    explain.main(BASE + ["--synthetic-train", "64", "--synthetic-val", "16", "--batch-size", "16",
                         "--epochs", "3", "--lambda-class", "0.5", "--output", out])
    records = log(out)
    epochs = [r for r in records if "train" in r]
    first = [r for r in records if r.get("iter") == 0][0]
    assert epochs[-1]["train"]["loss"] < epochs[0]["train"]["loss"] - 0.05
    # with background weight 0.5 the head learns to call patches background
    assert epochs[-1]["train"]["fg_fraction"] < first["fg_fraction"] - 0.15
    ckpt = read_checkpoint(os.path.join(out, "last.pth"))
    assert ckpt["epoch"] == 3 and ckpt["meta"]["variant"] == "ice"
    assert ckpt["model"]["ice_head.fc.weight"].shape == (11, 48)


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_prune_lowers_the_loss(tmp_path, method):
    prune = script("prune")
    out = str(tmp_path / method)
    prune.main(BASE + ["--synthetic-train", "64", "--synthetic-val", "16", "--batch-size", "16",
                       "--epochs", "3", "--method", method, "--keep-rate", "0.5", "--locs", "1",
                       "2", "--output", out])
    epochs = [r for r in log(out) if "train" in r]
    assert epochs[-1]["train"]["loss"] < epochs[0]["train"]["loss"]
    assert ("ice_loss" in epochs[0]["train"]) == (method == "ice")
    assert 0 <= epochs[-1]["val"]["acc1"] <= 1


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = BASE + ["--synthetic-train", "240", "--synthetic-val", "8", "--batch-size", "8",
                   "--epochs", "2", "--variant", "ice"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    explain = script("explain")
    cmd = [sys.executable, os.path.join(ROOT, "train", "explain.py")] + args
    # one thread everywhere: the same float reduction order in every run, so weights match bitwise
    subprocess.run(cmd + ["--output", whole], env=env(), check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--output", killed], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    path = os.path.join(killed, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(path) and any(r.get("epoch") == 1 and r.get("iter", 0) >= 3
                                        for r in log(killed)):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert read_checkpoint(os.path.join(killed, "last.pth"))["epoch"] == 1
    # the output dir holds a run: refused without --resume
    with pytest.raises(FileExistsError, match="--resume"):
        explain.main(args + ["--output", killed])
    res = subprocess.run(cmd + ["--output", killed, "--resume"], env=env(), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(whole), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_two_process_gloo_run_agrees_with_one_process(tmp_path):
    args = BASE + ["--synthetic-train", "32", "--synthetic-val", "8", "--epochs", "1",
                   "--loss-mode", "paper"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    script("explain").main(args + ["--batch-size", "16", "--output", one])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), os.path.join(ROOT, "train", "explain.py")] + args + [
        "--batch-size", "8", "--output", two]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torchrun --nproc_per_node 2" in res.stdout  # the printed resume command
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)
    la, lb = log(one)[-1]["train"], log(two)[-1]["train"]
    assert la["loss"] == pytest.approx(lb["loss"], abs=1e-4)


def test_bad_inputs(tmp_path):
    explain, prune = script("explain"), script("prune")
    small = BASE + ["--synthetic-train", "16", "--synthetic-val", "8", "--batch-size", "8",
                    "--epochs", "1"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        explain.main(small + ["--data", f"imagefolder:{tmp_path / 'nope'}",
                              "--output", str(tmp_path / "o1")])
    os.makedirs(tmp_path / "data" / "a")
    os.makedirs(tmp_path / "data" / "b")
    from PIL import Image
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "a" / "x.png")
    with pytest.raises(FileNotFoundError, match="class folder"):
        explain.main(small + ["--data", f"imagefolder:{tmp_path / 'data'}",
                              "--output", str(tmp_path / "o2")])
    # a checkpoint for 5 classes into a 10-class model, and one of another width
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                              depth=4, num_heads=3, num_classes=5)
    torch.save({"model": other.state_dict()}, tmp_path / "c5.pth")
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(5, 48\) vs model \(10, 48\)"):
        explain.main(small + ["--checkpoint", str(tmp_path / "c5.pth"),
                              "--output", str(tmp_path / "o3")])
    wide = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=96,
                             depth=2, num_heads=3, num_classes=10)
    from safetensors.torch import save_file
    save_file(wide.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="(?s)shapes differ.*missing in the checkpoint: blocks.2"):
        prune.main(small + ["--checkpoint", str(tmp_path / "wide.safetensors"), "--locs", "1",
                            "--output", str(tmp_path / "o4")])
    with pytest.raises(ValueError, match="keep_rate must be in"):
        prune.main(small + ["--keep-rate", "1.5", "--locs", "1", "--output", str(tmp_path / "o5")])
    with pytest.raises(ValueError, match=r"--lambda-class must be in \[0, 1\]"):
        explain.main(small + ["--lambda-class", "1.2", "--output", str(tmp_path / "o6")])
    with pytest.raises(ValueError, match="ice-weight"):
        prune.main(small + ["--ice-weight", "-1", "--output", str(tmp_path / "o7")])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        explain.main(small + ["--resume", "--output", str(tmp_path / "o8")])


def test_lambda_class_flag_in_both_scripts_and_the_checkpoint_meta(tmp_path):
    explain, prune = script("explain"), script("prune")
    small = BASE + ["--synthetic-train", "8", "--synthetic-val", "8", "--batch-size", "8",
                    "--epochs", "1"]

    def meta(out):
        return read_checkpoint(os.path.join(out, "last.pth"))["meta"]

    # the default: the class-count rule at SyntheticScenes' 10 classes, 9.75 / (9.75 + 25)
    explain.main(small + ["--output", str(tmp_path / "e-auto")])
    m = meta(str(tmp_path / "e-auto"))
    assert m["lambda_rule"] == "auto" and m["lambda_class"] == pytest.approx(9.75 / 34.75)
    assert m["loss"]["lambda_reference"] == 0.975
    # ICE-f's paper value is 0.99 at 1000 classes: 9.9 / (9.9 + 10) at 10
    explain.main(small + ["--variant", "ice-f", "--output", str(tmp_path / "e-f")])
    assert meta(str(tmp_path / "e-f"))["lambda_class"] == pytest.approx(9.9 / 19.9)
    explain.main(small + ["--lambda-class", "paper", "--output", str(tmp_path / "e-paper")])
    m = meta(str(tmp_path / "e-paper"))
    assert m["lambda_rule"] == "paper" and m["lambda_class"] == 0.975
    prune.main(small + ["--method", "ice", "--locs", "1", "--lambda-class", "0.4",
                        "--output", str(tmp_path / "p")])
    m = meta(str(tmp_path / "p"))
    assert m["lambda_rule"] == "fixed" and m["lambda_class"] == 0.4
    with pytest.raises(ValueError, match="not lambda-parametrized"):
        explain.main(small + ["--loss-mode", "official", "--lambda-class", "auto",
                              "--output", str(tmp_path / "e-off")])
    with pytest.raises(ValueError, match="applies to --method ice only"):
        prune.main(small + ["--method", "evit", "--lambda-class", "auto",
                            "--output", str(tmp_path / "p-evit")])
