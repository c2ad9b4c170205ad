"""The adversarial normalization loss against values worked out by hand with math.log / math.exp."""
import math

import pytest
import torch

from ice_prune.loss import (LOSS_MODES, ICELoss, adversarial_normalization_loss, auto_lambda,
                            ice_image_logits, parse_lambda)


def ce(logits, target_index):
    """-log softmax(logits)[target_index], written out."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[target_index]


# one image, two patches, C = 2 classes + background: patch 1 says class 0, patch 2 background
Z = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
LABEL = torch.tensor([0])
BG_HAT = [0.5 * 1.0, 0.5 * 0.0, 0.5 * 0.5]  # alpha * mean over both patches


def test_paper_terms_without_instance_norm():
    out = ICELoss("paper", lambda_class="paper", instance_norm=False)(Z, LABEL)
    l_class = ce([2.0, 0.0, 0.0], 0)  # Y_hat = the one foreground patch
    l_bg = ce(BG_HAT, 2)
    assert out.class_loss.item() == pytest.approx(l_class, abs=1e-6)
    assert out.bg_loss.item() == pytest.approx(l_bg, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.975 * l_class + 0.025 * l_bg, abs=1e-6)
    assert out.fg_fraction.item() == 0.5


def test_paper_mode_instance_normalizes_each_patch():
    z = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
    # per patch: mean 1, biased variance 2 -> (x - 1) / sqrt(2 + 1e-5)
    s = math.sqrt(2.0 + 1e-5)
    n1, n2 = [2 / s, -1 / s, -1 / s], [-1 / s, -1 / s, 2 / s]
    out = ICELoss("paper")(z, LABEL)
    assert out.class_loss.item() == pytest.approx(ce(n1, 0), abs=1e-6)
    bg_hat = [0.5 * (a + b) / 2 for a, b in zip(n1, n2)]
    assert out.bg_loss.item() == pytest.approx(ce(bg_hat, 2), abs=1e-6)


def test_official_terms():
    out = ICELoss("official")(Z, LABEL)
    l_class = ce([2.0 / 2, 0.0, 0.0], 0)  # foreground sum / (n_fg + 1) = [2, 0, 0] / 2
    l_bg = ce(BG_HAT, 2)
    assert out.class_loss.item() == pytest.approx(l_class, abs=1e-6)
    assert out.loss.item() == pytest.approx(1.0 * l_class + 0.025 * l_bg, abs=1e-6)
    assert out.bg_active


def test_official_background_term_off_below_ten_percent_foreground():
    z = torch.zeros(1, 11, 3)
    z[0, :, 2] = 1.0  # 10 background patches ...
    z[0, 0] = torch.tensor([2.0, 0.0, 0.0])  # ... and one foreground: 1/11 < 10%
    out = ICELoss("official")(z, LABEL)
    assert not out.bg_active
    assert out.loss.item() == pytest.approx(ce([1.0, 0.0, 0.0], 0), abs=1e-6)
    z[0, 1] = torch.tensor([2.0, 0.0, 0.0])  # 2/11 >= 10%: on again
    assert ICELoss("official")(z, LABEL).bg_active


def test_soft_targets_and_label_padding():
    out = ICELoss("paper", instance_norm=False)(Z, torch.tensor([[0.7, 0.3]]))
    expected = 0.7 * ce([2.0, 0.0, 0.0], 0) + 0.3 * ce([2.0, 0.0, 0.0], 1)
    assert out.class_loss.item() == pytest.approx(expected, abs=1e-6)
    # the same as integer labels when the soft label is one-hot
    one_hot = ICELoss("paper")(Z, torch.tensor([[1.0, 0.0]]))
    assert one_hot.loss.item() == pytest.approx(ICELoss("paper")(Z, LABEL).loss.item(), abs=1e-6)


def test_image_without_foreground_gives_uniform_class_prediction_in_paper_mode():
    z = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]]], requires_grad=True)
    out = ICELoss("paper", class_weight=1.0, bg_weight=0.0)(z, LABEL)
    assert out.class_loss.item() == pytest.approx(math.log(3), abs=1e-6)
    out.loss.backward()
    assert torch.count_nonzero(z.grad) == 0  # no patch to learn the class from


def test_batch_mean_many_classes_and_gradients_only_reach_foreground_in_class_phase():
    C = 1000 + 7  # no 1000 baked in anywhere
    z = torch.zeros(2, 3, C + 1)
    z[0, 0, 5] = 4.0  # image 0: patch 0 foreground (class 5), patches 1, 2 background
    z[0, 1:, C] = 4.0
    z[1, :, 9] = 4.0  # image 1: all foreground (class 9)
    z.requires_grad_(True)
    target = torch.tensor([5, 3])
    out = ICELoss("paper", instance_norm=False, class_weight=1.0, bg_weight=0.0)(z, target)
    row0 = [0.0] * (C + 1)
    row0[5] = 4.0
    row1 = [0.0] * (C + 1)
    row1[9] = 4.0
    assert out.loss.item() == pytest.approx((ce(row0, 5) + ce(row1, 3)) / 2, abs=1e-5)
    out.loss.backward()
    assert torch.count_nonzero(z.grad[0, 1:]) == 0 and torch.count_nonzero(z.grad[0, 0]) > 0


def test_list_of_selection_points_is_averaged():
    a, b = Z, torch.tensor([[[0.0, 3.0, 0.0]]])
    f = ICELoss("paper")
    out = f([a, b], LABEL)
    assert out.loss.item() == pytest.approx((f(a, LABEL).loss + f(b, LABEL).loss).item() / 2,
                                            abs=1e-6)
    with pytest.raises(ValueError, match="no ICE logits"):
        f([], LABEL)


def test_ice_image_logits_reads_the_foreground_mean():
    from dataclasses import replace

    def inorm(v):  # instance norm of one patch's C+1 logits: biased variance, eps 1e-5
        m = sum(v) / len(v)
        s = math.sqrt(sum((a - m) ** 2 for a in v) / len(v) + 1e-5)
        return [(a - m) / s for a in v]

    def mean(rows):
        return [sum(col) / len(rows) for col in zip(*rows)]

    # image 0: patches say class 0, background, class 1; image 1: no foreground patch
    img0 = [[5.0, 1.0, 0.0], [0.0, 0.0, 9.0], [1.0, 4.0, 0.0]]
    img1 = [[0.0, 0.0, 9.0], [1.0, 0.0, 3.0], [0.0, 2.0, 5.0]]
    z = torch.tensor([img0, img1])
    paper = LOSS_MODES["paper"]
    expected = [mean([inorm(img0[0]), inorm(img0[2])])[:2],  # the foreground patches' mean
                mean([inorm(p) for p in img1])[:2]]          # no foreground: every patch's mean
    torch.testing.assert_close(ice_image_logits(z, paper), torch.tensor(expected))
    expected = [mean([img0[0], img0[2]])[:2], mean(img1)[:2]]  # [[3, 2.5], [1/3, 2/3]]
    torch.testing.assert_close(ice_image_logits(z, replace(paper, instance_norm=False)),
                               torch.tensor(expected))


@pytest.mark.parametrize("kwargs, match", [
    ({"lambda_class": 1.5}, "lambda_class"),
    ({"lambda_class": -0.1}, "lambda_class"),
    ({"alpha": 0.0}, "alpha"),
    ({"bg_weight": -1.0}, "bg_weight"),
    ({"class_weight": 0.0, "bg_weight": 0.0}, "both 0"),
    ({"min_fg_fraction": 2.0}, "min_fg_fraction"),
    ({"beta": 1.0}, "unknown"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ICELoss("paper", **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown ICE loss mode"):
        ICELoss("nope")
    with pytest.raises(ValueError, match=r"\[B, N, C\+1\]"):
        adversarial_normalization_loss(torch.zeros(2, 3), LABEL)
    with pytest.raises(ValueError, match="class labels must be in"):
        adversarial_normalization_loss(Z, torch.tensor([2]))
    with pytest.raises(ValueError, match="do not fit"):
        adversarial_normalization_loss(Z, torch.tensor([[0.5, 0.25, 0.25]]))


# the class-count rule: lambda(C) = lambda_p C / (lambda_p C + (1 - lambda_p) 1000), written out
@pytest.mark.parametrize("num_classes, paper_lambda, expected", [
    (1000, 0.975, 0.975),
    (1000, 0.99, 0.99),  # ICE-f
    (10, 0.975, 9.75 / (9.75 + 25.0)),  # 0.2806
    (200, 0.975, 195.0 / (195.0 + 25.0)),  # 0.8864
    (2, 0.975, 1.95 / (1.95 + 25.0)),
])
def test_auto_lambda_keeps_the_papers_balance(num_classes, paper_lambda, expected):
    assert auto_lambda(num_classes, paper_lambda) == pytest.approx(expected, abs=1e-12)
    # the early-training ratio R = (1 - lambda) alpha C / lambda is the paper's 12.82 at alpha 0.5
    lam = auto_lambda(num_classes)
    assert (1 - lam) * 0.5 * num_classes / lam == pytest.approx(0.025 * 0.5 * 1000 / 0.975)


def test_iceloss_default_is_the_class_count_rule():
    lam = 1.95 / (1.95 + 25.0)  # C = 2
    loss = ICELoss("paper", instance_norm=False)
    assert loss.lambda_rule == "auto" and loss.resolved_lambda(2) == pytest.approx(lam)
    out = loss(Z, LABEL)
    l_class, l_bg = ce([2.0, 0.0, 0.0], 0), ce(BG_HAT, 2)
    assert out.loss.item() == pytest.approx(lam * l_class + (1 - lam) * l_bg, abs=1e-6)
    # the paper's literal value is one word away, and a number fixes lambda at any class count
    literal = ICELoss("paper", lambda_class="paper", instance_norm=False)
    assert literal.lambda_rule == "paper" and literal.resolved_lambda(2) == 0.975
    assert ICELoss("paper", lambda_class=0.3).resolved_lambda(500) == 0.3
    icef = ICELoss("paper", paper_lambda=0.99)
    assert icef.resolved_lambda(1000) == pytest.approx(0.99)
    # explicit weights are fixed weights; the official mode keeps its own
    assert ICELoss("paper", class_weight=1.0, bg_weight=0.0).resolved_lambda(2) == 1.0
    assert ICELoss("official").resolved_lambda(2) == 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "official", "lambda_class": "auto"}, "not lambda-parametrized"),
    ({"mode": "official", "lambda_class": 0.5}, "not lambda-parametrized"),
    ({"lambda_class": "sometimes"}, "auto.*paper"),
    ({"lambda_class": "auto", "class_weight": 1.0}, "not both"),
    ({"lambda_class": "auto", "paper_lambda": 1.0}, "paper_lambda"),
])
def test_bad_lambda_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ICELoss(**kwargs)


def test_parse_lambda():
    assert parse_lambda("auto") == "auto" and parse_lambda("paper") == "paper"
    assert parse_lambda("0.28") == 0.28
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        parse_lambda("-0.1")
    with pytest.raises(ValueError, match="auto, paper or a number"):
        parse_lambda("lots")
    with pytest.raises(ValueError, match="number of image classes"):
        auto_lambda(0)
