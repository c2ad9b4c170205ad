"""Per-image keep counts: the keep policies and the ragged reorganize op
``ice_prune::reorganize_ragged``.

The policies are checked against counts worked out by hand; the op (both kernels; Triton in the
interpreter on CPU) against a per-image loop over the dense ``reorganize_reference``, each image
with its own keep count, the results concatenated.
"""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ice_prune.kernels import (RAGGED_KERNELS, reorganize_ragged, reorganize_ragged_macs,
                               reorganize_reference)
from ice_prune.select import (KeepPolicy, keep_bounds, mass_keep_counts,
                              threshold_keep_counts)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_NAMES = tuple(RAGGED_KERNELS)


def loop_ragged(x, scores, keep_counts, P, fuse, normalize):
    """The oracle: the dense reference one image at a time, its rows concatenated."""
    parts, offsets = [], [0]
    for b, keep in enumerate(keep_counts.tolist()):
        out, _ = reorganize_reference(x[b:b + 1], scores[b:b + 1], keep, P, fuse, normalize)
        parts.append(out[0])
        offsets.append(offsets[-1] + out.shape[1])
    return torch.cat(parts), torch.tensor(offsets, dtype=torch.int64, device=x.device)


def _fused_rows(offsets, fuse):
    return offsets[1:] - 1 if fuse else offsets[:0]


def _check_rows(rows, offsets, expected, expected_offsets, fuse, dtype):
    assert torch.equal(offsets, expected_offsets)
    assert rows.dtype == dtype and rows.shape == expected.shape
    fused = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    fused[_fused_rows(expected_offsets, fuse)] = True
    # prefix and kept rows are copies: exact; the fused rows differ by the summation order
    assert torch.equal(rows[~fused], expected[~fused])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(rows[fused].float(), expected[fused].float(), **tol)


# ---------------------------------------------------------------- policies


