"""ice_prune.throughput (benchmark, benchmark_models) and bench/throughput.py: structure, interleaving, ratio of medians, checkpoints,
JSON. Timings are never asserted: where exact figures are checked, a fake clock supplies them."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import ice_prune

from ice_prune import throughput as timing

ROOT = Path(__file__).resolve().parents[1]


class Recorder(nn.Module):
    """A tiny model that logs each forward: its name, and the mode it ran in."""

    def __init__(self, name, log, clock=None, durations=()):
        super().__init__()
        self.name, self.log, self.clock, self.durations = name, log, clock, list(durations)
        self.lin = nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        self.log.append(self.name)
        self.seen.append((self.training, torch.is_inference_mode_enabled(),
                          torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                          tuple(x.shape)))
        if self.clock is not None:
            self.clock[0] += self.durations.pop(0)
        return self.lin(x.flatten(1)[:, :4])


def test_benchmark_structure():
    log = []
    model = Recorder("m", log).train()
    m = ice_prune.benchmark(model, input_size=(1, 2, 2), batch_size=3, device="cpu", reps=4,
                            warmup=2)
    assert isinstance(m, timing.Measurement) and m.batch_size == 3 and len(m.times) == 4
    assert m.img_per_s == [3 / t for t in m.times]
    assert m.median == statistics.median(m.img_per_s) and m.best == max(m.img_per_s)
    assert len(log) == 6  # warm-up ran and was discarded; no first calls unless asked for
    # eval mode, inference mode, fp32 without autocast, the batch asked for
    assert set(model.seen) == {(False, True, False, (3, 1, 2, 2))}
    assert m.first_call_s is None and m.new_batch_call_s is None


def test_autocast_dtype():
    model = Recorder("m", [])
    ice_prune.benchmark(model, (1, 2, 2), batch_size=2, device="cpu", dtype="bf16", reps=1,
                        warmup=0)
    assert model.seen[0][2] == torch.bfloat16


def test_models_interleaved_and_rotated():
    log = []
    models = {n: Recorder(n, log) for n in ("a", "b", "c")}
    run = timing.benchmark_models(models, (1, 2, 2), batch_size=2, device="cpu", reps=3, warmup=1)
    rounds = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert log == sum(rounds, []) == run.schedule
    assert all(len(run[n].times) == 3 for n in models)
    assert run.baseline == "a" and run.speedup("a") == 1.0


def test_speedup_is_ratio_of_medians(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    log = []
    # warm-up (first value) discarded; timed seconds per batch of 2 images
    base = Recorder("base", log, clock, [100.0, 2.0, 4.0, 2.0])   # img/s 1, 0.5, 1   -> median 1
    fast = Recorder("fast", log, clock, [100.0, 1.0, 1.0, 3.0])   # img/s 2, 2, 2/3   -> median 2
    run = timing.benchmark_models({"base": base, "fast": fast}, (1, 2, 2), batch_size=2, device="cpu",
                              reps=3, warmup=1)
    assert run["base"].times == [2.0, 4.0, 2.0]
    assert run["fast"].times == [1.0, 1.0, 3.0]
    assert run["fast"].median == 2.0 and run["fast"].best == 2.0
    assert run.speedup("fast") == 2.0  # a ratio of means would give 1.556 / 0.833 = 1.87
    out = run.to_dict()
    assert out["reps"] == 3 and out["warmup"] == 1 and out["dtype"] == "fp32"
    assert [r["speedup"] for r in out["results"]] == [1.0, 2.0]


def test_paired_speedup_pairs_each_repetition(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    base = Recorder("base", [], clock, [2.0, 4.0, 2.0])   # img/s 1, 0.5, 1     -> median 1
    slow = Recorder("slow", [], clock, [1.0, 2.0, 3.0])   # img/s 2, 1, 0.667   -> median 1
    run = timing.benchmark_models({"base": base, "slow": slow}, (1, 2, 2), batch_size=2, device="cpu",
                              reps=3, warmup=0)
    assert run.speedup("slow") == 1.0
    assert run.paired_ratios("slow") == [2.0, 2.0, 2 / 3]
    assert run.paired_speedup("slow") == 2.0  # per repetition: 2/1, 4/2, 2/3


def test_first_calls_timed_once_before_warmup_and_at_a_new_batch(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    log = []
    # first call, one warm-up, two timed rounds, first call at the new batch size
    base = Recorder("base", log, clock, [10.0, 1.0, 2.0, 2.0, 3.0])
    ice = Recorder("ice", log, clock, [12.5, 1.0, 1.0, 1.0, 3.5])
    run = timing.benchmark_models({"base": base, "ice": ice}, (1, 2, 2), batch_size=4,
                                  device="cpu", reps=2, warmup=1, first_call=True)
    assert run.schedule == ["base", "ice", "ice", "base", "base", "ice"]  # interleaving as before
    assert log == ["base", "ice"] + run.schedule + ["base", "ice"]
    assert run["base"].times == [2.0, 2.0] and run["ice"].times == [1.0, 1.0]
    assert (run["base"].first_call_s, run["ice"].first_call_s) == (10.0, 12.5)
    assert (run["base"].new_batch_call_s, run["ice"].new_batch_call_s) == (3.0, 3.5)
    for model in (base, ice):  # the timed batch first and in every round, then half of it, once
        assert [shape[0] for *_, shape in model.seen] == [4, 4, 4, 4, 2]
        assert set(model.seen[:1]) == {(False, True, False, (4, 1, 2, 2))}  # eval, inference mode
    assert run["ice"].new_batch_size == 2
    assert run.first_call_delta("ice") == 2.5 and run.first_call_delta("base") == 0.0
    assert run.first_call_delta("ice", new_batch=True) == 0.5
    assert run.first_call_delta("base", "ice") == -2.5
    row = run.to_dict()["results"][1]
    assert (row["first_call_s"], row["new_batch_size"], row["new_batch_call_s"]) == (12.5, 2, 3.5)
    assert (row["first_call_vs_baseline_s"], row["new_batch_call_vs_baseline_s"]) == (2.5, 0.5)
    assert timing.new_batch_size(1) == 2 and timing.new_batch_size(256) == 128
    plain = timing.benchmark_models({"base": Recorder("base", [], clock, [1.0])}, (1, 2, 2),
                                    batch_size=2,
                                    device="cpu", reps=1, warmup=0)
    assert plain.first_call_delta("base") is None
    assert plain.to_dict()["results"][0]["first_call_vs_baseline_s"] is None
    assert plain.to_dict()["model_dtype"] is None  # the weights as given


def tiny_variants():
    base = timm.create_model("vit_tiny_patch16_224", img_size=32)
    return {"baseline": base,
            "evit": ice_prune.patch(timm.create_model("vit_tiny_patch16_224", img_size=32), 0.5,
                                    method="evit"),
            "ice": ice_prune.patch(timm.create_model("vit_tiny_patch16_224", img_size=32), 0.5,
                                   method="ice")}


def test_model_dtype_runs_bf16_weights_and_inputs_and_gives_the_weights_back():
    models = tiny_variants()
    before = {n: [(p, p.data_ptr(), p.detach().clone()) for p in m.parameters()]
              for n, m in models.items()}
    seen = {n: [] for n in models}

    def spy(name):
        def hook(module, args, output):
            seen[name].append(({p.dtype for p in module.parameters()}, args[0].dtype, output.dtype,
                               torch.is_autocast_enabled("cpu")))
        return hook

    for name, model in models.items():
        model.register_forward_hook(spy(name))
    run = timing.benchmark_models(models, (3, 32, 32), batch_size=2, device="cpu", reps=1,
                                  warmup=0, model_dtype="bf16", first_call=True)
    for name in models:  # first call, the timed round, the new batch: all pure bf16, no autocast
        assert seen[name] == [({torch.bfloat16}, torch.bfloat16, torch.bfloat16, False)] * 3
    for name, model in models.items():  # the caller's parameters, their own fp32 tensors, unrounded
        for (p, ptr, value), q in zip(before[name], model.parameters()):
            assert q is p and p.data_ptr() == ptr and p.dtype == torch.float32
            assert torch.equal(p, value)
    out = run.to_dict()
    assert (out["model_dtype"], out["dtype"]) == ("bf16", "fp32")
    assert all(r["first_call_s"] > 0 and r["new_batch_size"] == 1 for r in out["results"])


def test_cast_weights_casts_shared_tensors_once():
    a = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    b = nn.Sequential(a[0], a[1])  # another model holding the same parameters and buffers
    a[0].register_buffer("index", torch.arange(2))  # not floating point: left alone
    weight, running_mean = a[0].weight.data_ptr(), a[1].running_mean
    with timing.cast_weights([a, b], torch.bfloat16):
        assert a[0].weight.dtype == torch.bfloat16 and b[0].weight is a[0].weight
        assert a[1].running_mean.dtype == torch.bfloat16
        assert b[1].running_mean is a[1].running_mean
        assert a[0].index.dtype == torch.int64
    assert a[0].weight.data_ptr() == weight and a[0].weight.dtype == torch.float32
    assert a[1].running_mean is running_mean
    assert b[1].running_mean is running_mean


def test_bad_arguments_name_the_fix():
    models = {"a": Recorder("a", [])}
    with pytest.raises(ValueError, match="baseline 'z'"):
        timing.benchmark_models(models, (1, 2, 2), 1, "cpu", reps=1, warmup=0, baseline="z")
    with pytest.raises(ValueError, match="unknown dtype"):
        timing.benchmark_models(models, (1, 2, 2), 1, "cpu", dtype="int8", reps=1)
    with pytest.raises(ValueError, match="reps >= 1"):
        timing.benchmark_models(models, (1, 2, 2), 1, "cpu", reps=0)
    with pytest.raises(ValueError, match="model_dtype bf16 .* must then be fp32, got fp16"):
        timing.benchmark_models(models, (1, 2, 2), 1, "cpu", dtype="fp16", model_dtype="bf16")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        timing.latency(models, (1, 2, 2), device="cpu", model_dtype="fp8")
    with pytest.raises(ValueError, match="on the CPU give a number"):
        timing.max_batch_size(models, (1, 2, 2), device="cpu")


@pytest.mark.parametrize("capacity", [1, 5, 37, 64, 100, 128, 1000, 8192, 10_000])
def test_find_max_batch_doubles_then_bisects(capacity):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= capacity

    assert timing.find_max_batch(fits, start=64, limit=8192) == min(capacity, 8192)
    assert len(tried) <= 2 * 14  # doubling and bisection: logarithmic, not a scan
    if capacity >= 128:
        assert tried[:2] == [64, 128]


def test_find_max_batch_nothing_fits():
    with pytest.raises(RuntimeError, match="batch of 1"):
        timing.find_max_batch(lambda b: False)


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32"]


def test_checkpoint_reaches_every_variant(tmp_path, throughput):
    src = ice_prune.patch(timm.create_model("vit_tiny_patch16_224", img_size=32), method="ice")
    path = tmp_path / "ice.pth"
    torch.save({"model": src.state_dict()}, path)  # a backbone plus a trained ICE head
    models, meta = throughput.build_variants(throughput.parse_args(
        TINY + ["--checkpoint", str(path), "--keep-rates", "0.5"]))
    assert list(models) == ["baseline", "evit@0.5", "ice@0.5"]
    assert meta["ice@0.5"] == {"method": "ice", "keep_rate": 0.5}
    for model in models.values():
        assert torch.equal(model.pos_embed, src.pos_embed)
    assert torch.equal(models["ice@0.5"].ice_head.fc.weight, src.ice_head.fc.weight)


def test_checkpoint_of_another_size_fails_clearly(tmp_path, throughput):
    path = tmp_path / "w.pth"
    torch.save({"model": timm.create_model("vit_tiny_patch16_224", img_size=64).state_dict()}, path)
    with pytest.raises(ValueError, match="pos_embed"):
        throughput.main(TINY + ["--checkpoint", str(path)])


def test_script_writes_table_json_and_plot(tmp_path, throughput, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    result = throughput.main(TINY + ["--batch-size", "2", "--reps", "2", "--warmup", "1",
                                     "--threads", "1", "--json", str(out), "--plot", str(png)])
    table = capsys.readouterr().out
    assert "ice@0.7" in table and "vs EViT" in table
    assert "1st call B=2 s" in table and "1st call B=1 s" in table and "(cpu, fp32, batch 2" in table
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["device"]["type"] == "cpu" and data["device"]["threads"] == 1
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["timm"]
    s = data["settings"]
    assert (s["batch_size"], s["reps"], s["warmup"], s["input_size"], s["dtype"]) == \
        (2, 2, 1, [3, 32, 32], "fp32")
    assert (s["model_dtype"], s["precision"], s["new_batch_size"]) == ("fp32", "fp32", 1)
    rows = {r["name"]: r for r in data["results"]}
    assert list(rows) == ["baseline", "evit@0.7", "ice@0.7", "evit@0.5", "ice@0.5"]
    base = rows["baseline"]
    for name, r in rows.items():
        assert len(r["img_per_s"]) == 2
        assert r["median_img_per_s"] == statistics.median(r["img_per_s"])
        assert r["speedup"] == pytest.approx(r["median_img_per_s"] / base["median_img_per_s"])
        assert r["paired_speedup"] == pytest.approx(statistics.median(
            b / t for b, t in zip(base["times_s"], r["times_s"])))
        assert r["first_call_s"] > 0 and r["new_batch_call_s"] > 0 and r["new_batch_size"] == 1
        assert r["first_call_vs_baseline_s"] == pytest.approx(r["first_call_s"]
                                                              - base["first_call_s"])
        assert r["new_batch_call_vs_baseline_s"] == pytest.approx(r["new_batch_call_s"]
                                                                  - base["new_batch_call_s"])
        assert r["macs"] == ice_prune.count_flops(
            ice_prune.patch(timm.create_model("vit_tiny_patch16_224", img_size=32), r["keep_rate"],
                            method=r["method"]) if r["method"] != "baseline" else
            timm.create_model("vit_tiny_patch16_224", img_size=32), (3, 32, 32))
    assert rows["ice@0.7"]["vs_evit"] == pytest.approx(
        rows["ice@0.7"]["median_img_per_s"] / rows["evit@0.7"]["median_img_per_s"])
    assert rows["ice@0.5"]["params"] - base["params"] == 192 * 1001  # the shared ICE head
    assert len(data["schedule"]) == 3 * 5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_percentile_interpolates_like_numpy():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 9.0, 8.0]
    assert timing.percentile(values, 50) == statistics.median(values) == 5.5
    assert timing.percentile(values, 90) == pytest.approx(9.1)  # numpy.percentile(values, 90)
    assert timing.percentile(values, 0) == 1.0 and timing.percentile(values, 100) == 10.0
    assert timing.percentile([3.0], 90) == 3.0
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        timing.percentile(values, 101)


def test_latency_is_batch_one_interleaved_with_percentiles(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    log = []
    # one warm-up forward each (discarded), then ten timed single-image forwards each, in seconds
    base_s = [1.0] + [0.010, 0.012, 0.011, 0.013, 0.010, 0.030, 0.011, 0.012, 0.010, 0.014]
    slow_s = [1.0] + [0.020, 0.011, 0.012, 0.013, 0.015, 0.012, 0.016, 0.012, 0.040, 0.012]
    base = Recorder("base", log, clock, base_s).train()
    slow = Recorder("slow", log, clock, slow_s)
    run = timing.latency({"base": base, "slow": slow}, (1, 2, 2), device="cpu", reps=10, warmup=1)
    assert isinstance(run, timing.LatencyRun) and isinstance(run["base"], timing.LatencyMeasurement)
    assert log == run.schedule == ["base", "slow", "slow", "base"] * 5 + ["base", "slow"]
    assert set(base.seen) == {(False, True, False, (1, 1, 2, 2))}  # eval, inference mode, batch 1
    assert run["base"].times == pytest.approx(base_s[1:])
    assert run["slow"].times == pytest.approx(slow_s[1:])
    assert run["base"].median_ms == pytest.approx(11.5)
    assert run["base"].p90_ms == pytest.approx(1e3 * (0.014 + 0.1 * (0.030 - 0.014)))  # 15.6
    assert run["base"].best_ms == pytest.approx(10.0)
    assert run["slow"].median_ms == pytest.approx(12.5)
    assert run.speedup("slow") == pytest.approx(11.5 / 12.5)  # below 1: pruning does not pay
    assert not run["base"].cuda_graph  # CPU: no CUDA graphs
    out = run.to_dict()
    assert (out["batch_size"], out["reps"], out["warmup"], out["baseline"]) == (1, 10, 1, "base")
    assert [r["name"] for r in out["results"]] == ["base", "slow"]
    assert out["results"][1]["p90_ms"] == pytest.approx(run["slow"].p90_ms)
    assert out["results"][0]["speedup"] == 1.0


def test_latency_bad_arguments():
    models = {"a": Recorder("a", [])}
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        timing.latency(models, (1, 2, 2), device="cpu", reps=1, cuda_graphs=True)
    with pytest.raises(ValueError, match="reps >= 1"):
        timing.latency(models, (1, 2, 2), device="cpu", reps=0)
    with pytest.raises(ValueError, match="baseline 'z'"):
        timing.latency(models, (1, 2, 2), device="cpu", reps=1, baseline="z")


def test_script_latency_only(tmp_path, throughput, capsys):
    out = tmp_path / "lat.json"
    result = throughput.main(TINY + ["--keep-rates", "0.5", "--latency-only", "--latency-reps", "3",
                                     "--latency-warmup", "1", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert "median ms" in table and "p90 ms" in table and "img/s" not in table
    data = json.loads(out.read_text())
    assert "results" not in data  # no throughput run
    lat = data["latency"]
    assert (lat["batch_size"], lat["reps"], lat["warmup"], lat["cuda_graphs"]) == (1, 3, 1, False)
    rows = {r["name"]: r for r in lat["results"]}
    assert list(rows) == ["baseline", "evit@0.5", "ice@0.5"]
    for r in rows.values():
        assert len(r["times_s"]) == 3 and r["p90_ms"] >= r["median_ms"] >= r["best_ms"]
        assert r["speedup"] == pytest.approx(rows["baseline"]["median_ms"] / r["median_ms"])
        assert r["gmacs"] > 0
    assert len(lat["schedule"]) == 4 * 3
    assert result["latency"]["results"] == lat["results"]


class FlagRecorder(Recorder):
    """A Recorder that also logs torch.backends.cudnn.benchmark as its forward saw it."""

    def forward(self, x):
        self.seen_cudnn = torch.backends.cudnn.benchmark
        return super().forward(x)


def test_cudnn_benchmark_mode_only_on_cuda_and_restored(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with timing.cudnn_benchmark_mode(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.benchmark is False
    with pytest.raises(KeyError):  # restored when the timed region raises, too
        with timing.cudnn_benchmark_mode(torch.device("cuda:0")):
            raise KeyError
    assert torch.backends.cudnn.benchmark is False
    with timing.cudnn_benchmark_mode(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark is False  # CPU: the flag is left alone
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with timing.cudnn_benchmark_mode(torch.device("cuda"), enabled=False):
        assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.parametrize("measure", ["benchmark_models", "latency"])
def test_timed_region_runs_inside_cudnn_benchmark_mode(monkeypatch, measure):
    calls = []
    real = timing.cudnn_benchmark_mode

    def spy(device, enabled=True):
        calls.append((device, enabled))
        return real(torch.device("cuda"), enabled)  # as on CUDA: the flag is set for the forwards

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(timing, "cudnn_benchmark_mode", spy)
    model = FlagRecorder("m", [])
    kwargs = {"batch_size": 2} if measure == "benchmark_models" else {}
    getattr(timing, measure)({"m": model}, (1, 2, 2), device="cpu", reps=1, warmup=0, **kwargs)
    assert calls == [(torch.device("cpu"), True)] and model.seen_cudnn is True
    assert torch.backends.cudnn.benchmark is False  # restored after the run
    calls.clear()
    getattr(timing, measure)({"m": model}, (1, 2, 2), device="cpu", reps=1, warmup=0,
                             cudnn_benchmark=False, **kwargs)
    assert calls == [(torch.device("cpu"), False)] and model.seen_cudnn is False


def test_cpu_run_leaves_cudnn_flag_alone(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = FlagRecorder("m", [])
    run = timing.benchmark_models({"m": model}, (1, 2, 2), batch_size=2, device="cpu", reps=1,
                                  warmup=0)
    assert model.seen_cudnn is False and torch.backends.cudnn.benchmark is False
    assert run["m"].cuda_graph is False and run.to_dict()["results"][0]["cuda_graph"] is False


def test_throughput_cuda_graphs_argument():
    models = {"a": Recorder("a", [])}
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        timing.benchmark_models(models, (1, 2, 2), 1, "cpu", reps=1, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs is 'auto', True or False"):
        timing.benchmark_models(models, (1, 2, 2), 1, "cpu", reps=1, cuda_graphs="yes")
    run = timing.benchmark_models(models, (1, 2, 2), 1, "cpu", reps=1, warmup=0, cuda_graphs="auto")
    assert run["a"].cuda_graph is False  # "auto" on a CPU: eager


def test_speedup_against_another_model(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    a = Recorder("a", [], clock, [4.0, 4.0, 4.0])
    b = Recorder("b", [], clock, [2.0, 2.0, 2.0])
    c = Recorder("c", [], clock, [1.0, 1.0, 4.0])
    run = timing.benchmark_models({"a": a, "b": b, "c": c}, (1, 2, 2), batch_size=2, device="cpu",
                                  reps=3, warmup=0)
    assert run.speedup("c") == 4.0 and run.speedup("c", "b") == 2.0
    assert run.paired_speedup("c", "b") == 2.0  # per repetition: 2, 2, 0.5


def test_script_model_dtype(tmp_path, throughput, capsys):
    with pytest.raises(ValueError, match="--model-dtype bf16 .*--dtype fp16"):
        throughput.parse_args(["--model-dtype", "bf16", "--dtype", "fp16"])
    out = tmp_path / "bf16.json"
    throughput.main(TINY + ["--keep-rates", "0.5", "--model-dtype", "bf16", "--batch-size", "2",
                            "--reps", "1", "--warmup", "0", "--threads", "1", "--latency",
                            "--latency-reps", "1", "--latency-warmup", "0", "--json", str(out)])
    table = capsys.readouterr().out
    assert "(cpu, bf16 weights, batch 2" in table and "(cpu, bf16 weights, batch 1" in table
    data = json.loads(out.read_text())
    assert (data["settings"]["model_dtype"], data["settings"]["dtype"]) == ("bf16", "fp32")
    assert data["settings"]["precision"] == "bf16 weights"
    assert [r["name"] for r in data["results"]] == ["baseline", "evit@0.5", "ice@0.5"]
    assert len(data["latency"]["results"]) == 3


def test_compile_default_and_cuda_graphs_flag(throughput):
    assert throughput.parse_args([]).compile is None  # resolved in main: on for CUDA
    assert throughput.parse_args(["--compile"]).compile is True
    assert throughput.parse_args(["--no-compile"]).compile is False
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device"):
        throughput.main(TINY + ["--device", "cpu", "--cuda-graphs"])


def fake_run(times):
    """A BenchmarkRun from seconds per repetition (batch 1), baseline 'baseline'."""
    measurements = {n: timing.Measurement(n, 1, list(t)) for n, t in times.items()}
    return timing.BenchmarkRun(measurements, "baseline", "cpu", "fp32", (3, 32, 32), 0)


def test_compiled_rows_are_ratios_to_the_compiled_baseline(throughput):
    run = fake_run({"baseline": [4.0], "evit@0.7": [2.0], "ice@0.7": [2.5], "evit-ref@0.7": [3.0],
                    "baseline+compile": [2.0], "evit@0.7+compile": [1.0], "ice@0.7+compile": [1.25],
                    "evit-ref@0.7+compile": [2.5]})
    meta, stats = {}, {}
    for i, name in enumerate(run.measurements):
        run[name].first_call_s, run[name].new_batch_call_s = 10.0 * (i + 1), 1.0 * (i + 1)
        plain = name.split("+")[0]
        method, _, rate = plain.partition("@")
        meta[name] = {"method": method, "keep_rate": float(rate or 1.0)}
        stats[name] = {"params": 1, "macs": 1}
    rows = {r["name"]: r for r in throughput.throughput_rows(run, meta, stats)}
    assert rows["evit@0.7"]["speedup"] == 2.0 and rows["evit@0.7+compile"]["speedup"] == 2.0
    assert rows["ice@0.7+compile"]["speedup"] == pytest.approx(1.6)
    assert rows["ice@0.7"]["vs_evit"] == rows["ice@0.7+compile"]["vs_evit"] == pytest.approx(0.8)
    assert rows["evit@0.7"]["vs_reference"] == pytest.approx(1.5)
    assert rows["evit@0.7+compile"]["vs_reference"] == pytest.approx(2.5)
    assert rows["baseline+compile"]["vs_eager"] == 2.0 and rows["baseline"]["vs_eager"] is None
    assert rows["ice@0.7"]["vs_reference"] is None and rows["evit@0.7"]["vs_evit"] is None
    # first calls beyond the baseline of the same kind: ice@0.7 is 3rd, baseline+compile 5th
    assert rows["ice@0.7"]["first_call_vs_baseline_s"] == 20.0
    assert rows["ice@0.7+compile"]["first_call_vs_baseline_s"] == 20.0
    assert rows["ice@0.7+compile"]["new_batch_call_vs_baseline_s"] == 2.0


def test_evit_reference_runs_non_fused_attention_with_the_same_outputs(throughput, monkeypatch):
    models, meta = throughput.build_variants(throughput.parse_args(
        TINY + ["--keep-rates", "0.5", "--evit-reference"]))
    assert list(models) == ["baseline", "evit@0.5", "ice@0.5", "evit-ref@0.5"]
    assert meta["evit-ref@0.5"] == {"method": "evit-ref", "keep_rate": 0.5}
    evit, ref = models["evit@0.5"].eval(), models["evit-ref@0.5"].eval()
    assert all(b.attn.fused_attn for b in evit.blocks)
    assert not any(b.attn.fused_attn for b in ref.blocks)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ours = evit(x)
        assert len(calls) == len(evit.blocks)  # our EViT: fused attention in every block
        calls.clear()
        theirs = ref(x)
    assert calls == []  # the reference never calls SDPA: it materializes every attention matrix
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_materialize_attention_needs_timm_attention(throughput):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32)
    model.blocks[1].attn = nn.Identity()
    with pytest.raises(ValueError, match="blocks.1.attn .Identity. has no fused_attn"):
        throughput.materialize_attention(model)


def test_script_evit_reference_reports_the_ratio(tmp_path, throughput, capsys):
    out = tmp_path / "ref.json"
    throughput.main(TINY + ["--keep-rates", "0.5", "--evit-reference", "--batch-size", "2",
                            "--reps", "2", "--warmup", "1", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert "evit-ref@0.5" in table and "EViT materializing the attention matrix" in table
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["results"]}
    assert rows["evit@0.5"]["vs_reference"] == pytest.approx(
        rows["evit@0.5"]["median_img_per_s"] / rows["evit-ref@0.5"]["median_img_per_s"])
    assert data["settings"]["compile"] is False and data["settings"]["cudnn_benchmark"] is False
    assert not any(r["compiled"] for r in rows.values())


def test_explain_variant_is_ice_in_explain_mode_on_the_same_weights(throughput):
    models, meta = throughput.build_variants(throughput.parse_args(
        TINY + ["--keep-rates", "0.5", "--explain"]))
    assert list(models) == ["baseline", "evit@0.5", "ice@0.5", "ice-explain@0.5"]
    assert meta["ice-explain@0.5"] == {"method": "ice-explain", "keep_rate": 0.5}
    ice, explained = models["ice@0.5"].eval(), models["ice-explain@0.5"].eval()
    assert explained.explain and not ice.explain  # its own knobs
    assert explained.keep_rate == ice.keep_rate == 0.5
    ours, theirs = list(explained.parameters()), list(ice.parameters())
    assert len(ours) == len(theirs) and all(a is b for a, b in zip(ours, theirs))
    assert explained.ice_head.fc.weight is ice.ice_head.fc.weight
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(explained(x), ice(x))
    assert explained.ice_explanation.foreground.shape == (2, 4) and ice.ice_explanation is None
    assert "ice-explain@0.5" not in throughput.build_variants(throughput.parse_args(
        TINY + ["--keep-rates", "0.5"]))[0]  # not in the default run


def test_script_explain_reports_the_ratio_to_ice(tmp_path, throughput, capsys):
    out = tmp_path / "explain.json"
    throughput.main(TINY + ["--keep-rates", "0.5", "--explain", "--batch-size", "2", "--reps", "3",
                            "--warmup", "1", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert "ice-explain@0.5" in table and "of ICE's img/s at the same keep rate" in table
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["baseline", "evit@0.5", "ice@0.5", "ice-explain@0.5"]
    ice, explained = rows["ice@0.5"], rows["ice-explain@0.5"]
    assert explained["vs_ice"] == pytest.approx(explained["median_img_per_s"]
                                                / ice["median_img_per_s"])
    assert explained["vs_ice_reps"] == pytest.approx(
        [i / e for i, e in zip(ice["times_s"], explained["times_s"])])
    assert explained["vs_ice_paired"] == pytest.approx(statistics.median(explained["vs_ice_reps"]))
    assert (explained["macs"], explained["params"]) == (ice["macs"], ice["params"])
    assert all(rows[n]["vs_ice"] is None for n in ("baseline", "evit@0.5", "ice@0.5"))


class InputRecorder(Recorder):
    """A Recorder that keeps every batch it is given."""

    def forward(self, x):
        self.batches = getattr(self, "batches", []) + [x.clone()]
        return super().forward(x)


def test_models_timed_on_given_images():
    """``inputs=``: every round and the first calls run on exactly those images (the new batch size
    on their first half); the batch size and image size follow from them; bad input is named."""
    images = torch.rand(4, 1, 2, 2)
    models = {n: InputRecorder(n, []) for n in ("a", "b")}
    run = timing.benchmark_models(models, inputs=images, device="cpu", reps=2, warmup=1,
                                  first_call=True)
    assert run["a"].batch_size == 4 and run.input_size == (1, 2, 2)
    for model in models.values():
        assert len(model.batches) == 1 + 3 + 1
        for batch in model.batches[:-1]:
            assert torch.equal(batch, images)
        assert torch.equal(model.batches[-1], images[:2])
    with pytest.raises(ValueError, match=r"inputs must be a \[B, C, H, W\] tensor"):
        timing.benchmark_models(models, inputs=images[0], device="cpu")
    with pytest.raises(ValueError, match="batch_size 8 differs from the 4 images"):
        timing.benchmark_models(models, inputs=images, batch_size=8, device="cpu")


def test_script_adaptive_variants_on_synthetic_images(tmp_path, throughput, capsys, monkeypatch):
    """--thresholds / --masses: every variant timed on one seeded batch of SyntheticScenes images;
    each adaptive row's mean tokens per point and GMACs are those of the same weights, with the
    same policy, on the same images, computed here apart from the script."""
    from ice_prune import KeepPolicy
    from ice_prune.data import SyntheticScenes
    torch.manual_seed(0)
    src = ice_prune.patch(timm.create_model("vit_tiny_patch16_224", img_size=64), method="ice")
    torch.nn.init.normal_(src.ice_head.fc.weight, std=0.02)
    torch.nn.init.normal_(src.ice_head.fc.weight[-1], std=0.3)  # the images' counts differ
    path = tmp_path / "ice.pth"
    torch.save({"model": src.state_dict()}, path)
    scenes = SyntheticScenes(img_size=64, length=4, split="val", seed=1, scale=(0.1, 0.6))
    images = torch.stack([scenes[i][0] for i in range(4)])
    timed = []

    def recording(models, *args, inputs=None, **kwargs):
        timed.append((list(models), inputs))
        return timing.benchmark_models(models, *args, inputs=inputs, **kwargs)

    monkeypatch.setattr(throughput, "benchmark_models", recording)
    out = tmp_path / "r.json"
    throughput.main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--checkpoint",
                     str(path), "--keep-rates", "0.5", "--thresholds", "0.7", "--masses", "0.8",
                     "--policy-max-share", "0.9", "--seed", "1", "--batch-size", "4",
                     "--reps", "1", "--warmup", "0", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    names = ["baseline", "evit@0.5", "ice@0.5", "ice@threshold=0.7", "evit@mass=0.8"]
    assert timed[0][0] == names and torch.equal(timed[0][1], images)
    assert "tokens kept per point" in table and "SyntheticScenes images (seed 1" in table
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == names
    for name, method, policy in (("ice@threshold=0.7", "ice", KeepPolicy(threshold=0.7,
                                                                         max_share=0.9)),
                                 ("evit@mass=0.8", "evit", KeepPolicy(mass=0.8, max_share=0.9))):
        row = rows[name]
        assert row["method"] == f"{method}-adaptive" and row["keep_rate"] is None
        assert row["policy"] == {"threshold": policy.threshold, "mass": policy.mass,
                                 "min_share": 0.0, "max_share": 0.9}
        model = ice_prune.load_model("vit_tiny_patch16_224", path, method=method, img_size=64,
                                     patch_kwargs={"keep_policy": policy})
        with torch.no_grad():
            model(images)
        counts = torch.stack(model.ice_keep_counts, dim=1)  # [image, point]
        assert len(set(map(tuple, counts.tolist()))) > 1  # the images kept different counts
        assert row["kept_per_point"] == pytest.approx(counts.double().mean(dim=0).tolist())
        assert row["macs"] == ice_prune.count_flops(model, images=images) / 4
        assert row["img_per_s"] and row["nearest_fixed"] == f"{method}@0.5"
        assert row["vs_nearest_fixed"] == pytest.approx(
            row["median_img_per_s"] / rows[f"{method}@0.5"]["median_img_per_s"])
        assert name in table
    # the fixed-keep variants ran on the same images, at their fixed cost
    fixed = ice_prune.load_model("vit_tiny_patch16_224", path, method="ice", keep_rate=0.5,
                                 img_size=64)
    assert rows["ice@0.5"]["macs"] == ice_prune.count_flops(fixed, (3, 64, 64))
    assert rows["ice@0.5"]["kept_per_point"] is None


def test_adaptive_variants_refuse_what_they_cannot_run_with(throughput):
    with pytest.raises(ValueError, match="use --images synthetic"):
        throughput.parse_args(TINY + ["--thresholds", "0.5", "--images", "random"])
    with pytest.raises(ValueError, match="drop --latency"):
        throughput.parse_args(TINY + ["--masses", "0.9", "--latency"])
    with pytest.raises(ValueError, match="not 'max'"):
        throughput.parse_args(TINY + ["--images", "synthetic", "--batch-size", "max"])
    with pytest.raises(ValueError, match="threshold is a foreground probability"):
        throughput.parse_args(TINY + ["--thresholds", "1.5"])
    assert throughput.parse_args(TINY + ["--masses", "0.9"]).images == "synthetic"
    assert throughput.parse_args(TINY).images == "random"
