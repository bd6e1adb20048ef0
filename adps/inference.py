"""Prediction with a trained model: load once, batch, write a CSV row and a heatmap per image.

A model folder (``models/<category>``) holds ``psm.pt`` (weights, model and preprocessing params)
and ``thresholds.json`` (chosen on the validation split); nothing else is needed, not even
params.yaml.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from adps.config import Params
from adps.data.datasets import Normalizer
from adps.data.images import InputGeometry, read_rgb
from adps.errors import AdpsError, ImageReadError
from adps.evaluation.heatmaps import heatmap_panel, save_heatmap
from adps.files import (
    build_dir,
    exclusive_lock,
    not_a_regular_file,
    open_regular,
    path_text,
    replace_dir_atomically,
    swap_in_dir,
    write_text_atomically,
)
from adps.model.network import at_size, score_input_problem
from adps.paths import PSM_FILE, THRESHOLDS_FILE
from adps.runtime import resolve_device
from adps.training.checkpoints import input_geometry, load_model

logger = logging.getLogger(__name__)
CSV_COLUMNS = ("path", "score", "is_anomalous", "threshold", "heatmap", "error")
MAX_BATCH_PIXELS = 4 * 1024 * 1024  # images of one size go through the model together up to this many pixels
MAX_NAME_BYTES = 200  # a longer output file name is shortened (file systems allow 255 bytes, suffixes are added)


@dataclass
class ImageSource:
    """One input: a file path or the image file's bytes; ``error`` set when it was refused before reading."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    error: str = ""
    pixels: int | None = None  # what it counts against a request's budget, read from its header (Predictor.sized)


class RequestOverBudget(AdpsError):
    """A request (or batch) whose images together are over ``production.max_request_megapixels`` (HTTP 413)."""


@dataclass(frozen=True)
class PixelBudget:
    """How many pixels one image and one request (one batch of ``adps predict``) may bring to the model.

    Memory follows pixels, not file bytes (a 62 KB PNG can hold 64 megapixels): about 430 bytes per pixel
    the model sees at once, and about 50 per pixel of every image a batch holds while it waits (measured by
    :mod:`benchmarks.pixel_memory`, see ``production.max_image_megapixels`` in params.yaml). Both are checked
    from each file's header, before anything is decoded.
    """

    image_megapixels: float
    request_megapixels: float

    @classmethod
    def from_params(cls, params: Params | None = None) -> PixelBudget:
        """The ``production.*`` budget of ``params`` (their defaults when None)."""
        production = (params or Params()).production
        return cls(production.max_image_megapixels, production.max_request_megapixels)

    @property
    def request_pixels(self) -> int:
        return int(self.request_megapixels * 1e6)

    def image_problem(self, size: tuple[int, int], model_size: tuple[int, int]) -> str:
        """Why an image of ``size`` seen by the model at ``model_size`` (both (width, height)) is over budget, or ""."""
        seen = model_size[0] * model_size[1]
        if seen > self.image_megapixels * 1e6:
            return (
                f"{size[0]}x{size[1]} px is {seen / 1e6:.3g} megapixels at the model's input size "
                f"({model_size[0]}x{model_size[1]}), over production.max_image_megapixels = {self.image_megapixels:g} "
                "(about 430 bytes per pixel): downscale it, or raise the limit if the machine has the memory"
            )
        held = max(seen, size[0] * size[1])
        if held > self.request_pixels:
            return (
                f"{size[0]}x{size[1]} px is {held / 1e6:.3g} megapixels, over production.max_request_megapixels = "
                f"{self.request_megapixels:g}: downscale it, or raise the limit"
            )
        return ""


@dataclass
class ImagePrediction:
    """One image's result; ``error`` is set (and the rest empty) when the image could not be read.

    ``image``: the model input (H, W, 3); ``anomaly_map``: (height, width) at the image's own size
    ``original_size`` = (width, height), whatever size the model saw.
    """

    path: str
    score: float | None = None
    is_anomalous: bool | None = None
    threshold: float | None = None
    anomaly_map: np.ndarray | None = None
    image: np.ndarray | None = None
    original_size: tuple[int, int] | None = None
    features: np.ndarray | None = None
    error: str = ""


