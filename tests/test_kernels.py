"""The reorganize op and its kernels against the plain-torch reference, and both against an
independent oracle written here (a Python loop in float64), so the "torch" kernel, which is the
reference itself, is checked too.

The same tests run on CPU, where the Triton kernels run in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), and on a GPU, where they are compiled.
"""
import importlib.util
import math
import pathlib
import sys

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import ice_prune
from ice_prune.kernels import (KERNELS, reorganize, reorganize_backward_reference, reorganize_macs,
                               reorganize_reference, resolve_kernel)
from ice_prune.kernels import ops
from ice_prune.kernels.reference import EPS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_NAMES = ("torch", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# relative to sum_i |w_i x_i| (the fused row's condition): fp32 summation order, one rounding of the
# output and, for bf16/fp16 scores, the reference's weights computed in that dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-5}


def _inputs(B, N, D, P, dtype=torch.float32, score_dtype=torch.float32):
    x = torch.randn(B, N, D, device=DEVICE).to(dtype)
    scores = torch.rand(B, N - P, device=DEVICE).to(score_dtype)
    return x, scores


def loop_reorganize(x, scores, keep, P, fuse, normalize):
    """The oracle: one image and one token at a time, in float64, sharing no code with the library.

    Returns ``(order, kept rows [B, P + keep, D], fused rows [B, D] or None, scale [B, D])``: the
    order is Python's stable sort, NaN first then descending score (torch's descending argsort);
    ``scale`` is ``sum_i |w_i| |x_i|`` over the dropped tokens, what the fused row's rounding error
    is measured against."""
    x, scores = x.detach().cpu(), scores.detach().cpu().double()
    orders, kept_rows, fused_rows, scales = [], [], [], []
    for b in range(x.shape[0]):
        s = scores[b].tolist()
        order = sorted(range(len(s)), key=lambda i: (not math.isnan(s[i]),
                                                     0.0 if math.isnan(s[i]) else -s[i]))
        orders.append(order)
        kept_rows.append(torch.stack([x[b, p] for p in range(P)]
                                     + [x[b, P + i] for i in order[:keep]]))
        weights = [s[i] for i in order[keep:]]
        if normalize:
            total = max(sum(weights), EPS)
            weights = [w / total for w in weights]
        fused = torch.zeros(x.shape[-1], dtype=torch.float64)
        scale = torch.zeros(x.shape[-1], dtype=torch.float64)
        for w, i in zip(weights, order[keep:]):
            fused += w * x[b, P + i].double()
            scale += abs(w) * x[b, P + i].double().abs()
        fused_rows.append(fused)
        scales.append(scale)
    return (orders, torch.stack(kept_rows), torch.stack(fused_rows) if fuse else None,
            torch.stack(scales))


def test_loop_oracle_hand_computed():
    # 1 prefix token, 3 patch tokens scored 0.1, 0.5, 0.2; keep 1: token 1 kept, 2 then 0 fused
    x = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    order, kept, fused, _ = loop_reorganize(x, torch.tensor([[0.1, 0.5, 0.2]]), 1, 1, True, False)
    assert order == [[1, 2, 0]]
    assert torch.equal(kept, torch.tensor([[[9.0, 9.0], [3.0, 4.0]]]))
    torch.testing.assert_close(fused, torch.tensor([[1.1, 1.4]], dtype=torch.float64))
    nan = float("nan")
    assert loop_reorganize(x, torch.tensor([[1.0, nan, 1.0]]), 1, 1, False, False)[0] == [[1, 0, 2]]


def _check_forward(x, scores, keep, P, fuse, normalize, kernel):
    out, order = reorganize(x, scores, keep, P, fuse, normalize, kernel)
    ref, ref_order = reorganize_reference(x, scores, keep, P, fuse, normalize)
    assert out.shape == ref.shape and out.dtype == x.dtype and out.is_contiguous()
    assert order.dtype == torch.int64
    torch.testing.assert_close(order, ref_order, rtol=0, atol=0)
    assert torch.equal(out[:, :P + keep], ref[:, :P + keep]), "prefix and kept rows must be copies"
    loop_order, loop_kept, loop_fused, scale = loop_reorganize(x, scores, keep, P, fuse, normalize)
    assert order.tolist() == loop_order
    assert torch.equal(out[:, :P + keep].cpu(), loop_kept)
    if fuse:
        # the weighted sum of |w_i| |x_i| bounds the rounding error
        tol = max(TOL[x.dtype], TOL[scores.dtype])
        for name, fused in (("reference", ref[:, -1]), ("loop oracle", loop_fused)):
            err = (out[:, -1].cpu().double() - fused.cpu().double()).abs()
            assert (err <= tol * scale + 1e-6).all(), f"fused row off {name} by {err.max().item()}"
    return out, order


def test_reference_hand_computed():
    # 1 prefix token, 3 patch tokens scored 0.1, 0.5, 0.2; keep 1: token 1 kept, tokens 2 then 0 fused
    x = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    s = torch.tensor([[0.1, 0.5, 0.2]])
    out, order = reorganize_reference(x, s, 1, 1, fuse=True, normalize=False)
    assert order.tolist() == [[1, 2, 0]]
    torch.testing.assert_close(out, torch.tensor([[[9.0, 9.0], [3.0, 4.0],
                                                  [0.2 * 5 + 0.1 * 1, 0.2 * 6 + 0.1 * 2]]]))
    out, _ = reorganize_reference(x, s, 1, 1, fuse=True, normalize=True)
    torch.testing.assert_close(out[0, -1], torch.tensor([(0.2 * 5 + 0.1 * 1) / 0.3,
                                                         (0.2 * 6 + 0.1 * 2) / 0.3]))
    out, _ = reorganize_reference(x, s, 2, 1, fuse=False)
    torch.testing.assert_close(out, torch.tensor([[[9.0, 9.0], [3.0, 4.0], [5.0, 6.0]]]))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fuse,normalize", [(True, False), (True, True), (False, False)])
def test_forward_matches_reference(kernel, dtype, fuse, normalize):
    x, scores = _inputs(3, 1 + 50, 72, 1, dtype)
    _check_forward(x, scores, 35, 1, fuse, normalize, kernel)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_ties_nan_and_inf_sort_like_torch(kernel):
    x, _ = _inputs(2, 2 + 40, 16, 2)
    scores = (torch.rand(2, 40, device=DEVICE) * 4).floor()  # many ties: stable order decides
    scores[0, 5], scores[0, 9], scores[1, 0] = float("nan"), float("nan"), float("inf")
    scores[1, 7] = float("-inf")
    out, order = reorganize(x, scores, 12, 2, False, False, kernel)
    torch.testing.assert_close(order, torch.argsort(scores, dim=1, descending=True, stable=True),
                               rtol=0, atol=0)
    assert order.tolist() == loop_reorganize(x, scores, 12, 2, False, False)[0]
    assert torch.equal(out, reorganize_reference(x, scores, 12, 2, False)[0])


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_keep_all_gives_a_zero_fused_row(kernel):
    x, scores = _inputs(2, 1 + 9, 8, 1)
    out, _ = _check_forward(x, scores, 9, 1, True, True, kernel)
    assert torch.equal(out[:, -1], torch.zeros_like(out[:, -1]))


@pytest.mark.parametrize("fuse,normalize", [(True, False), (True, True), (False, False)])
def test_backward_reference_is_autograd(fuse, normalize):
    x = torch.randn(2, 1 + 30, 24, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 30, dtype=torch.float64, requires_grad=True)
    out, order = reorganize_reference(x, s, 11, 1, fuse, normalize)
    g = torch.randn_like(out)
    gx, gs = torch.autograd.grad(out, (x, s), g, allow_unused=True)
    mine_x, mine_s = reorganize_backward_reference(g, x.detach(), s.detach(), order, 11, 1, fuse,
                                                   normalize)
    torch.testing.assert_close(mine_x, gx)
    torch.testing.assert_close(mine_s, gs if gs is not None else torch.zeros_like(s))


def test_backward_reference_tiny_dropped_sum_follows_clamp():
    # sum of dropped scores below EPS: weights s_i / EPS, no gradient through the sum
    x = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[0.9, 0.8, 1e-14, 2e-14, 3e-14, 0.7]], dtype=torch.float64,
                     requires_grad=True)
    out, order = reorganize_reference(x, s, 3, 0, True, True)
    g = torch.randn_like(out)
    gx, gs = torch.autograd.grad(out, (x, s), g)
    mine = reorganize_backward_reference(g, x.detach(), s.detach(), order, 3, 0, True, True)
    torch.testing.assert_close(mine[0], gx)
    torch.testing.assert_close(mine[1], gs)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("fuse,normalize", [(True, False), (True, True), (False, False)])
