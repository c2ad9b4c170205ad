"""Per-image keep counts run padded and masked (``KeepPolicy(masked=True)``, ``ice_prune.masked``):
the same counts and outputs as the packed run (tests/test_packed.py checks that one against plain
references), the unpatched model where nothing is dropped, batch independence, the honest MAC
count (every row computed), and bench/throughput.py's ``--masked`` twins."""
import dataclasses
import json

import pytest
import torch

import ice_prune
from ice_prune import KeepPolicy
from ice_prune.integrations.common import ICEState
from ice_prune.kernels import reorganize_reference
from ice_prune.masked import select
from ice_prune.select import EViTSelector
from test_packed import adaptive_value, images, make, policy
from test_throughput import TINY, throughput  # noqa: F401 (a fixture)

TOL = 1e-5


def patched(method, prefix=1, **kw):
    """:func:`test_packed.make`'s model, patched with ``kw`` (placement, fuse)."""
    model = make(method, prefix)
    ice_prune.unpatch(model)
    ice_prune.patch(model, method=method, **kw)
    if method == "ice":
        torch.nn.init.normal_(model.ice_head.fc.weight, std=0.02)
        torch.nn.init.normal_(model.ice_head.fc.weight[-1], std=1.0)
    return model


def drops_twice(fuse):
    """``require`` for :func:`test_packed.adaptive_value`: some image drops tokens at two points,
    so a point runs on a batch where tokens are already masked (and, with fusion, a fused one)."""
    def require(counts):
        for c in counts:
            n, drops = 16, 0
            for k in c:
                drops += k < n
                n = k + int(fuse and k < n)
            if drops >= 2:
                return True
        return False
    return require


def run(model, x, rule):
    """``(logits, [B, points] counts)`` of ``model`` on ``x`` under ``rule``."""
    model.keep_policy = rule
    out = model(x)
    return out, torch.stack(model.ice_keep_counts, dim=1)


@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("placement, prefix, shares", [
    ("attn", 1, {}), ("block", 5, dict(min_share=0.2, max_share=0.9))])
def test_masked_keeps_what_packed_keeps_and_gives_its_outputs(method, fuse, placement, prefix,
                                                              shares):
    model = patched(method, prefix, placement=placement, fuse=fuse)
    x = images()
    with torch.no_grad():
        value = adaptive_value(model, x, method, require=drops_twice(fuse), placement=placement,
                               fuse=fuse, **shares)
        packed, packed_counts = run(model, x, policy(method, value, **shares))
        out, counts = run(model, x, policy(method, value, masked=True, **shares))
        features = model.forward_features(x)
    assert torch.equal(counts, packed_counts)
    assert len(set(map(tuple, counts.tolist()))) > 1  # the images kept different counts
    assert (out - packed).abs().max().item() <= TOL
    assert features.shape == (4, 16 + prefix, 24)  # every row stays, computed


@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("placement", ["attn", "block"])
def test_a_masked_policy_keeping_every_token_is_the_unpatched_model(method, placement):
    model = make(None)
    x = images()
    keep_all = KeepPolicy(threshold=0.0, masked=True) if method == "ice" else \
        KeepPolicy(mass=1.0, masked=True)
    with torch.no_grad():
        ref = model(x)
        ice_prune.patch(model, method=method, placement=placement, keep_policy=keep_all)
        out = model(x)
    assert (out - ref).abs().max().item() <= TOL
    assert [c.tolist() for c in model.ice_keep_counts] == [[16] * 4] * 3


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_an_image_alone_and_in_a_batch_keeps_the_same_tokens(method):
    model = patched(method, fuse=True)
    x = images()
    with torch.no_grad():
        rule = policy(method, adaptive_value(model, x, method, require=drops_twice(True)),
                      masked=True)
        batch, batch_counts = run(model, x, rule)
        for b in range(x.shape[0]):
            alone, counts = run(model, x[b:b + 1], rule)
            assert torch.equal(counts[0], batch_counts[b]), b
            assert (alone[0] - batch[b]).abs().max().item() <= TOL, b
    assert len(set(map(tuple, batch_counts.tolist()))) > 1