class TorchEngine:
    """The forward pass in PyTorch: the ADPS model with its input normalisation, on a device."""

    def __init__(self, model: torch.nn.Module, spec: dict[str, Any], score: dict[str, Any], device: str = "cpu"):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().set_scoring(**score)
        self.geometry = input_geometry(spec)
        self.normalize = Normalizer(spec["normalize_mean"], spec["normalize_std"])
        self.teacher_out = threading.local()  # per thread: a server may run requests in several threads at once
        self.model.teacher.register_forward_hook(lambda _m, _input, out: setattr(self.teacher_out, "last", out[-1]))

    def to(self, device: str) -> None:
        self.device = resolve_device(device)
        self.model.to(self.device)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Images of one size (H, W, 3) in [0, 1] -> maps (N, H, W), scores (N,) and the teacher's deepest
        level averaged over positions (N, C), read off the same forward pass (the drift monitor's features)."""
        batch = torch.stack([self.normalize(img) for img in images]).to(self.device)
        self.teacher_out.last = None
        out = self.model(batch)
        teacher = self.teacher_out.last
        pooled = None if teacher is None else teacher.mean(dim=(2, 3)).cpu().numpy()
        return out.anomaly_map[:, 0].cpu().numpy(), out.image_score.cpu().numpy(), pooled


class PredictionRecorder(Protocol):
    """Where predictions are recorded (:class:`adps.production.log.PredictionLog`): queued, never waited for."""

    enabled: bool
    counts: dict[str, int]

    def record(
        self, results: list[ImagePrediction], sources: list[ImageSource], thresholds: dict[str, Any]
    ) -> None: ...

    def flush(self, timeout: float = 10.0) -> bool: ...


class Engine(Protocol):
    """What a :class:`Predictor` runs: how images become its input (``geometry``) and its forward pass on a
    batch of images of one size."""

    geometry: InputGeometry

    def to(self, device: str) -> None: ...

    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...


class Predictor:
    """A loaded model (an :class:`Engine`: PyTorch, or ONNX Runtime in :mod:`adps.export`) with its thresholds."""

    def __init__(self, engine: Engine, thresholds: dict[str, Any], budget: PixelBudget | None = None):
        """``budget``: the pixels one image and one batch may bring (None: no limit, as in evaluation; `adps
        predict` and the served model set the project's, :meth:`PixelBudget.from_params`)."""
        self.engine = engine
        self.geometry = engine.geometry
        self.thresholds = thresholds
        self.budget = budget

    @classmethod
    def from_dir(cls, model_dir: Path, device: str = "auto") -> Predictor:
        """Load ``psm.pt`` and ``thresholds.json`` from a model folder (or the folder of a given psm.pt).

        The two files must belong together: thresholds.json records the sha256 of the psm.pt it was
        chosen for, so a checkpoint copied in from another category is refused.
        """
        model_dir = Path(model_dir)
        if model_dir.suffix == ".pt" and model_dir.name != PSM_FILE:
            raise AdpsError(
                f"{model_dir} is not a deployable model (that is psm.pt with thresholds.json beside it): "
                f"give the model folder, e.g. --model {model_dir.parent}"
            )
        folder = model_dir.parent if model_dir.suffix == ".pt" else model_dir
        thresholds = read_thresholds(folder / THRESHOLDS_FILE)
        model, payload = load_model(folder / PSM_FILE)
        check_model_pair(folder, payload, thresholds)
        try:
            engine = TorchEngine(model, payload["spec"], thresholds["score"], device)
        except (TypeError, ValueError) as err:  # a score (kind, method...) this model cannot answer with
            raise AdpsError(
                f"{folder / THRESHOLDS_FILE} has a score this psm.pt cannot use ({err}): run `adps evaluate` again."
            ) from err
        return cls(engine, thresholds)

    def with_budget(self, budget: PixelBudget | None) -> Predictor:
        """The same loaded model and thresholds under another pixel budget."""
        return Predictor(self.engine, self.thresholds, budget)

    def to(self, device: str) -> Predictor:
        """Move the model to ``device`` (auto, cpu or cuda)."""
        self.engine.to(device)
        return self

    def predict_arrays(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """(H_i, W_i, 3) float images in [0, 1] at the model input size -> maps [(H_i, W_i)] and scores (N,).

        Images of one size go through the engine together, in batches of their own of at most
        :data:`MAX_BATCH_PIXELS` pixels (at least one image), so memory follows the image size, not the batch.
        """
        maps, scores, _ = self.run_engine(images)
        return maps, scores

    def run_engine(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray | None]]:
        """:meth:`predict_arrays`, with each image's pooled teacher features (None from an engine without them)."""
        maps: list[np.ndarray] = [np.empty(0)] * len(images)
        features: list[np.ndarray | None] = [None] * len(images)
        scores = np.zeros(len(images), np.float32)
        for group in engine_groups([image.shape for image in images]):
            group_maps, group_scores, pooled = self.engine([images[i] for i in group])
            for j, i in enumerate(group):
                maps[i], scores[i] = group_maps[j], group_scores[j]
                features[i] = None if pooled is None else pooled[j]
        return maps, scores, features

    def sized(self, source: ImageSource) -> ImageSource:
        """``source`` with its pixel count read from its header (nothing decoded), or with its error when it may
        not be read: not a regular file (never opened: a FIFO would block), or over the per-image budget."""
        if source.error or source.pixels is not None:
            return source
        name = path_text(source.name)
        if source.path is not None and (problem := not_a_regular_file(source.path)):
            return replace(source, error=f"cannot read image {name}: {problem}")
        size = header_size(source)
        if size is None:  # not an image, or a damaged header: decoding says why
            return replace(source, pixels=0)
        model_size = self.geometry.input_size(*size)
        if self.budget is not None and (problem := self.budget.image_problem(size, model_size)):
            logger.warning("skipping %s: %s", name, problem)
            return replace(source, error=f"cannot score {name}: {problem}")
        return replace(source, pixels=max(size[0] * size[1], model_size[0] * model_size[1]))

    def batches(self, sources: list[ImageSource], batch_size: int) -> Iterator[list[ImageSource]]:
        """``sources`` in batches of at most ``batch_size`` images and the request budget's pixels (sized lazily,
        so only one batch's headers are read ahead)."""
        batch: list[ImageSource] = []
        pixels = 0
        for source in sources:
            source = self.sized(source)
            over = self.budget is not None and pixels + (source.pixels or 0) > self.budget.request_pixels
            if batch and (len(batch) >= batch_size or over):
                yield batch
                batch, pixels = [], 0
            batch.append(source)
            pixels += source.pixels or 0
        if batch:
            yield batch

    def check_request(self, sources: list[ImageSource]) -> None:
        """Refuse a request whose images are together over the budget (each one alone fits: :meth:`sized`)."""
        total = sum(s.pixels or 0 for s in sources if not s.error)
        if self.budget is not None and total > self.budget.request_pixels:
            raise RequestOverBudget(
                f"the request's {len(sources)} images hold {total / 1e6:.3g} megapixels, over "
                f"production.max_request_megapixels = {self.budget.request_megapixels:g}: send them in smaller requests"
            )

    def read(self, source: ImageSource) -> ImagePrediction:
        """Decode one input at the model input size; any failure is that input's error (the others go on)."""
        name = path_text(source.name)
        if source.error:
            return ImagePrediction(name, error=path_text(source.error))
        try:
            with opened(source) as raw:
                image, original = read_rgb(raw, self.geometry, name)
        except ImageReadError as err:
            logger.warning("skipping unreadable image: %s", path_text(str(err)))
            return ImagePrediction(name, error=path_text(str(err)))
        except Exception as err:  # a file that cannot be opened, memory, a decoder's own failure: this input only
            logger.warning("skipping %s: %s: %s", name, type(err).__name__, path_text(str(err)))
            return ImagePrediction(name, error=f"cannot read image {name}: {failure_text(err)}")
        if problem := score_input_problem(*image.shape[:2], **self.thresholds["score"]):
            logger.warning("skipping %s: %s", name, problem)
            return ImagePrediction(name, error=f"cannot score {name}: {problem}")
        return ImagePrediction(name, image=image, original_size=original)

    def predict_paths(self, paths: list[Path], batch_size: int = 16) -> list[ImagePrediction]:
        """Predict every path; unreadable files come back with ``error`` set and do not stop the rest."""
        sources = [ImageSource(path_text(p), path=Path(p)) for p in paths]
        return [r for batch in self.batches(sources, batch_size) for r in self.predict_batch(batch)]

    def predict_batch(self, sources: list[ImageSource]) -> list[ImagePrediction]:
        """Decode and score one batch (memory holds one batch at a time); errors stay on their row.

        Raises:
            RequestOverBudget: the batch's images are together over the request budget (nothing was decoded).
        """
        sources = [self.sized(s) for s in sources]
        self.check_request(sources)
        results = [self.read(s) for s in sources]
        readable = [r for r in results if not r.error]
        if readable:
            threshold = float(self.thresholds["image"])
            for group in engine_groups([r.image.shape for r in readable]):
                self.score_group([readable[i] for i in group], threshold)
        return results

    def score_group(self, group: list[ImagePrediction], threshold: float) -> None:
        """Run images of one size through the engine together; when that fails, each alone, so that only an
        image that fails by itself gets the error."""
        try:
            maps, scores, pooled = self.engine([r.image for r in group])
        except Exception as err:
            if len(group) > 1:
                for r in group:
                    self.score_group([r], threshold)
                return
            logger.warning("cannot score %s: %s: %s", group[0].path, type(err).__name__, err)
            group[0].error = f"cannot score {group[0].path}: {failure_text(err)}"
            return
        for j, r in enumerate(group):
            try:
                self.finish(r, maps[j], float(scores[j]), None if pooled is None else pooled[j], threshold)
            except Exception as err:  # one image's map or score: its own error
                r.anomaly_map = r.score = r.threshold = r.is_anomalous = r.features = None
                r.error = f"cannot score {r.path}: {failure_text(err)}"

    def finish(self, r: ImagePrediction, anomaly_map: np.ndarray, score: float, pooled: Any, threshold: float) -> None:
        """Fill one result from the engine's map and score; a score that is not a number is its error."""
        if not np.isfinite(score):
            raise ValueError(f"the model gave a score of {score} (not a finite number)")
        r.anomaly_map = at_size(torch.from_numpy(anomaly_map), r.original_size[::-1]).numpy()
        r.score, r.threshold, r.features = score, threshold, pooled
        r.is_anomalous = bool(score >= threshold)

    def regions(self, result: ImagePrediction) -> list[dict[str, Any]]:
        """The result's defect regions (see :func:`defect_regions`) at the pixel threshold."""
        return defect_regions(result.anomaly_map, float(self.thresholds["pixel"]), result.original_size)


def defect_regions(anomaly_map: np.ndarray, threshold: float, image_size: tuple[int, int]) -> list[dict[str, Any]]:
    """Connected regions of ``anomaly_map >= threshold``, strongest first, in the input image's pixels.

    Each: ``x, y, width, height`` (bounding box), ``area`` (pixels of the region), ``peak`` (highest score).
    """
    labels, _ = ndimage.label(anomaly_map >= threshold)
    scale_x, scale_y = image_size[0] / anomaly_map.shape[1], image_size[1] / anomaly_map.shape[0]
    regions = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == index
        rows, cols = box
        regions.append(
            {
                "x": round(cols.start * scale_x),
                "y": round(rows.start * scale_y),
                "width": round((cols.stop - cols.start) * scale_x),
                "height": round((rows.stop - rows.start) * scale_y),
                "area": round(float(inside.sum()) * scale_x * scale_y),
                "peak": float(anomaly_map[box][inside].max()),
            }
        )
    return sorted(regions, key=lambda region: -region["peak"])


def engine_groups(shapes: list[tuple[int, ...]]) -> Iterator[list[int]]:
    """Indices of images of one shape, in groups of at most :data:`MAX_BATCH_PIXELS` pixels (at least one
    image): memory grows with the pixels that go through the model at once."""
    for shape in dict.fromkeys(shapes):
        same = [i for i, other in enumerate(shapes) if other == shape]
        per_batch = max(1, MAX_BATCH_PIXELS // (shape[0] * shape[1]))
        for start in range(0, len(same), per_batch):
            yield same[start : start + per_batch]


def header_size(source: ImageSource) -> tuple[int, int] | None:
    """(width, height) from the file's header (Pillow reads no pixels), or None when it cannot be read."""
    try:
        with opened(source) as raw, Image.open(raw) as image:
            return image.size
    except Exception:  # decoding the file reports the reason on its row
        return None


@contextlib.contextmanager
def opened(source: ImageSource) -> Iterator[IO[bytes]]:
    """The input's bytes as a file: its data, or its path opened only when it is a regular file."""
    if source.data is not None:
        yield io.BytesIO(source.data)
        return
    with open_regular(source.path) as handle:
        yield handle


def failure_text(err: BaseException) -> str:
    """An unexpected failure in a few words for a row's error (its first line, safe as text)."""
    first = (str(err).splitlines() or [""])[0][:300]
    return path_text(f"{type(err).__name__}: {first}" if first else type(err).__name__)


def read_thresholds(path: Path) -> dict[str, Any]:
    """thresholds.json of a model folder, checked for the keys and values prediction needs, and for its
    category when the folder is a project's ``models/<category>`` (:mod:`adps.training.model_folder`)."""
    from adps.training.model_folder import check_folder_category, project_category, read_thresholds_file

    thresholds = read_thresholds_file(path)
    check_folder_category(path.parent, thresholds, project_category(path.parent))
    return thresholds


def check_model_pair(folder: Path, checkpoint: dict[str, Any], thresholds: dict[str, Any]) -> None:
    """psm.pt is a stage-2 checkpoint, and thresholds.json was chosen for exactly this file (its sha256, its
    category, a kind it holds): the check every stage runs (:mod:`adps.training.model_folder`)."""
    from adps.training.model_folder import check_psm_phase, check_thresholds_belong

    check_psm_phase(folder / PSM_FILE, checkpoint)
    check_thresholds_belong(folder, checkpoint, thresholds)


def collect_inputs(source: Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """A file, or every entry under a folder, recursively (hidden names and the ``exclude`` folders skipped).

    Anything that is not a folder is listed, broken links, FIFOs and non-images included, so it gets a
    row with its error, as does a subfolder that cannot be read; links to folders are not followed (a link
    loop cannot hang the walk). ``exclude``: this run's own output folders, when they lie inside the input
    (never read back as inputs).
    """
    if os.path.lexists(source) and not source.is_dir():  # a file, or a link or FIFO that gets its row's error
        return [source]
    if not source.is_dir():
        raise AdpsError(f"input not found: {path_text(source)}")
    skipped = {p.resolve() for p in exclude}

    def read(folder: Path) -> bool:
        try:
            return not folder.name.startswith(".") and folder.resolve() not in skipped and not is_output(folder)
        except (OSError, RuntimeError):  # cannot be looked into: walked, so that listing it fails onto its row
            return True

    found: list[Path] = []

    def unlisted(err: OSError) -> None:
        if err.filename is not None:
            found.append(Path(err.filename))

    for root, dirs, files in os.walk(source, onerror=unlisted, followlinks=False):
        dirs[:] = sorted(d for d in dirs if read(Path(root) / d))
        found += [Path(root) / name for name in sorted(files) if not name.startswith(".")]
        found += [Path(root) / d for d in dirs if (Path(root) / d).is_symlink()]
    if not found:
        raise AdpsError(f"no files in {path_text(source)}: give an image file or a folder of images.")
    return sorted(found)


def is_output(folder: Path) -> bool:
    """Whether a folder was written by ``adps predict`` (predictions or maps): never read back as input."""
    markers = (folder / OUTPUT_MARKER).is_file() or (folder / MAPS_MARKER).is_file()
    return markers or ((folder / "predictions.csv").is_file() and (folder / "heatmaps").is_dir())  # older outputs


def check_folders(source: Path, output: Path, save_maps: Path | None, model_dir: Path | None) -> None:
    """Outputs are replaced whole: what is read (input, model) may not lie inside them; maps nest only in the output.

    An output inside the input folder is fine: it is skipped when the input is read.
    """
    outputs = [("--output", output.resolve())] + ([("--save-maps", save_maps.resolve())] if save_maps else [])
    read = [("--input", source), ("--model", model_dir)]
    for flag, target in outputs:
        for what, path in read:
            if path is not None and path.resolve().is_relative_to(target):
                raise AdpsError(
                    f"{what} {path} lies inside {flag} {target}, which `adps predict` replaces whole: "
                    f"choose a {flag} folder outside it"
                )
    if (
        save_maps is not None
        and output.resolve().is_relative_to(save_maps.resolve())
        and not nested_maps(output, save_maps)
    ):
        raise AdpsError(
            f"--output {output} lies inside --save-maps {save_maps}: put the maps inside the output (e.g. "
            f"--save-maps {output / 'maps'}) or in a folder of their own"
        )


def nested_maps(output: Path, save_maps: Path | None) -> bool:
    """Whether the maps folder is the output folder or inside it (then it is built as part of the output)."""
    return save_maps is not None and save_maps.resolve().is_relative_to(output.resolve())


def predictions_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@dataclass
class OutputNames:
    """The name of each input's heatmap and raw map: its path relative to the input folder, suffix kept (``a/x.png``
    and ``b/x.jpg`` stay apart), as text every tool reads (:func:`adps.files.path_text`: a latin-1 name's bytes
    as ``\\xNN``), each part at most :data:`MAX_NAME_BYTES`, and never the same for two inputs of a run."""

    source: Path
    taken: set[str] = field(default_factory=set)

    def __call__(self, path: Path) -> str:
        relative = path.relative_to(self.source) if self.source.is_dir() else Path(path.name)
        name = "/".join(short_part(path_text(part)) for part in relative.parts)
        unique, n = name, 1
        while unique in self.taken:  # two names that read the same as text (``\\xe9`` typed, and the byte)
            n += 1
            unique = f"{name}~{n}"
        self.taken.add(unique)
        return unique


def short_part(part: str) -> str:
    """A file name part that fits a file system with a suffix added: a long one (escaping makes a name up to
    four times longer) keeps its start and suffix, with a hash of the whole between them."""
    if len(part.encode()) <= MAX_NAME_BYTES:
        return part
    start = part.encode()[: MAX_NAME_BYTES // 2].decode("utf-8", "ignore")
    return f"{start}~{hashlib.sha256(part.encode()).hexdigest()[:12]}{Path(part).suffix[:16]}"


def check_output(output: Path, marker: str = "predictions.csv") -> None:
    """Fail before any scoring when an output folder cannot be (re)written (``marker``: a file only we write)."""
    if output.is_symlink():
        raise AdpsError(f"output {output} is a symbolic link: give a real folder (it is replaced whole).")
    if output.exists() and not output.is_dir():
        raise AdpsError(f"output {output} is a file: give a folder.")
    if output.is_dir() and any(output.iterdir()) and not (output / marker).is_file():
        raise AdpsError(
            f"output {output} is a non-empty folder that `adps predict` did not write; "
            "give a new or empty folder (its contents would be replaced)."
        )
    parent = output.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AdpsError(f"cannot write in {parent}: choose an --output folder you can write to.")


def output_lock(output: Path):
    """One ``adps predict`` per output folder at a time (a lock file beside it)."""
    lock_path = output.absolute().parent / f".{output.name}.lock"
    return exclusive_lock(
        lock_path, f"another `adps predict` is writing to {output}; wait for it or choose another --output"
    )


def predict_to_folder(
    predictor: Predictor,
    source: Path,
    output: Path,
    batch_size: int = 16,
    progress: bool = False,
    save_maps: Path | None = None,
    model_dir: Path | None = None,
    log: PredictionRecorder | None = None,
) -> dict[str, Any]:
    """Predict ``source`` (file or folder, recursively); write ``predictions.csv`` and ``heatmaps/<relative path>.png``.

    Images are decoded, scored and drawn one batch at a time. The output folder is built beside the
    target and swapped in when complete: it never mixes files of two runs. ``save_maps`` gets each raw
    anomaly map as float32 ``<relative path>.npy`` (the image's own resolution), for re-scoring elsewhere; it may
    lie inside the output. Outputs inside the input are never read as inputs; an input or model
    (``model_dir``) inside an output is refused before anything runs. Each prediction is recorded in
    ``log`` when given (its counts are in the summary).
    """
    if batch_size < 1:
        raise AdpsError(f"--batch-size must be at least 1 (got {batch_size})")
    check_folders(source, output, save_maps, model_dir)
    inputs = collect_inputs(source, exclude=tuple(p for p in (output, save_maps) if p is not None))
    check_output(output)
    nested = nested_maps(output, save_maps)
    if save_maps is not None and not nested:
        check_output(save_maps, marker=MAPS_MARKER)
    summary: dict[str, Any] = {}
    job = PredictionJob(predictor, source, output, batch_size, progress, log)

    def build(tmp: Path, maps_tmp: Path | None = None) -> None:
        (tmp / OUTPUT_MARKER).write_text("adps predict output\n")
        if nested:
            maps_tmp = tmp / save_maps.resolve().relative_to(output.resolve())
            maps_tmp.mkdir(parents=True, exist_ok=True)
            (maps_tmp / MAPS_MARKER).write_text("adps predict maps\n")
        summary.update(job.write(inputs, tmp, maps_tmp))

    with output_lock(output):
        if save_maps is None or nested:
            replace_dir_atomically(output, build)
        else:
            with output_lock(save_maps):
                maps_tmp = build_dir(save_maps, lambda tmp: (tmp / MAPS_MARKER).write_text("adps predict maps\n"))
                try:
                    replace_dir_atomically(output, lambda tmp: build(tmp, maps_tmp))
                except BaseException:
                    shutil.rmtree(maps_tmp, ignore_errors=True)
                    raise
                swap_in_dir(maps_tmp, save_maps)
    if log is not None and log.enabled:
        log.flush()
        summary["log"] = dict(log.counts)
    return {"predictions": path_text(output / "predictions.csv"), **summary}


MAPS_MARKER = ".adps-maps"
OUTPUT_MARKER = ".adps-predictions"


@dataclass
class PredictionJob:
    """Rows, heatmaps and raw maps of one ``adps predict``, written into temp folders batch by batch."""

    predictor: Predictor
    source: Path
    output: Path
    batch_size: int
    progress: bool
    log: PredictionRecorder | None = None

    def write(self, inputs: list[Path], folder: Path, maps_folder: Path | None) -> dict[str, Any]:
        """Score every input, batch by batch; every failure of one file stays on that file's row."""
        rows, failed, not_written, anomalous = [], [], [], 0
        names = OutputNames(self.source)
        sources = [ImageSource(path_text(p), path=p) for p in inputs]
        with tqdm(total=len(sources), desc="predicting", unit="image", disable=not self.progress) as bar:
            for batch in self.predictor.batches(sources, self.batch_size):
                results = self.predictor.predict_batch(batch)
                self.record(results, batch)
                for source, r in zip(batch, results, strict=True):
                    heatmap = ""
                    if r.error:
                        failed.append(r.path)
                    else:
                        anomalous += bool(r.is_anomalous)
                        heatmap = self.saved_outputs(r, source.path, names, folder, maps_folder)
                        not_written += [r.path] if r.error else []
                    rows.append({k: getattr(r, k) for k in CSV_COLUMNS if k != "heatmap"} | {"heatmap": heatmap})
                bar.update(len(batch))
        write_text_atomically(folder / "predictions.csv", predictions_csv(rows))
        summary = {"n_images": len(rows), "n_anomalous": anomalous, "n_unreadable": len(failed), "unreadable": failed}
        return summary | ({"outputs_not_written": not_written} if not_written else {})

    def record(self, results: list[ImagePrediction], batch: list[ImageSource]) -> None:
        """Hand the batch to the log; the log loses rows, never the run (it counts what it could not take)."""
        if self.log is None:
            return
        try:
            self.log.record(results, batch, self.predictor.thresholds)
        except Exception as err:  # the predictions stand without their log rows
            logger.warning("prediction log: %d rows not recorded: %s", len(results), failure_text(err))

    def saved_outputs(
        self, r: ImagePrediction, path: Path, names: OutputNames, folder: Path, maps_folder: Path | None
    ) -> str:
        """The heatmap's path after writing it (and the raw map); "" with the row's ``error`` set when either
        cannot be written (the score stays: the image was scored), and neither is left behind."""
        written: list[Path] = []
        try:
            name = names(path)
            self.save_outputs(r, name, folder, maps_folder, written)
        except Exception as err:  # a name the file system refuses, a full disk: this row only
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            logger.warning("%s was scored, but its outputs were not written: %s", r.path, failure_text(err))
            r.error = f"scored, but its heatmap or raw map could not be written: {failure_text(err)}"
            return ""
        return path_text(self.output / "heatmaps" / f"{name}.png")

    def save_outputs(
        self, r: ImagePrediction, name: str, folder: Path, maps_folder: Path | None, written: list[Path]
    ) -> None:
        """Heatmap PNG (and raw map) of one image, named ``name`` (see :class:`OutputNames`)."""
        shown = at_size(torch.from_numpy(r.anomaly_map), r.image.shape[:2]).numpy()  # drawn at the model input size
        panel = heatmap_panel(r.image, shown, float(self.predictor.thresholds["pixel"]), None)
        written.append(folder / "heatmaps" / f"{name}.png")
        save_heatmap(written[-1], panel, f"{name} score={r.score:.3f}")
        if maps_folder is not None:
            written.append(maps_folder / f"{name}.npy")
            written[-1].parent.mkdir(parents=True, exist_ok=True)
            np.save(written[-1], r.anomaly_map.astype(np.float32))
