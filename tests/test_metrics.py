"""Metrics against values computed by hand from the published protocols, quirks included."""
import numpy as np
import pytest

from ice_prune.evaluation import metrics


def test_average_precision_by_hand():
    # ranked 0.9(+), 0.8(-), 0.7(+), 0.1(-): P@1 = 1 at R = .5, P@3 = 2/3 at R = 1
    assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a tie is one threshold (sklearn): both retrieved at once, P = .5, R = 1
    assert metrics.average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert metrics.average_precision([0, 0], [0.2, 0.1]) == 0.0


def test_chefer_binarize_threshold_at_mean_and_nan_rule():
    fg, ap = metrics.chefer_binarize(np.array([[0.0, 1.0], [2.0, 3.0]]))
    # normalized 0, 1/3, 2/3, 1; mean 1/2
    np.testing.assert_array_equal(fg, [[False, False], [True, True]])
    np.testing.assert_allclose(ap[1], [[0, 1 / 3], [2 / 3, 1]])
    np.testing.assert_allclose(ap[0], 1 - ap[1])
    # a constant map: 0/0 -> NaN, every comparison false, argmax -> channel 0 (background)
    fg, ap = metrics.chefer_binarize(np.full((2, 2), 7.0))
    assert not fg.any()
    np.testing.assert_array_equal(ap, 0)


def test_imagenet_seg_meter_one_image_by_hand():
    meter = metrics.ImageNetSegMeter()
    meter.update(np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[0, 1], [1, 1]]))
    r = meter.compute()
    # predicted fg = bottom row; correct: (0,0), (1,0), (1,1)
    assert r["pixel_accuracy"] == pytest.approx(75.0)
    assert r["iou_background"] == pytest.approx(100 * 1 / 2)   # inter {(0,0)}, union {(0,0),(0,1)}
    assert r["iou_foreground"] == pytest.approx(100 * 2 / 3)   # inter 2, union 3
    assert r["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    # flattened (1 - s, s) = (1, 2/3, 1/3, 0, 0, 1/3, 2/3, 1) vs one-hot (1,0,0,0, 0,1,1,1):
    # thresholds 1: P 2/2 R 2/4; 2/3: P 3/4 R 3/4; 1/3: P 4/6 R 1; 0: R stays 1
    assert r["map"] == pytest.approx(100 * (0.5 * 1 + 0.25 * 0.75 + 0.25 * 4 / 6))


def test_imagenet_seg_meter_accumulates_over_the_dataset():
    meter = metrics.ImageNetSegMeter()
    meter.update(np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[0, 1], [1, 1]]))
    meter.update(np.full((2, 2), 0.3), np.ones((2, 2), dtype=int))  # constant: all background
    r = meter.compute()
    assert r["pixel_accuracy"] == pytest.approx(100 * 3 / 8)
    # sums over images, not the mean of per-image IoUs (which would give (7/12 + 0) / 2)
    assert r["iou_background"] == pytest.approx(100 * 1 / (2 + 4))
    assert r["iou_foreground"] == pytest.approx(100 * 2 / (3 + 4))
    assert r["miou"] == pytest.approx(100 * (1 / 6 + 2 / 7) / 2)
    # second image: all AP scores 0 -> one threshold, P = 4/8 at R = 1
    assert r["map"] == pytest.approx(100 * ((0.5 + 0.1875 + 1 / 6) + 0.5) / 2)
    assert r["images"] == 2


def test_imagenet_seg_meter_rejects_bad_input():
    meter = metrics.ImageNetSegMeter()
    with pytest.raises(ValueError, match="upsample"):
        meter.update(np.zeros((2, 2)), np.zeros((4, 4), dtype=int))
    with pytest.raises(ValueError, match="0 .background. or 1"):
        meter.update(np.zeros((2, 2)), np.full((2, 2), 3))