def test_ties_break_in_packed_row_order():
    """Two points on one image, by hand: the first ranks the tokens out of their order, the second
    sees scores all tied, so it keeps the first rows of the packed order (the best of the first
    point, the fused token last), not the first positions of the padded batch. The active rows,
    sorted by their packed position, are the dense reorganize applied twice."""
    P, n, D = 1, 6, 3
    x = torch.randn(1, P + n, D)
    first = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.25, 0.2, 0.1]])  # [CLS] column first
    tied = torch.full((1, P + n), 0.125)
    rule = KeepPolicy(mass=1.0, min_share=0.5, max_share=0.5, masked=True)  # keep ceil(n / 2)
    state = ICEState(EViTSelector(), (0, 1), "attn", (1.0, 1.0), True, False, False, "auto", P,
                     None, rule)
    out = select(state, select(state, x, None, first, 0), None, tied, 1)
    expected, _ = reorganize_reference(x, first[:, P:], 3, P)  # [CLS, t1, t4, t5, fused]
    expected, _ = reorganize_reference(expected, tied[:, :expected.shape[1] - P], 2, P)
    active, position = state.padded
    rows = out[0][active[0]][position[0][active[0]].argsort()]
    assert [c.tolist() for c in state.keep_counts] == [[3], [2]]
    torch.testing.assert_close(rows, expected[0], rtol=1e-6, atol=1e-6)


def test_masked_must_be_a_bool():
    with pytest.raises(TypeError, match="masked is True .* or False"):
        KeepPolicy(threshold=0.5, masked="yes")
    assert KeepPolicy(mass=0.9, masked=True).masked


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_count_flops_counts_every_row(method):
    """A masked policy computes the unpruned model's every row, plus at each point the scores of
    every row and the fused token's weighted sum over all of them: that is what it counts, with
    either counter, whatever the images keep. ICE: norm2 (5 per element, as fvcore counts a layer
    norm) and the head on the patch rows; EViT: the [CLS] row against every key (H multiply-adds
    per element at the first point, :func:`~ice_prune.integrations.common.cls_attention_row`'s
    block-diagonal product; one after it, a plain product that masks keys)."""
    model = patched(method)
    x = images()
    with torch.no_grad():
        model.keep_policy = policy(method, adaptive_value(model, x, method), masked=True)
        model(x)
    assert any((c < 16).any() for c in model.ice_keep_counts)  # something was dropped
    B, N, n, D = 4, 17, 16, 24
    if method == "ice":
        scoring = [5 * N * D + n * D * model.ice_head.fc.out_features] * 3
    else:
        heads = model.blocks[0].attn.num_heads
        scoring = [heads * N * D, N * D, N * D]
    extra = B * sum(s + n * D for s in scoring)
    for counter in ("fvcore", "torch"):
        unpatched = ice_prune.count_flops(make(None), images=x, counter=counter)
        assert ice_prune.count_flops(model, images=x, counter=counter) == unpatched + extra


# ----------------------------------------------------------------------------- bench --masked


def test_bench_masked_adds_a_twin_on_the_same_weights(throughput):
    args = throughput.parse_args(TINY + ["--keep-rates", "0.5", "--thresholds", "0.5",
                                         "--masses", "0.9", "--masked"])
    models, meta = throughput.build_variants(args)
    assert list(models) == ["baseline", "evit@0.5", "ice@0.5", "ice@threshold=0.5",
                            "ice@threshold=0.5,masked", "evit@mass=0.9", "evit@mass=0.9,masked"]
    for name in ("ice@threshold=0.5", "evit@mass=0.9"):
        twin = models[f"{name},masked"]
        assert twin.keep_policy == dataclasses.replace(models[name].keep_policy, masked=True)
        assert meta[f"{name},masked"] == dict(meta[name], masked=True)
        assert meta[name]["masked"] is False and "masked" not in meta[name]["policy"]
        for a, b in zip(twin.parameters(), models[name].parameters()):
            assert a is b  # the same tensors, the ICE head's too
    with pytest.raises(ValueError, match="--masked adds .* give some"):
        throughput.parse_args(TINY + ["--masked"])


def test_bench_masked_rows(tmp_path, throughput, capsys):
    out = tmp_path / "r.json"
    # 16 patches, so that the policy drops some
    throughput.main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--keep-rates", "0.5",
                     "--masses", "0.5", "--masked", "--batch-size", "2", "--reps", "1",
                     "--warmup", "0", "--threads", "1", "--no-compile", "--json", str(out)])
    table = capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    twin, packed = rows["evit@mass=0.5,masked"], rows["evit@mass=0.5"]
    assert twin["masked"] is True and packed["masked"] is False
    assert twin["kept_per_point"] == packed["kept_per_point"] and packed["kept_per_point"][0] < 16
    assert twin["macs"] > rows["baseline"]["macs"] > packed["macs"]  # every row, computed
    assert twin["packed"] == "evit@mass=0.5" and twin["vs_packed"] == pytest.approx(
        twin["median_img_per_s"] / packed["median_img_per_s"])
    assert packed["packed"] is None and packed["vs_packed"] is None
    assert "evit@mass=0.5,masked: " in table and "of the img/s of evit@mass=0.5," in table
