"""The benchmark scripts keep working (tiny sizes; their numbers are reported in the README, not asserted)."""

from benchmarks.ablation import ablation_table
from benchmarks.cost import cost_table, measure
from tests.conftest import REPO_ROOT


def test_cost_benchmark_measures_every_step():
    timings = measure(str(REPO_ROOT / "params.yaml"), batch_size=2, size=64, repeats=1)
    plain = {f"{net}_{kind}_s" for net in ("backbone", "resnet18") for kind in ("train", "infer")}
    assert set(timings) == plain | {"distill_train_s", "psm_train_s", "adps_infer_s"}
    table = cost_table(timings, "efficientnet_lite0")
    both = timings["distill_train_s"] + timings["psm_train_s"]
    ratio = both / timings["backbone_train_s"]
    assert f"| ADPS training, both stages per batch | {both:.3f} | {ratio:.2f} |" in table


def test_ablation_table_has_a_mean_row():
    row = {"pixel_ap": 0.5, "image_auroc": 0.9}
    other = {"pixel_ap": 0.25, "image_auroc": 0.75}
    results = {"adps": {"a": row, "a/no_wmb_psm": row}, "symmetric": {"a": other}}
    table = ablation_table(results, ["a"])
    assert "symmetric k=1 pixel AP" in table and "k=8" not in table
    assert "| a | 0.500 | 0.900 | 0.500 | 0.900 | 0.250 | 0.750 |" in table and "| mean |" in table
