"""Bad input and faults, as a hostile or careless user makes them: one clear error, nothing lost.

Each test names the case of the README's "Bad input" table it covers.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adps import paths, stages
from adps.config import ParamsError, load_params
from adps.data.datasets import ValidationDataset
from adps.data.images import load_rgb
from adps.errors import AdpsError, ImageReadError
from adps.files import write_json_atomically, write_text_atomically
from adps.inference import Predictor, predict_to_folder
from adps.training.checkpoints import CheckpointError, input_normalizer, load_model, read_checkpoint
from tests.conftest import tiny_params, write_params

ADPS = [sys.executable, "-m", "adps.cli"]


def adps(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*ADPS, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def assert_user_error(out: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit non-zero, no traceback, and a message with every fragment."""
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    message = " ".join((out.stderr + out.stdout).split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def model_copy(trained_project, tmp_path) -> Path:
    """A copy of the trained washer model folder (psm.pt + thresholds.json), safe to damage."""
    root, _ = trained_project
    folder = tmp_path / "washer"
    folder.mkdir()
    for name in ("psm.pt", "thresholds.json", "student.pt"):
        shutil.copy(root / "models/washer" / name, folder / name)
    return folder


@pytest.fixture
def images(trained_project, tmp_path) -> Path:
    root, _ = trained_project
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(root / "data/synthetic/washer/test/good/000.png", folder / "good.png")
    return folder


# --- images -------------------------------------------------------------------------------------


def test_oversized_image_is_a_row_error_and_the_others_are_scored(model_copy, images, tmp_path):
    Image.new("L", (9000, 8000)).save(images / "huge.png")  # 72 MP, over the 64 MP limit
    result = predict_to_folder(Predictor.from_dir(model_copy, "cpu"), images, tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert "over the limit" in rows["huge.png"]["error"] and rows["good.png"]["score"] != ""
    assert result["n_unreadable"] == 1


def test_tiny_image_is_refused_and_a_float_tiff_in_unit_range_is_not_black(tmp_path):
    Image.new("RGB", (1, 1), "white").save(tmp_path / "dot.png")
    with pytest.raises(ImageReadError, match="smaller than 16 px"):
        load_rgb(tmp_path / "dot.png", 64)
    Image.fromarray(np.full((32, 32), 0.8, np.float32), mode="F").save(tmp_path / "unit.tif")
    assert load_rgb(tmp_path / "unit.tif", 32).mean() == pytest.approx(0.8, abs=0.01)
    Image.fromarray(np.full((32, 32), 50000, np.uint16)).save(tmp_path / "deep.png")
    assert load_rgb(tmp_path / "deep.png", 32).mean() == pytest.approx(50000 / 65535, abs=0.01)


def test_nested_folders_links_and_suffixes_get_their_own_rows_and_heatmaps(model_copy, images, tmp_path):
    (images / "a").mkdir()
    (images / "b").mkdir()
    shutil.copy(images / "good.png", images / "a" / "x.png")
    shutil.copy(images / "good.png", images / "b" / "x.png")
    Image.open(images / "good.png").convert("RGB").save(images / "a" / "x.jpg")
    (images / "dangling.png").symlink_to(images / "missing.png")
    (images / "loop").symlink_to(images, target_is_directory=True)
    maps = tmp_path / "maps"
    predict_to_folder(Predictor.from_dir(model_copy, "cpu"), images, tmp_path / "out", save_maps=maps)
    rows = read_rows(tmp_path / "out", key="relative")
    assert {"a/x.png", "b/x.png", "a/x.jpg", "good.png", "dangling.png", "loop"} == set(rows)
    assert rows["dangling.png"]["error"] and rows["loop"]["error"]
    for name in ("a/x.png", "b/x.png", "a/x.jpg"):
        assert (tmp_path / "out" / "heatmaps" / f"{name}.png").is_file()
        raw = np.load(maps / f"{name}.npy")
        assert raw.dtype == np.float32 and raw.shape == (64, 64)
    assert sorted(p.name for p in maps.rglob("*.npy")) == ["good.png.npy", "x.jpg.npy", "x.png.npy", "x.png.npy"]


def test_rerun_replaces_the_whole_output_folder_and_a_busy_folder_is_refused(model_copy, images, tmp_path):
    predictor, out = Predictor.from_dir(model_copy, "cpu"), tmp_path / "out"
    shutil.copy(images / "good.png", images / "extra.png")
    predict_to_folder(predictor, images, out)
    (images / "extra.png").unlink()
    predict_to_folder(predictor, images, out)
    assert not (out / "heatmaps" / "extra.png.png").exists()  # no heatmap of an earlier run stays
    with open(tmp_path / ".out.lock", "w") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(AdpsError, match="another `adps predict` is writing"):
            predict_to_folder(predictor, images, out)
    assert set(read_rows(out)) == {"good.png"}


def test_a_sideways_phone_image_scores_like_the_upright_one(model_copy, images, tmp_path):
    """Stored turned a quarter left with EXIF orientation 6: every viewer shows it upright, and so does predict."""
    upright = Image.open(images / "good.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(images / "phone.png", exif=exif)
    upright.transpose(Image.Transpose.ROTATE_90).save(images / "untagged.png")  # the same pixels, no tag
    predict_to_folder(Predictor.from_dir(model_copy, "cpu"), images, tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert rows["phone.png"]["score"] == rows["good.png"]["score"]
    assert rows["untagged.png"]["score"] != rows["good.png"]["score"]  # the tag is what turns it


def test_predict_never_reads_its_own_output(model_copy, images, tmp_path):
    """Output (and maps) inside the input folder, run twice: the second run scores the same two images."""
    predictor = Predictor.from_dir(model_copy, "cpu")
    shutil.copy(images / "good.png", images / "other.png")
    runs = []
    for _ in range(2):
        result = predict_to_folder(predictor, images, images / "preds", save_maps=images / "preds" / "maps")
        assert (result["n_images"], result["n_unreadable"]) == (2, 0)
        runs.append(read_rows(images / "preds"))
    assert set(runs[1]) == {"good.png", "other.png"} and runs[0] == runs[1]
    assert sorted(p.name for p in (images / "preds" / "maps").rglob("*.npy")) == ["good.png.npy", "other.png.npy"]
    assert predict_to_folder(predictor, images, images / "preds", save_maps=images / "maps")["n_images"] == 2
    with pytest.raises(AdpsError, match=r"--input \S+ lies inside --output .*replaces whole"):
        predict_to_folder(predictor, images / "preds" / "heatmaps", images / "preds")
    shutil.copytree(model_copy, tmp_path / "o" / "washer")
    with pytest.raises(AdpsError, match=r"--model \S+ lies inside --output"):
        predict_to_folder(predictor, images, tmp_path / "o", model_dir=tmp_path / "o" / "washer")
    with pytest.raises(AdpsError, match=r"--output \S+ lies inside --save-maps"):
        predict_to_folder(predictor, images, tmp_path / "maps" / "out", save_maps=tmp_path / "maps")
    assert sorted(p.name for p in (tmp_path / "o" / "washer").iterdir()) == ["psm.pt", "student.pt", "thresholds.json"]
    second = predict_to_folder(predictor, images, images / "another", save_maps=images / "maps")
    assert second["n_images"] == 2  # no earlier output or maps folder inside the input is read either
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(AdpsError, match="is a symbolic link: give a real folder"):
        predict_to_folder(predictor, images, tmp_path / "dangling")


def test_commands_find_their_project_from_a_subfolder_and_create_nothing_elsewhere(trained_project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(trained_project[0], root)
    write_params(root, data={"categories": ["washer"], "image_size": 64})
    subfolder = root / "models"
    champion = ["predict", "-m", "models:/adps-washer@champion", "-i", "../data/synthetic/washer/test/good"]
    no_store = adps(*champion, "-o", "../preds", cwd=subfolder)
    assert_user_error(no_store, f"no MLflow store at {root / 'mlflow.db'}", "adps register")
    assert not (subfolder / "mlflow.db").exists() and not (root / "mlflow.db").exists()
    assert adps("register", "-c", "washer", cwd=root).returncode == 0
    served = adps(*champion, "-o", "../preds", cwd=subfolder)
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout)["n_images"] == 2 and not (subfolder / "mlflow.db").exists()
    assert "washer" in adps("report", cwd=subfolder).stdout
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert_user_error(adps(*champion, "-o", "preds", cwd=outside), "not in an ADPS project", "--params")
    assert_user_error(adps("validate", cwd=outside), "not in an ADPS project")
    assert list(outside.iterdir()) == []
    local = adps("predict", "-m", str(root / "models/washer"), "-i", str(root / "data/synthetic/washer/test/good"),
                 "-o", "preds", cwd=outside)  # fmt: skip
    assert local.returncode == 0, local.stderr  # a model folder needs no project


def test_predict_output_and_option_errors_come_before_any_scoring(trained_project, images, tmp_path):
    root, _ = trained_project
    model = str(root / "models/washer")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    base = ["predict", "--model", model, "--input", str(images)]
    assert_user_error(adps(*base, "--output", str(tmp_path / "afile"), cwd=tmp_path), "is a file")
    assert_user_error(adps(*base, "--output", str(tmp_path / "mine"), cwd=tmp_path), "did not write")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    out = tmp_path / "o"
    assert_user_error(adps(*base, "--output", str(out), "--batch-size", "0", cwd=tmp_path), "--batch-size")
    assert_user_error(
        adps(*base, "--output", str(out), "--device", "foo", cwd=tmp_path), "'foo' is not one of 'auto', 'cpu', 'cuda'"
    )
    if not torch.cuda.is_available():
        assert_user_error(adps(*base, "--output", str(out), "--device", "cuda", cwd=tmp_path), "no usable CUDA")
    assert not out.exists()


def read_rows(output: Path, key: str = "name") -> dict[str, dict[str, str]]:
    with open(output / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    if key == "name":
        return {Path(r["path"]).name: r for r in rows}
    base = min((Path(r["path"]) for r in rows), key=lambda p: len(p.parts)).parent
    return {str(Path(r["path"]).relative_to(base)): r for r in rows}


# --- model folders --------------------------------------------------------------------------------


def test_a_checkpoint_from_elsewhere_or_a_student_is_not_a_model(model_copy):
    with pytest.raises(AdpsError, match=r"student.pt is not a deployable model.*--model"):
        Predictor.from_dir(model_copy / "student.pt")
    shutil.copy(model_copy / "student.pt", model_copy / "psm.pt")  # a stage-1 checkpoint in psm.pt's place
    with pytest.raises(AdpsError, match="'distill' checkpoint, not a trained PSM"):
        Predictor.from_dir(model_copy)


def test_a_psm_checkpoint_of_another_model_is_refused(model_copy):
    payload = read_checkpoint(model_copy / "psm.pt")
    payload["state"] = {k: v + 1 if v.is_floating_point() else v for k, v in payload["state"].items()}
    payload["category"] = "wood"
    torch.save(payload, model_copy / "psm.pt")
    with pytest.raises(
        AdpsError, match=r"is not the checkpoint .*thresholds.json was chosen for \(it was trained for wood\)"
    ):
        Predictor.from_dir(model_copy)


def test_malformed_thresholds_and_damaged_checkpoints_are_named(model_copy):
    good = (model_copy / "thresholds.json").read_text()
    (model_copy / "thresholds.json").write_text("{not json")
    with pytest.raises(AdpsError, match=r"thresholds.json is not valid JSON"):
        Predictor.from_dir(model_copy)
    (model_copy / "thresholds.json").write_text(json.dumps({"image": 0.5}))
    with pytest.raises(AdpsError, match=r"thresholds.json lacks pixel, score"):
        Predictor.from_dir(model_copy)
    unbound = {k: v for k, v in json.loads(good).items() if k != "checkpoint_sha256"}
    (model_copy / "thresholds.json").write_text(json.dumps(unbound))  # not tied to any psm.pt
    with pytest.raises(AdpsError, match=r"thresholds.json lacks checkpoint_sha256: run `adps evaluate`"):
        Predictor.from_dir(model_copy)
    (model_copy / "thresholds.json").write_text(good)
    payload = read_checkpoint(model_copy / "psm.pt")
    payload["state"].pop(next(iter(payload["state"])))
    torch.save(payload, model_copy / "psm.pt")
    with pytest.raises(CheckpointError, match=r"does not fit its own model spec"):
        load_model(model_copy / "psm.pt")


def test_a_loaded_model_scores_with_the_params_default_until_told_otherwise(model_copy):
    model, _ = load_model(model_copy / "psm.pt")
    assert model.scorer.method == "max" and model.scorer.kernel.numel() == len(
        torch.arange(-6, 7)
    )  # sigma 2 -> radius 6


# --- stages -----------------------------------------------------------------------------------------


def test_failed_evaluate_changes_none_of_its_outputs(trained_project, monkeypatch):
    root, _ = trained_project
    monkeypatch.chdir(root)
    outputs = [paths.thresholds_file(tiny_params(), "washer"), paths.metrics_file(tiny_params(), "washer")]
    before = {p: p.read_bytes() for p in outputs}
    heatmaps_before = sorted(p.name for p in paths.heatmaps_dir(tiny_params(), "washer").iterdir())
    plots = paths.plots_dir(tiny_params(), "washer").parent
    moved = plots.with_name("plots-moved")
    os.replace(plots, moved)
    plots.write_text("a file where the plots folder goes")  # the last folder to write cannot be built
    try:
        with pytest.raises(OSError):
            stages.evaluate(tiny_params(score={"sigma": 1.0}), "washer")
        assert {p: p.read_bytes() for p in outputs} == before
        assert sorted(p.name for p in paths.heatmaps_dir(tiny_params(), "washer").iterdir()) == heatmaps_before
    finally:
        plots.unlink()
        os.replace(moved, plots)


def test_evaluate_refuses_a_checkpoint_trained_with_other_params(trained_project, monkeypatch):
    root, _ = trained_project
    monkeypatch.chdir(root)
    with pytest.raises(CheckpointError, match=r"image_size: checkpoint 64, params 128.*adps distill -c washer"):
        stages.evaluate(tiny_params(data={"image_size": 128}, synthetic={"image_size": 64}), "washer")


def test_psm_refuses_an_incomplete_student(trained_project, tmp_path, monkeypatch, tiny_dataset_master):
    root, _ = trained_project
    shutil.copytree(tiny_dataset_master, tmp_path / "data" / "synthetic")
    (tmp_path / "models/washer").mkdir(parents=True)
    payload = read_checkpoint(root / "models/washer/student.pt")
    payload["state"] = {k: v for k, v in payload["state"].items() if not k.startswith("student.")}
    torch.save(payload, tmp_path / "models/washer/student.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"complete teacher and student.*adps distill -c washer"):
        stages.psm(tiny_params(), "washer")


def test_synthesis_that_never_draws_an_anomaly_is_an_error_not_a_hang(trained_project, monkeypatch):
    root, _ = trained_project
    monkeypatch.chdir(root)
    params = tiny_params(anomalies={"perlin_threshold": 0.999, "n_procedural_textures": 1})
    _, val, _ = __import__("adps.data.splits", fromlist=["x"]).category_splits(params, "washer")
    dataset = ValidationDataset(val, 64, input_normalizer(params), params.anomalies, 0)
    with pytest.raises(AdpsError, match=r"perlin_threshold=0.999.*lower it"):
        dataset[len(val)]


def test_register_checks_before_touching_the_tracking_store(project, tmp_path):
    params = tiny_params(tracking={"uri": f"sqlite:///{tmp_path / 'runs.db'}"})
    with pytest.raises(AdpsError, match="unknown category 'nope'"):
        stages.register(params, "nope")
    with pytest.raises(AdpsError, match=r"cannot register washer: missing \S*/models/washer/psm.pt"):
        stages.register(params, "washer")
    assert not (tmp_path / "runs.db").exists()  # no run was started
    with pytest.raises(ParamsError, match="data.categories"):
        tiny_params(data={"categories": ["../../x"]})


# --- params, reports, tuning -------------------------------------------------------------------------


def test_params_files_that_are_empty_not_utf8_or_impossible(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ParamsError, match="is empty"):
        load_params(tmp_path / "empty.yaml")
    (tmp_path / "latin1.yaml").write_bytes("runtime: {seed: 1}  # café\n".encode("latin-1"))
    with pytest.raises(ParamsError, match="not UTF-8"):
        load_params(tmp_path / "latin1.yaml")
    with pytest.raises(ParamsError, match=r"psm_head_channels.0.*greater than or equal to 1"):
        tiny_params(model={"psm_head_channels": [0, -4]})


def test_cli_user_errors_have_no_traceback(tmp_path):
    write_params(tmp_path)
    (tmp_path / "reports/metrics").mkdir(parents=True)
    (tmp_path / "reports/metrics/fabric.json").write_text("{broken")
    assert_user_error(adps("report", cwd=tmp_path), "fabric.json is not valid JSON")
    assert_user_error(adps("register", "-c", "nope", cwd=tmp_path), "unknown category 'nope'")
    assert_user_error(adps("tune", "-c", "washer", "--trials", "0", cwd=tmp_path), "--trials")
    assert_user_error(adps("tune", "-c", "washer", "--workers", "0", cwd=tmp_path), "--workers")
    (tmp_path / "bad.yaml").write_bytes(b"\xff\xfe")
    assert_user_error(adps("validate", "--params", "bad.yaml", cwd=tmp_path), "not UTF-8")


def test_report_means_only_the_metrics_present(tmp_path):
    write_params(tmp_path)
    write_json_atomically(tmp_path / "reports/metrics/fabric.json", {"pixel_ap": 0.5, "aupro": None})
    write_json_atomically(tmp_path / "reports/metrics/washer.json", {"pixel_ap": 0.7, "aupro": 0.9})
    out = adps("report", cwd=tmp_path)
    mean_row = next(line for line in out.stdout.splitlines() if "mean" in line)
    assert "0.600" in mean_row and "0.900" in mean_row  # not (0.9 + 0) / 2


# --- files ---------------------------------------------------------------------------------------------


def test_stale_temp_files_are_cleaned_and_outputs_follow_the_umask(tmp_path):
    target = tmp_path / "metrics.json"
    stale = [tmp_path / ".metrics.json.abc123.tmp", tmp_path / ".metrics.json.dir.tmp"]
    stale[0].write_text("killed mid-write")
    stale[1].mkdir()
    old = os.umask(0o022)
    try:
        write_text_atomically(target, "{}")
    finally:
        os.umask(old)
    assert not any(p.exists() for p in stale)
    assert target.stat().st_mode & 0o777 == 0o644


def test_validate_leaves_nothing_in_the_system_temp_dir(project, tmp_path, monkeypatch):
    scratch = tmp_path / "systemtmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    stages.validate(tiny_params(), "fabric")
    assert list(scratch.iterdir()) == []


class Payload:
    """An object whose unpickling would run code (creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "state": Payload(marker)}, tmp_path / "psm.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "psm.pt")
    assert not marker.exists()


def wait_for_holder(lock: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    """Until ``process`` holds ``lock`` (it writes its pid there once it has it)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip() == f"pid {process.pid}":
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{lock} was never taken by pid {process.pid}")


def test_two_runs_never_write_one_category_at_once(project):
    """Overlapping runs: a second writer of the category fails at once and names the first; both files stay sound."""
    write_params(project, train={"distill": {"epochs": 40, "batch_size": 4}})
    first = subprocess.Popen(
        [*ADPS, "distill", "-c", "washer"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for_holder(paths.category_lock(tiny_params(), "washer"), first)
        second = adps("distill", "-c", "washer", cwd=project)
        assert_user_error(second, "category washer is being written by another pipeline run", f"pid {first.pid}")
        evaluated = adps("evaluate", "-c", "washer", cwd=project)  # any stage of that category waits its turn
        assert_user_error(evaluated, "category washer is being written")
        other = adps("validate", "-c", "fabric", cwd=project)  # other categories are free
        assert other.returncode == 0, other.stderr
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert read_checkpoint(paths.student_checkpoint(tiny_params(), "washer"))["phase"] == "distill"


def test_second_flow_run_on_a_busy_project_starts_nothing(project, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import adps_pipeline

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(paths.pipeline_lock(tiny_params()))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with prefect_test_harness(server_startup_timeout=120), pytest.raises(AdpsError) as err:
            adps_pipeline(params_path="params.yaml")
        assert "another adps-pipeline run is working on this project" in str(err.value)
        assert f"pid {holder.pid}" in str(err.value)
    finally:
        holder.kill()
    assert not (project / "models").exists() and not (project / "reports").exists()


HOLD_LOCK = """
import fcntl, os, sys, time
from pathlib import Path
path = Path(sys.argv[1]); path.parent.mkdir(parents=True, exist_ok=True)
handle = open(path, "a+"); fcntl.flock(handle, fcntl.LOCK_EX); handle.write(f"pid {os.getpid()}"); handle.flush()
print("held", flush=True); time.sleep(600)
"""
