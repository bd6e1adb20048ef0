"""The benchmark scripts keep working (tiny sizes; their numbers are reported in the README, not asserted)."""

from benchmarks.ablation import ablation_table
from benchmarks.cost import cost_table, measure
from tests.conftest import REPO_ROOT


def test_cost_benchmark_measures_every_step():
    timings = measure(str(REPO_ROOT / "params.yaml"), batch_size=2, size=64, repeats=1)
    plain = {f"{net}_{kind}_s" for net in ("backbone", "resnet18") for kind in ("train", "infer")}
    kinds = ("adps", "memory_bank", "adps+memory_bank")
    steps = {"distill_train_s", "psm_train_s", "bank_build_s", *(f"{k}_infer_s" for k in kinds)}
    assert set(timings) == plain | steps | {"backbone_mb", *(f"{k}_mb" for k in kinds)}
    table = cost_table(timings, "efficientnet_lite0")
    both = timings["distill_train_s"] + timings["psm_train_s"]
    ratio = both / timings["backbone_train_s"]
    assert f"| ADPS training, both stages per batch | {both:.3f} | {ratio:.2f} |" in table
    # the combination holds both parts; the bank alone has no student or PSM
    assert timings["memory_bank_mb"] < timings["adps_mb"] < timings["adps+memory_bank_mb"]
    assert f"| kind memory_bank | {timings['memory_bank_mb']:.1f} |" in table


def test_ablation_table_has_a_mean_row():
    row = {"pixel_ap": 0.5, "image_auroc": 0.9}
    other = {"pixel_ap": 0.25, "image_auroc": 0.75}
    results = {"adps": {"a": row, "a/no_wmb_psm": row}, "symmetric": {"a": other}}
    table = ablation_table(results, ["a"])
    assert "symmetric k=1 pixel AP" in table and "k=8" not in table
    assert "| a | 0.500 | 0.900 | 0.500 | 0.900 | 0.250 | 0.750 |" in table and "| mean |" in table


def test_the_elpv_split_is_seeded_disjoint_and_leaves_out_uncertain_labels(tmp_path):
    from benchmarks.elpv import split_cells, write_source

    labels = [(tmp_path / f"n{i}.png", 0.0, "mono") for i in range(30)]
    labels += [(tmp_path / f"d{i}.png", 1.0, "mono") for i in range(12)]
    labels += [(tmp_path / f"u{i}.png", 1 / 3, "mono") for i in range(5)] + [(tmp_path / "p.png", 0.0, "poly")]
    split = split_cells(labels, "mono", n_train=20, n_test=6, seed=0)
    assert [len(split[k]) for k in ("train/good", "test/good", "test/defect")] == [20, 6, 6]
    assert not set(split["train/good"]) & set(split["test/good"])
    assert all(p.name.startswith("n") for p in split["train/good"] + split["test/good"])  # p = 0 mono only
    assert all(p.name.startswith("d") for p in split["test/defect"])  # p = 1 only, never 1/3
    assert split == split_cells(labels, "mono", n_train=20, n_test=6, seed=0)
    assert split != split_cells(labels, "mono", n_train=20, n_test=6, seed=1)
    for path, _, _ in labels:
        path.touch()
    write_source(tmp_path / "source", {"mono": split})
    assert len(list((tmp_path / "source/mono/test/defect").iterdir())) == 6
    assert not (tmp_path / "source/mono/ground_truth").exists()  # labels by image only


def test_tiles_cover_the_image_and_average_where_they_overlap():
    """A stand-in model whose map is the tile's own pixel value: averaged tiles give back the image."""
    import torch

    from benchmarks.native import tiled_map

    class Echo(torch.nn.Module):
        def forward(self, image):
            return type("Out", (), {"anomaly_map": image[:, :1]})()

    image = torch.rand(1, 3, 70, 150)
    torch.testing.assert_close(tiled_map(Echo(), image, 32), image[0, 0])
