"""One test per validation failure kind, through the real Great Expectations suite."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps import paths, stages
from adps.errors import DatasetError, ValidationFailed
from tests.conftest import tiny_params

DATA = Path("data/synthetic")


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def latin1_copy(path: Path, name: bytes) -> Path:
    copy = Path(os.fsdecode(bytes(path.parent) + b"/" + name))
    shutil.copy(path, copy)
    return copy


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CASES: dict[str, tuple[Callable[[], None], str, str]] = {
    "truncated": (
        lambda: truncate(DATA / "fabric/test/good/001.png"),
        "fabric/test/good/001.png",
        "image cannot be read: OSError: image file is truncated",
    ),
    "transparent": (
        lambda: save(DATA / "fabric/train/good/002.png", np.zeros((64, 64, 4), np.uint8), "RGBA"),
        "fabric/train/good/002.png",
        "image cannot be read: 4096 pixels are transparent",
    ),
    "size": (
        lambda: save(DATA / "washer/train/good/003.png", np.zeros((16, 16, 3), np.uint8)),
        "washer/train/good/003.png",
        "width outside [32, 8192] pixels",
    ),
    "mask_on_good": (
        lambda: save(DATA / "fabric/ground_truth/good/000_mask.png", np.zeros((64, 64), np.uint8)),
        "fabric/test/good/000.png",
        "a mask exists for a good image",
    ),
    "mask_size": (
        lambda: save(DATA / "washer/ground_truth/hole/000_mask.png", np.full((32, 32), 255, np.uint8)),
        "washer/test/hole/000.png",
        "mask size differs from image size",
    ),
    "mask_not_binary": (
        lambda: save(
            DATA / "washer/ground_truth/stain/000_mask.png",
            np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8),
        ),
        "washer/test/stain/000.png",
        "mask values are not binary (expected 0 and one foreground value): data/synthetic/washer/ground_truth/stain/"
        "000_mask.png is a PNG with 256 distinct values in 0..255 (8-bit): set data.mask_threshold, e.g. 127, to read "
        "defect = value > 127",
    ),
    "mask_empty": (
        lambda: save(DATA / "fabric/ground_truth/scratch/000_mask.png", np.zeros((64, 64), np.uint8)),
        "fabric/test/scratch/000.png",
        "defect mask is empty",
    ),
    "mask_corrupt": (
        lambda: (DATA / "fabric/ground_truth/hole/000_mask.png").write_bytes(b"not a png"),
        "fabric/test/hole/000.png",
        "mask cannot be read: UnidentifiedImageError",
    ),
    "special_file": (  # a named pipe is named, never opened (opening one waits for a writer)
        lambda: os.mkfifo(DATA / "fabric/test/good/pipe.png"),
        "fabric/test/good/pipe.png",
        "image cannot be read: a named pipe (FIFO), not a regular file: not opened",
    ),
    "latin1_name": (  # a name that is not UTF-8 is shown as `ls -b` shows it, in every report
        lambda: truncate(latin1_copy(DATA / "fabric/test/good/001.png", b"d\xe9faut.png")),
        "fabric/test/good/d\\xe9faut.png",
        "image cannot be read: OSError: image file is truncated",
    ),
    "defect_in_train": (
        lambda: shutil.copytree(DATA / "washer/test/crack", DATA / "washer/train/crack"),
        "washer/train/crack/000.png",
        "anomalous image in the training split",
    ),
    "test_copied_into_train": (
        lambda: shutil.copy(DATA / "fabric/test/stain/000.png", DATA / "fabric/train/good/x.png"),
        "fabric/train/good/x.png",
        "identical image in both train and test",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_failure_kind_names_the_file_and_reason_and_touches_no_data(project, case):
    corrupt, bad_file, reason = CASES[case]
    corrupt()
    before = tree_digest(DATA)
    category = bad_file.split("/")[0]
    with pytest.raises(ValidationFailed) as err:
        stages.validate(tiny_params(), category)
    matches = [f for f in err.value.failures if f["file"].endswith(bad_file)]
    assert matches, err.value.failures
    assert any(reason in f["reason"] for f in matches), matches
    assert tree_digest(DATA) == before
    assert bad_file in str(err.value)  # the message names the file, not only the report
    summary = json.loads(paths.validation_summary(tiny_params(), category).read_text())
    assert summary["success"] is False and any(f["file"].endswith(bad_file) for f in summary["failures"])
    assert bad_file in paths.validation_failures_csv(tiny_params(), category).read_text()


def test_a_site_can_narrow_modes_and_bit_depths(project):
    save(DATA / "fabric/train/good/004.png", np.zeros((64, 64), bool), "1")
    stages.validate(tiny_params(), "fabric")  # by default, every image the reader takes passes
    params = tiny_params(validation={"allowed_modes": ["1", "RGB"], "allowed_bit_depths": [8, 16]})
    with pytest.raises(ValidationFailed) as err:
        stages.validate(params, "fabric")
    assert [f["reason"] for f in err.value.failures if f["file"].endswith("004.png")] == [
        "bit depth not allowed (allowed: [8, 16])"
    ]
    with pytest.raises(ValidationFailed) as err:
        stages.validate(tiny_params(validation={"allowed_modes": ["RGB"]}), "fabric")
    assert [f["reason"] for f in err.value.failures if f["file"].endswith("004.png")] == [
        "image mode not allowed (allowed: RGB)"
    ]


def test_too_few_images_and_empty_folder_name_the_category(project):
    shutil.rmtree(DATA / "washer/train/good")
    (DATA / "washer/train/good").mkdir()
    with pytest.raises(ValidationFailed) as err:
        stages.validate(tiny_params(), "washer")
    assert {"file": "<category washer>", "check": "n_train", "reason": "fewer than 5 training images"} in (
        err.value.failures
    )


def test_missing_category_folder_is_a_clear_error_and_keeps_old_reports(project):
    stages.validate(tiny_params(), "washer")
    docs = paths.data_docs_dir(tiny_params(), "washer") / "index.html"
    assert docs.is_file()
    shutil.rmtree(DATA / "washer")
    with pytest.raises(DatasetError, match=r"category folder not found: \S*/data/synthetic/washer"):
        stages.validate(tiny_params(), "washer")
    assert docs.is_file()


def test_clean_dataset_passes_and_writes_reports(project):
    for category in ("fabric", "washer"):
        result = stages.validate(tiny_params(), category)
        assert result["success"] and result["n_images"] == 10 + 2 + 5
        summary = json.loads(paths.validation_summary(tiny_params(), category).read_text())
        assert summary["success"] and all(c["success"] for c in summary["checks"])
        assert (paths.data_docs_dir(tiny_params(), category) / "index.html").is_file()


def test_unchanged_images_give_a_byte_identical_summary(project):
    """distill@C depends on the summary: revalidating the same images must not make training stale."""
    stages.validate(tiny_params(), "fabric")
    first = paths.validation_summary(tiny_params(), "fabric").read_bytes()
    stages.validate(tiny_params(), "fabric")
    assert paths.validation_summary(tiny_params(), "fabric").read_bytes() == first
