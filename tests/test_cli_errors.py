"""Every script answers a wrong command line with one ``error: ...`` line, exit status 2, no traceback.
Each case runs a script as a subprocess, as a user would; the bad input is caught
before a model or a data set is built, so each case costs about the import of torch."""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    text = tmp / "notes.txt"
    text.write_text("these are notes, not weights\n")
    return {"tmp": tmp, "text": str(text), "missing": str(tmp / "missing.pth"),
            "under_file": str(text / "run")}


def train(script, *args):
    return [f"train/{script}.py", *TINY, "--data", "synthetic", "--synthetic-train", "4",
            "--synthetic-val", "2", "--epochs", "1", "--batch-size", "2", "--workers", "0",
            "--no-progress", *args]


def output(files, name):
    return ["--output", str(files["tmp"] / name)]


# (id, argv built from the files fixture, regex the single error line must match)
CASES = [
    ("evaluate-missing-checkpoint",
     lambda f: ["train/evaluate.py", "accuracy", "--data", "synthetic", *TINY, "--checkpoint",
                f["missing"], "--out", str(f["tmp"] / "ev")],
     r"checkpoint '.*missing\.pth' does not exist"),
    ("bench-text-checkpoint",
     lambda f: ["bench/throughput.py", *TINY, "--checkpoint", f["text"]],
     r"checkpoint '.*notes\.txt' is a text file, not weights"),
    ("prune-missing-imagefolder",
     lambda f: train("prune", "--data", f"imagefolder:{f['tmp'] / 'nope'}", *output(f, "pr")),
     r"data path '.*nope' is not a directory; give an ImageFolder tree"),
    ("prune-unknown-data-kind",
     lambda f: train("prune", "--data", "coco:/x", *output(f, "pr")),
     r"--data must be 'synthetic' or 'imagefolder:PATH', got 'coco:/x'"),
    ("bench-cuda-without-gpu",
     lambda f: ["bench/throughput.py", *TINY, "--device", "cuda"],
     r"--device cuda: .*(no CUDA GPU|only \d+ CUDA).*--device cpu"),
    ("prune-cuda-7",
     lambda f: train("prune", "--device", "cuda:7", *output(f, "pr")),
     r"--device cuda:7: .*(no CUDA GPU|only \d+ CUDA).*--device cpu"),
    ("explain-tpu",
     lambda f: train("explain", "--device", "tpu", *output(f, "ex")),
     r"--device 'tpu' is not a device .*cpu, cuda, cuda:N"),
    ("pm-output-under-file",
     lambda f: train("pm", "--output", f["under_file"]),
     r"--output '.*notes\.txt/run' cannot be created: .*notes\.txt' is a file.*another --output"),
    ("evaluate-out-under-file",
     lambda f: ["train/evaluate.py", "accuracy", "--data", "synthetic", *TINY, "--out",
                f["under_file"]],
     r"--out '.*notes\.txt/run' cannot be created: .*is a file"),
    ("reproduce-out-under-file",
     lambda f: ["train/reproduce.py", "--out", f["under_file"]],
     r"--out '.*notes\.txt/run' cannot be created: .*is a file"),
    ("bench-json-under-file",
     lambda f: ["bench/throughput.py", *TINY, "--json", f["under_file"] + ".json"],
     r"--json '.*notes\.txt/run\.json' cannot be written: .*is a file"),
    ("prune-bad-model-kwargs",
     lambda f: train("prune", "--model-kwargs", "{depth: 6}", *output(f, "pr")),
     r"--model-kwargs is not JSON"),
    ("bench-unknown-model",
     lambda f: ["bench/throughput.py", "--model", "no_such_vit"],
     r"unknown timm model 'no_such_vit'.*timm\.list_models"),
    ("prune-keep-rate",
     lambda f: train("prune", "--keep-rate", "1.5", *output(f, "pr")),
     r"--keep-rate 1\.5: keep_rate must be in \(0, 1\]"),
    ("bench-keep-rates",
     lambda f: ["bench/throughput.py", *TINY, "--keep-rates", "0.7", "2"],
     r"--keep-rates 2: keep_rate must be in \(0, 1\]"),
]


@pytest.fixture(scope="module")
def error_line(files):
    """The one error line a case's script prints, each script run once per module."""
    lines = {}

    def run_case(case_id):
        if case_id not in lines:
            argv = next(a for i, a, _ in CASES if i == case_id)
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
            run = subprocess.run([sys.executable, *argv(files)], capture_output=True, text=True,
                                 cwd=ROOT, env=env, timeout=120)
            printed = [line for line in run.stderr.splitlines()
                       if line.strip() and not line.startswith("warning:")]
            assert "Traceback" not in run.stderr, run.stderr
            assert run.returncode == 2, run.stderr
            errors = [line for line in printed if line.startswith("error: ")]
            assert len(errors) == 1 and len(printed) == 1, run.stderr
            lines[case_id] = errors[0]
        return lines[case_id]

    return run_case


def kinds_matched(line):
    """The distinct patterns of CASES that an error line matches."""
    return {p for _, _, p in CASES if re.search(p, line)}


@pytest.mark.parametrize("case_id, pattern", [pytest.param(i, p, id=i) for i, _, p in CASES])
def test_one_line_error(error_line, case_id, pattern):
    line = error_line(case_id)
    assert kinds_matched(line) == {pattern}, line


def test_at_least_twelve_kinds(error_line):
    """The scripts answer at least twelve kinds of wrong command line, each with its own message:
    an error line matching another case's pattern is the same kind, not a new one."""
    ids = [case_id for case_id, _, _ in CASES]
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # the scripts not run yet by the cases above
        lines = dict(zip(ids, pool.map(error_line, ids)))
    seen = {}
    for case_id, _, pattern in CASES:
        matched = kinds_matched(lines[case_id])
        assert matched == {pattern}, (case_id, lines[case_id], matched)
        seen.setdefault(pattern, case_id)
    assert len(seen) >= 12, sorted(seen.values())


def test_argparse_errors_are_one_line(capsys):
    from ice_prune.training.cli import ArgumentParser

    parser = ArgumentParser(prog="bench/throughput.py")
    parser.add_argument("--dtype", choices=["fp32", "bf16"])
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--dtype", "int8"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.fullmatch(
        r"error: argument --dtype: invalid choice: 'int8' \(choose from .*\) \(see "
        r"bench/throughput\.py --help\)\n", err), err


def test_device_and_output_checks(tmp_path, monkeypatch):
    import torch

    from ice_prune.throughput import check_device
    from ice_prune.training import cli

    assert check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"--device cuda:2: torch sees only 2 CUDA GPU\(s\), cuda:0 "
                                         r"to cuda:1; use --device cuda:0"):
        check_device("cuda:2", "--device")
    with pytest.raises(ValueError, match="device 'xla' is not a device type this library runs on"):
        check_device("xla", "device")
    cli.check_output_dir(str(tmp_path / "a" / "b"))  # made later, under a writable folder
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"--output '.*f' cannot be created: '.*f' is a file"):
        cli.check_output_dir(str(tmp_path / "f"))
    with pytest.raises(ValueError, match=r"--plot '.*' is a folder; give a file name"):
        cli.check_output_file(str(tmp_path), "--plot")
