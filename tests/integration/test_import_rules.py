"""Importers decide nothing validation cannot see: one mask rule for every source, every file left out named.

Real files, the real `prepare` and `validate` stages (Great Expectations), per source.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps import paths, stages
from adps.errors import AdpsError, ValidationFailed
from adps.production.review import check_mask
from benchmarks import import_check
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
    assert "is a JPEG with" in failure["reason"] and "JPEG compression greys a mask's edges" in failure["reason"]


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


def noisy_mask(path: Path) -> np.ndarray:
    """A 64 x 64 PNG mask as published with compression noise: background (x + y) % 100 (values 0..99), the
    defect rows 20..24 x columns 10..19 at 200 + x % 10 (200..209): 100 + 10 = 110 distinct values in 0..209.
    With data.mask_threshold 127 exactly the defect is > 127: 5 rows x 10 columns = 50 pixels."""
    y, x = np.mgrid[0:64, 0:64]
    mask = ((x + y) % 100).astype(np.uint8)
    mask[20:25, 10:20] = 200 + x[20:25, 10:20] % 10
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return mask


def with_data(params, **data):
    return params.model_copy(update={"data": params.data.model_copy(update=data)})


def test_a_noisy_png_mask_is_refused_by_name_and_imported_with_mask_threshold(project):
    source = folder_source(project / "src")
    noisy_mask(source / "masks" / "a0_mask.png")
    params = folder_params()
    stages.prepare(params)
    [failure] = failures_of(params, "parts")
    assert failure["check"] == "mask_binary"
    assert "a0_mask.png is a PNG with 110 distinct values in 0..209 (8-bit)" in failure["reason"]
    assert "set data.mask_threshold, e.g. 127, to read defect = value > 127" in failure["reason"]
    assert "JPEG" not in failure["reason"]  # the JPEG advice is for JPEG masks only
    threshold = with_data(params, mask_threshold=127)
    assert stages.prepare(threshold)["changed"] == ["parts"]
    folder = paths.category_dir(params, "parts")
    written = np.asarray(Image.open(folder / "ground_truth" / "anomalous" / "a0_mask.png"))
    assert set(np.unique(written)) == {0, 255} and (written == 255).sum() == 50
    assert (written[20:25, 10:20] == 255).all()
    manifest = json.loads((folder / "masks.json").read_text())
    assert manifest["mask_threshold"] == 127 and set(manifest["masks"]) == {
        "ground_truth/anomalous/a0_mask.png",
        "ground_truth/anomalous/a1_mask.png",  # the 0/255 crack, rewritten by the same rule: 40 pixels
    }
    assert manifest["masks"]["ground_truth/anomalous/a0_mask.png"] == "src/parts/masks/a0_mask.png (value > 127)"
    assert stages.validate(threshold, "parts")["success"]
    assert stages.prepare(threshold)["changed"] == []  # deterministic: the same bytes, nothing swapped


def test_the_mask_threshold_is_the_same_rule_for_mvtec_and_kolektor(project):
    category = project / "src" / "bottle"
    for i in range(6):
        image(category / "train" / "good" / f"{i:03d}.png")
    image(category / "test" / "good" / "000.png")
    image(category / "test" / "broken" / "000.png")
    noisy_mask(category / "ground_truth" / "broken" / "000_mask.png")
    params = tiny_params(
        data={"source": "mvtec", "categories": ["bottle"], "import_path": "src", "mask_threshold": 127}
    )
    stages.prepare(params)
    written = np.asarray(Image.open(paths.category_dir(params, "bottle") / "ground_truth/broken/000_mask.png"))
    assert (written == 255).sum() == 50 and stages.validate(params, "bottle")["success"]
    ksdd = kolektor_source(project / "ksdd")
    noisy_mask(ksdd / "test" / "6_GT.png")
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(ksdd / "test" / "5_GT.png")  # noise only: 90 <= 127
    kolektor = tiny_params(
        data={"source": "kolektor", "categories": ["ksdd"], "import_path": "ksdd", "mask_threshold": 127}
    )
    stages.prepare(kolektor)
    folder = paths.category_dir(kolektor, "ksdd")
    assert (folder / "test" / "good" / "5.png").is_file()  # normal by the rule: no value above 127
    assert (np.asarray(Image.open(folder / "ground_truth/defect/6_mask.png")) == 255).sum() == 50


def test_an_empty_defect_mask_is_kept_labelled_by_image_only_or_refused(project):
    source = folder_source(project / "src")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(source / "masks" / "a1_mask.png")  # label noise
    params = folder_params()
    rows = stages.prepare(params)["not_imported"]["parts"]
    assert rows == [
        {
            "file": "src/parts/masks/a1_mask.png",
            "reason": "mask marks no pixel: a1.png is kept as a defect labelled by image only "
            "(data.empty_defect_mask: image_label; image metrics use it, pixel metrics leave it out)",
            "blocking": "false",
        }
    ]
    result = stages.validate(params, "parts")
    assert result["defects_without_mask"].startswith("1 of 2 defect images have no mask")
    assert "src/parts/masks/a1_mask.png: mask marks no pixel" in result["not_imported"][0]
    refuse = with_data(params, empty_defect_mask="refuse")
    stages.prepare(refuse)
    [failure] = failures_of(refuse, "parts")
    assert failure["file"].endswith("test/anomalous/a1.png") and failure["check"] == "mask_nonempty"
    assert "defect mask is empty" in failure["reason"]


def polygon(points: list[list[float]], kind: str = "polygon") -> dict:
    return {"label": "pitting", "points": points, "shape_type": kind, "group_id": None, "flags": {}}


def labelme_file(path: Path, image_name: str, shapes: list[dict], size: tuple[int, int] = (64, 64)) -> None:
    doc = {"shapes": shapes, "imagePath": image_name, "imageWidth": size[0], "imageHeight": size[1]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def bsdata_like(root: Path) -> Path:
    """BSData's layout in small: ``data/`` holds every image, ``label/`` a labelme file per annotated image."""
    for name in [f"n{i}" for i in range(12)] + ["d0", "d1"]:
        image(root / "data" / f"{name}.jpg")
    # d0: rectangle polygon (10,20)-(29,24): columns 10..29 (20) x rows 20..24 (5) = 100 pixels.
    labelme_file(root / "label" / "d0.json", "d0.jpg", [polygon([[10, 20], [29, 20], [29, 24], [10, 24]])])
    # d1: circle centre (30, 30) through (30, 32): radius 2, 13 lattice points (see tests/unit/test_annotations.py).
    labelme_file(root / "label" / "d1.json", "..\\data\\d1.jpg", [polygon([[30, 30], [30, 32]], "circle")])
    labelme_file(root / "label" / "n0.json", "n0.jpg", [])  # annotated, nothing marked: normal
    (root / "data" / "BSD" / "test").mkdir(parents=True)
    shutil.copy(root / "data" / "n1.jpg", root / "data" / "BSD" / "test")  # a stray copy, as BSData has
    return root


