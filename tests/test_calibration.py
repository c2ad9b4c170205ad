"""``ice_prune.calibrate_keep_policy``: the policy's cost (the blocks' multiply-adds), worked out
here by hand from the counts the model reports (``model.ice_keep_counts``) and the test model's
dims (checked against the model and fvcore), brackets the fixed keep rate's, also worked out by
hand, within one step of the bisection; the ends with a warning; the model left as it was; bad
input refused."""
import itertools
import math

import pytest
import torch

import ice_prune
from ice_prune import KeepPolicy
from ice_prune.flops import flop_analysis
from test_packed import images, make

ITERATIONS = 10
STEP = 2.0 ** -ITERATIONS


def patched(method, placement="attn"):
    """:func:`test_packed.make`'s model (an ICE head with a spread background logit), patched at
    ``placement``."""
    model = make(method)
    if placement != "attn":
        ice_prune.unpatch(model)
        ice_prune.patch(model, method=method, placement=placement)
        if method == "ice":
            torch.nn.init.normal_(model.ice_head.fc.weight, std=0.02)
            torch.nn.init.normal_(model.ice_head.fc.weight[-1], std=1.0)
    return model


def scenes(batch=16):
    torch.manual_seed(0)
    return images(batch)


# ----------------------------------------------------------------------------- the reference
# the test model's dims (test_packed.make: embed 24, 2 heads of 12, MLP hidden 96), written out;
# test_the_hand_dims_are_the_models checks them against the model
ATTN_ROW = 4 * 24 * 24  # MACs per row of a block's attention linears: qkv 24x72, proj 24x24
PAIR = 2 * 24  # per pair of rows: q.k and attention.v, 2 heads of 12 each
MLP_ROW = 2 * 24 * 96  # per row of its MLP: fc1 24x96, fc2 96x24


def macs_by_hand(counts, placement, num_patches=16, prefix=1, locs=(3, 6, 9), depth=12, norm=0):
    """One image's MACs summed over the blocks, from its kept counts at the selection points: a
    block's attention runs on the rows before its cut (prefix, the tokens still there, a fused
    token once a point dropped some), its MLP with EViT's placement on those after the cut, with
    ``"block"`` on those before (the next block's runs after). ``norm``: MACs per row of each of a
    block's two layer norms (its attention's, its MLP's), not counted by the calibration."""
    n, total, point = num_patches, 0, 0
    for block in range(depth):
        attn = prefix + n
        if block in locs:
            kept = counts[point]
            point += 1
            if kept < n:
                n = kept + 1  # the fused token
        mlp = prefix + n if placement == "attn" else attn
        total += attn * ATTN_ROW + attn ** 2 * PAIR + mlp * MLP_ROW + (attn + mlp) * norm
    return total


def fixed_counts(rate):
    """The counts of fixed keep ``rate`` (a float, or one per selection point)."""
    counts, n = [], 16
    for r in (rate,) * 3 if isinstance(rate, float) else rate:
        k = math.ceil(r * n)
        counts.append(k)
        n = k + 1 if k < n else n
    return counts


def fixed_cost_by_hand(rate, placement):
    return macs_by_hand(fixed_counts(rate), placement)


def cost_by_hand(model, x, policy, placement):
    model.keep_policy = policy
    with torch.no_grad():
        model(x)
    counts = torch.stack(model.ice_keep_counts, dim=1).tolist()
    model.keep_policy = None
    return sum(macs_by_hand(c, placement) for c in counts) / len(counts)


def value_of(policy):
    return policy.threshold if policy.threshold is not None else policy.mass


def with_value(method, value, **shares):
    return (KeepPolicy(threshold=value, **shares) if method == "ice"
            else KeepPolicy(mass=value, **shares))


def test_the_hand_dims_are_the_models():
    model = patched("ice")
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        assert sum(m.weight.numel() for m in attn.modules() if isinstance(m, torch.nn.Linear)) \
            == ATTN_ROW
        assert 2 * attn.num_heads * attn.head_dim == PAIR
        assert sum(m.weight.numel() for m in mlp.modules() if isinstance(m, torch.nn.Linear)) \
            == MLP_ROW
        assert (attn.qkv.in_features, attn.qkv.out_features) == (24, 72)
        assert (attn.proj.in_features, attn.proj.out_features) == (24, 24)
        assert (attn.num_heads, attn.head_dim) == (2, 12)
        assert (mlp.fc1.in_features, mlp.fc1.out_features) == (24, 96)
        assert (mlp.fc2.in_features, mlp.fc2.out_features) == (96, 24)
        assert [type(m).__name__ for m in block.modules()].count("Linear") == 4
    assert (model._ice.locs, model._ice.num_prefix, len(model.blocks)) == ((3, 6, 9), 1, 12)


