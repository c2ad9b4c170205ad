"""Micro-benchmarks of the reorganize step and the fused ICE score (pytest-benchmark).

    .venv/bin/python -m pytest bench/test_kernels.py --benchmark-only --benchmark-columns=median,min,rounds

Implementations of one selection point (keep the top ``k`` of ``n`` tokens by score, fuse the rest
as EViT's attention-weighted sum): the op with its Triton kernel (one launch: ranking, copies and the
fused row in ``_reorganize_kernel``), a two-launch Triton path for comparison (``_order_kernel``,
then ``_gather_fuse_kernel`` gathering through the order: bench/two_launch_reorganize.py), the
plain-torch reference, and EViT-style eager code (topk, gather, complement, gather, weighted sum,
cat). ``extra_info`` holds the median time
per step and the effective bandwidth over the minimal bytes: every input row read once, ``P + k + 1``
rows written, the scores read and the int64 order written. On a GPU it also holds the time and
bandwidth of ``STEPS`` steps captured in one CUDA graph (``graph_step_us``, ``graph_GBps``): the
device time without the host's launch overhead, what the bandwidth goal (at least 70% of a device
copy's, ``test_device_copy``) is measured on. The Triton cases need a CUDA GPU and are skipped without
one; the torch cases run on CPU too (fp32, as a CPU has no fast bf16).

The ICE score (``test_ice_score``) at the same selection point, DeiT-S's 1001-way head, as the patched
model runs it: under autocast on a GPU (fp32 norm2 output and weight, bf16 arithmetic), fp32 on CPU.
Five ways: ``ice_prune::ice_score`` with the Triton kernel, the same with each token's top class
(``top_class=True``), the same writing explain mode's map from its epilogue
(``ice_prune::ice_score_into_map``, the op explain mode runs on a GPU), with the torch kernel
(chunked over classes), and the
logits path it replaces (linear layer, then ``foreground_score``'s logsumexp). ``extra_info`` holds
the median time per call and the head's TFLOP/s; for the Triton cases also the config (the shipped
table's, or the autotuner's with ``ICE_PRUNE_AUTOTUNE=1``), the first call's time (compile included:
a cold or warm Triton cache, as the machine has it) and the first call at another batch size (no
compile: ``T`` is not specialized).
"""
import statistics
import time

import pytest
import timm
import torch

import torch.nn.functional as F

import ice_prune
from ice_prune.kernels import ice_score, reorganize, reorganize_reference
from ice_prune.kernels.ops import triton_ice_score, triton_reorganize
from ice_prune.kernels.reference import MapTarget
from ice_prune.kernels.tuning import autotune_enabled
from ice_prune.select import foreground_score, keep_count, token_schedule
from two_launch_reorganize import reorganize_triton_two_launch  # bench/, beside this file

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCHES = (256, 1024) if CUDA else (64,)
# steps timed per round: a GPU step is shorter than one host synchronization
STEPS = 20 if CUDA else 1
NUM_PREFIX, NUM_PATCHES, DIM, KEEP_RATE = 1, 196, 384, 0.7  # DeiT-S's first selection point


def evit_eager(x, scores, keep, num_prefix):
    """The step as EViT's code writes it: top-k indices, their complement, two gathers, a sum."""
    B, N, D = x.shape
    n = N - num_prefix
    tokens = x[:, num_prefix:]
    idx = torch.topk(scores, keep, dim=1, largest=True, sorted=True).indices
    kept = torch.gather(tokens, 1, idx[..., None].expand(B, keep, D))
    # complement: zero the kept positions in an arange, sort, drop the first ``keep``
    others = torch.arange(n, device=x.device).expand(B, n).scatter(1, idx, 0)
    compl = torch.sort(others, dim=1).values[:, keep:]
    dropped = torch.gather(tokens, 1, compl[..., None].expand(B, n - keep, D))
    weights = torch.gather(scores, 1, compl).to(x.dtype)
    fused = torch.sum(dropped * weights[..., None], dim=1, keepdim=True)
    return torch.cat([x[:, :num_prefix], kept, fused], dim=1), idx


IMPLS = {
    "triton": lambda x, s, k, p: reorganize(x, s, k, p, True, False, "triton"),
    "triton_two_launch": lambda x, s, k, p: reorganize_triton_two_launch(x, s, k, p, True, False),
    "torch": lambda x, s, k, p: reorganize_reference(x, s, k, p, True, False),
    "evit_eager": evit_eager,
}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _timed(fn, *args):
    def run():
        for _ in range(STEPS):
            fn(*args)
        _sync()

    return run


