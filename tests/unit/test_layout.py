from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps.data.images import read_mask
from adps.data.layout import (
    FolderSet,
    build_sample_index,
    import_folder_category,
    import_kolektor,
    import_mvtec_category,
    normal_split,
)
from adps.errors import DatasetError


def png(path: Path, value: int = 128, size: int = 40, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path)
    return path


def mask_png(path: Path, box: bool, size: int = 40, on: int = 255) -> Path:
    arr = np.zeros((size, size), np.uint8)
    if box:
        arr[5:15, 5:15] = on
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)
    return path


def make_mvtec(root: Path) -> Path:
    cat = root / "bottle"
    for i in range(3):
        png(cat / "train" / "good" / f"{i:03d}.png", 100 + i)
    png(cat / "test" / "good" / "000.png")
    png(cat / "test" / "broken" / "000.png")
    mask_png(cat / "ground_truth" / "broken" / "000_mask.png", True)
    png(cat / "test" / "broken" / "001.png")  # no mask on purpose
    return cat


def test_mvtec_sample_index(tmp_path):
    cat = make_mvtec(tmp_path)
    samples = build_sample_index(cat, "bottle")
    assert len(samples) == 6
    by_name = {(s.split, s.defect_type, s.image_path.name): s for s in samples}
    broken = by_name[("test", "broken", "000.png")]
    assert broken.label == 1 and broken.mask_path == cat / "ground_truth" / "broken" / "000_mask.png"
    assert by_name[("test", "broken", "001.png")].mask_path is None
    assert all(s.label == 0 for s in samples if s.defect_type == "good")


def test_missing_category_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"category folder not found: .*nope.*adps prepare"):
        build_sample_index(tmp_path / "nope", "nope")


def test_mvtec_import_copies_the_tree(tmp_path):
    make_mvtec(tmp_path / "src")
    import_mvtec_category(tmp_path / "src", "bottle", tmp_path / "dst")
    assert len(build_sample_index(tmp_path / "dst", "bottle")) == 6
    with pytest.raises(DatasetError, match="MVTec category not found"):
        import_mvtec_category(tmp_path / "src", "cable", tmp_path / "dst2")


def test_kolektor_import(tmp_path):
    src = tmp_path / "ksdd2"
    for split in ("train", "test"):
        png(src / split / "10.png")
        mask_png(src / split / "10_GT.png", False)
        png(src / split / "11.png", 60)
        mask_png(src / split / "11_GT.png", True, on=1)  # non-0/255 foreground is fine
    skipped = import_kolektor(src, tmp_path / "out")
    samples = build_sample_index(tmp_path / "out", "ksdd2")
    train = [s for s in samples if s.split == "train"]
    assert [s.image_path.name for s in train] == ["10.png"]  # defective training image left out, and named:
    assert sorted((e.source.parent.name, e.source.name, e.blocking) for e in skipped) == [
        ("test", "10_GT.png", False),  # the empty masks of normal images
        ("train", "10_GT.png", False),
        ("train", "11.png", False),
        ("train", "11_GT.png", False),
    ]
    defect = next(s for s in samples if s.label == 1)
    assert defect.image_path.name == "11.png" and read_mask(defect.mask_path).sum() == 100
    assert defect.mask_path.read_bytes() == (src / "test" / "11_GT.png").read_bytes()  # the mask as given


def test_kolektor_missing_gt_names_the_file(tmp_path):
    png(tmp_path / "train" / "1.png")
    with pytest.raises(DatasetError, match=r"1_GT.png"):
        import_kolektor(tmp_path, tmp_path / "out")


def import_from(root: Path, test_normal_fraction: float) -> list:
    """The folder importer on ``root/{normal,anomalous,masks}`` into ``root/out``."""
    return import_folder_category(
        FolderSet(root / "normal", root / "anomalous", root / "masks", "_mask"),
        root / "out",
        test_normal_fraction=test_normal_fraction,
        seed=0,
    )


def test_folder_import(tmp_path):
    for i in range(10):
        png(tmp_path / "normal" / f"n{i}.png", 100 + i)
    png(tmp_path / "anomalous" / "a0.png")
    mask_png(tmp_path / "masks" / "a0_mask.png", True)
    png(tmp_path / "anomalous" / "a1.png")  # no mask: left for validation to report
    import_from(tmp_path, 0.2)
    samples = build_sample_index(tmp_path / "out", "c")
    expected = {f"n{i}.png": normal_split(f"n{i}.png", 0, 0.2) for i in range(10)}
    assert {s.image_path.name: s.split for s in samples if s.label == 0} == expected
    assert set(expected.values()) == {"train", "test"}
    anomalous = {s.image_path.name: s for s in samples if s.label == 1}
    assert anomalous["a0.png"].mask_path is not None and anomalous["a1.png"].mask_path is None


def test_normal_split_is_per_name_so_new_images_move_no_old_one():
    names = [f"img_{i}.png" for i in range(2000)]
    splits = {name: normal_split(name, 3, 0.2) for name in names}
    assert 0.17 < sum(s == "test" for s in splits.values()) / len(names) < 0.23
    assert {name: normal_split(name, 3, 0.2) for name in names[:100]} == {n: splits[n] for n in names[:100]}
    assert normal_split("a.png", 3, 0.0) == "train"


def test_folder_import_refuses_to_overwrite_an_imported_file(tmp_path):
    png(tmp_path / "normal" / "x.png")
    png(tmp_path / "out" / "train" / "good" / "x.png", 5)
    png(tmp_path / "out" / "test" / "good" / "x.png", 5)
    with pytest.raises(DatasetError, match=r"x.png would replace .*rename one"):
        import_from(tmp_path, 0.2)


def test_folder_import_copies_an_undecodable_mask_for_validation_to_name(tmp_path):
    png(tmp_path / "normal" / "n.png")
    png(tmp_path / "anomalous" / "a.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a_mask.png").write_bytes(b"not a png")
    import_from(tmp_path, 0.0)
    assert (tmp_path / "out" / "ground_truth" / "anomalous" / "a_mask.png").read_bytes() == b"not a png"


def test_folder_import_without_normals_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"no normal images in .*normal"):
        import_from(tmp_path, 0.2)