@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("placement", ["attn", "block"])
def test_the_by_hand_macs_are_fvcores(method, placement):
    """fvcore (``ice_prune.count_flops``'s counter) on the fixed keep rates 1, 0.7 and 0.5: its
    count of the blocks' attention and MLP modules is the by-hand cost exactly. Its total (one
    image) differs between 0.7 and 0.5 by the by-hand difference within 2% once the blocks' layer
    norms are added (5 MACs per element, as fvcore counts an affine norm): at embed 24 they are 3%
    of a row's MACs (0.2% at ViT-S's 384); the rest is the selection steps and the final norm. From
    keep rate 1, which runs no selection step, ICE's difference also holds its whole scoring head,
    3% of it here, so the totals are compared between rates that both select."""
    model = patched(method, placement)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    totals = {}
    for rate in (1.0, 0.7, 0.5):
        model.keep_rate = rate
        with torch.no_grad():
            analysis = flop_analysis(model, (x,))
            by_block = analysis.by_module_and_operator()
            totals[rate] = analysis.total()
        # the linear layers and the attention products (not the norms, EViT's extra [CLS] row,
        # ICE's score, the reorganize): EViT's selecting blocks compute attention outside attn
        blocks = sum(by_block[f"blocks.{b}"][op] for b in range(12)
                     for op in ("linear", "scaled_dot_product_attention"))
        assert blocks == fixed_cost_by_hand(rate, placement), rate
        assert ice_prune.count_flops(model, (3, 32, 32)) == totals[rate]
    by_hand = (macs_by_hand(fixed_counts(0.7), placement, norm=5 * 24)
               - macs_by_hand(fixed_counts(0.5), placement, norm=5 * 24))
    assert totals[0.7] - totals[0.5] == pytest.approx(by_hand, rel=0.02)


# ----------------------------------------------------------------------------- the search
@pytest.mark.parametrize("method", ["ice", "evit"])
@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7])
def test_the_calibrated_cost_is_the_fixed_rates_within_one_step(method, placement, rate):
    model = patched(method, placement)
    x = scenes()
    policy = ice_prune.calibrate_keep_policy(model, x, rate, iterations=ITERATIONS)
    assert (policy.threshold is None) == (method == "evit")
    assert (policy.min_share, policy.max_share, policy.masked) == (0.0, 1.0, False)
    value = value_of(policy)
    assert STEP <= value < 1 and value / STEP == int(value / STEP)  # inside the grid, on it
    target = fixed_cost_by_hand(rate, placement)
    got = cost_by_hand(model, x, policy, placement)
    # one step toward fewer tokens (ICE: a higher threshold, EViT: a lower mass) and toward more
    fewer = cost_by_hand(model, x, with_value(method, value + (STEP if method == "ice" else -STEP)),
                         placement)
    more = cost_by_hand(model, x, with_value(method, value - (STEP if method == "ice" else -STEP)),
                        placement)
    assert fewer <= got <= more
    assert fewer <= target <= more  # the step crosses the target
    # of the two values around the target, the nearer (a tie to the one keeping more)
    if got > target:
        assert got - target <= target - fewer
    elif got < target:
        assert target - got < more - target


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_a_tie_goes_to_the_value_keeping_more(method):
    """Two images and a keep rate per selection point. The cases are found by hand: each image's
    counts at every grid value (they do not depend on the batch) give a pair's mean cost along the
    grid; where the midpoint of two successive costs is the cost of some fixed counts, the rates
    that keep those counts put the target halfway between two neighbouring values."""
    model = patched(method)
    x = scenes(8)
    steps = 2 ** ITERATIONS
    values = [(steps - i) / steps if method == "ice" else i / steps
              for i in range(0 if method == "ice" else 1, steps + 1)]  # toward more tokens
    table = []  # [value][image]: the image's cost at the value
    with torch.no_grad():
        for value in values:
            model.keep_policy = with_value(method, value)
            model(x)
            counts = torch.stack(model.ice_keep_counts, dim=1).tolist()
            table.append([macs_by_hand(c, "attn") for c in counts])
    model.keep_policy = None
    schedules = {}  # cost: per-point rates keeping those counts
    for k1 in range(1, 17):
        n1 = k1 + 1 if k1 < 16 else 16
        for k2 in range(1, n1 + 1):
            n2 = k2 + 1 if k2 < n1 else n1
            for k3 in range(1, n2 + 1):
                rates = ((k1 - 0.5) / 16, (k2 - 0.5) / n1, (k3 - 0.5) / n2)
                assert fixed_counts(rates) == [k1, k2, k3]
                schedules.setdefault(macs_by_hand((k1, k2, k3), "attn"), rates)
    cases = []
    for b1, b2 in itertools.combinations(range(len(x)), 2):
        mean = [(row[b1] + row[b2]) / 2 for row in table]
        for i in range(1, len(values) - 2):  # neighbours with a value on each side
            if mean[i] < mean[i + 1] and (mean[i] + mean[i + 1]) / 2 in schedules:
                cases.append((b1, b2, schedules[(mean[i] + mean[i + 1]) / 2]))
    toward_fewer = STEP if method == "ice" else -STEP
    ties = 0
    for b1, b2, rates in cases[:6]:
        pair = x[[b1, b2]]
        policy = ice_prune.calibrate_keep_policy(model, pair, rates, iterations=ITERATIONS)
        value, target = value_of(policy), fixed_cost_by_hand(rates, "attn")
        got = cost_by_hand(model, pair, policy, "attn")
        fewer = cost_by_hand(model, pair, with_value(method, value + toward_fewer), "attn")
        more = cost_by_hand(model, pair, with_value(method, value - toward_fewer), "attn")
        if got != target and (got - target == target - fewer or target - got == more - target):
            ties += 1
            assert got > target, (b1, b2, rates)
    assert ties >= 3, "too few ties among these images to check the rule"


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_the_policy_does_not_depend_on_the_batch_size(method):
    model = patched(method)
    x = scenes()
    whole = ice_prune.calibrate_keep_policy(model, x, 0.5, iterations=ITERATIONS)
    assert ice_prune.calibrate_keep_policy(model, x, 0.5, iterations=ITERATIONS,
                                           batch_size=3) == whole


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_keep_rate_one_is_the_policy_keeping_every_token(method):
    model = patched(method)
    x = scenes()
    policy = ice_prune.calibrate_keep_policy(model, x, 1.0, iterations=ITERATIONS)
    assert value_of(policy) == (0.0 if method == "ice" else 1.0)
    assert (cost_by_hand(model, x, policy, "attn") == fixed_cost_by_hand(1.0, "attn")
            == 12 * (17 * ATTN_ROW + 17 ** 2 * PAIR + 17 * MLP_ROW))