def _graph_step_seconds(fn, *args, replays=20):
    """Median device time of one call of ``fn``: ``STEPS`` calls captured in one CUDA graph (warm
    already: compiled, autotuned), replayed and timed with CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(STEPS):
            fn(*args)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / STEPS)
    return statistics.median(times)


def _minimal_bytes(B, N, D, keep, num_prefix, esize):
    n = N - num_prefix
    rows = B * (N + num_prefix + keep + 1) * D * esize  # read every row once, write the output
    return rows + B * n * 4 + B * n * 8  # fp32 scores read, int64 order written


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("B", BATCHES)
def test_reorganize_step(benchmark, impl, B):
    if impl.startswith("triton") and not CUDA:
        pytest.skip("the Triton kernels are benchmarked on a CUDA GPU only")
    N, keep = NUM_PREFIX + NUM_PATCHES, keep_count(KEEP_RATE, NUM_PATCHES)
    x = torch.randn(B, N, DIM, device=DEVICE, dtype=DTYPE)
    scores = torch.rand(B, NUM_PATCHES, device=DEVICE).softmax(dim=1)
    fn = IMPLS[impl]
    for _ in range(3):  # warm-up: Triton compile and autotune, allocator
        fn(x, scores, keep, NUM_PREFIX)
    _sync()
    benchmark.pedantic(_timed(fn, x, scores, keep, NUM_PREFIX), rounds=30 if CUDA else 20,
                       warmup_rounds=2)
    step = benchmark.stats.stats.median / STEPS
    nbytes = _minimal_bytes(B, N, DIM, keep, NUM_PREFIX, x.element_size())
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "dtype": str(DTYPE), "B": B, "N": N, "D": DIM, "keep": keep,
        "median_step_us": step * 1e6, "effective_GBps": nbytes / step / 1e9})
    if CUDA:
        graph_step = _graph_step_seconds(fn, x, scores, keep, NUM_PREFIX)
        benchmark.extra_info.update({"graph_step_us": graph_step * 1e6,
                                     "graph_GBps": nbytes / graph_step / 1e9})
        if impl == "triton" and not triton_reorganize.INTERPRETED:
            if autotune_enabled():
                best = triton_reorganize._reorganize_autotuned.best_config
                config = {**best.kwargs, "num_warps": best.num_warps}
            else:
                config = {**triton_reorganize.INTERPRETER_CONFIG,
                          "num_warps": triton_reorganize.NUM_WARPS}
            benchmark.extra_info["config"] = config


@pytest.mark.parametrize("B", BATCHES)
def test_device_copy(benchmark, B):
    """The yardstick for the bandwidth goal: a plain device-to-device copy of the step's input."""
    src = torch.randn(B, NUM_PREFIX + NUM_PATCHES, DIM, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    benchmark.pedantic(_timed(dst.copy_, src), rounds=30 if CUDA else 20, warmup_rounds=2)
    step = benchmark.stats.stats.median / STEPS
    nbytes = 2 * src.numel() * src.element_size()
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if CUDA else "cpu", "dtype": str(DTYPE), "B": B,
        "median_step_us": step * 1e6, "copy_GBps": nbytes / step / 1e9})
    if CUDA:
        graph_step = _graph_step_seconds(dst.copy_, src)
        benchmark.extra_info.update({"graph_step_us": graph_step * 1e6,
                                     "graph_copy_GBps": nbytes / graph_step / 1e9})


