"""Importers decide nothing validation cannot see: one mask rule for every source, every file left out named.

Real files, the real `prepare` and `validate` stages (Great Expectations), per source.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps import paths, stages
from adps.errors import ValidationFailed
from tests.conftest import tiny_params

RNG = np.random.default_rng(3)


def image(path: Path, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(60, 200, (size, size, 3), np.uint8)).save(path)
    return path


def crack_mask(path: Path, **save: object) -> np.ndarray:
    """A one-pixel-wide diagonal crack of 40 pixels, 0/255, saved as ``path`` (JPEG blurs its edges)."""
    mask = np.zeros((64, 64), np.uint8)
    mask[np.arange(10, 50), np.arange(10, 50)] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path, **save)
    return mask


def folder_source(root: Path) -> Path:
    """``root/parts/{normal,anomalous,masks}``: 10 normal images, two defects with PNG masks."""
    for i in range(10):
        image(root / "parts" / "normal" / f"n{i}.png")
    for name in ("a0", "a1"):
        image(root / "parts" / "anomalous" / f"{name}.png")
        crack_mask(root / "parts" / "masks" / f"{name}_mask.png")
    return root / "parts"


def folder_params():
    folder = {"test_normal_fraction": 0.3}
    return tiny_params(data={"source": "folder", "categories": ["parts"], "import_path": "src", "folder": folder})


def failures_of(params, category: str) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as err:
        stages.validate(params, category)
    return err.value.failures


def test_a_jpeg_mask_is_imported_unchanged_and_refused_by_validation(project):
    source = folder_source(project / "src")
    (source / "masks" / "a0_mask.png").unlink()
    truth = crack_mask(source / "masks" / "a0_mask.jpg", quality=90)
    assert len(np.unique(np.asarray(Image.open(source / "masks" / "a0_mask.jpg")))) > 2  # grey edges
    params = folder_params()
    stages.prepare(params)
    imported = paths.category_dir(params, "parts") / "ground_truth" / "anomalous" / "a0_mask.jpg"
    assert imported.read_bytes() == (source / "masks" / "a0_mask.jpg").read_bytes()  # nothing binarised
    assert (truth > 0).sum() == 40
    [failure] = failures_of(params, "parts")
    assert failure["file"] == "data/folder/parts/test/anomalous/a0.png" and failure["check"] == "mask_binary"
    assert (
        "not binary" in failure["reason"]
        and "data/folder/parts/ground_truth/anomalous/a0_mask.jpg" in (failure["reason"])
    )


def test_the_same_jpeg_mask_under_mvtec_gets_the_same_verdict(project):
    category = project / "src" / "bottle"
    for i in range(6):
        image(category / "train" / "good" / f"{i:03d}.png")
    image(category / "test" / "good" / "000.png")
    image(category / "test" / "broken" / "000.png")
    crack_mask(category / "ground_truth" / "broken" / "000_mask.jpg", quality=90)
    params = tiny_params(data={"source": "mvtec", "categories": ["bottle"], "import_path": "src"})
    stages.prepare(params)
    [failure] = failures_of(params, "bottle")
    assert failure["file"] == "data/mvtec/bottle/test/broken/000.png" and failure["check"] == "mask_binary"
    assert "ground_truth/broken/000_mask.jpg" in failure["reason"]


def test_every_file_the_folder_importer_leaves_out_is_named(project):
    source = folder_source(project / "src")
    crack_mask(source / "masks" / "ghost_mask.png")  # pairs no image: blocks
    Image.new("RGB", (64, 64)).save(source / "normal" / "n10.ppm")  # an image format not imported: blocks
    image(source / "normal" / "nested" / "n11.png")  # a subfolder: blocks
    (source / "normal" / "notes.txt").write_text("shift 2")  # not an image: named only
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(source / "masks" / "n0_mask.png")  # empty mask of a normal
    params = folder_params()
    result = stages.prepare(params)
    left_out = {Path(r["file"]).name: r for r in result["not_imported"]["parts"]}
    assert set(left_out) == {"ghost_mask.png", "n10.ppm", "nested", "notes.txt", "n0_mask.png"}
    assert {n for n, r in left_out.items() if r["blocking"] == "true"} == {"ghost_mask.png", "n10.ppm", "nested"}
    failures = {Path(f["file"]).name: f["reason"] for f in failures_of(params, "parts")}
    assert set(failures) == {"ghost_mask.png", "n10.ppm", "nested"}
    assert "mask of no anomalous image" in failures["ghost_mask.png"]
    assert "image format .ppm is not imported" in failures["n10.ppm"]
    (source / "masks" / "ghost_mask.png").unlink()
    (source / "normal" / "n10.ppm").unlink()
    (source / "normal" / "nested" / "n11.png").unlink()
    (source / "normal" / "nested").rmdir()
    stages.prepare(params)
    assert stages.validate(params, "parts")["not_imported"] == [
        "src/parts/masks/n0_mask.png: empty mask of the normal image n0.png: normal images need none",
        "src/parts/normal/notes.txt: not an image file",
    ]
    summary = json.loads(paths.validation_summary(params, "parts").read_text())
    assert len(summary["not_imported"]) == 2 and summary["success"]


def test_a_defect_mask_on_a_normal_image_and_two_images_sharing_a_mask_are_named(project):
    source = folder_source(project / "src")
    crack_mask(source / "masks" / "n1_mask.png")  # says n1 has a defect, but n1 sits in normal/
    image(source / "anomalous" / "a0.jpg")  # a0.png and a0.jpg would share a0_mask
    params = folder_params()
    stages.prepare(params)
    failures = {(Path(f["file"]).name, f["check"]): f["reason"] for f in failures_of(params, "parts")}
    assert "n1.png is in the normal folder" in failures[("n1_mask.png", "used")]
    assert "a0.jpg and a0.png share one mask name" in failures[("a0.jpg", "used")]


def test_files_in_the_layout_that_nothing_uses_are_named(project):
    gt = project / "data" / "synthetic" / "fabric" / "ground_truth" / "crack"
    (gt / "000_mask.png").rename(gt / "000.png")  # a mask named without _mask
    image(project / "data" / "synthetic" / "fabric" / "test" / "crack" / "deeper" / "x.png")
    failures = {f["file"]: f["reason"] for f in failures_of(tiny_params(), "fabric")}
    assert "a mask's name must end in _mask" in failures["data/synthetic/fabric/ground_truth/crack/000.png"]
    assert "not in the dataset layout" in failures["data/synthetic/fabric/test/crack/deeper/x.png"]
    assert "data/synthetic/fabric/test/crack/000.png" not in failures  # without its mask: labelled by image only


def test_links_in_a_source_folder_are_imported_as_files_and_broken_ones_named(project):
    source = folder_source(project / "src")
    (source / "normal" / "again.png").symlink_to("n1.png")  # a relative link: its file is imported
    (source / "normal" / "gone.png").symlink_to("missing.png")
    params = folder_params()
    stages.prepare(params)
    imported = next(paths.category_dir(params, "parts").rglob("again.png"))
    assert not imported.is_symlink() and imported.read_bytes() == (source / "normal" / "n1.png").read_bytes()
    failures = {Path(f["file"]).name: f["reason"] for f in failures_of(params, "parts")}
    assert set(failures) == {"gone.png"} and "a link to a file that does not exist" in failures["gone.png"]
    (source / "normal" / "gone.png").unlink()
    assert stages.prepare(params)["changed"] == ["parts"]  # the link's removal is seen
    assert stages.validate(params, "parts")["success"]


def kolektor_source(root: Path) -> Path:
    """KolektorSDD2 layout: 6 normal and 1 defect image per split, each with its _GT mask."""
    for split in ("train", "test"):
        for i in range(7):
            image(root / split / f"{i}.png")
            mask = np.zeros((64, 64), np.uint8)
            mask[5:9, 5:9] = 255 if i == 6 else 0
            Image.fromarray(mask).save(root / split / f"{i}_GT.png")
    return root


def test_kolektor_names_what_it_leaves_out_and_holds_back_an_unreadable_mask(project):
    source = kolektor_source(project / "src")
    params = tiny_params(data={"source": "kolektor", "categories": ["ksdd"], "import_path": "src"})
    rows = stages.prepare(params)["not_imported"]["ksdd"]
    assert len(rows) == 6 + 2 + 6  # train: 6 empty masks, the defect and its mask; test: 6 empty masks
    left_out = {r["file"]: r for r in rows}
    assert left_out["src/train/6.png"]["blocking"] == "false"
    assert "training uses normal images only" in left_out["src/train/6.png"]["reason"]
    assert "empty mask of a normal image" in left_out["src/test/0_GT.png"]["reason"]
    stages.validate(params, "ksdd")
    (source / "train" / "5_GT.png").write_bytes((source / "train" / "5_GT.png").read_bytes()[:40])
    stages.prepare(params)
    failures = {Path(f["file"]).name: f["reason"] for f in failures_of(params, "ksdd")}
    assert "5.png" in failures and "its mask cannot be read" in failures["5.png"]
