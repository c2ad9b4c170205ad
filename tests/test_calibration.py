"""``ice_prune.calibrate_keep_policy``: the policy's cost, worked out here by hand from the counts
the model reports (``model.ice_keep_counts``), brackets the fixed keep rate's, also worked out by
hand, within one step of the bisection; the ends with a warning; the model left as it was; bad
input refused."""
import math

import pytest
import torch

import ice_prune
from ice_prune import KeepPolicy
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
def rows_by_hand(counts, placement, num_patches=16, prefix=1, locs=(3, 6, 9), depth=12):
    """One image's token rows summed over the blocks, from its kept counts at the selection points:
    the rows each block's MLP runs on (prefix, the tokens still there, a fused token once a point
    dropped some); with EViT's placement a selecting block's MLP runs after the cut, with
    ``"block"`` the next block's does."""
    n, total, point = num_patches, 0, 0
    for block in range(depth):
        if placement == "block":
            total += prefix + n
        if block in locs:
            kept = counts[point]
            point += 1
            if kept < n:
                n = kept + 1  # the fused token
        if placement == "attn":
            total += prefix + n
    return total


def fixed_cost_by_hand(rate, placement):
    counts, n = [], 16
    for _ in range(3):
        k = math.ceil(rate * n)
        counts.append(k)
        n = k + 1 if k < n else n
    return rows_by_hand(counts, placement)


def cost_by_hand(model, x, policy, placement):
    model.keep_policy = policy
    with torch.no_grad():
        model(x)
    counts = torch.stack(model.ice_keep_counts, dim=1).tolist()
    model.keep_policy = None
    return sum(rows_by_hand(c, placement) for c in counts) / len(counts)


def value_of(policy):
    return policy.threshold if policy.threshold is not None else policy.mass


def with_value(method, value, **shares):
    return (KeepPolicy(threshold=value, **shares) if method == "ice"
            else KeepPolicy(mass=value, **shares))


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
    """Two images: the mean cost moves in half rows, and the fixed rate's often lies halfway
    between the costs of two neighbouring values."""
    model = patched(method)
    x = scenes()
    toward_fewer = STEP if method == "ice" else -STEP
    ties = 0
    for b in range(0, 16, 2):
        for rate in (0.3, 0.4, 0.5, 0.6, 0.7):
            pair = x[b:b + 2]
            policy = ice_prune.calibrate_keep_policy(model, pair, rate, iterations=ITERATIONS)
            value, target = value_of(policy), fixed_cost_by_hand(rate, "attn")
            got = cost_by_hand(model, pair, policy, "attn")
            fewer = cost_by_hand(model, pair, with_value(method, value + toward_fewer), "attn")
            more = cost_by_hand(model, pair, with_value(method, value - toward_fewer), "attn")
            if got != target and (got - target == target - fewer
                                  or target - got == more - target):
                ties += 1
                assert got > target, (b, rate)
        if ties >= 3:
            break
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
    assert cost_by_hand(model, x, policy, "attn") == fixed_cost_by_hand(1.0, "attn") == 12 * 17


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
