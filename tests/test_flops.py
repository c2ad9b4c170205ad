"""MAC counting: the published DeiT-S / EViT figures, ICE's head cost, and fvcore vs FlopCounterMode."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import ice_prune
from ice_prune import flops
from ice_prune.kernels import reorganize_packed_reference, reorganize_reference

D, H, C = 384, 6, 1000  # DeiT-S width, heads, ImageNet classes


@pytest.fixture(scope="module")
def deit_s():
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def counts(deit_s):
    """fvcore MACs of DeiT-S and of EViT / ICE at keep rates 0.7 and 0.5 (one trace each)."""
    out = {"deit": flops.count_flops(deit_s)}
    for rate in (0.7, 0.5):
        for method in ("evit", "ice"):
            out[method, rate] = flops.count_flops(
                ice_prune.patch(copy.deepcopy(deit_s), rate, method=method))
    return out


def non_prefix_tokens_at_selection(rate, n=196, points=3):
    """Patch tokens (plus an earlier fused token) each selection point scores: EViT's ceil rule with
    fusion, written out here independently of ice_prune.token_schedule."""
    seen = []
    for _ in range(points):
        seen.append(n)
        n = math.ceil(rate * n) + 1  # kept tokens + the fused one
    return seen


def test_deit_s_is_4_60_gmacs(counts):
    assert counts["deit"] / 1e9 == pytest.approx(4.60, rel=0.01)


@pytest.mark.parametrize("rate, gmacs", [(0.7, 3.03), (0.5, 2.31)])
def test_evit_placement_matches_evit_figures(counts, rate, gmacs):
    assert counts["evit", rate] / 1e9 == pytest.approx(gmacs, rel=0.01)


@pytest.mark.parametrize("rate", [0.7, 0.5])
def test_ice_is_evit_plus_exactly_the_head(counts, rate):
    seen = non_prefix_tokens_at_selection(rate)
    if rate == 0.7:
        assert seen == [196, 139, 99]
    head = D * (C + 1) * sum(seen)  # Linear(384, 1001) on every token it scores
    # The two other differences, both tiny: EViT's one extra [CLS] attention row per selection point
    # (q_cls . K^T over prefix + tokens, as K [N, H * d] times a block-diagonal [H * d, H] of q_cls:
    # H times the row's multiply-adds, so that K is not copied), and ICE's norm2 over the full
    # sequence for the head (the MLP then normalizes the reduced one), 5 operations per element as
    # fvcore counts a layer norm.
    cls_row = H * D * sum(n + 1 for n in seen)
    head_norm = 5 * D * sum(n + 1 for n in seen)
    assert counts["ice", rate] - counts["evit", rate] == head + head_norm - cls_row
    assert (counts["ice", 0.7] - counts["evit", 0.7]) / 1e9 == pytest.approx(0.167, abs=0.001)


def test_fvcore_and_flop_counter_mode_agree(deit_s, counts):
    assert flops.count_flops(deit_s, counter="torch") == counts["deit"]
    for method, rate in (("evit", 0.7), ("ice", 0.5)):
        model = ice_prune.patch(copy.deepcopy(deit_s), rate, method=method)
        assert flops.count_flops(model, counter="torch") == counts[method, rate]


def test_without_sdpa_handle_fvcore_misses_attention(deit_s, counts):
    """The bug the handle fixes: plain fvcore gives 4.25; the difference is 12 blocks of attention."""
    from fvcore.nn import FlopCountAnalysis
    plain = FlopCountAnalysis(deit_s, torch.randn(1, 3, 224, 224))
    plain.unsupported_ops_warnings(False)
    plain.uncalled_modules_warnings(False)
    assert plain.total() / 1e9 == pytest.approx(4.25, rel=0.01)
    assert counts["deit"] - plain.total() == 12 * 2 * 197 * 197 * D


class SDPA(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, q, k, v):
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v  # fvcore counts these matmuls itself


@pytest.mark.parametrize("counter", ["fvcore", "torch"])
def test_sdpa_macs_match_explicit_attention(counter):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    expected = 2 * 3 * (5 * 7 * 8 + 5 * 7 * 4)
    if counter == "fvcore":
        assert flops.flop_analysis(SDPA(True), (q, k, v)).total() == expected
        assert flops.flop_analysis(SDPA(False), (q, k, v)).total() == expected
    else:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False, custom_mapping=flops.torch_formulas()) as fc:
            SDPA(True)(q, k, v)
        assert fc.get_total_flops() == 2 * expected


class Reorganize(nn.Module):
    def __init__(self, op, keep, fuse):
        super().__init__()
        self.op, self.keep, self.fuse = op, keep, fuse

    def forward(self, x, scores):
        if self.op:
            return torch.ops.ice_prune.reorganize(x, scores, self.keep, 1, self.fuse, True, "torch")[0]
        return reorganize_reference(x, scores, self.keep, 1, self.fuse, True)[0]


@pytest.mark.parametrize("fuse", [True, False])
def test_reorganize_handle_reads_the_op_inputs(fuse):
    B, N, Dx, keep = 2, 11, 6, 4
    x, scores = torch.randn(B, N, Dx), torch.rand(B, N - 1)
    expected = B * (N - 1 - keep) * Dx if fuse else 0  # the fused row's weighted sum
    assert flops.flop_analysis(Reorganize(True, keep, fuse), (x, scores)).total() == expected
    # the torch reference path (argsort, gather, einsum) costs the same
    assert flops.flop_analysis(Reorganize(False, keep, fuse), (x, scores)).total() == expected
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=flops.torch_formulas()) as fc:
        Reorganize(True, keep, fuse)(x, scores)
    assert fc.get_total_flops() == 2 * expected


def test_einsum_counted_exactly():
    assert flops.einsum_macs("bn,bnd->bd", [(3, 1001), (3, 1001, 384)]) == 3 * 1001 * 384
    assert flops.einsum_macs("ij,jk->ik", [(2, 3), (3, 5)]) == 30
    assert flops.einsum_macs("ij,jk,kl->il", [(2, 3), (3, 5), (5, 7)]) is None


def test_count_flops_scales_with_batch_and_keeps_mode():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, pretrained=False).train()
    one = flops.count_flops(model, (3, 32, 32))
    assert flops.count_flops(model, (3, 32, 32), batch_size=3) == 3 * one
    assert model.training
    with pytest.raises(ValueError, match="unknown counter"):
        flops.count_flops(model, (3, 32, 32), counter="ptflops")
    with pytest.raises(ValueError, match="channels, height, width"):
        flops.count_flops(model, (32, 32))


class RaggedReorganize(torch.nn.Module):
    def __init__(self, keep_counts, fuse):
        super().__init__()
        self.keep_counts, self.fuse = keep_counts, fuse

    def forward(self, x, scores):
        total = int(x.shape[0] * (1 + self.fuse) + self.keep_counts.sum())
        return torch.ops.ice_prune.reorganize_ragged(x, scores, self.keep_counts, total, 1,
                                                     self.fuse, True, "torch")[0]


@pytest.mark.parametrize("fuse", [True, False])
def test_ragged_reorganize_handle_reads_the_packed_total(fuse):
    """fvcore's handle gets each image's dropped rows from the packed total (the keep counts are a
    tensor it cannot read): by hand, images keeping 1, 10 and 4 of 10 drop 9 + 0 + 6 rows."""
    x, scores = torch.randn(3, 11, 6), torch.rand(3, 10)
    module = RaggedReorganize(torch.tensor([1, 10, 4]), fuse)
    expected = (9 + 0 + 6) * 6 if fuse else 0
    assert flops.flop_analysis(module, (x, scores)).total() == expected
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=flops.torch_formulas()) as fc:
        module(x, scores)
    assert fc.get_total_flops() == 2 * expected


def test_count_flops_on_given_images():
    """``images=``: the count of a forward on those images; for a model whose cost does not depend
    on the input, the random batch's count of the same shape. Bad input is named."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, pretrained=False)
    images = torch.rand(3, 3, 32, 32)
    for counter in ("fvcore", "torch"):
        assert flops.count_flops(model, images=images, counter=counter) == flops.count_flops(
            model, (3, 32, 32), batch_size=3, counter=counter)
    with pytest.raises(ValueError, match=r"images must be a \[B, C, H, W\] tensor"):
        flops.count_flops(model, images=images[0])