def test_a_bsdata_like_folder_splits_by_labelme_annotations(project):
    """One folder of images and a label folder of labelme files (BSData's layout): annotated = defect."""
    bsdata_like(project / "src" / "bsd")
    folder = {"normal": "data", "anomalous": "data", "masks": "label", "test_normal_fraction": 0.3}
    params = tiny_params(data={"source": "folder", "categories": ["bsd"], "import_path": "src", "folder": folder})
    rows = stages.prepare(params)["not_imported"]["bsd"]
    assert rows == [
        {
            "file": "src/bsd/data/BSD",
            "reason": "a subfolder holding only copies of files in the folder (same bytes): not read",
            "blocking": "false",
        },
        {
            "file": "src/bsd/label/n0.json",
            "reason": "labelme marks no pixel: n0.jpg is normal (normal images need none)",
            "blocking": "false",
        },
    ]
    dataset = paths.category_dir(params, "bsd")
    assert sorted(p.name for p in (dataset / "test" / "anomalous").iterdir()) == ["d0.jpg", "d1.jpg"]
    assert len(list(dataset.glob("*/good/*.jpg"))) == 12
    masks = {p.name: (np.asarray(Image.open(p)) == 255).sum() for p in (dataset / "ground_truth/anomalous").iterdir()}
    assert masks == {"d0_mask.png": 100, "d1_mask.png": 13}
    manifest = json.loads((dataset / "masks.json").read_text())["masks"]
    assert manifest["ground_truth/anomalous/d0_mask.png"] == "src/bsd/label/d0.json (labelme: 1 region drawn)"
    assert stages.validate(params, "bsd")["success"]
    assert stages.prepare(params)["changed"] == []  # the same annotations draw the same bytes


