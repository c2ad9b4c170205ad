"""Throughput measurement: images per second of one model, or of several interleaved in one run.

What makes a speed-up honest: random inputs (the measured work does not depend on them), eval mode,
``torch.inference_mode``, warm-up rounds discarded, ``torch.cuda.synchronize`` around the timed
region on CUDA, and the variants interleaved per repetition (their order rotated each repetition) so
that drift of the machine (clock, other load) spreads over all of them. A speed-up is the ratio of two
medians taken in one run.

>>> import timm, copy, ice_prune
>>> base = timm.create_model("deit_small_patch16_224")
>>> evit = ice_prune.patch(copy.deepcopy(base), 0.7, method="evit")
>>> run = ice_prune.benchmark_models({"deit": base, "evit": evit})  # doctest: +SKIP
>>> run.speedup("evit")  # doctest: +SKIP
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: defaults per device type: the CPU ones keep the default 5-model run of bench/throughput.py on a
#: 2-core CPU within 5 minutes, in short rounds (a few seconds) so that interleaving follows the load
#: of a shared machine; on a GPU batches are large and repetitions cheap
DEFAULTS = {
    "cpu": {"batch_size": 16, "reps": 12, "warmup": 2},
    "cuda": {"batch_size": 256, "reps": 30, "warmup": 5},
}


@dataclass
class Measurement:
    """Timings of one model: ``times`` holds the seconds of each repetition (one batch each)."""

    name: str
    batch_size: int
    times: list[float] = field(default_factory=list)

    @property
    def img_per_s(self) -> list[float]:
        return [self.batch_size / t for t in self.times]

    @property
    def median(self) -> float:
        """Median images per second over the repetitions."""
        return statistics.median(self.img_per_s)

    @property
    def best(self) -> float:
        """Best (highest) images per second over the repetitions."""
        return max(self.img_per_s)

    def to_dict(self) -> dict:
        return {"name": self.name, "batch_size": self.batch_size, "times_s": self.times,
                "img_per_s": self.img_per_s, "median_img_per_s": self.median,
                "best_img_per_s": self.best}


@dataclass
class BenchmarkRun:
    """The result of :func:`benchmark_models`: one :class:`Measurement` per model, in the given order,
    the run's settings, and the order the forwards actually ran in (``schedule``)."""

    measurements: dict[str, Measurement]
    baseline: str
    device: str
    dtype: str
    input_size: tuple[int, ...]
    warmup: int
    schedule: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Measurement:
        return self.measurements[name]

    def speedup(self, name: str) -> float:
        """Median images/s of ``name`` over the baseline's median, both from this run."""
        return self.measurements[name].median / self.measurements[self.baseline].median

    def paired_speedup(self, name: str) -> float:
        """Median over repetitions of the baseline's time over ``name``'s in the same repetition: on a
        machine whose load changes during the run (shared CPUs) a pair shares the load it saw."""
        pairs = zip(self.measurements[self.baseline].times, self.measurements[name].times)
        return statistics.median(base / t for base, t in pairs)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "device": self.device, "dtype": self.dtype,
                "input_size": list(self.input_size), "warmup": self.warmup,
                "reps": len(next(iter(self.measurements.values())).times),
                "results": [dict(m.to_dict(), speedup=self.speedup(name),
                                 paired_speedup=self.paired_speedup(name))
                            for name, m in self.measurements.items()]}