def test_threshold_counts_hand_computed_with_bounds():
    scores = torch.tensor([
        [0.9, 0.8, 0.7, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # 3 pass
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # none pass: the minimum
        [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],  # all pass: the maximum
        [0.5, 0.49, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0],  # >= is kept: 6 pass
    ])
    assert threshold_keep_counts(scores, 0.5).tolist() == [3, 1, 10, 6]
    # min ceil(0.2 * 10) = 2, max ceil(0.5 * 10) = 5
    counts = threshold_keep_counts(scores, 0.5, min_share=0.2, max_share=0.5)
    assert counts.dtype == torch.int64 and counts.tolist() == [3, 2, 5, 5]
    assert keep_bounds(10, 0.0, 1.0) == (1, 10)
    assert keep_bounds(197, 0.25, 0.75) == (math.ceil(0.25 * 197), math.ceil(0.75 * 197))


def test_mass_counts_hand_computed():
    # non-prefix attention (need not sum to 1: the prefix takes the rest); mass is a share of it
    attn = torch.tensor([
        [0.05, 0.40, 0.10, 0.20, 0.05],  # sum 0.8; sorted 0.40 0.20 0.10 0.05 0.05
        [0.16, 0.16, 0.16, 0.16, 0.16],  # uniform
    ])
    # target 0.5 * 0.8 = 0.4: the top token alone holds it
    assert mass_keep_counts(attn, 0.5).tolist() == [1, 3]
    # target 0.6: 0.40 + 0.20 = 0.60 holds it (>=); uniform: 4 of 5 (0.64)
    assert mass_keep_counts(attn, 0.75).tolist() == [2, 4]
    # 0.9 * 0.8 = 0.72: 0.40 + 0.20 + 0.10 = 0.70 falls short, four tokens
    assert mass_keep_counts(attn, 0.9).tolist() == [4, 5]
    assert mass_keep_counts(attn, 1.0).tolist() == [5, 5]
    # bounds: min ceil(0.4 * 5) = 2, max ceil(0.6 * 5) = 3
    assert mass_keep_counts(attn, 0.5, min_share=0.4, max_share=0.6).tolist() == [2, 3]
    assert mass_keep_counts(attn.to(torch.bfloat16), 0.75).tolist() == [2, 4]


def test_policy_dispatches_and_validates():
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.2]])
    assert KeepPolicy(threshold=0.5).keep_counts(scores).tolist() == [2]
    assert KeepPolicy(mass=0.5).keep_counts(scores).tolist() == [1]  # 0.9 of 1.8
    assert KeepPolicy(threshold=0.5, max_share=0.25).keep_counts(scores).tolist() == [1]
    bad = [dict(), dict(threshold=0.5, mass=0.5), dict(threshold=1.5), dict(threshold=-0.1),
           dict(threshold=True), dict(mass=0.0), dict(mass=1.2), dict(threshold=0.5, min_share=-1),
           dict(threshold=0.5, max_share=0.0), dict(threshold=0.5, min_share=0.6, max_share=0.5)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            KeepPolicy(**kwargs)
    with pytest.raises(ValueError, match="must not exceed max_share"):
        KeepPolicy(threshold=0.5, min_share=0.6, max_share=0.5)
    with pytest.raises(ValueError, match=r"\[B, n\]"):
        KeepPolicy(threshold=0.5).keep_counts(scores[0])


def test_policy_counts_do_not_depend_on_the_batch():
    scores = torch.rand(6, 50)
    for policy in (KeepPolicy(threshold=0.5, min_share=0.1, max_share=0.9), KeepPolicy(mass=0.7)):
        batch = policy.keep_counts(scores)
        alone = torch.cat([policy.keep_counts(scores[b:b + 1]) for b in range(6)])
        assert torch.equal(batch, alone)


# ---------------------------------------------------------------- the op


def _inputs(B, n, D, P, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, P + n, D, generator=g).to(dtype).to(DEVICE)
    scores = torch.rand(B, n, generator=g).to(dtype).to(DEVICE)
    return x, scores


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("P", (1, 5))
@pytest.mark.parametrize("fuse", (True, False))
@pytest.mark.parametrize("normalize", (True, False))
def test_matches_the_per_image_loop(kernel, dtype, P, fuse, normalize):
    n, D = 13, 40
    x, scores = _inputs(4, n, D, P, dtype)
    keep_counts = torch.tensor([1, n, 6, 12], device=DEVICE)  # 1 and n among them
    rows, offsets, order = reorganize_ragged(x, scores, keep_counts, P, fuse, normalize,
                                             kernel=kernel)
    expected, expected_offsets = loop_ragged(x, scores, keep_counts, P, fuse, normalize)
    _check_rows(rows, offsets, expected, expected_offsets, fuse, dtype)
    assert torch.equal(order, torch.argsort(scores, dim=1, descending=True, stable=True))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_total_given_or_read_and_keep_all(kernel):
    P, n, D = 1, 9, 24
    x, scores = _inputs(3, n, D, P, torch.float32)
    keep_counts = torch.full((3,), n, device=DEVICE)
    total = 3 * (P + n + 1)
    rows, offsets, _ = reorganize_ragged(x, scores, keep_counts, P, total=total, kernel=kernel)
    assert rows.shape == (total, D) and offsets.tolist() == [0, 11, 22, 33]
    assert torch.equal(rows[offsets[1:] - 1], torch.zeros(3, D, device=DEVICE))  # nothing dropped
    again, _, _ = reorganize_ragged(x, scores, keep_counts, P, kernel=kernel)
    assert torch.equal(rows, again)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("normalize", (True, False))
def test_an_image_alone_and_in_a_batch_gives_the_same_rows(kernel, normalize):
    P, n, D = 1, 31, 64
    x, scores = _inputs(5, n, D, P, torch.float32, seed=1)
    keep_counts = torch.tensor([3, 31, 1, 17, 9], device=DEVICE)
    rows, offsets, order = reorganize_ragged(x, scores, keep_counts, P, True, normalize,
                                             kernel=kernel)
    for b in range(5):
        alone, alone_offsets, alone_order = reorganize_ragged(
            x[b:b + 1], scores[b:b + 1], keep_counts[b:b + 1], P, True, normalize, kernel=kernel)
        assert torch.equal(alone, rows[offsets[b]:offsets[b + 1]])
        assert torch.equal(alone_order, order[b:b + 1])


@pytest.mark.parametrize("P", (1, 5))
@pytest.mark.parametrize("fuse", (True, False))
@pytest.mark.parametrize("normalize", (True, False))
def test_gradcheck_fp64(P, fuse, normalize):
    x, scores = _inputs(3, 6, 4, P, torch.float64, seed=2)
    x.requires_grad_()
    scores.requires_grad_()
    keep_counts = torch.tensor([1, 6, 3], device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda x, s: reorganize_ragged(x, s, keep_counts, P, fuse, normalize, kernel="torch")[0],
        (x, scores))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("normalize", (True, False))
def test_gradients_match_the_per_image_loop(kernel, normalize):
    P, n, D = 1, 11, 20
    x, scores = _inputs(3, n, D, P, torch.float32, seed=3)
    keep_counts = torch.tensor([2, 11, 7], device=DEVICE)
    grad = torch.randn(3 * (P + 1) + 20, D, device=DEVICE)
    xa, sa = x.clone().requires_grad_(), scores.clone().requires_grad_()
    rows, _, _ = reorganize_ragged(xa, sa, keep_counts, P, True, normalize, kernel=kernel)
    rows.backward(grad)
    xb, sb = x.clone().requires_grad_(), scores.clone().requires_grad_()
    expected, _ = loop_ragged(xb, sb, keep_counts, P, True, normalize)
    expected.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(sa.grad, sb.grad)


@pytest.mark.parametrize("fuse", (True, False))
@pytest.mark.parametrize("normalize", (True, False))
def test_opcheck(fuse, normalize):
    x, scores = _inputs(3, 7, 8, 2, torch.float32, seed=4)
    keep_counts = torch.tensor([1, 7, 4], device=DEVICE)
    total = int(keep_counts.sum()) + 3 * (2 + int(fuse))
    args = (x.requires_grad_(), scores.requires_grad_(), keep_counts, total, 2, fuse, normalize,
            "torch")
    torch.library.opcheck(torch.ops.ice_prune.reorganize_ragged.default, args)


def test_flop_counter_counts_the_fused_sums():
    P, n, D = 1, 10, 16
    x, scores = _inputs(3, n, D, P, torch.float32)
    keep_counts = torch.tensor([1, 10, 4], device=DEVICE)
    with FlopCounterMode(display=False) as counter:
        reorganize_ragged(x, scores, keep_counts, P, kernel="torch")
    dropped = 9 + 0 + 6
    assert counter.get_total_flops() == 2 * dropped * D
    assert reorganize_ragged_macs(3, n, D, 3 * (P + 1) + 15, P) == dropped * D
    assert reorganize_ragged_macs(3, n, D, 3 * P + 15, P, fuse=False) == 0


def test_bad_input_raises_a_clear_error():
    x, scores = _inputs(2, 5, 4, 1, torch.float32)
    ok = torch.tensor([1, 5], device=DEVICE)
    with pytest.raises(ValueError, match=r"keep_counts must lie in \[1, 5\]"):
        reorganize_ragged(x, scores, torch.tensor([0, 5], device=DEVICE), 1)
    with pytest.raises(ValueError, match=r"keep_counts must lie in \[1, 5\]"):
        reorganize_ragged(x, scores, torch.tensor([1, 6], device=DEVICE), 1)
    with pytest.raises(ValueError, match="keep_counts must be"):
        reorganize_ragged(x, scores, ok.float(), 1)
    with pytest.raises(ValueError, match="keep_counts must be"):
        reorganize_ragged(x, scores, ok[:1], 1)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="total must be the packed row count"):
            reorganize_ragged(x, scores, ok, 1, total=9)
    with pytest.raises(ValueError, match="scores must be"):
        reorganize_ragged(x, scores[:, :4], ok, 1)
    with pytest.raises(ValueError, match="num_prefix"):
        reorganize_ragged(x, scores, ok, 6)


def test_policy_counts_feed_the_op():
    P, n, D = 1, 16, 8
    x, _ = _inputs(4, n, D, P, torch.float32, seed=5)
    # scores at least 1e-3 from the threshold, so the counts are unambiguous
    scores = torch.tensor([0.9, 0.1, 0.8, 0.3] * 4, device=DEVICE).repeat(4, 1)
    scores[1, :12] = 0.05
    scores[2] = 0.95
    counts = KeepPolicy(threshold=0.5, min_share=0.25, max_share=0.75).keep_counts(scores)
    assert counts.tolist() == [8, 4, 12, 8]
    rows, offsets, _ = reorganize_ragged(x, scores, counts, P, True, True)
    expected, expected_offsets = loop_ragged(x, scores, counts, P, True, True)
    _check_rows(rows, offsets, expected, expected_offsets, True, torch.float32)