@pytest.mark.parametrize("B", BATCHES)
def test_reorganize_share_of_pruned_forward(benchmark, B):
    """The reorganize steps at all three selection points of DeiT-S (keep rate 0.7, EViT), timed
    alone, as a share of the pruned model's whole forward (eval, no grad). On a GPU also from a
    captured CUDA graph (``graph_reorganize_share``: device time, no host launch overhead; the
    goal, at most 2.5%, is about this one)."""
    kernel = "triton" if CUDA else "torch"
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    model = ice_prune.patch(model, keep_rate=KEEP_RATE, method="evit", kernel=kernel)
    model = model.to(DEVICE, DTYPE).eval()
    images = torch.randn(B, 3, 224, 224, device=DEVICE, dtype=DTYPE)
    lengths = [NUM_PREFIX + NUM_PATCHES] + token_schedule(NUM_PREFIX + NUM_PATCHES, NUM_PREFIX,
                                                          [KEEP_RATE] * 3)
    steps = []
    for N in lengths[:-1]:
        n = N - NUM_PREFIX
        steps.append((torch.randn(B, N, DIM, device=DEVICE, dtype=DTYPE),
                      torch.rand(B, n, device=DEVICE).softmax(dim=1), keep_count(KEEP_RATE, n)))

    def reorganize_all():
        for x, scores, keep in steps:
            reorganize(x, scores, keep, NUM_PREFIX, True, False, kernel)

    def median_seconds(fn, reps):
        times = []
        for _ in range(reps):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.no_grad():
        for _ in range(2):
            model(images)
            reorganize_all()
        benchmark.pedantic(lambda: (model(images), _sync()), rounds=10 if CUDA else 3)
        forward = benchmark.stats.stats.median
        step_time = median_seconds(reorganize_all, 50 if CUDA else 10)
        benchmark.extra_info.update({
            "device": torch.cuda.get_device_name() if CUDA else "cpu", "dtype": str(DTYPE),
            "B": B, "kernel": kernel, "tokens": lengths, "forward_ms": forward * 1e3,
            "reorganize_ms": step_time * 1e3, "reorganize_share": step_time / forward})
        if CUDA:
            graph_forward = _graph_step_seconds(model, images)
            graph_steps = _graph_step_seconds(reorganize_all)
            benchmark.extra_info.update({
                "graph_forward_ms": graph_forward * 1e3, "graph_reorganize_ms": graph_steps * 1e3,
                "graph_reorganize_share": graph_steps / graph_forward})


SCORE_CLASSES = 1000  # ImageNet: a 384 x 1001 head
_MAPS: dict = {}


def _into_map(h, w):
    """Explain mode's call at the first point: the score, and the map written from the epilogue
    (its buffers made once per shape, as a forward makes them once for all its points)."""
    B, n = h.shape[:2]
    if (B, n) not in _MAPS:
        f32, i64 = dict(device=h.device), dict(device=h.device, dtype=torch.int64)
        _MAPS[B, n] = MapTarget(torch.arange(n, device=h.device).expand(B, n), 0,
                                torch.empty(B, n + 1, **f32), torch.empty(B, n + 1, **i64),
                                torch.empty(B, n + 1, **i64), torch.empty(B, n + 1, **f32))
    return ice_score(h, w, kernel="triton", into=_MAPS[B, n])


SCORE_IMPLS = {
    "triton": lambda h, w: ice_score(h, w, kernel="triton"),
    "triton_top_class": lambda h, w: ice_score(h, w, kernel="triton", top_class=True),
    "triton_into_map": _into_map,
    "torch": lambda h, w: ice_score(h, w, kernel="torch"),
    "logits_logsumexp": lambda h, w: foreground_score(F.linear(h, w)),
}


@pytest.mark.parametrize("impl", list(SCORE_IMPLS))
@pytest.mark.parametrize("B", BATCHES)
def test_ice_score(benchmark, impl, B):
    if impl.startswith("triton") and not CUDA:
        pytest.skip("the Triton kernels are benchmarked on a CUDA GPU only")
    h = torch.randn(B, NUM_PATCHES, DIM, device=DEVICE)
    weight = torch.randn(SCORE_CLASSES + 1, DIM, device=DEVICE) / DIM ** 0.5
    fn = SCORE_IMPLS[impl]
    autocast = torch.autocast(DEVICE.type, dtype=DTYPE, enabled=CUDA)
    first_calls = {}
    with torch.no_grad(), autocast:
        for name, tokens in (("first_call_s", h), ("first_call_new_batch_s", h[:B - 3])):
            _sync()
            start = time.perf_counter()
            fn(tokens, weight)
            _sync()
            first_calls[name] = time.perf_counter() - start
        for _ in range(3):  # warm-up: allocator
            fn(h, weight)
        _sync()
        benchmark.pedantic(_timed(fn, h, weight), rounds=30 if CUDA else 20, warmup_rounds=2)
    step = benchmark.stats.stats.median / STEPS
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "dtype": f"autocast {DTYPE}" if CUDA else str(DTYPE), "B": B, "n": NUM_PATCHES, "D": DIM,
        "classes": SCORE_CLASSES + 1, "median_step_us": step * 1e6,
        "TFLOPs": 2 * B * NUM_PATCHES * DIM * (SCORE_CLASSES + 1) / step / 1e12})
    if impl.startswith("triton") and not triton_ice_score.INTERPRETED:
        if autotune_enabled():
            best = triton_ice_score._ice_score_autotuned.best_config
            config = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        else:
            kind = triton_ice_score.compute_kind(DTYPE, "tf32")
            arch = torch.cuda.get_device_capability()[0]
            config = triton_ice_score.config_for(arch, kind, DIM)._asdict()
        benchmark.extra_info.update(config=config, **first_calls)