def resolve_device(device: Union[str, torch.device, None], flag: str = "device") -> torch.device:
    """``None`` / ``"auto"``: CUDA when present, else CPU; a device that is not on this machine is a
    ValueError naming ``flag`` (see :func:`ice_prune.engine.check_device`)."""
    from ice_prune.engine import check_device

    return check_device(device, flag)


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _autocast(device: torch.device, dtype: torch.dtype):
    # weights stay fp32; fp16/bf16 run under autocast, as mixed-precision inference usually does
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_models(
    models: Mapping[str, nn.Module],
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = "fp32",
    reps: Optional[int] = None,
    warmup: Optional[int] = None,
    baseline: Optional[str] = None,
    progress: bool = False,
) -> BenchmarkRun:
    """Time several models interleaved in one run.

    Each round runs every model once on the same random batch; round ``r`` starts at model
    ``r mod len(models)`` (a rotation), so no model always runs first or right after another. The
    ``warmup`` rounds are discarded, then ``reps`` rounds are timed, one batch per model each.

    Args:
        models: name -> model; moved to ``device`` and put in eval mode.
        input_size: ``(C, H, W)`` of one image.
        batch_size: images per forward; default per device type (:data:`DEFAULTS`).
        device: ``"auto"``/``None`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the last two under autocast).
        reps: timed rounds; default per device type.
        warmup: discarded rounds; default per device type.
        baseline: the name speed-ups are taken against; default the first model.
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    if not models:
        raise ValueError("benchmark_models needs at least one model")
    if len(input_size) != 3:
        raise ValueError(f"input_size is (channels, height, width) of one image, got {input_size!r}")
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    defaults = DEFAULTS.get(device.type, DEFAULTS["cpu"])
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    reps = defaults["reps"] if reps is None else reps
    warmup = defaults["warmup"] if warmup is None else warmup
    if batch_size < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, reps >= 1, warmup >= 0; got {batch_size}, {reps}, "
                         f"{warmup}")
    baseline = next(iter(models)) if baseline is None else baseline
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {list(models)}")

    names = list(models)
    for model in models.values():
        model.to(device).eval()
    x = torch.randn(batch_size, *input_size, device=device)
    run = BenchmarkRun({n: Measurement(n, batch_size) for n in names}, baseline, str(device),
                       {v: k for k, v in DTYPES.items()}[dtype], tuple(input_size), warmup)
    bar = tqdm(total=(warmup + reps) * len(names), desc="benchmark", unit="batch",
               disable=not progress, leave=False)
    with torch.inference_mode(), _autocast(device, dtype), bar:
        for r in range(warmup + reps):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                bar.set_postfix_str(name)
                _sync(device)
                start = time.perf_counter()
                models[name](x)
                _sync(device)
                elapsed = time.perf_counter() - start
                run.schedule.append(name)
                if r >= warmup:
                    run.measurements[name].times.append(elapsed)
                bar.update()
    return run


def benchmark(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = "fp32",
    reps: Optional[int] = None,
    warmup: Optional[int] = None,
    progress: bool = False,
) -> Measurement:
    """Images per second of one model (median and best over ``reps``); see :func:`benchmark_models`
    for the arguments. To compare models, time them together with :func:`benchmark_models`."""
    run = benchmark_models({"model": model}, input_size, batch_size, device, dtype, reps, warmup,
                           progress=progress)
    return run["model"]


def find_max_batch(fits: Callable[[int], bool], start: int = 64, limit: int = 8192) -> int:
    """Largest batch ``b <= limit`` with ``fits(b)``: double from ``start`` until it fails, then
    bisect between the last batch that fitted and the first that did not."""
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    good, bad, b = 0, start, start  # good: largest batch known to fit; bad: smallest known not to
    while fits(b):
        good = b
        if b == limit:
            return limit
        b = bad = min(2 * b, limit)
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    if good == 0:
        raise RuntimeError("not even a batch of 1 fits in memory")
    return good


def max_batch_size(
    models: Union[nn.Module, Mapping[str, nn.Module]],
    input_size: Sequence[int] = (3, 224, 224),
    device: Union[str, torch.device, None] = "cuda",
    dtype: Union[str, torch.dtype, None] = "fp32",
    start: int = 64,
    limit: int = 8192,
) -> int:
    """The largest batch at which every model runs a forward on a CUDA GPU (the paper measured at
    the maximum batch size): doubling, then bisection on out-of-memory."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if device.type != "cuda":
        raise ValueError("batch_size='max' searches for the largest batch that fits in GPU memory; "
                         "on the CPU give a number (e.g. 32)")
    models = {"model": models} if isinstance(models, nn.Module) else models
    for model in models.values():
        model.to(device).eval()

    def fits(b: int) -> bool:
        try:
            with torch.inference_mode(), _autocast(device, dtype):
                x = torch.randn(b, *input_size, device=device)
                for model in models.values():
                    model(x)
            _sync(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    return find_max_batch(fits, start, limit)
