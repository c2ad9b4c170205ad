"""The fused ICE score ``ice_prune::ice_score``: both kernels (the Triton one interpreted on CPU) against
an fp64 oracle written here, its op registration and FLOP counts, and its use by the ICE selector in a
patched model (same output and same kept tokens as the logits path, under torch.compile too)."""
import copy

import pytest
import timm
import torch
import triton.language as tl
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ice_prune
import ice_prune.integrations.common
import ice_prune.select
from ice_prune import flops
from ice_prune.head import ICEHead
from ice_prune.kernels import ice_score, ice_score_macs, ice_score_reference
from ice_prune.kernels.reference import MapTarget
from ice_prune.select import foreground_score, fused_foreground_score

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_NAMES = ("torch", "triton")
EPS32 = torch.finfo(torch.float32).eps


def oracle(h, weight, bias=None):
    """``1 - softmax(logits)[..., -1]`` in float64, and the bound on an fp32-accumulated kernel's
    error: ``D eps sum_d |h_d w_cd|`` for a logit (the worst-case error of an fp32 dot product of
    length D), a few eps of ``|logsumexp - background|`` for the exp / log, times the sigmoid's
    slope (at most 1/4) and 2 (the logsumexp and the background logit each carry one error)."""
    h, weight = h.detach().cpu().double(), weight.detach().cpu().double()
    logits = h @ weight.T
    magnitude = h.abs() @ weight.abs().T
    if bias is not None:
        logits = logits + bias.detach().cpu().double()
        magnitude = magnitude + bias.detach().cpu().double().abs()
    score = 1 - logits.softmax(dim=-1)[..., -1]
    margin = (logits[..., :-1].logsumexp(dim=-1) - logits[..., -1]).abs()
    D = h.shape[-1]
    tol = 0.5 * (D * EPS32 * magnitude.amax(dim=-1) + 8 * EPS32 * margin) + 1e-7
    return score, tol


def check(scores, expected, tol):
    assert scores.dtype == torch.float32 and scores.shape == expected.shape
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    err = (scores.cpu().double() - expected).abs()
    assert (err <= tol).all(), f"max error {err.max():.3g}, worst error / bound {(err / tol).max():.3g}"


def random_head(C, D, scale=3.0, bias=False):
    """A head whose logits have standard deviation about ``scale`` on unit tokens, so the scores
    spread over (0, 1) instead of saturating."""
    weight = torch.randn(C + 1, D, device=DEVICE) * scale / D ** 0.5
    return weight, (torch.randn(C + 1, device=DEVICE) if bias else None)


# C = 127 fills one class tile of 128 with the background, C = 128 leaves the background alone in a
# last tile, C = 1000 is ImageNet's 1001 rows (7 full tiles and a ragged one); n and D are ragged
# against 64-wide token and channel tiles
SHAPES = [(2, 5, 8, 1), (2, 37, 70, 10), (1, 65, 40, 127), (3, 17, 33, 128), (2, 40, 96, 1000)]


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("B,n,D,C", SHAPES)
@pytest.mark.parametrize("bias", (False, True))
def test_matches_fp64_oracle(kernel, B, n, D, C, bias):
    h = torch.randn(B, n, D, device=DEVICE)
    weight, b = random_head(C, D, bias=bias)
    check(ice_score(h, weight, b, kernel=kernel), *oracle(h, weight, b))


@pytest.mark.parametrize("chunk", (1, 32 * 13, 101 * 40, None))
def test_torch_path_tiles(chunk):
    """The torch path's tiles of (token, class) pairs, 90 tokens x 101 classes: one class at a time
    (32 tokens per tile, a running logsumexp over 101 chunks), 13 classes at a time (ragged), every
    class for 40 tokens at a time (a ragged last tile), the default (one tile)."""
    h = torch.randn(3, 30, 24, device=DEVICE)
    weight, b = random_head(100, 24, bias=True)
    check(ice_score_reference(h, weight, b, chunk=chunk), *oracle(h, weight, b))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("C", (10, 1000))