def test_gradients_match_reference_autograd(kernel, dtype, fuse, normalize):
    x, scores = _inputs(3, 1 + 40, 150, 1, dtype)  # D = 150: two channel blocks, the last partial
    g = torch.randn(3, 1 + 17 + int(fuse), 150, device=DEVICE).to(dtype)
    grads = []
    for fn in (reorganize_reference, lambda *a: reorganize(*a, kernel=kernel)):
        xr, sr = x.clone().requires_grad_(), scores.clone().requires_grad_()
        out, _ = fn(xr, sr, 17, 1, fuse, normalize)
        out.backward(g)
        grads.append((xr.grad, sr.grad if sr.grad is not None else torch.zeros_like(sr)))
    (ref_x, ref_s), (gx, gs) = grads
    tol = TOL[dtype]
    torch.testing.assert_close(gx, ref_x, rtol=tol, atol=tol)
    torch.testing.assert_close(gs, ref_s, rtol=1e-4, atol=1e-4 * ref_s.abs().max().item())


def test_backward_accepts_expanded_gradient():
    # out.sum() backpropagates a stride-0 gradient; the kernel reads it through its strides
    x, scores = _inputs(2, 1 + 20, 33, 1)
    xr, sr = x.clone().requires_grad_(), scores.clone().requires_grad_()
    reorganize_reference(xr, sr, 8, 1, True, True)[0].sum().backward()  # autograd, no custom op
    ref = xr.grad, sr.grad
    for kernel in KERNEL_NAMES:
        xr, sr = x.clone().requires_grad_(), scores.clone().requires_grad_()
        reorganize(xr, sr, 8, 1, True, True, kernel)[0].sum().backward()
        torch.testing.assert_close((xr.grad, sr.grad), ref)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("fuse,normalize", [(True, True), (False, False)])
