"""Throughput and batch-1 latency: images per second of one model, or of several interleaved in one
run (:func:`benchmark_models`), and the median / p90 milliseconds of single-image forwards
(:func:`latency`, with CUDA graphs on a GPU). Precision: ``dtype`` runs fp16 / bf16 under autocast
(fp32 weights); ``model_dtype`` casts the weights and inputs instead (pure fp16 / bf16, no autocast).

What makes a speed-up honest: random inputs (the measured work does not depend on them), eval mode,
``torch.inference_mode``, warm-up rounds discarded, ``torch.cuda.synchronize`` around the timed
region on CUDA, and the variants interleaved per repetition (their order rotated each repetition) so
that drift of the machine (clock, other load) spreads over all of them. A speed-up is the ratio of two
medians taken in one run. On CUDA, ``torch.backends.cudnn.benchmark`` is on while timing (restored
after): without it the patch-embedding convolution, in the baseline as in every variant, may run a
slow default algorithm.

>>> import timm, copy, ice_prune
>>> base = timm.create_model("deit_small_patch16_224")
>>> evit = ice_prune.patch(copy.deepcopy(base), 0.7, method="evit")
>>> run = ice_prune.benchmark_models({"deit": base, "evit": evit})  # doctest: +SKIP
>>> run.speedup("evit")  # doctest: +SKIP
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

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
    """Timings of one model: ``times`` holds the seconds of each repetition (one batch each);
    ``cuda_graph`` is True when the forward replayed a captured CUDA graph. With
    ``benchmark_models(..., first_call=True)``: ``first_call_s``, the seconds of the model's first
    forward (compilation, kernel compiles, cuDNN's algorithm search included), and
    ``new_batch_call_s``, its first forward at another batch size (``new_batch_size``)."""

    name: str
    batch_size: int
    times: list[float] = field(default_factory=list)
    cuda_graph: bool = False
    first_call_s: Optional[float] = None
    new_batch_size: Optional[int] = None
    new_batch_call_s: Optional[float] = None

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
                "cuda_graph": self.cuda_graph, "img_per_s": self.img_per_s,
                "median_img_per_s": self.median, "best_img_per_s": self.best,
                "first_call_s": self.first_call_s, "new_batch_size": self.new_batch_size,
                "new_batch_call_s": self.new_batch_call_s}


@dataclass
class _Run:
    """What a timed run holds: one measurement per model in the given order, the run's settings,
    and the order the timed forwards actually ran in (``schedule``). ``dtype``: the autocast dtype
    (``"fp32"``: none); ``model_dtype``: the dtype weights and inputs were cast to (None: the weights
    as given, fp32 inputs)."""

    measurements: dict
    baseline: str
    device: str
    dtype: str
    input_size: tuple[int, ...]
    warmup: int
    schedule: list[str] = field(default_factory=list)
    model_dtype: Optional[str] = None

    def __getitem__(self, name: str):
        return self.measurements[name]


@dataclass
class BenchmarkRun(_Run):
    """The result of :func:`benchmark_models`: one :class:`Measurement` per model."""

    def speedup(self, name: str, baseline: Optional[str] = None) -> float:
        """Median images/s of ``name`` over the baseline's median, both from this run; ``baseline``:
        another model of the run to compare against (default the run's baseline)."""
        baseline = self.baseline if baseline is None else baseline
        return self.measurements[name].median / self.measurements[baseline].median

    def paired_ratios(self, name: str, baseline: Optional[str] = None) -> list[float]:
        """The baseline's time over ``name``'s in each repetition (a pair shares the load it saw)."""
        baseline = self.baseline if baseline is None else baseline
        pairs = zip(self.measurements[baseline].times, self.measurements[name].times)
        return [base / t for base, t in pairs]

    def paired_speedup(self, name: str, baseline: Optional[str] = None) -> float:
        """Median over repetitions of the baseline's time over ``name``'s in the same repetition: on a
        machine whose load changes during the run (shared CPUs) a pair shares the load it saw."""
        return statistics.median(self.paired_ratios(name, baseline))

    def first_call_delta(self, name: str, baseline: Optional[str] = None,
                         new_batch: bool = False) -> Optional[float]:
        """Seconds ``name``'s first forward took beyond the baseline's (``new_batch``: the first
        forwards at the new batch size); None when first calls were not measured."""
        baseline = self.baseline if baseline is None else baseline
        attr = "new_batch_call_s" if new_batch else "first_call_s"
        ours, theirs = (getattr(self.measurements[n], attr) for n in (name, baseline))
        return None if ours is None or theirs is None else ours - theirs

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "device": self.device, "dtype": self.dtype,
                "model_dtype": self.model_dtype, "input_size": list(self.input_size),
                "warmup": self.warmup, "reps": len(next(iter(self.measurements.values())).times),
                "results": [dict(m.to_dict(), speedup=self.speedup(name),
                                 paired_speedup=self.paired_speedup(name),
                                 first_call_vs_baseline_s=self.first_call_delta(name),
                                 new_batch_call_vs_baseline_s=self.first_call_delta(
                                     name, new_batch=True))
                            for name, m in self.measurements.items()]}


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device: Any = None, flag: str = "device") -> torch.device:
    """The device ``device`` names, checked to exist on this machine: ``None`` / ``"auto"`` is CUDA
    when present, else the CPU. Anything else that cannot run here (``"tpu"``, ``"cuda"`` without a
    GPU, ``"cuda:7"`` on a machine with fewer GPUs) is a ValueError naming ``flag`` and the fix, raised
    before a model is built."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {device!r} is not a device torch knows: use cpu, cuda, cuda:N "
                         f"or auto") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"{flag} {device!r} is not a device type this library runs on: use cpu, "
                         f"cuda, cuda:N or auto")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {device}: torch sees no CUDA GPU on this machine "
                             f"(torch.cuda.is_available() is False); use {flag} cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{flag} {device}: torch sees only {count} CUDA GPU(s), cuda:0 to "
                             f"cuda:{count - 1}; use {flag} cuda:0 (or {flag} cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: no Apple MPS device on this machine; use {flag} cpu")
    return dev


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


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else {v: k for k, v in DTYPES.items()}[dtype]


def check_precision(dtype: Union[str, torch.dtype, None], model_dtype: Union[str, torch.dtype, None]
                    ) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """``(autocast dtype, weights' dtype or None)``: one of the two may be fp16 / bf16, not both
    (weights cast to a half type run without autocast); a ``model_dtype`` of None stays None."""
    dtype = resolve_dtype(dtype)
    model_dtype = None if model_dtype is None else resolve_dtype(model_dtype)
    if model_dtype not in (None, torch.float32) and dtype != torch.float32:
        raise ValueError(f"model_dtype {_dtype_name(model_dtype)} runs the weights and inputs in "
                         f"{_dtype_name(model_dtype)} without autocast; dtype (the autocast dtype) "
                         f"must then be fp32, got {_dtype_name(dtype)}")
    return dtype, model_dtype


@contextmanager
def cast_weights(models: Iterable[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Every floating-point parameter and buffer of ``models`` in ``dtype`` inside (what
    ``Module.to(dtype)`` casts), the original tensors put back on the way out: the caller's weights
    come back as they were, not rounded. A tensor shared by several models (or tied within one) is
    cast once and stays shared."""
    params, buffers, cast = [], [], {}
    try:
        for model in models:
            for module in model.modules():
                for p in module._parameters.values():
                    # a shared parameter is cast on its first visit, then has ``dtype``
                    if p is not None and p.is_floating_point() and p.dtype != dtype:
                        params.append((p, p.data))
                        p.data = p.data.to(dtype)
                for key, b in module._buffers.items():
                    if b is not None and b.is_floating_point() and b.dtype != dtype:
                        if id(b) not in cast:
                            cast[id(b)] = b.to(dtype)
                        buffers.append((module, key, b))
                        module._buffers[key] = cast[id(b)]
        yield
    finally:
        for p, data in params:
            p.data = data
        for module, key, b in buffers:
            module._buffers[key] = b


def new_batch_size(batch_size: int) -> int:
    """The batch size of the second first call: half the timed one (2 for a timed batch of 1)."""
    return batch_size // 2 if batch_size > 1 else 2


def _autocast(device: torch.device, dtype: torch.dtype, cache: bool = True):
    # weights stay fp32; fp16/bf16 run under autocast, as mixed-precision inference usually does;
    # CUDA graph capture needs autocast's weight cache off (torch.cuda.graphs' notes)
    return (nullcontext() if dtype == torch.float32
            else torch.autocast(device.type, dtype=dtype, cache_enabled=cache))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def cudnn_benchmark_mode(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = enabled`` inside, on CUDA only, restored on the way out:
    cuDNN then times its convolution algorithms on the first call of each shape and keeps the fastest
    (the warm-up rounds absorb that). Elsewhere the flag is left as it is."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _check_cuda_graphs(cuda_graphs: Union[bool, str], device: torch.device) -> bool:
    """Whether to capture CUDA graphs: ``"auto"`` means on CUDA only; True off CUDA is an error."""
    if cuda_graphs not in ("auto", True, False):
        raise ValueError(f"cuda_graphs is 'auto', True or False, got {cuda_graphs!r}")
    if cuda_graphs is True and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device; use cuda_graphs='auto' or False on "
                         f"{device.type}")
    return device.type == "cuda" and cuda_graphs is not False


def _graph_forwards(models: Mapping[str, nn.Module], x: torch.Tensor, device: torch.device,
                    measurements: Mapping) -> dict[str, Callable]:  # pragma: no cover - needs a GPU
    """Each model's forward on ``x``'s shape as a replayed CUDA graph, its measurement's
    ``cuda_graph`` set True; a ``torch.compile``'d model runs as compiled (``mode="reduce-overhead"``
    brings its own graphs), and one that cannot be captured runs eagerly, with a warning."""
    forwards: dict[str, Callable] = dict(models)
    for name, model in models.items():
        if hasattr(model, "_orig_mod"):  # torch.compile'd: runs as compiled
            continue
        try:
            forwards[name] = _capture_cuda_graph(model, x)
            measurements[name].cuda_graph = True
        except RuntimeError as e:  # e.g. an op that synchronizes with the host
            warnings.warn(f"{name}: no CUDA graph ({e}); timed eagerly")
            torch.cuda.synchronize(device)
    return forwards


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
    cuda_graphs: Union[bool, str] = False,
    cudnn_benchmark: bool = True,
    model_dtype: Union[str, torch.dtype, None] = None,
    first_call: bool = False,
    inputs: Optional[torch.Tensor] = None,
) -> BenchmarkRun:
    """Time several models interleaved in one run.

    Each round runs every model once on the same random batch (or ``inputs``); round ``r`` starts at model
    ``r mod len(models)`` (a rotation), so no model always runs first or right after another. The
    ``warmup`` rounds are discarded, then ``reps`` rounds are timed, one batch per model each.

    With ``first_call``, each model's first forward is timed alone (synchronized) before the warm-up,
    in the models' order: what a user waits for on first use (torch.compile, Triton compiles or
    autotuning, cuDNN's algorithm search). After the timed rounds each model's first forward at
    :func:`new_batch_size` is timed too: a new batch size should not compile or tune again. It comes
    last because a ``torch.compile``'d model recompiles for a new shape, with a dynamic batch size
    that later calls at the timed size would then run. All models share the process: the first one
    measured (the baseline, by default) also pays what is set up once per process or per shape
    (cuBLAS handles, cuDNN's choice for the patch embedding), which later models find done.

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
        cuda_graphs: False (default), True or ``"auto"`` (on CUDA only): capture each model's
            forward once as a CUDA graph and time its replays, for small, launch-bound models whose
            kernels are too short to hide their launches (as :func:`latency` does at batch 1); a
            ``torch.compile``'d model runs as compiled (``mode="reduce-overhead"`` has its own).
        cudnn_benchmark: on CUDA, ``torch.backends.cudnn.benchmark`` while timing (restored after).
        model_dtype: None (the weights as given, fp32 inputs), ``"fp32"``, ``"fp16"`` or
            ``"bf16"``: floating-point weights, buffers and inputs cast to it for the run, no
            autocast (``dtype`` must be fp32); the models get their own tensors back afterwards
            (:func:`cast_weights`).
        first_call: also time each model's first forward and its first at a new batch size.
        inputs: ``[B, C, H, W]`` images to time on instead of a random batch (``input_size`` and
            ``batch_size`` then follow from it): for models whose cost depends on the images, such
            as a per-image keep policy (random noise makes every token look alike). With
            ``first_call``, the new batch size's call runs on the first images of ``inputs``.
    """
    if not models:
        raise ValueError("benchmark_models needs at least one model")
    if inputs is not None:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            raise ValueError(f"inputs must be a [B, C, H, W] tensor of images, got "
                             f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs)}")
        if batch_size is not None and batch_size != len(inputs):
            raise ValueError(f"batch_size {batch_size} differs from the {len(inputs)} images given as "
                             f"inputs; leave batch_size unset")
        input_size, batch_size = tuple(inputs.shape[1:]), len(inputs)
    if len(input_size) != 3:
        raise ValueError(f"input_size is (channels, height, width) of one image, got {input_size!r}")
    device, (dtype, model_dtype) = check_device(device), check_precision(dtype, model_dtype)
    defaults = DEFAULTS.get(device.type, DEFAULTS["cpu"])
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    reps = defaults["reps"] if reps is None else reps
    warmup = defaults["warmup"] if warmup is None else warmup
    if batch_size < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, reps >= 1, warmup >= 0; got {batch_size}, {reps}, "
                         f"{warmup}")
    use_graphs = _check_cuda_graphs(cuda_graphs, device)
    run = BenchmarkRun({n: Measurement(n, batch_size) for n in models},
                       _check_baseline(models, baseline), str(device), _dtype_name(dtype),
                       tuple(input_size), warmup, model_dtype=_dtype_name(model_dtype))
    if inputs is not None:
        x = inputs.to(device=device, dtype=model_dtype or torch.float32)
        new_x = x[:new_batch_size(batch_size)] if first_call else None
    else:
        x = torch.randn(batch_size, *input_size, device=device, dtype=model_dtype)
        new_x = (torch.randn(new_batch_size(batch_size), *input_size, device=device,
                             dtype=model_dtype) if first_call else None)
    return _run_interleaved(models, run, x, dtype, model_dtype, reps, use_graphs, cudnn_benchmark,
                            progress, "benchmark", "batch", new_x)