def test_half_precision_inputs(kernel, dtype, C):
    """bf16 / fp16 tokens and weight: products of two such numbers are exact in fp32, so both kernels
    are within the fp32 bound of the fp64 score of the very inputs they got; against the score of the
    fp32 values before rounding they differ by the rounding of the inputs, which we bound loosely."""
    h = torch.randn(2, 37, 70, device=DEVICE)
    weight, _ = random_head(C, 70)
    h16, w16 = h.to(dtype), weight.to(dtype)
    scores = ice_score(h16, w16, kernel=kernel)
    check(scores, *oracle(h16, w16))
    unrounded, _ = oracle(h, weight)
    # relative input rounding u (bf16 2^-8, fp16 2^-11): a logit moves by at most 2u sum|h_d w_d|
    u = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    magnitude = (h.abs() @ weight.abs().T).amax(dim=-1).cpu().double()
    assert ((scores.cpu().double() - unrounded).abs() <= 0.5 * 2 * u * magnitude + 1e-6).all()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_autocast_rounds_inputs_like_a_linear_layer(kernel):
    h = torch.randn(2, 21, 40, device=DEVICE)
    weight, b = random_head(50, 40, bias=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        scores = ice_score(h, weight, b, kernel=kernel)
    expected = ice_score(h.bfloat16(), weight.bfloat16(), b.bfloat16(), kernel=kernel)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("C", (1, 10, 1000))
def test_extreme_logits_do_not_overflow(kernel, C):
    """Logits of order 1e4: exp would overflow fp32 without the running max; scores saturate to 0
    or 1 or sit in between, never NaN. A zero token has all logits 0: score C / (C + 1)."""
    D = 48
    h = torch.randn(3, 19, D, device=DEVICE)
    h[0, 0] = 0
    weight = torch.randn(C + 1, D, device=DEVICE) * 1e4 / D ** 0.5
    weight[-1] *= 4  # a background logit that beats the max of 1000 class logits on some tokens
    scores = ice_score(h, weight, kernel=kernel)
    expected, tol = oracle(h, weight)
    check(scores, expected, tol)
    assert (expected < 1e-30).any() and (expected > 1 - 1e-12).any()  # both tails are exercised
    # far from the boundary (|logsumexp - background| > 100, beyond any rounding) saturation is exact
    logits = h.cpu().double() @ weight.cpu().double().T
    far = (logits[..., :-1].logsumexp(dim=-1) - logits[..., -1]).abs() > 100
    assert far.float().mean() > 0.5
    assert ((scores.cpu().double() - expected).abs()[far] < 1e-30).all()
    assert scores[0, 0].item() == pytest.approx(C / (C + 1), rel=1e-6)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("C", (1, 10, 1000))
def test_tied_logits(kernel, C):
    """Every class row equal: logsumexp is ``z + log C``. With the background row equal too the score is
    exactly C / (C + 1) for every token; with another background row it is sigmoid(log C + (w - v).h)."""
    D = 36
    h = torch.randn(2, 23, D, device=DEVICE)
    w = torch.randn(D, device=DEVICE) / D ** 0.5
    weight = w.expand(C + 1, D).contiguous()
    scores = ice_score(h, weight, kernel=kernel)
    torch.testing.assert_close(scores, torch.full_like(scores, C / (C + 1)), rtol=4 * EPS32, atol=0)
    weight[-1] = torch.randn(D, device=DEVICE) / D ** 0.5
    scores = ice_score(h, weight, kernel=kernel)
    check(scores, *oracle(h, weight))
    expected = torch.sigmoid(torch.log(torch.tensor(float(C), dtype=torch.float64))
                             + (h.cpu().double() @ (w - weight[-1]).cpu().double()))
    torch.testing.assert_close(scores.cpu().double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_strided_tokens_and_weight(kernel):
    """The selector passes ``h[:, num_prefix:]``, a view; a transposed weight is read in place too."""
    full = torch.randn(2, 1 + 30, 40, device=DEVICE)
    h = full[:, 1:]
    weight_t = torch.randn(40, 11, device=DEVICE) * 3 / 40 ** 0.5
    weight = weight_t.T  # [C + 1, D] with unit stride over classes
    channels_last = h.transpose(1, 2).contiguous().transpose(1, 2)
    expected = oracle(h, weight)
    for tokens in (h, channels_last):
        check(ice_score(tokens, weight, kernel=kernel), *expected)


@pytest.mark.gpu
def test_gpu_deit_small_head_under_autocast():
    """DeiT-S's first selection point at batch 256 with the 1001-way head, as the patched model runs
    it under bf16 autocast (fp32 norm2 output and weight): the compiled kernel rounds in the kernel,
    the torch path with torch; both sum in fp32."""
    h = torch.randn(256, 1 + 196, 384, device="cuda")[:, 1:]
    weight, _ = random_head(1000, 384)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        scores = ice_score(h, weight, kernel="triton")
        torch.testing.assert_close(scores, ice_score(h, weight, kernel="torch"), rtol=0, atol=1e-4)
    check(scores, *oracle(h.bfloat16(), weight.bfloat16()))


def test_kernels_agree_with_the_logits_path():
    h = torch.randn(3, 50, 64, device=DEVICE)
    weight, b = random_head(1000, 64, bias=True)
    unfused = foreground_score(nn.functional.linear(h, weight, b))
    for kernel in KERNEL_NAMES:
        torch.testing.assert_close(ice_score(h, weight, b, kernel=kernel), unfused,
                                   rtol=1e-5, atol=1e-6)


def test_empty_batch():
    weight, _ = random_head(10, 16)
    for kernel in KERNEL_NAMES:
        assert ice_score(torch.randn(0, 5, 16, device=DEVICE), weight, kernel=kernel).shape == (0, 5)


def test_refuses_gradients_and_bad_input():
    h = torch.randn(2, 5, 8, device=DEVICE)
    weight, _ = random_head(3, 8)
    with pytest.raises(RuntimeError, match="no backward"):
        ice_score(h.clone().requires_grad_(), weight)
    with pytest.raises(RuntimeError, match="no backward"):
        ice_score(h, weight.clone().requires_grad_())
    with torch.no_grad():  # fine without a graph
        ice_score(h, weight.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"h must be \[B, n, D\]"):
        ice_score(h[0], weight)
    with pytest.raises(ValueError, match=r"weight must be \[C \+ 1, D\]"):
        ice_score(h, weight[:, :4])
    with pytest.raises(ValueError, match=r"C >= 1"):
        ice_score(h, weight[:1])
    with pytest.raises(ValueError, match=r"bias must be \[C \+ 1\]"):
        ice_score(h, weight, torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="floating point"):
        ice_score(h.long(), weight)
    with pytest.raises(ValueError, match="unknown kernel"):
        ice_score(h, weight, kernel="cuda")
    with pytest.raises(TypeError, match="kernel='triton' computes"):
        ice_score(h.double(), weight.double(), kernel="triton")
    # fp64 goes to the torch kernel under "auto"
    check(ice_score(h.double(), weight.double()), *oracle(h, weight))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_opcheck(kernel):
    h = torch.randn(2, 9, 20, device=DEVICE)
    weight, b = random_head(10, 20, bias=True)
    for args in ((h, weight, None, torch.float32, kernel), (h, weight, b, torch.bfloat16, kernel)):
        torch.library.opcheck(torch.ops.ice_prune.ice_score.default, args)


def test_flop_counter_counts_the_linear_layer_it_replaces():
    B, n, D, C = 2, 30, 64, 100
    h = torch.randn(B, n, D, device=DEVICE)
    weight, _ = random_head(C, D)
    assert ice_score_macs(B, n, D, C) == B * n * D * (C + 1)
    with FlopCounterMode(display=False) as counter:
        ice_score(h, weight)
    assert counter.get_total_flops() == 2 * B * n * D * (C + 1)


# ----------------------------------------------------------------------------- the selector
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("hidden_dim", (None, 48))
def test_fused_score_of_linear_and_mlp_heads(kernel, hidden_dim):
    """A linear head is fused whole; an MLP head runs fc.0 / GELU in torch and fuses fc.2 (with its
    bias)."""
    head = ICEHead(32, 10, hidden_dim=hidden_dim).to(DEVICE).eval()
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=2 / m.in_features ** 0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias)
    tokens = torch.randn(2, 25, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fused_foreground_score(head, tokens, kernel),
                                   foreground_score(head(tokens)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused_foreground_score(head.fc, tokens, kernel),
                                   foreground_score(head(tokens)), rtol=1e-5, atol=1e-6)


def test_fused_score_falls_back_where_it_does_not_apply():
    head = ICEHead(16, 4)
    tokens = torch.randn(2, 6, 16)
    assert fused_foreground_score(head, tokens) is None  # the head's parameters want gradients
    with torch.no_grad():
        assert fused_foreground_score(head, tokens) is not None

    class Scaled(ICEHead):  # another forward: the op cannot know what it computes
        def forward(self, x):
            return 2 * super().forward(x)

    with torch.no_grad():
        assert fused_foreground_score(Scaled(16, 4), tokens) is None
        assert fused_foreground_score(nn.Sequential(nn.Linear(16, 5), nn.Tanh()), tokens) is None
        assert fused_foreground_score(nn.Identity(), tokens) is None
        assert fused_foreground_score(nn.Linear(16, 1), tokens) is None  # no image class


def _model(kernel, **kw):
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, pretrained=False).to(DEVICE)
    model = ice_prune.patch(model.eval(), method="ice", kernel=kernel, **kw)
    # a head whose scores spread over (0, 1), as a trained one's do (the initial one's sit near 1)
    nn.init.normal_(model.ice_head.fc.weight, std=3 / model.embed_dim ** 0.5)
    return model


@pytest.fixture
def spies(monkeypatch):
    """Counts the fused-score calls and records the kept positions of every reorganize step."""
    calls, kept = [], []
    score, reorganize = ice_prune.select.ice_score, ice_prune.integrations.common.reorganize

    def spy_score(*args, **kwargs):
        calls.append(1)
        return score(*args, **kwargs)

    def spy_reorganize(x, scores, keep, *args):
        out, order = reorganize(x, scores, keep, *args)
        kept.append(order[:, :keep])
        return out, order

    monkeypatch.setattr(ice_prune.select, "ice_score", spy_score)
    monkeypatch.setattr(ice_prune.integrations.common, "reorganize", spy_reorganize)
    return calls, kept


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("keep_rate", (0.7, 0.5))
def test_patched_model_fused_score_equals_logits_path(kernel, keep_rate, spies):
    calls, kept = spies
    model = _model(kernel, keep_rate=keep_rate)
    images = torch.randn(4, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        with torch.enable_grad():  # autograd through the head: the logits path
            expected = model(images).detach()
        assert not calls and model.ice_logits == []  # eval keeps no logits
        kept_expected, kept[:] = list(kept), []
        out = model(images)
    assert len(calls) == 3 and model.ice_logits == []
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(kept) == 3 and all(torch.equal(a, b) for a, b in zip(kept, kept_expected))


def test_train_mode_and_gradients_keep_the_logits_path(spies):
    calls, _ = spies
    model = _model("torch", keep_rate=0.5)
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    model.train()
    model(images).sum().backward()
    assert not calls and len(model.ice_logits) == 3
    assert model.ice_head.fc.weight.grad is not None
    model.eval()
    model(images)  # eval with autograd on: the scores must stay differentiable
    assert not calls
    with torch.inference_mode():
        model(images)
    assert len(calls) == 3


def test_flop_counts_unchanged_by_the_fused_score(monkeypatch):
    """fvcore and FlopCounterMode count the op as the linear layer it replaces: the same MACs as the
    logits path (selector forced onto it here)."""
    model = _model("auto", keep_rate=0.7)
    counts = {c: flops.count_flops(model, (3, 64, 64), counter=c) for c in ("fvcore", "torch")}
    assert counts["fvcore"] == counts["torch"]
    monkeypatch.setattr(ice_prune.select, "fused_foreground_score", lambda *args, **kwargs: None)
    for c in ("fvcore", "torch"):
        assert flops.count_flops(model, (3, 64, 64), counter=c) == counts[c]


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_compiled_patched_model_fullgraph(kernel, spies):
    """``torch.compile(fullgraph=True)`` traces the op (its fake) without a graph break; aot_eager on
    CPU runs the same graph as inductor without the C++ compile (the inductor case is below)."""
    calls, _ = spies
    model = _model(kernel, keep_rate=0.5)
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        with torch.enable_grad():  # the logits path
            expected = model(images).detach()
        backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        torch.testing.assert_close(compiled(images), expected, rtol=1e-4, atol=1e-4)
    assert calls  # traced through the fused op


@pytest.mark.slow
def test_compiled_patched_model_inductor_cpu():
    """Inductor's C++ code generation on CPU (about a minute on 2 cores)."""
    model = _model("torch", keep_rate=0.5)
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        with torch.enable_grad():  # the logits path
            expected = reference(images).detach()
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        torch.testing.assert_close(compiled(images), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- configs
from ice_prune.kernels import triton_ice_score as S  # noqa: E402
from ice_prune.kernels.tuning import AUTOTUNE_ENV, autotune_enabled  # noqa: E402

SHIPPED = sorted({row[3] for row in S.CONFIGS})


def test_config_table():
    """The shipped configs: one per (GPU generation, compute kind, width); no batch size anywhere."""
    assert S.held_chunks(384) == (128, 3) and S.held_chunks(192) == (64, 3)
    assert S.held_chunks(768) == (256, 3) and S.held_chunks(70) == (32, 3)
    assert S.held_chunks(8) == (16, 1) and S.held_chunks(1000) == (256, 4)
    assert S.config_for(9, "16-bit", 384) == S.ScoreConfig(128, 64, 8, 2)  # DeiT-S under autocast
    assert S.config_for(9, "16-bit", 768) == S.ScoreConfig(64, 32, 8, 2)
    assert S.config_for(9, "tf32", 384) == S.ScoreConfig(64, 32, 4, 2)
    assert S.config_for(8, "16-bit", 192) == S.ScoreConfig(64, 64, 4, 2)
    for arch, kind, D in ((9, "16-bit", 1024), (9, "ieee", 384), (8, "tf32", 384), (10, "16-bit", 384),
                          (7, "tf32", 64)):
        assert not S.config_for(arch, kind, D).hold  # the tokens reloaded per class tile
    # tiles from the head alone: C + 1 = 7 classes clamp BLOCK_C, nothing clamps BLOCK_T
    meta = S._meta(S.ScoreConfig(128, 64, 8, 2), C=6, D=384, itemsize=2)
    assert meta == dict(BLOCK_T=128, BLOCK_C=16, BLOCK_K=128, NUM_K=3, num_warps=8, num_stages=2)
    assert S._meta(S.ScoreConfig(64, 32, 4, 2, hold=False), 1000, 384, 4)["NUM_K"] == 0
    assert "T" not in S.AUTOTUNE_KEY
    kernel = S._ice_score_kernel
    assert list(kernel.kwargs["do_not_specialize"] if S.INTERPRETED
                else kernel.do_not_specialize) == ["T", "loc"]  # loc: explain mode's point


def test_autotune_is_opt_in(monkeypatch):
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    assert not autotune_enabled()
    for value, on in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(AUTOTUNE_ENV, value)
        assert autotune_enabled() is on
    pruned = S._prune_configs([S._tuning_config(c) for c in S.AUTOTUNE_CONFIGS],
                              {"C": 1000, "D": 384}, COMPUTE=tl.bfloat16)
    assert len(pruned) == len(S.AUTOTUNE_CONFIGS)
    assert all(c.kwargs["NUM_K"] in (0, 3) and c.kwargs["BLOCK_K"] in (64, 128) for c in pruned)
    small = S._prune_configs([S._tuning_config(c) for c in S.AUTOTUNE_CONFIGS],
                             {"C": 1, "D": 32}, COMPUTE=tl.float32)
    assert {c.kwargs["BLOCK_C"] for c in small} == {16}
    assert {(c.kwargs["BLOCK_K"], c.kwargs["NUM_K"]) for c in small} == {(32, 1), (32, 0)}


def class_oracle(h, weight, bias=None):
    """fp64 logits and softmax of the head by hand, and a per-token bound on a logit's error."""
    h, weight = h.detach().cpu().double(), weight.detach().cpu().double()
    logits = h @ weight.T
    magnitude = h.abs() @ weight.abs().T
    if bias is not None:
        logits = logits + bias.detach().cpu().double()
        magnitude = magnitude + bias.detach().cpu().double().abs()
    err = h.shape[-1] * EPS32 * magnitude.amax(dim=-1) + 1e-7
    return logits, logits.softmax(dim=-1), err


def check_top_class(top_class, top_prob, h, weight, bias=None):
    """The kernel's class is the fp64 argmax wherever the top two image logits are farther apart
    than the logits' error, else within that error of the max; its probability matches the fp64
    softmax at that class."""
    logits, probs, err = class_oracle(h, weight, bias)
    assert top_class.dtype == torch.int64 and top_prob.dtype == torch.float32
    top_class, top_prob = top_class.cpu(), top_prob.cpu().double()
    classes = logits[..., :-1]
    two = classes.topk(min(2, classes.shape[-1]), dim=-1).values
    clear = (two[..., 0] - two[..., -1] > 2 * err) | (classes.shape[-1] == 1)
    assert torch.equal(top_class[clear], classes.argmax(dim=-1)[clear])
    chosen = classes.gather(-1, top_class[..., None])[..., 0]
    assert (chosen >= two[..., 0] - 2 * err).all()
    want = probs.gather(-1, top_class[..., None])[..., 0]
    assert ((top_prob - want).abs() <= want * (4 * err + 16 * EPS32) + 1e-7).all()


@pytest.mark.parametrize("config", SHIPPED, ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("B,n,D,C,bias", [(2, 37, 70, 1000, True), (3, 17, 33, 6, False),
                                          (1, 65, 384, 127, True)])
def test_every_shipped_config(config, dtype, B, n, D, C, bias):
    """Each shipped config in the interpreter, every compute dtype, with and without bias, D ragged
    against every chunk, C + 1 = 1001 and a small odd head: scores against the fp64 oracle, top class
    and probability against the softmax by hand, the scores the same with and without them."""
    h = torch.randn(B, n, D, device=DEVICE).to(dtype)
    weight, b = random_head(C, D, bias=bias)
    weight, b = weight.to(dtype), None if b is None else b.to(dtype)
    scores, top_class, top_prob = S.ice_score_triton(h, weight, b, dtype, True, config)
    check(scores, *oracle(h, weight, b))
    check_top_class(top_class, top_prob, h, weight, b)
    torch.testing.assert_close(S.ice_score_triton(h, weight, b, dtype, False, config), scores,
                               rtol=0, atol=0)
    # the torch path sums the same rounded products in fp32: much closer than the worst case
    ref_scores, ref_class, ref_prob = ice_score_reference(h, weight, b, dtype, top_class=True)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top_prob, ref_prob, rtol=1e-5, atol=1e-7)
    assert (top_class == ref_class).float().mean() > 0.99  # near-ties may differ


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("bias", (False, True))
def test_top_class_matches_softmax_by_hand(kernel, bias):
    h = torch.randn(2, 40, 96, device=DEVICE)
    weight, b = random_head(1000, 96, bias=bias)
    scores, top_class, top_prob = ice_score(h, weight, b, kernel=kernel, top_class=True)
    assert torch.equal(scores, ice_score(h, weight, b, kernel=kernel))
    check_top_class(top_class, top_prob, h, weight, b)
    logits = nn.functional.linear(h, weight, b)
    want_class, want_prob = ice_prune.select.top_class_of(logits)  # the logits path's version
    assert torch.equal(top_class, want_class)
    torch.testing.assert_close(top_prob, want_prob, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", (1, 13 * 32, None))
def test_top_class_across_torch_tiles(chunk):
    """The torch path's class chunks fold the running argmax like the kernel's class tiles."""
    h = torch.randn(3, 30, 24, device=DEVICE)
    weight, b = random_head(100, 24, bias=True)
    scores, top_class, top_prob = ice_score_reference(h, weight, b, top_class=True, chunk=chunk)
    assert torch.equal(scores, ice_score_reference(h, weight, b, chunk=chunk))
    check_top_class(top_class, top_prob, h, weight, b)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("chunk", (None, 32 * 7))
def test_top_class_ties_go_to_the_lowest_index(kernel, chunk):
    """Integer tokens and weights make every logit exact, so ties are exact: the lowest tied index
    wins, as torch.argmax, within a class tile (70 and 71), across tiles (5 and 700: BLOCK_C is at
    most 64) and across the torch path's class chunks (chunk=224: 7 classes per chunk)."""
    D, C = 16, 1000
    h = torch.randint(-2, 3, (2, 32, D), device=DEVICE).float()
    weight = torch.randint(-1, 2, (C + 1, D), device=DEVICE).float()
    weight[-1] = 0  # background logit 0
    for tied in ((70, 71), (5, 700), (12, 13, 990)):
        w = weight.clone()
        w[list(tied)] = 4 * torch.randint(1, 3, (D,), device=DEVICE).float()  # the largest rows
        h[..., :] = h.abs() + 1  # positive tokens: the tied rows win every token
        if kernel == "torch":
            _, top_class, top_prob = ice_score_reference(h, w, top_class=True, chunk=chunk)
        else:
            _, top_class, top_prob = ice_score(h, w, kernel=kernel, top_class=True)
        assert (top_class == tied[0]).all()
        assert torch.equal(top_class, (h @ w[:-1].T).argmax(dim=-1))
        # logits up to about 400: fp32 exp(z - lse) is good to about |z| eps
        want = torch.softmax(h.double() @ w.double().T, dim=-1)[..., tied[0]]
        torch.testing.assert_close(top_prob.double(), want, rtol=1e-4, atol=1e-12)
    # all class rows equal: class 0, with probability P(foreground) / C
    w = torch.randint(-1, 2, (D,), device=DEVICE).float().expand(C + 1, D).contiguous()
    scores, top_class, top_prob = ice_score(h, w, kernel=kernel, top_class=True)
    assert (top_class == 0).all()
    torch.testing.assert_close(top_prob, scores / C, rtol=1e-6, atol=0)


def test_top_class_op_registration_and_flops():
    h = torch.randn(2, 9, 20, device=DEVICE)
    weight, b = random_head(10, 20, bias=True)
    for kernel in KERNEL_NAMES:
        for args in ((h, weight, None, torch.float32, kernel), (h, weight, b, torch.bfloat16, kernel)):
            torch.library.opcheck(torch.ops.ice_prune.ice_score_top_class.default, args)
    with FlopCounterMode(display=False) as counter:
        ice_score(h, weight, b, top_class=True)
    assert counter.get_total_flops() == 2 * ice_score_macs(2, 9, 20, 10)
    with torch.no_grad():
        empty = ice_score(h[:0], weight, b, top_class=True)
    assert [t.shape for t in empty] == [(0, 9)] * 3 and empty[1].dtype == torch.int64


def _map_target(patches, P, loc):
    B = patches.shape[0]
    fill = dict(device=patches.device)
    return MapTarget(patches, loc, torch.full((B, P + 1), -1.0, **fill),
                     torch.full((B, P + 1), -1, dtype=torch.int64, **fill),
                     torch.full((B, P + 1), -1, dtype=torch.int64, **fill),
                     torch.full((B, P + 1), -1.0, **fill))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_scores_into_the_map_by_hand(kernel):
    """``ice_score(..., into=...)``: each token's score, the point, its top class and that class's
    probability land at the token's patch (a fused token's ``P`` in the spare column); patches no
    token stands for keep what they held; the scores returned are ``ice_score``'s."""
    B, n, D, C, P = 2, 5, 16, 6, 8
    h = torch.randn(B, n, D, device=DEVICE)
    weight, b = random_head(C, D, bias=True)
    patches = torch.tensor([[7, 0, 3, 8, 5], [8, 2, 6, 1, 4]], device=DEVICE)  # 8: a fused token
    into = _map_target(patches, P, loc=2)
    with torch.no_grad():
        scores = ice_score(h, weight, b, kernel=kernel, into=into)
        want, top_class, top_prob = ice_score(h, weight, b, kernel=kernel, top_class=True)
    torch.testing.assert_close(scores, want, rtol=0, atol=0)
    logits = (h.double() @ weight.double().T + b.double()).cpu()
    probs = logits.softmax(dim=-1)
    for i in range(B):
        for t in range(n):
            p = patches[i, t].item()
            assert into.point[i, p] == 2 and into.top_class[i, p] == probs[i, t, :C].argmax()
            assert abs(into.foreground[i, p].item() - (1 - probs[i, t, C].item())) < 1e-5
            assert abs(into.top_prob[i, p].item() - probs[i, t, :C].max().item()) < 1e-5
        untouched = sorted(set(range(P)) - set(patches[i].tolist()))
        assert (into.point[i, untouched] == -1).all() and (into.foreground[i, untouched] == -1).all()


def test_into_map_op_registration_and_flops():
    B, n, D, P = 2, 9, 20, 12
    h = torch.randn(B, n, D, device=DEVICE)
    weight, b = random_head(10, 20, bias=True)
    patches = torch.stack([torch.randperm(P + 1, device=DEVICE)[:n] for _ in range(B)])
    for kernel in KERNEL_NAMES:
        for bias, dtype in ((None, torch.float32), (b, torch.bfloat16)):
            args = (h, weight, bias, dtype, kernel, *_map_target(patches, P, 1))
            torch.library.opcheck(torch.ops.ice_prune.ice_score_into_map.default, args)
        into = _map_target(patches, P, 0)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ice_prune.kernels.ops.ice_score_into_map_op(h, weight, b, torch.float32, kernel, *into)
        assert counter.get_total_flops() == 2 * ice_score_macs(B, n, D, 10)


# ----------------------------------------------------------------------------- explain mode
def _explained(kernel, keep_rate=0.5, **kw):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=4, num_classes=5)
    model = ice_prune.patch(model.to(DEVICE).eval(), keep_rate=keep_rate, method="ice",
                            locs=(1, 2, 3), explain=True, kernel=kernel, num_classes=7, **kw)
    with torch.no_grad():  # a head that separates tokens and classes
        for p in model.ice_head.parameters():
            p.normal_(std=0.3)
    return model


@pytest.mark.parametrize("path", ("fused-torch", "fused-triton", "logits"))
@pytest.mark.parametrize("heads", ("shared", "per_location"))
def test_explanation_top_class_by_hand(monkeypatch, path, heads):
    """``ice_explanation.top_class`` / ``top_prob``: each patch's best image class and its
    probability from a plain softmax of the head's logits by hand, on the tokens the selector scored
    at the patch's last scoring (tokens and orders recorded by spies): on the fused path (eval,
    no grad) with either kernel, and on the logits path (train mode, the loss's logits)."""
    kernel = path.split("-")[1] if path.startswith("fused") else "torch"
    model = _explained(kernel, heads=heads)
    points, orders = [], []
    scores_of, reorganize = ice_prune.select.ICESelector.scores, ice_prune.integrations.common.reorganize

    def spy_scores(self, cls_attn, h, head, num_prefix, *args, **kwargs):
        points.append((h[:, num_prefix:].detach().clone(), head))
        return scores_of(self, cls_attn, h, head, num_prefix, *args, **kwargs)

    def spy_reorganize(x, scores, keep, *args):
        out, order = reorganize(x, scores, keep, *args)
        orders.append(order[:, :keep])
        return out, order

    monkeypatch.setattr(ice_prune.select.ICESelector, "scores", spy_scores)
    monkeypatch.setattr(ice_prune.integrations.common, "reorganize", spy_reorganize)
    calls = []
    score = ice_prune.select.ice_score
    monkeypatch.setattr(ice_prune.select, "ice_score",
                        lambda *a, **k: calls.append(1) or score(*a, **k))
    images = torch.randn(3, 3, 32, 32, device=DEVICE)
    if path == "logits":
        model.train()
        model(images)
        assert not calls and len(model.ice_logits) == 3
    else:
        with torch.no_grad():
            model(images)
        assert len(calls) == 3 and model.ice_logits == []
    e = model.ice_explanation
    B, P = 3, 16
    want_class = torch.full((B, P), -1, dtype=torch.int64)
    want_prob = torch.full((B, P), float("nan"), dtype=torch.float64)
    gap = torch.zeros(B, P, dtype=torch.float64)
    patches = torch.arange(P).expand(B, P)
    for j, (tokens, head) in enumerate(points):
        fc = head.fc
        logits = tokens.cpu().double() @ fc.weight.detach().cpu().double().T
        if fc.bias is not None:
            logits = logits + fc.bias.detach().cpu().double()
        probs = logits.softmax(dim=-1)
        top2 = logits[..., :-1].topk(2, dim=-1)
        for b in range(B):
            for r, patch in enumerate(patches[b].tolist()):
                if patch < P:
                    want_class[b, patch] = top2.indices[b, r, 0]
                    want_prob[b, patch] = probs[b, r, top2.indices[b, r, 0]]
                    gap[b, patch] = top2.values[b, r, 0] - top2.values[b, r, 1]
        if j < len(orders):
            kept = patches.gather(1, orders[j].cpu())
            patches = torch.cat([kept, torch.full((B, 1), P)], dim=1)  # fused token last
    assert e.top_class.shape == e.top_prob.shape == (B, P)
    assert e.top_class.dtype == torch.int64 and e.top_prob.dtype == torch.float32
    clear = gap > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(e.top_class.cpu()[clear], want_class[clear])
    torch.testing.assert_close(e.top_prob.cpu().double(), want_prob, rtol=0, atol=2e-5)
    # the rest of the map is what it was: the foreground at the same scoring
    fg_ref = torch.full((B, P), float("nan"), dtype=torch.float64)
    point_ref = torch.full((B, P), -1, dtype=torch.int64)
    patches = torch.arange(P).expand(B, P)
    for j, (tokens, head) in enumerate(points):
        logits = tokens.cpu().double() @ head.fc.weight.detach().cpu().double().T
        if head.fc.bias is not None:
            logits = logits + head.fc.bias.detach().cpu().double()
        fg = 1 - logits.softmax(dim=-1)[..., -1]
        for b in range(B):
            for r, patch in enumerate(patches[b].tolist()):
                if patch < P:
                    fg_ref[b, patch] = fg[b, r]
                    point_ref[b, patch] = j
        if j < len(orders):
            patches = torch.cat([patches.gather(1, orders[j].cpu()), torch.full((B, 1), P)], dim=1)
    torch.testing.assert_close(e.foreground.cpu().double(), fg_ref, rtol=0, atol=2e-5)
    assert torch.equal(e.point.cpu(), point_ref) and set(point_ref.unique().tolist()) == {0, 1, 2}


def test_explanation_top_class_at_keep_rate_one():
    """Keep rate 1: every patch is scored last at the last point; its class is the argmax of the
    head's softmax over the tokens the last point scored."""
    model = _explained("auto", keep_rate=1.0)
    tokens = []
    scores_of = model._ice.selector.scores

    def spy(cls_attn, h, head, num_prefix, *args, **kwargs):
        tokens.append(h[:, num_prefix:].detach().clone())
        return scores_of(cls_attn, h, head, num_prefix, *args, **kwargs)

    model._ice.selector.scores = spy
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, device=DEVICE))
        probs = model.ice_head(tokens[-1]).double().softmax(dim=-1)
    e = model.ice_explanation
    assert torch.equal(e.top_class, probs[..., :-1].argmax(dim=-1))
    torch.testing.assert_close(e.top_prob.double(), probs.gather(-1, e.top_class[..., None])[..., 0],
                               rtol=0, atol=1e-6)
    assert (e.point == 2).all()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_explanation_top_class_under_fullgraph_compile(kernel):
    """The top-class op traces through its fake: no graph break, the same classes as eager."""
    model = _explained(kernel)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        model(images)
        eager = model.ice_explanation
        torch.compile(model, fullgraph=True, backend="aot_eager")(images)
        compiled = model.ice_explanation
    assert torch.equal(compiled.top_class, eager.top_class)
    assert torch.equal(compiled.point, eager.point)
    torch.testing.assert_close(compiled.top_prob, eager.top_prob, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled.foreground, eager.foreground, rtol=1e-5, atol=1e-7)


def test_triton_score_refuses_more_tokens_than_int32_indexes(monkeypatch):
    """The kernel indexes tokens in int32 (a 64-bit division is a called routine on the GPU): a
    call of ``MAX_TOKENS = 2**31`` tokens or more is refused with the fix, before anything is
    allocated; one below runs. (The limit lowered to a test's size to show both sides.)"""
    assert S.MAX_TOKENS == 2 ** 31
    monkeypatch.setattr(S, "MAX_TOKENS", 10)
    weight, _ = random_head(3, 8)
    h = torch.randn(2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"fewer than 10 tokens.*B \* n = 10.*in parts"):
        S.ice_score_triton(h, weight, None, torch.float32)
    torch.testing.assert_close(S.ice_score_triton(h[:, :4], weight, None, torch.float32),
                               ice_score_reference(h[:, :4], weight), rtol=0, atol=1e-5)


def test_the_head_is_cast_once_until_it_changes():
    """``head_in``: the head's weight in the compute dtype is cast once and reused (each point and
    each forward read the same copy), and cast again once the parameter changes in place (its
    version) or moves (its storage); a parameter already in the dtype is read as it is."""
    fc = nn.Linear(16, 6, bias=False)
    w = fc.weight
    first = S.head_in(w, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and first.is_contiguous()
    assert torch.equal(first, w.detach().bfloat16())
    assert S.head_in(w, torch.bfloat16) is first  # reused
    with torch.no_grad():
        w.mul_(2)  # an optimizer step's in-place change
    second = S.head_in(w, torch.bfloat16)
    assert second is not first and torch.equal(second, w.detach().bfloat16())
    fc.weight.data = fc.weight.data.clone() + 1  # new storage, as .to() of the module makes
    third = S.head_in(w, torch.bfloat16)
    assert torch.equal(third, w.detach().bfloat16()) and not torch.equal(third, second)
    assert S.head_in(w, torch.float32) is w  # nothing to cast
    key = id(w)
    del fc, w, first, second, third
    assert key not in S._HEAD_CASTS  # forgotten with the parameter