class PackedReorganize(torch.nn.Module):
    def __init__(self, offsets, keep_counts, total):
        super().__init__()
        self.offsets, self.keep_counts, self.total = offsets, keep_counts, total

    def forward(self, rows, scores):
        return reorganize_packed_reference(rows, scores, self.offsets, self.keep_counts,
                                           self.total, 1, True, True)[0]


def test_packed_reorganize_counts_the_dropped_rows():
    """The packed batch's fused rows (an ``index_add`` of the weighted dropped rows) cost what
    the dense reorganize counts: by hand, images of 7, 3 and 5 tokens keeping 2, 3 and 1 drop
    5 + 0 + 4 rows of 6 elements."""
    offsets = torch.tensor([0, 8, 12, 18])
    rows, scores = torch.randn(18, 6), torch.rand(3, 7)
    module = PackedReorganize(offsets, torch.tensor([2, 3, 1]), (1 + 2 + 1) + (1 + 3) + (1 + 1 + 1))
    expected = (5 + 0 + 4) * 6
    assert flops.flop_analysis(module, (rows, scores)).total() == expected
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=flops.torch_formulas()) as fc:
        module(rows, scores)
    assert fc.get_total_flops() == 2 * expected


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("counter", ["fvcore", "torch"])
def test_explain_mode_costs_the_head_it_runs(kernel, counter):
    """Explain mode runs the head at every point on either kernel (the Triton one writes the map in
    its epilogue, op ``ice_prune::ice_score_into_map``): both counters count it as the same head
    product, so the explained model costs what the ICE model does at the same keep rate."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                              pretrained=False)
    model = ice_prune.patch(model, keep_rate=0.5, method="ice", locs=(1, 2), kernel=kernel)
    plain = flops.count_flops(model, (3, 32, 32), counter=counter)
    model.explain = True
    assert flops.count_flops(model, (3, 32, 32), counter=counter) == plain
    model.keep_rate = 1.0  # the head still runs at every point; the blocks run every token
    model.explain = False
    dense = flops.count_flops(model, (3, 32, 32), counter=counter)
    model.explain = True
    head = 2 * 16 * 192 * (1000 + 1)  # two points score 16 tokens each; norm2 is reused
    assert flops.count_flops(model, (3, 32, 32), counter=counter) == dense + head