def test_coco_and_label_studio_files_give_the_masks_of_anomalous_images(project):
    source = folder_source(project / "src")
    for name in ("a0", "a1"):
        (source / "masks" / f"{name}_mask.png").unlink()
    coco = {
        "images": [{"id": 1, "file_name": "a0.png", "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "iscrowd": 0, "segmentation": [[10, 20, 29, 20, 29, 24, 10, 24]]}],
    }
    (source / "masks" / "coco.json").write_text(json.dumps(coco))  # (10,20)-(29,24): 20 x 5 = 100 pixels
    # Percent of 64 px: x 25% -> 16, 50% -> 32; y 25% -> 16, 37.5% -> 24: columns 16..32 (17) x rows 16..24 (9) = 153.
    result = {
        "type": "polygonlabels",
        "original_width": 64,
        "original_height": 64,
        "value": {"points": [[25, 25], [50, 25], [50, 37.5], [25, 37.5]], "polygonlabels": ["d"]},
    }
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/0a1b2c3d-a1.png"}, "annotations": [{"result": [result]}]}]
    (source / "masks" / "export.json").write_text(json.dumps(tasks))
    params = folder_params()
    stages.prepare(params)
    gt = paths.category_dir(params, "parts") / "ground_truth" / "anomalous"
    assert {p.name: (np.asarray(Image.open(p)) == 255).sum() for p in gt.iterdir()} == {
        "a0_mask.png": 100,
        "a1_mask.png": 153,
    }
    assert stages.validate(params, "parts")["success"]


def test_annotations_that_cannot_be_drawn_name_the_file_and_the_entry(project):
    source = folder_source(project / "src")
    (source / "masks" / "a0_mask.png").unlink()
    (source / "masks" / "a1_mask.png").unlink()
    labelme_file(source / "masks" / "a0.json", "a0.png", [polygon([[1, 1], [9, 9]], "line")])
    labelme_file(source / "masks" / "a1.json", "a1.png", [polygon([[1, 1], [9, 1], [9, 9]])], size=(64, 48))
    labelme_file(source / "masks" / "ghost.json", "ghost.png", [polygon([[1, 1], [9, 1], [9, 9]])])
    params = folder_params()
    stages.prepare(params)
    failures = {Path(f["file"]).name: f["reason"] for f in failures_of(params, "parts")}
    assert set(failures) == {"a0.json", "a1.json", "ghost.json"}
    assert "labelme shapes[0] (line): shape type 'line' is not read" in failures["a0.json"]
    assert "states the image is 64 x 48 px, the image is 64 x 64 px" in failures["a1.json"]
    assert "annotates ghost.png, which is not in normal or anomalous" in failures["ghost.json"]


def prepare_within(params, seconds: float = 60) -> dict:
    """``stages.prepare`` in a thread: a FIFO opened by mistake would block it, never the test run."""
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(stages.prepare(params)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "prepare hangs: a special file was opened"
    return outcome


def test_a_latin1_name_and_special_files_in_a_source_folder(project):
    source = folder_source(project / "src")
    latin1 = Path(os.fsdecode(bytes(source / "normal") + b"/d\xe9faut.png"))
    image(latin1)
    os.mkfifo(source / "normal" / "pipe.png")
    os.mkfifo(source / "masks" / "a0_mask.png.json")
    params = folder_params()
    rows = {r["file"]: r for r in prepare_within(params)["not_imported"]["parts"]}
    assert rows["src/parts/normal/pipe.png"]["reason"] == "a named pipe (FIFO), not a regular file: not read"
    assert rows["src/parts/normal/pipe.png"]["blocking"] == "true"
    assert "a named pipe" in rows["src/parts/masks/a0_mask.png.json"]["reason"]
    imported = paths.category_dir(params, "parts")
    assert any(p.name == latin1.name for p in imported.glob("*/good/*"))  # imported under its own bytes
    failures = {f["file"]: f["reason"] for f in failures_of(params, "parts")}
    assert "a named pipe (FIFO)" in failures["src/parts/normal/pipe.png"]
    (source / "normal" / "pipe.png").unlink()
    (source / "masks" / "a0_mask.png.json").unlink()
    prepare_within(params)
    assert stages.validate(params, "parts")["success"]
    metadata = paths.validation_metadata_csv(params, "parts").read_text(encoding="utf-8")
    assert "d\\xe9faut.png" in metadata  # shown as `ls -b` shows it


def test_a_reviewers_mask_is_read_by_the_same_rule(tmp_path):
    mask = tmp_path / "m.png"
    noisy_mask(mask)
    with pytest.raises(AdpsError, match=r"is not binary: it is a PNG with 110 distinct values in 0\.\.209 \(8-bit\)"):
        check_mask(mask, (64, 64))
    check_mask(mask, (64, 64), 127)  # 50 pixels above 127: what prepare will import
    with pytest.raises(AdpsError, match=r"marks no pixel above data.mask_threshold \(210\)"):  # the largest is 209
        check_mask(mask, (64, 64), 210)
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(AdpsError, match="is a named pipe"):
        check_mask(tmp_path / "pipe.png", (64, 64))


def test_the_import_check_counts_what_it_imported(tmp_path, capsys):
    source = bsdata_like(tmp_path / "BSData")
    code = import_check.main(
        [
            str(source),
            "--normal",
            "data",
            "--anomalous",
            "data",
            "--masks",
            "label",
            "--set",
            "validation.min_train=5",
            "--out",
            str(tmp_path / "project"),
        ]
    )
    counts = json.loads(capsys.readouterr().out)
    assert code == 0 and counts["validation"] == "passed"
    assert counts["normal_train"] + counts["normal_test"] == 12 and counts["defect"] == 2  # n0..n11, d0, d1
    assert counts["defect_with_mask"] == counts["masks_written"] == counts["regions_drawn"] == 2


@pytest.mark.skipif(not os.environ.get("ADPS_BSDATA"), reason="ADPS_BSDATA: a local clone of github.com/2Obe/BSData")
def test_bsdata_as_published_imports_and_validates(tmp_path):
    """The real set (CC BY-SA 4.0, never committed): 1104 images, 394 labelme files with 485 pitting polygons."""
    folder = {"normal": "data", "anomalous": "data", "masks": "label"}
    counts = import_check.check(Path(os.environ["ADPS_BSDATA"]), tmp_path / "project", folder, [])
    assert counts["validation"] == "passed"
    assert counts["normal_train"] + counts["normal_test"] == 710
    assert counts["defect"] == counts["defect_with_mask"] == counts["masks_written"] == 394
    assert counts["regions_drawn"] == 485