def test_opcheck(kernel, fuse, normalize):
    x, scores = _inputs(2, 1 + 12, 20, 1)
    args = (x.requires_grad_(), scores.requires_grad_(), 5, 1, fuse, normalize, kernel)
    torch.library.opcheck(torch.ops.ice_prune.reorganize.default, args)


def test_flop_counter_counts_the_fused_sum():
    B, P, n, D, keep = 4, 1, 30, 64, 20
    x, scores = _inputs(B, P + n, D, P)
    x.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        out, _ = reorganize(x, scores, keep, P, True, True, "torch")
    assert reorganize_macs(B, n, D, keep) == B * (n - keep) * D
    assert counter.get_total_flops() == 2 * B * (n - keep) * D
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 4 * B * (n - keep) * D
    assert reorganize_macs(B, n, D, keep, fuse=False) == 0


def test_kernel_resolution_and_errors(monkeypatch):
    assert resolve_kernel("auto", torch.device("cpu")) == "torch"
    assert resolve_kernel("auto", torch.device("cuda")) == ("triton" if "triton" in KERNELS
                                                            else "torch")
    with pytest.raises(ValueError, match="unknown kernel"):
        resolve_kernel("cuda", torch.device("cpu"))
    monkeypatch.setitem(KERNELS, "triton", KERNELS["triton"]._replace(runs_on_cpu=False))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_kernel("triton", torch.device("cpu"))


def test_bad_input_raises_a_clear_error():
    x, scores = _inputs(2, 11, 8, 1)
    with pytest.raises(ValueError, match="keep must be an int in"):
        reorganize(x, scores, 0, 1)
    with pytest.raises(ValueError, match="keep must be an int in"):
        reorganize(x, scores, 11, 1)
    with pytest.raises(ValueError, match=r"scores must be \[B, N - num_prefix\]"):
        reorganize(x, scores[:, 1:], 3, 1)
    with pytest.raises(ValueError, match="num_prefix must be"):
        reorganize(x, scores, 3, 11)
    with pytest.raises(ValueError, match=r"x must be \[B, N, D\]"):
        reorganize(x[0], scores, 3, 1)
    with pytest.raises(TypeError, match="floating point"):
        reorganize(x, (scores * 10).long(), 3, 1)