def _check_baseline(models: Mapping[str, nn.Module], baseline: Optional[str]) -> str:
    """The name speed-ups are taken against: ``baseline``, default the first model."""
    baseline = next(iter(models)) if baseline is None else baseline
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {list(models)}")
    return baseline


def _run_interleaved(models: Mapping[str, nn.Module], run, x: torch.Tensor, dtype: torch.dtype,
                     model_dtype: Optional[torch.dtype], reps: int, use_graphs: bool,
                     cudnn_benchmark: bool, progress: bool, desc: str, unit: str,
                     new_x: Optional[torch.Tensor] = None):
    """What :func:`benchmark_models` and :func:`latency` share: the models on ``x``'s device in eval
    mode, their weights in ``model_dtype`` (None: as given), then ``run.warmup`` + ``reps``
    interleaved rounds timed into ``run`` (replayed CUDA graphs with ``use_graphs``); with ``new_x``,
    each model's first forward (on ``x``, before the warm-up) and its first on ``new_x`` (after the
    timed rounds) timed into ``first_call_s`` / ``new_batch_call_s``; returns ``run``."""
    from tqdm.auto import tqdm

    device = x.device
    for model in models.values():
        model.to(device).eval()
    bar = tqdm(total=(run.warmup + reps) * len(models), desc=desc, unit=unit,
               disable=not progress, leave=False)
    cast = nullcontext() if model_dtype is None else cast_weights(models.values(), model_dtype)
    with cast, torch.inference_mode(), \
            cudnn_benchmark_mode(device, cudnn_benchmark), \
            _autocast(device, dtype, cache=not use_graphs), bar:
        if new_x is not None:
            for name, model in models.items():
                run.measurements[name].first_call_s = _timed_call(model, x, device)
        forwards = (_graph_forwards(models, x, device, run.measurements) if use_graphs
                    else dict(models))
        _interleaved(forwards, x, device, run.warmup, reps, run.measurements, run.schedule, bar)
        if new_x is not None:
            for name, model in models.items():
                run.measurements[name].new_batch_size = len(new_x)
                run.measurements[name].new_batch_call_s = _timed_call(model, new_x, device)
    return run