def test_cumulative_mass_mask_by_hand():
    a = np.array([[0.1, 0.4, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1]])
    # ascending 0.1, 0.2, 0.3, 0.4 -> cumulative 0.1, 0.3, 0.6, 1.0; tau 0.6 keeps cum > 0.4
    np.testing.assert_array_equal(metrics.cumulative_mass_mask(a, 0.6),
                                  [[False, True, False, True], [True, True, False, False]])
    np.testing.assert_array_equal(metrics.cumulative_mass_mask(a, 0.8)[0], [False, True, True, True])


def test_voc_jaccard_best_head_per_class_and_void_quirk():
    t = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 255], [0, 0, 0, 2]])
    head0 = np.zeros((4, 4), bool)
    head0[:2, :2] = True
    head0[2, 3] = True          # on a void pixel: counts in the union (the quirk)
    head1 = np.zeros((4, 4), bool)
    head1[3, 3] = head1[0, 0] = True
    # class 1: head0 4/5, head1 1/5; class 2: head0 0, head1 1/2 -> best per class 0.8 and 0.5
    assert metrics.voc_jaccard(np.stack([head0, head1]), t) == pytest.approx((0.8 + 0.5) / 2)
    assert metrics.voc_jaccard(head0, t) == pytest.approx((0.8 + 0.0) / 2)
    with pytest.raises(ValueError, match="no object class"):
        metrics.voc_jaccard(head0, np.where(t == 255, 255, 0))


def test_box_iou_lost_by_hand():
    iou = metrics.box_iou_lost([0, 0, 10, 10], np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(iou, [25 / 175, 1.0, 0.0], rtol=1e-6)


def test_box_from_mask_uses_the_component_of_the_most_confident_foreground_patch():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[0, 1] = mask[1, 0] = True              # component A
    mask[2, 2] = mask[2, 3] = mask[3, 3] = True              # component B
    mask[3, 1] = True                                        # only diagonal to B: own component
    scores = np.zeros((4, 4))
    scores[3, 3] = 5.0
    scores[0, 3] = 9.0                                       # higher, but background
    scores[0, 0] = 4.0
    assert metrics.box_from_mask(mask, scores, 8) == [16.0, 16.0, 32.0, 32.0]
    assert metrics.box_from_mask(mask, scores, 8, image_size=(28, 30)) == [16.0, 16.0, 30.0, 28.0]
    # empty mask: the highest-scoring patch alone (row 0, col 3)
    assert metrics.box_from_mask(np.zeros((4, 4), bool), scores, (8, 4)) == [12.0, 0.0, 16.0, 8.0]


def test_corloc_hit():
    gts = np.array([[0, 0, 8, 8], [16, 16, 30, 30]])
    assert metrics.corloc_hit([16, 16, 32, 32], gts)                # 196 / 256 with the second box
    assert not metrics.corloc_hit([16, 16, 32, 32], gts[:1])
    assert not metrics.corloc_hit([0, 0, 20, 20], np.array([[0, 0, 10, 10]]))  # 100 / 400


def test_inclusive_iou_and_cub_meter():
    # inclusive ends: 5x5 overlap of two 10x10 boxes -> 25 / 175 (exclusive would be 16 / 146)
    assert metrics.box_iou_inclusive([0, 0, 9, 9], [5, 5, 14, 14]) == pytest.approx(25 / 175)
    assert metrics.box_iou_inclusive([0, 0, 0, 0], [0, 0, 0, 0]) == 1.0
    meter = metrics.CUBLocMeter()
    meter.update([0, 0, 9, 9], np.array([0, 0, 9, 9]), pred_class=3, label=3)      # hit, correct
    meter.update([0, 0, 9, 9], np.array([[0, 0, 9, 10]]), pred_class=1, label=3)   # hit, wrong
    meter.update([0, 0, 9, 9], np.array([[5, 5, 14, 14]]), pred_class=2, label=2)  # miss, correct
    r = meter.compute()
    assert r["top1_cls"] == pytest.approx(200 / 3)
    assert r["gt_known_loc"] == pytest.approx(200 / 3)
    assert r["top1_loc"] == pytest.approx(100 / 3)
