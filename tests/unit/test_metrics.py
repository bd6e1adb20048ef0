import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from adps.config import ThresholdParams
from adps.evaluation.metrics import aupro, decision_metrics, detection_metrics, f1_max
from adps.evaluation.thresholds import choose_threshold


def reference_aupro(maps, masks, fpr_limit):
    """Straightforward reference: every distinct threshold, per-region overlaps in a loop."""
    regions = []
    for i, m in enumerate(masks):
        labelled, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fpr = (predicted & normal).sum() / normal.sum()
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    fprs, pros = map(np.array, zip(*points, strict=True))
    keep = fprs <= fpr_limit
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < fpr_limit and keep.sum() < len(fprs):
        j = keep.sum()
        x.append(fpr_limit)
        y.append(np.interp(fpr_limit, fprs[j - 1 : j + 1], pros[j - 1 : j + 1]))
    return np.trapezoid(y, x) / fpr_limit


def random_case(seed, n=4, size=12):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    masks[0, 2:5, 2:5] = True
    masks[0, 8:10, 7:11] = True
    masks[2, 5:9, 1:3] = True
    maps = rng.random((n, size, size)) + 0.6 * masks
    return np.round(maps, 2), masks  # rounding creates ties


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("limit", [0.3, 1.0, 0.05])
def test_aupro_matches_reference(seed, limit):
    maps, masks = random_case(seed)
    assert aupro(maps, masks, limit) == pytest.approx(reference_aupro(maps, masks, limit), abs=1e-9)


def test_aupro_hand_built_cases():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True
    perfect = masks.astype(float)
    assert aupro(perfect, masks, 0.3) == pytest.approx(1.0)
    inverted = 1.0 - perfect  # every normal pixel ranks above every anomalous one
    assert aupro(inverted, masks, 0.3) == pytest.approx(0.0)
    constant = np.zeros((2, 4, 4))  # one threshold: fpr jumps 0 -> 1, pro 0 -> 1, linear in between
    assert aupro(constant, masks, 0.3) == pytest.approx(0.15)


def test_aupro_weighs_regions_equally_not_pixels():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, :5, :5] = True  # big region, 25 px
    masks[0, 8, 8] = True  # small region, 1 px
    maps = np.zeros((1, 10, 10))
    maps[0, 8, 8] = 1.0  # only the small region found: PRO = 0.5 at FPR 0
    assert aupro(maps, masks, 0.3) == pytest.approx(reference_aupro(maps, masks, 0.3))
    assert aupro(maps, masks, 0.3) > 0.5


def test_detection_metrics_match_sklearn():
    maps, masks = random_case(1)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    m = detection_metrics(scores, labels, maps, masks, 0.3)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert m["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    f1, thr = m["pixel_f1_max"], m["pixel_f1_max_threshold"]
    assert f1 == pytest.approx(f1_score(masks.ravel(), maps.ravel() >= thr))


def test_f1_max_is_the_best_over_thresholds():
    rng = np.random.default_rng(0)
    labels = rng.random(200) > 0.7
    scores = rng.random(200) + labels * 0.4
    best, thr = f1_max(labels, scores)
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert best == pytest.approx(brute)
    assert f1_score(labels, scores >= thr) == pytest.approx(best)


def test_thresholds_from_validation():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1])
    assert choose_threshold(scores, labels, ThresholdParams(strategy="f1")) == pytest.approx(0.8)
    assert choose_threshold(scores, labels, ThresholdParams(strategy="percentile", percentile=50)) == pytest.approx(0.2)


def test_decision_metrics():
    d = decision_metrics(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    assert d == {"precision": 0.5, "recall": 0.5, "f1": 0.5}


# Three 2x2 images: a normal one, a defect with a one-pixel mask, a defect labelled by image only
# whose whole map is hot (0.8). Its pixels are unknown: counted as normal, they would sit above the
# masked defect's pixel (0.7) and pull pixel AP from 1 down to 1/5.
LABELLED_BY_IMAGE = {
    "scores": np.array([0.4, 0.7, 0.8]),
    "labels": np.array([0, 1, 1]),
    "maps": np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.7, 0.1], [0.1, 0.1]], [[0.8, 0.8], [0.8, 0.8]]]),
    "masks": np.array([[[0, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]], bool),
}


def test_pixel_metrics_leave_out_defects_without_a_mask_and_image_metrics_keep_them():
    case = LABELLED_BY_IMAGE
    masked = detection_metrics(**case, fpr_limit=0.3, masked=np.array([True, True, False]))
    # masked pixels: 7 normal (0.1 0.2 0.3 0.4 0.1 0.1 0.1) below the one defect pixel (0.7)
    assert masked["pixel_ap"] == 1.0 and masked["pixel_auroc"] == 1.0
    assert masked["image_auroc"] == 1.0 and masked["image_ap"] == 1.0  # 0.7 and 0.8 above 0.4
    everything = detection_metrics(**case, fpr_limit=0.3)  # what counting unknown pixels as normal gives
    assert everything["pixel_ap"] == pytest.approx(1 / 5)  # four 0.8 "normals" above the 0.7 defect
    assert everything["pixel_auroc"] == pytest.approx(7 / 11)  # the defect beats 7 of 11 normals


def test_without_any_mask_pixel_metrics_are_missing_never_zero():
    metrics = detection_metrics(**LABELLED_BY_IMAGE, fpr_limit=0.3, masked=np.array([True, False, False]))
    pixel = ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "pixel_f1_max_threshold")
    assert all(np.isnan(metrics[key]) for key in pixel)
    assert metrics["image_auroc"] == 1.0


def test_the_metrics_report_counts_masked_defects_and_has_no_pixel_decisions_without_masks():
    from adps.config import EvaluationParams
    from adps.evaluation.predictions import Predictions
    from adps.evaluation.reports import evaluation_report, pixel_coverage

    case = LABELLED_BY_IMAGE
    thresholds = {"image": 0.5, "pixel": 0.5}
    mixed = Predictions(**case, paths=["n", "a", "b"], masked=np.array([True, True, False]))
    report = evaluation_report(mixed, thresholds, EvaluationParams())
    assert report["n_test_anomalous"] == 2 and report["n_test_anomalous_masked"] == 1
    assert report["pixel_f1_at_threshold"] == 1.0  # only the 0.7 pixel is >= 0.5 among the masked ones
    assert report["image_recall_at_threshold"] == 1.0 and report["image_precision_at_threshold"] == 1.0
    assert (
        pixel_coverage(report)
        == "Pixel metrics over the 1 of 2 defect images that have a mask; image metrics over all."
    )
    image_only = Predictions(**case, paths=["n", "a", "b"], masked=np.array([True, False, False]))
    report = evaluation_report(image_only, thresholds, EvaluationParams())
    assert report["pixel_ap"] is None and report["pixel_f1_at_threshold"] is None and report["aupro"] is None
    assert report["n_test_anomalous_masked"] == 0 and report["image_auroc"] == 1.0
    assert pixel_coverage(report).startswith("Image metrics only: none of the 2 defect images has a mask")