def _timed_call(forward: Callable, x: torch.Tensor, device: torch.device) -> float:
    """Seconds of one ``forward(x)``, synchronized on both sides on CUDA."""
    _sync(device)
    start = time.perf_counter()
    forward(x)
    _sync(device)
    return time.perf_counter() - start


def _interleaved(forwards: Mapping[str, Callable], x: torch.Tensor, device: torch.device,
                 warmup: int, reps: int, measurements: Mapping, schedule: list, bar) -> None:
    """The timing loop of :func:`benchmark_models` and :func:`latency`: round ``r`` runs every
    forward once, starting at ``r mod len(forwards)``; the first ``warmup`` rounds are discarded."""
    names = list(forwards)
    for r in range(warmup + reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            bar.set_postfix_str(name)
            elapsed = _timed_call(forwards[name], x, device)
            schedule.append(name)
            if r >= warmup:
                measurements[name].times.append(elapsed)
            bar.update()


def benchmark(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = "fp32",
    reps: Optional[int] = None,
    warmup: Optional[int] = None,
    progress: bool = False,
    model_dtype: Union[str, torch.dtype, None] = None,
) -> Measurement:
    """Images per second of one model (median and best over ``reps``); see :func:`benchmark_models`
    for the arguments. To compare models, time them together with :func:`benchmark_models`."""
    run = benchmark_models({"model": model}, input_size, batch_size, device, dtype, reps, warmup,
                           progress=progress, model_dtype=model_dtype)
    return run["model"]


LATENCY_DEFAULTS = {
    "cpu": {"reps": 50, "warmup": 5},
    "cuda": {"reps": 300, "warmup": 20},
}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between the closest ranks
    (numpy's default): 50 is the median."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must lie in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class LatencyMeasurement:
    """Seconds of each timed single-image forward of one model (``times``), and how it ran:
    ``cuda_graph`` is True when the forward replayed a captured CUDA graph."""

    name: str
    times: list[float] = field(default_factory=list)
    cuda_graph: bool = False

    @property
    def median_ms(self) -> float:
        return 1e3 * percentile(self.times, 50)

    @property
    def p90_ms(self) -> float:
        return 1e3 * percentile(self.times, 90)

    @property
    def best_ms(self) -> float:
        return 1e3 * min(self.times)

    def to_dict(self) -> dict:
        return {"name": self.name, "times_s": self.times, "cuda_graph": self.cuda_graph,
                "median_ms": self.median_ms, "p90_ms": self.p90_ms, "best_ms": self.best_ms}


@dataclass
class LatencyRun(_Run):
    """The result of :func:`latency`: one :class:`LatencyMeasurement` per model, in the given order."""

    def speedup(self, name: str) -> float:
        """The baseline's median latency over ``name``'s, both from this run: above 1, ``name`` answers
        one image sooner; below 1, pruning does not pay at batch 1."""
        return self.measurements[self.baseline].median_ms / self.measurements[name].median_ms

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "device": self.device, "dtype": self.dtype,
                "model_dtype": self.model_dtype, "input_size": list(self.input_size),
                "warmup": self.warmup, "batch_size": 1,
                "reps": len(next(iter(self.measurements.values())).times),
                "results": [dict(m.to_dict(), speedup=self.speedup(name))
                            for name, m in self.measurements.items()]}


def _capture_cuda_graph(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s forward on ``x``'s shape captured as a CUDA graph: a call copies its input into the
    static input and replays the graph (one launch instead of one per kernel). Warm-up runs on a side
    stream first, as torch.cuda.graphs asks, so that lazy initialisation is not captured."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)

    def replay(inp: torch.Tensor) -> torch.Tensor:
        static_x.copy_(inp)
        graph.replay()
        return static_out

    return replay


def latency(
    models: Mapping[str, nn.Module],
    input_size: Sequence[int] = (3, 224, 224),
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = "fp32",
    reps: Optional[int] = None,
    warmup: Optional[int] = None,
    baseline: Optional[str] = None,
    cuda_graphs: Union[bool, str] = "auto",
    progress: bool = False,
    cudnn_benchmark: bool = True,
    model_dtype: Union[str, torch.dtype, None] = None,
) -> LatencyRun:
    """Batch-1 latency of several models, interleaved like :func:`benchmark_models`: each timed
    round runs one single-image forward of every model (rotated start), each forward timed alone
    (synchronized on CUDA), so every model gets ``reps`` latencies; median and p90 are read from them.

    ``cuda_graphs``: ``"auto"`` (on CUDA only), True or False. On CUDA each model's forward is
    captured once as a CUDA graph and replayed (at batch 1 a ViT is launch-bound: graphs take the
    per-kernel launch cost away); a model that cannot be captured runs eagerly, its measurement's
    ``cuda_graph`` False. A ``torch.compile``'d model is not captured: it runs as compiled
    (``mode="reduce-overhead"`` brings torch.compile's own CUDA graphs). Other arguments as in
    :func:`benchmark_models` (cuDNN benchmark on CUDA included, ``model_dtype`` too); defaults per
    device type in :data:`LATENCY_DEFAULTS`.
    """
    if not models:
        raise ValueError("latency needs at least one model")
    if len(input_size) != 3:
        raise ValueError(f"input_size is (channels, height, width) of one image, got {input_size!r}")
    device, (dtype, model_dtype) = check_device(device), check_precision(dtype, model_dtype)
    defaults = LATENCY_DEFAULTS.get(device.type, LATENCY_DEFAULTS["cpu"])
    reps = defaults["reps"] if reps is None else reps
    warmup = defaults["warmup"] if warmup is None else warmup
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1, warmup >= 0; got {reps}, {warmup}")
    use_graphs = _check_cuda_graphs(cuda_graphs, device)
    run = LatencyRun({n: LatencyMeasurement(n) for n in models}, _check_baseline(models, baseline),
                     str(device), _dtype_name(dtype), tuple(input_size), warmup,
                     model_dtype=_dtype_name(model_dtype))
    x = torch.randn(1, *input_size, device=device, dtype=model_dtype)
    return _run_interleaved(models, run, x, dtype, model_dtype, reps, use_graphs, cudnn_benchmark,
                            progress, "latency", "image")


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
    model_dtype: Union[str, torch.dtype, None] = None,
) -> int:
    """The largest batch at which every model runs a forward on a CUDA GPU (the paper measured at
    the maximum batch size): doubling, then bisection on out-of-memory; ``dtype`` and
    ``model_dtype`` as in :func:`benchmark_models`."""
    device, (dtype, model_dtype) = check_device(device), check_precision(dtype, model_dtype)
    if device.type != "cuda":
        raise ValueError("batch_size='max' searches for the largest batch that fits in GPU memory; "
                         "on the CPU give a number (e.g. 32)")
    models = {"model": models} if isinstance(models, nn.Module) else models
    for model in models.values():
        model.to(device).eval()

    def fits(b: int) -> bool:
        try:
            cast = (nullcontext() if model_dtype is None
                    else cast_weights(models.values(), model_dtype))
            with cast, torch.inference_mode(), _autocast(device, dtype):
                x = torch.randn(b, *input_size, device=device, dtype=model_dtype)
                for model in models.values():
                    model(x)
            _sync(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    return find_max_batch(fits, start, limit)
