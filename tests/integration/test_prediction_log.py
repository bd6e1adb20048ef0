"""The prediction log and the review queue, with a real SQLite store (PostgreSQL: tests/e2e/test_production.py).

Every prediction becomes one row; a store that is down loses rows, never predictions; flagged inputs
wait in the review queue with their heatmaps; a verdict moves an image where ``prepare`` imports it.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps import stages
from adps.config import load_params
from adps.data import layout
from adps.errors import AdpsError
from adps.inference import ImageSource, Predictor, TorchEngine, predict_to_folder
from adps.production.log import LogSettings, PredictionLog, read_rows
from adps.production.review import REVIEWED_PREFIX, IncomingFolders, ReviewQueue
from adps.tracking.lineage import data_manifest, reviewed_line
from adps.training.checkpoints import build_model, model_spec
from tests.conftest import tiny_params
from tests.servers import free_port

SHA = "ab" * 32


def untrained_predictor(threshold: float = 0.5) -> Predictor:
    """A fixed, untrained tiny model (no training needed to test what is recorded)."""
    import torch

    torch.manual_seed(0)
    params = tiny_params(model={"kind": "adps"})
    spec = model_spec(params)
    engine = TorchEngine(build_model(spec).eval(), spec, params.score.model_dump(), "cpu")
    return Predictor(engine, {"image": threshold, "pixel": 0.5, "score": params.score.model_dump(),
                              "category": "washer", "checkpoint_sha256": SHA})  # fmt: skip


def settings(tmp_path: Path, url: str | None = None, **kw) -> LogSettings:
    kw = {"keep_flagged": True, "keep_passed_fraction": 0.0, "keep_max_bytes": 2**30, **kw}
    return LogSettings(url or f"sqlite:///{tmp_path / 'predictions.db'}", tmp_path / "review", **kw)


@pytest.fixture
def images(tiny_dataset_master, tmp_path) -> Path:
    """Six washer test images and one file that is not an image."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i, path in enumerate(sorted((tiny_dataset_master / "washer").rglob("test/*/*.png"))[:6]):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_every_prediction_is_one_row_with_its_input_decision_and_features(images, tmp_path):
    predictor = untrained_predictor()
    scores = [r.score for r in predictor.predict_paths(sorted(images.glob("[0-9].png")))]
    predictor.thresholds["image"] = float(np.median(scores))  # three of six flagged
    log = PredictionLog(settings(tmp_path), "predict", "models/washer")
    summary = predict_to_folder(predictor, images, tmp_path / "out", log=log)

    rows = read_rows(log.settings.url)
    assert summary["log"] == {"logged": 7, "lost": 0, "kept": 3, "not_kept": 0} and len(rows) == 7
    by_name = {Path(r["input_name"]).name: r for r in rows}
    broken = by_name.pop("broken.png")
    assert broken["error"] and broken["score"] is None and broken["psm_sha256"] == SHA
    for name, row in by_name.items():
        assert row["input_sha256"] == hashlib.sha256((images / name).read_bytes()).hexdigest()
        assert (row["width"], row["height"]) == (64, 64) and row["category"] == "washer"
        assert row["is_anomalous"] == (row["score"] >= row["threshold"]) and row["error"] == ""
        assert len(np.frombuffer(row["features"], np.float16)) == 112  # Lite0's deepest level
        assert 0 < row["brightness"] < 1 and row["contrast"] > 0 and row["sharpness"] > 0
        assert bool(row["kept"]) == row["is_anomalous"]
    items = ReviewQueue(tmp_path / "review").items("washer")
    assert sorted(i["id"] for i in items) == sorted(r["kept"] for r in by_name.values() if r["kept"])
    for item in items:
        assert (
            Path(item["heatmap"]).is_file()
            and Path(item["image"]).read_bytes() == (images / Path(item["input_name"]).name).read_bytes()
        )


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////nonexistent-folder/predictions.db",
        "postgresql+psycopg://adps@127.0.0.1:{port}/adps",
        "postgresql://bob:p@ss:w0rd@127.0.0.1:1/db",  # a password with ':' and '@': the URL does not parse
    ],
    ids=["sqlite-folder-missing", "postgres-not-running", "url-that-does-not-parse"],
)
def test_a_store_that_is_down_loses_rows_not_predictions(images, tmp_path, url, caplog):
    predictor = untrained_predictor()
    log = PredictionLog(settings(tmp_path, url.format(port=free_port())), "predict", "models/washer")
    sources = [ImageSource(str(p), path=p) for p in sorted(images.glob("*.png"))]
    results = predictor.predict_batch(sources)
    started = time.perf_counter()
    log.record(results, sources, predictor.thresholds)
    assert time.perf_counter() - started < 0.5  # the prediction never waits for the store
    summary = predict_to_folder(predictor, images, tmp_path / "out", log=log)
    assert summary["n_images"] == 7 and (tmp_path / "out/predictions.csv").is_file()
    assert log.flush(30) and log.counts["logged"] == 0 and log.counts["lost"] == 14
    assert "rows not recorded" in caplog.text and "the predictions were answered" in caplog.text
    assert "w0rd" not in caplog.text and "p@ss" not in caplog.text


def test_a_store_that_hangs_delays_predict_by_the_flush_timeout_at_most(images, tmp_path, caplog):
    """A server that accepts connections and never answers: the rows are counted lost after 5 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql+psycopg://adps@127.0.0.1:{silent.getsockname()[1]}/adps"
        log = PredictionLog(settings(tmp_path, url), "predict", "models/washer")
        started = time.perf_counter()
        summary = predict_to_folder(untrained_predictor(), images, tmp_path / "out", log=log)
        assert time.perf_counter() - started < 20 and summary["n_images"] == 7
        assert summary["log"]["logged"] == 0 and summary["log"]["lost"] == 7
        assert "did not take them within 5 s" in caplog.text


def test_the_review_queue_stops_at_its_size_cap(images, tmp_path):
    predictor = untrained_predictor(threshold=0.0)  # everything flagged
    one = (images / "0.png").stat().st_size
    log = PredictionLog(settings(tmp_path, keep_max_bytes=int(one * 1.5)), "predict", "m")
    predict_to_folder(predictor, images, tmp_path / "out", log=log)
    assert log.counts["kept"] == 0 or log.counts["kept"] + log.counts["not_kept"] == 6
    total = sum(f.stat().st_size for f in (tmp_path / "review").rglob("*") if f.is_file())
    assert log.counts["not_kept"] >= 5 and total <= one * 1.5 + 200_000  # at most one image (+ its heatmap)


def mask_for(path: Path, size: tuple[int, int]) -> Path:
    mask = np.zeros(size[::-1], np.uint8)
    mask[10:20, 10:20] = 255
    Image.fromarray(mask).save(path)
    return path


def test_verdicts_move_images_where_prepare_imports_them(project, images):
    params = load_params(project / "params.yaml")
    predictor = untrained_predictor(threshold=0.0)
    log = PredictionLog(settings(project), "predict", "m")
    predict_to_folder(predictor, images, project / "out", log=log)
    queue = ReviewQueue(project / "review")
    ids = [item["id"] for item in queue.items("washer")]
    assert len(ids) == 6
    incoming = IncomingFolders(project / "data/incoming")

    with pytest.raises(AdpsError, match=r"is 32 x 32 px, the image 64 x 64"):
        queue.judge(ids[0], "defect", incoming, mask_for(project / "small.png", (32, 32)))
    jpeg = project / "mask.jpg"
    Image.open(mask_for(project / "m.png", (64, 64))).save(jpeg, quality=75)  # grey edges: not binary
    with pytest.raises(AdpsError, match="is not binary"):
        queue.judge(ids[0], "defect", incoming, jpeg)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(project / "empty.png")
    with pytest.raises(AdpsError, match="marks no pixel"):
        queue.judge(ids[0], "defect", incoming, project / "empty.png")
    with pytest.raises(AdpsError, match="below validation.min_side 100"):
        queue.judge(ids[0], "good", IncomingFolders(project / "data/incoming", min_side=100))
    (project / "review/washer/stray.json").write_text("{broken")
    with pytest.raises(AdpsError, match="no item with id 'nope'"):
        queue.judge("nope", "good", incoming)
    assert len(queue.items()) == 6  # nothing moved by a refused verdict

    queue.judge(ids[0], "defect", incoming, mask_for(project / "mask.png", (64, 64)))
    queue.judge(ids[1], "defect", incoming)  # labelled by image only
    for item_id in ids[2:]:
        queue.judge(item_id, "good", incoming)
    assert queue.items() == [] and len((project / "review/verdicts.csv").read_text().splitlines()) == 7
    assert not list((project / "data/incoming/washer/masks").glob("*.jpg"))  # refused verdicts left nothing

    stages.prepare(params)
    samples = layout.build_sample_index(project / "data/synthetic/washer", "washer")
    reviewed = {s.image_path.name: s for s in samples if s.image_path.name.startswith(REVIEWED_PREFIX)}
    assert len(reviewed) == 6
    assert reviewed[f"{REVIEWED_PREFIX}{ids[0]}.png"].mask_path is not None
    unmasked = reviewed[f"{REVIEWED_PREFIX}{ids[1]}.png"]
    assert unmasked.label == 1 and unmasked.mask_path is None
    share = params.data.folder.test_normal_fraction
    for item_id in ids[2:]:
        sample = reviewed[f"{REVIEWED_PREFIX}{item_id}.png"]
        expected = layout.normal_split(sample.image_path.name, params.runtime.seed, share)
        assert (sample.label, sample.split) == (0, expected)
    goods = Counter(f"{s.split}/good" for s in reviewed.values() if s.label == 0)
    where = ", ".join(f"{n} {folder}" for folder, n in sorted((goods + Counter({"test/anomalous": 2})).items()))
    assert reviewed_line(data_manifest(params, "washer")) == (
        f"**Reviewed images**: 6 images judged with `adps review` are in this version's data ({where})."
    )


def test_the_same_input_twice_and_a_category_with_path_characters(tmp_path):
    """Two copies of one input in the same second are one item (duplicates by content: test_review_queue.py);
    a category from a model's thresholds.json that is a path lands in ``unknown`` inside the queue, never
    outside it, under an id no other category holds."""
    from datetime import datetime

    queue = ReviewQueue(tmp_path / "review")
    row = {"time": datetime(2026, 12, 1, 10, 0, 0), "input_sha256": "ab" * 32, "category": "washer",
           "input_name": "x.png", "score": 0.9, "width": 64, "height": 64}  # fmt: skip
    image, anomaly_map = np.zeros((64, 64, 3), np.float32), np.zeros((64, 64), np.float32)
    png = mask_for(tmp_path / "x.png", (64, 64)).read_bytes()
    first, second = (queue.add(row, "flagged", png, None, image, anomaly_map, 0.5, 2**30) for _ in range(2))
    assert first == second == "20261201-100000-abababababab" and len(queue.items()) == 1
    elsewhere = queue.add(row | {"category": "../../evil"}, "flagged", png, None, image, anomaly_map, 0.5, 2**30)
    assert (tmp_path / "review/unknown" / f"{elsewhere}.json").is_file() and not (tmp_path / "evil").exists()
    assert elsewhere == first + "-1"  # the same content and second in another category: another id
    assert json.loads((tmp_path / "review/washer" / f"{first}.json").read_text())["reason"] == "flagged"