def test_compiled_op_forward_and_backward_match_eager():
    x, scores = _inputs(2, 1 + 24, 40, 1)

    def step(x, s):
        out, order = reorganize(x, s, 10, 1, True, True, "triton")
        return (out.float() ** 2).sum(), order

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        xr, sr = x.clone().requires_grad_(), scores.clone().requires_grad_()
        loss, order = fn(xr, sr)
        loss.backward()
        grads.append((loss.detach(), order, xr.grad, sr.grad))
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("method", ("ice", "evit"))
def test_compiled_patched_vit_with_triton_matches_torch_kernel(method):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, pretrained=False,
                              num_classes=10).to(DEVICE).eval()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    ice_prune.patch(model, keep_rate=0.5, method=method, kernel="torch", trace=True)
    with torch.no_grad():
        expected = model(images)
        kept = [loc["kept"] for loc in model.ice_trace["locations"]]
        model._ice.kernel = "triton"
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(loc["kept"], k) for loc, k in zip(model.ice_trace["locations"], kept))
        model.trace = False
        # inductor on a GPU; on CPU aot_eager traces the same graph (fake op, autograd) without the
        # C++ compile time
        backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        torch.testing.assert_close(compiled(images), expected, rtol=1e-4, atol=1e-4)


def _strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout."""
    if layout == "transposed":  # last dim not unit-stride
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other element of a wider buffer
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), P=st.integers(0, 2), n=st.integers(1, 40), D=st.integers(1, 70),
    keep_frac=st.floats(0.0, 1.0), dtype=st.sampled_from(DTYPES),
    score_dtype=st.sampled_from((torch.float32, "same")),
    layout=st.sampled_from(("contiguous", "transposed", "sliced")),
    fuse=st.booleans(), normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_property_forward_matches_reference(B, P, n, D, keep_frac, dtype, score_dtype, layout,
                                            fuse, normalize, seed):
    torch.manual_seed(seed)
    keep = max(1, round(keep_frac * n))
    x, scores = _inputs(B, P + n, D, P, dtype, dtype if score_dtype == "same" else score_dtype)
    _check_forward(_strided(x, layout), _strided(scores, layout), keep, P, fuse, normalize,
                   "triton")


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), P=st.integers(0, 2), n=st.integers(1, 30), D=st.integers(1, 40),
       keep_frac=st.floats(0.0, 1.0), fuse=st.booleans(), normalize=st.booleans(),
       layout=st.sampled_from(("contiguous", "transposed")), seed=st.integers(0, 2**16))
def test_property_backward_matches_reference(B, P, n, D, keep_frac, fuse, normalize, layout, seed):
    torch.manual_seed(seed)
    keep = max(1, round(keep_frac * n))
    x, scores = _inputs(B, P + n, D, P)
    x, scores = _strided(x, layout), _strided(scores, layout)
    out, order = reorganize_reference(x, scores, keep, P, fuse, normalize)
    g = torch.randn_like(out)
    ref = reorganize_backward_reference(g, x, scores, order, keep, P, fuse, normalize)
    mine = ops.reorganize_backward_op(_strided(g, layout), x, scores, order, keep, P, fuse,
                                      normalize, "triton")
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("fuse,normalize", [(True, False), (True, True)])
def test_gpu_large_shapes(fuse, normalize):
    x, scores = _inputs(256, 1 + 196, 384, 1, torch.bfloat16)
    _check_forward(x, scores, 138, 1, fuse, normalize, "triton")
    x, scores = _inputs(4, 1 + 3136, 768, 1, torch.bfloat16)  # 896 px images: n in the thousands
    _check_forward(x, scores, 2195, 1, fuse, normalize, "triton")


@pytest.mark.gpu
def test_gpu_step_captures_in_a_cuda_graph():
    # a host synchronization (.item(), nonzero) inside the step would make the capture fail
    x, scores = _inputs(64, 1 + 196, 384, 1, torch.bfloat16)
    ref = reorganize(x, scores, 138, 1, True, True, "triton")
    reorganize(x, scores, 138, 1, True, True, "triton")  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, order = reorganize(x, scores, 138, 1, True, True, "triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref[0]) and torch.equal(order, ref[1])


@pytest.mark.parametrize("method", ("ice", "evit"))
def test_patched_vit_trains_through_the_triton_kernel(method):
    # the selector's scores (ICE head, [CLS] attention) get the same gradients from both kernels
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, pretrained=False,
                              num_classes=10).to(DEVICE).train()
    ice_prune.patch(model, keep_rate=0.5, method=method, locs=(1, 3))
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    grads = []
    for kernel in KERNEL_NAMES:
        model._ice.kernel = kernel
        model.zero_grad()
        # the ICE head reaches the loss only through the fused tokens' weights, i.e. the kernel
        model(images).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    if method == "ice":
        assert grads[0]["ice_head.fc.weight"].abs().sum() > 0
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5, msg=k)


# The one-launch forward (``_reorganize_kernel``, the op's Triton forward) called directly, against
# the reference and the two-launch path it replaced: ragged n and D (several channel blocks, the last
# partial), 0-2 prefix tokens, keep = 1, n and in between, ties, NaN and signed zeros.
ONE_LAUNCH_CASES = ((0, 37, 72, 1), (1, 37, 200, 20), (2, 37, 72, 37))  # (P, n, D, keep)


def _tied_scores(B, n, dtype=torch.float32):
    """Scores with many ties (the stable order decides), two NaNs in row 0 (ranked first; with
    keep = 1 one of them is fused) and signed zeros in the last row (equal to torch)."""
    scores = (torch.rand(B, n, device=DEVICE) * 4).floor()
    scores[0, 3], scores[0, 30] = float("nan"), float("nan")
    scores[-1, 4], scores[-1, 9], scores[-1, 12] = -0.0, 0.0, -0.0
    return scores.to(dtype)


def _assert_fused_close(fused, ref, x, scores, order, keep, P, normalize):
    """The fused rows within the dtype's tolerance of ``sum_i |w_i| |x_i|`` (the summation order
    differs); NaN exactly where the reference has NaN."""
    w = scores.gather(1, order[:, keep:]).double()
    if normalize:
        w = w / w.sum(dim=1, keepdim=True).clamp_min(EPS)
    dropped = x[:, P:].gather(1, order[:, keep:, None].expand(-1, -1, x.shape[-1])).double()
    scale = torch.einsum("bn,bnd->bd", w.abs(), dropped.abs())
    nan = ref.isnan()
    assert torch.equal(fused.isnan(), nan)
    err = (fused.double() - ref.double()).abs()[~nan]
    tol = max(TOL[x.dtype], TOL[scores.dtype])
    assert (err <= tol * scale[~nan] + 1e-6).all(), f"fused row off by {err.max().item()}"


def _check_launcher(fn, cases, dtype, fuse, normalize):
    """``fn(x, scores, keep, P, fuse, normalize)`` against the reference on tied scores: the order
    and the kept rows exactly, the fused row within the dtype's tolerance."""
    for P, n, D, keep in cases:
        x, _ = _inputs(3, P + n, D, P, dtype)
        scores = _tied_scores(3, n)
        ref, ref_order = reorganize_reference(x, scores, keep, P, fuse, normalize)
        assert torch.equal(ref_order, torch.argsort(scores, dim=1, descending=True, stable=True))
        out, order = fn(x, scores, keep, P, fuse, normalize)
        assert out.shape == ref.shape and out.dtype == dtype
        assert torch.equal(order, ref_order), (P, n, D, keep)
        assert torch.equal(out[:, :P + keep], ref[:, :P + keep]), (P, n, D, keep)
        if fuse:
            _assert_fused_close(out[:, -1], ref[:, -1], x, scores, ref_order, keep, P, normalize)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fuse,normalize", [(True, False), (True, True), (False, False)])
