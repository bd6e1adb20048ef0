"""The embedded dataset must not be trivially easy: the naive baseline's mean pixel AP stays < 0.6."""

from adps.config import Params
from adps.data.embedded import generate_category
from adps.data.layout import build_sample_index
from adps.evaluation.naive import naive_baseline_scores


def test_naive_baseline_mean_pixel_ap_below_bound_on_default_dataset(tmp_path):
    params = Params()  # the default dataset: same sizes and counts as params.yaml
    aps = []
    for category in params.data.categories:
        generate_category(category, params.synthetic, params.runtime.seed, tmp_path / category)
        scores = naive_baseline_scores(build_sample_index(tmp_path / category, category), params.data.image_size)
        aps.append(scores["pixel_ap"])
    assert 0.0 < sum(aps) / len(aps) < 0.6