@pytest.mark.parametrize("method", ["ice", "evit"])
def test_an_unreachable_cost_gives_the_nearest_end_with_a_warning(method):
    model = patched(method)
    x = scenes()
    # every image keeps at least 60% at each point: fixed keep 0.3 costs less than any policy
    with pytest.warns(UserWarning, match="nearest end"):
        fewest = ice_prune.calibrate_keep_policy(model, x, 0.3, min_share=0.6,
                                                 iterations=ITERATIONS)
    assert value_of(fewest) == (1.0 if method == "ice" else STEP)
    assert fewest.min_share == 0.6
    # at most half of them: fixed keep 0.9 costs more than any policy
    with pytest.warns(UserWarning, match="nearest end"):
        most = ice_prune.calibrate_keep_policy(model, x, 0.9, max_share=0.5,
                                               iterations=ITERATIONS)
    assert value_of(most) == (0.0 if method == "ice" else 1.0)
    assert most.max_share == 0.5
    assert cost_by_hand(model, x, most, "attn") == fixed_cost_by_hand(0.5, "attn")


def test_the_model_is_left_as_it_was_and_runs_in_eval_without_grad():
    model = patched("ice")
    x = scenes()
    before = KeepPolicy(threshold=0.25, min_share=0.2)
    model.keep_policy = before
    model.train()
    model.blocks[2].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []
    handle = model.blocks[0].register_forward_hook(
        lambda module, args, out: seen.append((module.training, torch.is_grad_enabled())))
    ice_prune.calibrate_keep_policy(model, x, 0.5, iterations=4)
    handle.remove()
    assert seen and set(seen) == {(False, False)}
    assert model.keep_policy is before
    assert {name: m.training for name, m in model.named_modules()} == modes


# ----------------------------------------------------------------------------- refusals
def test_bad_input_is_refused_naming_the_fix():
    model = patched("ice")
    x = scenes(4)
    for rate in (0.0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\]"):
            ice_prune.calibrate_keep_policy(model, x, rate)
    for bad in (x[0], x[None], torch.zeros(0, 3, 32, 32), x.tolist()):
        with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
            ice_prune.calibrate_keep_policy(model, bad, 0.5)
    with pytest.raises(ValueError, match="must not exceed max_share"):
        ice_prune.calibrate_keep_policy(model, x, 0.5, min_share=0.6, max_share=0.5)
    for name in ("batch_size", "iterations"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            ice_prune.calibrate_keep_policy(model, x, 0.5, **{name: 0})
    assert model.keep_policy is None and not model.training
    with pytest.raises(ValueError, match=r"patched with ice_prune.patch\(model, method='ice'\)"):
        ice_prune.calibrate_keep_policy(make(None), x, 0.5)
    model.trace = True
    with pytest.raises(ValueError, match="model.trace = False"):
        ice_prune.calibrate_keep_policy(model, x, 0.5)
    assert model.keep_policy is None and model.trace