def test_one_launch_forward_matches_reference(dtype, fuse, normalize):
    _check_launcher(ops.triton_reorganize.reorganize_triton, ONE_LAUNCH_CASES, dtype, fuse,
                    normalize)


def _bench_module(name):
    """A module of bench/ (scripts beside the package, not importable from it), loaded by path."""
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # as bench/test_kernels.py imports it
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fuse,normalize", [(True, False), (True, True), (False, False)])
def test_benchmarks_two_launch_forward_matches_reference(dtype, fuse, normalize):
    """bench/two_launch_reorganize.py, the benchmark's comparison point, on the widest case."""
    fn = _bench_module("two_launch_reorganize").reorganize_triton_two_launch
    _check_launcher(fn, [c for c in ONE_LAUNCH_CASES if c[2] == 200], dtype, fuse, normalize)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("score_dtype", (torch.float64, torch.float16, torch.bfloat16))
def test_one_launch_order_for_low_and_high_precision_scores(score_dtype):
    # fp64 scores take the kernel's fp64 keys; fp16 / bf16 ones are widened to fp32 (exactly). The
    # values differ below fp32's precision (fp64) and at the dtype's extremes (subnormals, inf).
    T = ops.triton_reorganize
    n, P, keep = 40, 1, 13
    x, _ = _inputs(2, P + n, 24, P)
    scores = _tied_scores(2, n, torch.float64)
    tiny = torch.finfo(score_dtype).tiny
    scores[0, 6:10] = torch.tensor([1 + 1e-12, 1 + 2e-12, 1.0, tiny / 4], dtype=torch.float64)
    scores[1, 0], scores[1, 1], scores[1, 2] = float("inf"), float("-inf"), -tiny / 4
    scores = scores.to(score_dtype)
    expected = torch.argsort(scores, dim=1, descending=True, stable=True)
    for fuse in (False, True):
        out, order = T.reorganize_triton(x, scores, keep, P, fuse, False)
        assert torch.equal(order, expected)
        ref = reorganize_reference(x, scores, keep, P, fuse)[0]
        assert torch.equal(out[:, :P + keep], ref[:, :P + keep])
    assert torch.equal(T.argsort_descending(scores), expected)


