"""`prepare` is incremental: a category is rewritten only when its files change (added, changed, removed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps import stages
from adps.data.layout import save_binary_mask
from adps.errors import DatasetError
from tests.conftest import tiny_params


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), os.stat(p).st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def incoming(project: Path, category: str) -> Path:
    return project / "data" / "incoming" / category


def add_normal(project: Path, category: str, name: str, value: int = 90) -> Path:
    path = incoming(project, category) / "normal" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(path)
    return path


def test_unchanged_source_leaves_every_file_untouched(project):
    before = snapshot(project / "data" / "synthetic")
    result = stages.prepare(tiny_params())
    assert result["changed"] == [] and snapshot(project / "data" / "synthetic") == before


def test_new_images_change_only_their_category(project):
    washer = snapshot(project / "data" / "synthetic" / "washer")
    added = [add_normal(project, "fabric", f"new_{i}.png", 80 + i) for i in range(5)]
    defect = incoming(project, "fabric") / "anomalous" / "d.png"
    defect.parent.mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(defect)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:20] = True
    save_binary_mask(mask, incoming(project, "fabric") / "masks" / "d_mask.png")

    result = stages.prepare(tiny_params())
    assert result["changed"] == ["fabric"]
    assert snapshot(project / "data" / "synthetic" / "washer") == washer
    fabric = project / "data" / "synthetic" / "fabric"
    imported = {p.name for p in fabric.rglob("new_*.png")}
    assert imported == {p.name for p in added}
    assert (fabric / "test" / "anomalous" / "d.png").is_file()
    assert (fabric / "ground_truth" / "anomalous" / "d_mask.png").is_file()

    added[0].unlink()  # a removed source file leaves the dataset too
    assert stages.prepare(tiny_params())["changed"] == ["fabric"]
    assert added[0].name not in {p.name for p in fabric.rglob("new_*.png")}


def test_dropped_category_folder_is_removed(project):
    stages.prepare(tiny_params(data={"categories": ["fabric"]}))
    assert not (project / "data" / "synthetic" / "washer").exists()


def test_name_clash_with_a_generated_image_is_a_clear_error_and_keeps_the_data(project):
    before = snapshot(project / "data" / "synthetic")
    add_normal(project, "washer", "000.png")  # the generated images are 000.png, 001.png, ...
    with pytest.raises(DatasetError, match=r"000.png would replace"):
        stages.prepare(tiny_params())
    assert snapshot(project / "data" / "synthetic") == before