def test_one_launch_overwrites_every_output_element_and_reruns_harmlessly():
    # the autotuner runs the kernel several times on the same buffers: outputs prefilled with NaN /
    # -1 must come out fully written, and a second launch must not accumulate
    T = ops.triton_reorganize
    P, n, D, keep = 2, 37, 200, 20
    x, _ = _inputs(2, P + n, D, P)
    scores = _tied_scores(2, n)
    ref, ref_order = reorganize_reference(x, scores, keep, P, True, True)
    out = torch.full_like(ref, float("nan"))
    order = torch.full_like(ref_order, -1)
    for _ in range(2):
        T.launch_reorganize(x, scores, order, out, keep, P, True, True)
        assert torch.equal(order, ref_order)
        assert torch.equal(out[:, :P + keep], ref[:, :P + keep])
        _assert_fused_close(out[:, -1], ref[:, -1], x, scores, ref_order, keep, P, True)


def test_one_launch_autotune_configs_and_pruning():
    T = ops.triton_reorganize
    configs = T.AUTOTUNE_CONFIGS
    assert {c.kwargs["BLOCK_D"] for c in configs} == {64, 128, 256}
    assert {c.kwargs["BLOCK_I"] for c in configs} == {32, 64}
    assert {c.num_warps for c in configs} == {2, 4, 8}
    deit = T._prune_configs(configs, {"n": 196, "D": 384})
    assert any(c.kwargs["BLOCK_D"] == 256 for c in deit)
    narrow = T._prune_configs(configs, {"n": 10, "D": 72})  # tiles at most one row / block wide
    assert narrow and all(c.kwargs["BLOCK_D"] <= 128 and c.kwargs["BLOCK_I"] == 32 for c in narrow)
    assert T._prune_configs(configs, {"n": 1, "D": 1})
    # the key separates what changes the compiled kernel or the best blocks
    assert set(T.AUTOTUNE_KEY) >= {"n", "D", "keep", "FUSE", "NORMALIZE"}
    assert set(T.INTERPRETER_CONFIG) == {"BLOCK_D", "BLOCK_I", "BLOCK_J"}


def test_one_launch_without_channels_still_orders():
    T = ops.triton_reorganize
    x = torch.empty(2, 1 + 37, 0, device=DEVICE)
    scores = _tied_scores(2, 37)
    out, order = T.reorganize_triton(x, scores, 4, 1, True, False)
    assert out.shape == (2, 1 + 4 + 1, 0)
    assert torch.equal(order, torch.argsort(scores, dim=1, descending=True, stable=True))


def test_import_kernels_from_the_repository_root_does_not_register_the_ops_again(tmp_path):
    """``import kernels`` (transformers does it to probe for Hugging Face's ``kernels`` package) from
    the repository root must not find this project's kernels: running ops.py a second time
    registers the custom ops again, which frees the first registration's library under
    ``ice_prune.kernels``' op objects."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import importlib, torch, ice_prune\n"
        "from torch._library.custom_ops import OPDEFS\n"
        "from ice_prune.kernels import ops\n"
        "try:\n"
        "    importlib.import_module('kernels')\n"
        "except ImportError:\n"
        "    pass\n"
        "assert OPDEFS['ice_prune::ice_score'] is ops.ice_score_op, 'ice_score registered twice'\n"
        "assert OPDEFS['ice_prune::reorganize'] is ops.reorganize_op, 'reorganize registered twice'\n"
        "h, w = torch.randn(2, 5, 8), torch.randn(4, 8)\n"
        "print(ops.ice_score_op(h, w, None, torch.float32, 'torch').shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2, 5])" in out.stdout
