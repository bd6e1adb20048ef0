"""Typed, frozen parameters loaded from ``params.yaml``.

Every value that changes a result is a field here. Unknown keys and bad values fail at load time
with the key path, the bad value and what is allowed, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, PrivateAttr, ValidationError, model_validator

from adps.errors import AdpsError

PARAMS_FILE = "params.yaml"  # the project's params; its folder is the project root
SYNTHETIC_CATEGORIES = ("fabric", "wood", "washer", "capsule", "strip")
SYNTHETIC_DEFECT_KINDS = ("scratch", "crack", "hole", "stain", "contamination")

# A category names a folder, a DVC stage (distill@C) and a registered model (adps-C): no path parts.
CategoryName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
MetricName = Literal["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max"]
METRIC_NAMES: tuple[str, ...] = get_args(MetricName)  # the headline test metrics, in table order


class ParamsError(AdpsError):
    """A params file that is missing, unreadable or invalid; the message says what to fix."""


class Section(BaseModel):
    """Base of every params section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RuntimeParams(Section):
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0)
    cpu_kernels: Literal["avx2", "native"] = "avx2"  # instruction set of torch's CPU kernels (adps.runtime)
    progress: bool = True
    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: int = Field(2, ge=1)
    dask_address: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class FolderImportParams(Section):
    normal: str = "normal"
    anomalous: str = "anomalous"
    masks: str = "masks"
    mask_suffix: str = "_mask"
    test_normal_fraction: float = Field(0.2, ge=0.0, lt=1.0)


class DataParams(Section):
    source: Literal["synthetic", "mvtec", "kolektor", "folder"] = "synthetic"
    categories: tuple[CategoryName, ...] = Field(SYNTHETIC_CATEGORIES, min_length=1)
    import_path: Path = Path("data/incoming")  # where new images arrive; a dependency of `prepare`
    folder: FolderImportParams = FolderImportParams()
    # None: masks must be two-level (defect = non-zero); t: defect = value > t on 0..255 (16-bit scaled by 255/65535)
    mask_threshold: float | None = Field(None, ge=0.0, lt=255.0)
    empty_defect_mask: Literal["image_label", "refuse"] = "image_label"  # a labelled defect whose mask marks nothing
    image_size: int = Field(128, ge=32, le=1024, multiple_of=32)
    resolution: Literal["auto", "native", "resize"] = "auto"
    scale: float = Field(1.0, gt=0.0, le=1.0)  # native: images scaled by this first (very large frames)
    normalize_mean: tuple[float, float, float] | None = None  # None: the backbone weights' own
    normalize_std: tuple[float, float, float] | None = None
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    val_defect_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # labelled test defects held out for validation

    @model_validator(mode="after")
    def _check_source(self) -> DataParams:
        if self.source == "synthetic":
            unknown = [c for c in self.categories if c not in SYNTHETIC_CATEGORIES]
            if unknown:
                raise ValueError(f"unknown synthetic categories {unknown}; allowed: {list(SYNTHETIC_CATEGORIES)}")
        if self.source == "kolektor" and len(self.categories) != 1:
            raise ValueError("data.source 'kolektor' imports one product: give one name in data.categories")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"data.categories has duplicates: {list(self.categories)}")
        return self


class SyntheticParams(Section):
    image_size: int = Field(128, ge=64, le=1024)
    strip_height: int = Field(512, ge=64, le=4096)  # the strip category's images (not square)
    strip_width: int = Field(192, ge=64, le=4096)
    n_train: int = Field(80, ge=1)
    n_test_good: int = Field(20, ge=1)
    n_test_defect: int = Field(8, ge=1)
    defect_kinds: tuple[Literal["scratch", "crack", "hole", "stain", "contamination"], ...] = SYNTHETIC_DEFECT_KINDS
    lighting_jitter: float = Field(0.06, ge=0.0, le=0.5)
    max_shift: int = Field(3, ge=0)
    max_rotation_deg: float = Field(4.0, ge=0.0, le=180.0)
    noise_std: float = Field(0.012, ge=0.0, le=0.2)


class AnomalyParams(Section):
    texture_dir: Path | None = None
    n_procedural_textures: int = Field(24, ge=1)
    normal_prob: float = Field(0.5, ge=0.0, le=1.0)
    beta_max: float = Field(0.8, ge=0.0, lt=1.0)
    perlin_scale_exp_max: int = Field(6, ge=1, le=8)
    perlin_threshold: float = Field(0.5, gt=-1.0, lt=1.0)
    max_rotation_deg: float = Field(90.0, ge=0.0, le=180.0)


# Image modes the one image reader (adps.data.images) takes, byte order aside; validation may narrow them.
ImageMode = Literal["1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"]


class ValidationParams(Section):
    allowed_modes: tuple[ImageMode, ...] | None = None  # None: every mode the image reader takes
    allowed_bit_depths: tuple[Literal[1, 8, 16, 32], ...] | None = None
    min_side: int = Field(32, ge=1)
    max_side: int = Field(8192, ge=1)
    min_train: int = Field(10, ge=1)
    min_test_good: int = Field(1, ge=0)
    min_test_defect: int = Field(1, ge=0)


BackboneName = Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "wide_resnet50_2"]


MODEL_KINDS = ("adps", "memory_bank", "adps+memory_bank")


class MemoryBankParams(Section):
    levels: tuple[Literal[0, 1, 2], ...] = Field((1, 2), min_length=1)
    neighbourhood: int = Field(3, ge=1, le=7)
    coreset_ratio: float = Field(0.1, gt=0.0, le=1.0)
    max_entries: int = Field(16384, ge=1)
    max_positions: int = Field(32768, ge=1)  # training positions the coreset chooses from (seeded subset)
    projection_dim: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _check_levels(self) -> MemoryBankParams:
        if list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"model.memory_bank.levels must be increasing and distinct, got {list(self.levels)}")
        if self.neighbourhood % 2 == 0:
            raise ValueError(f"model.memory_bank.neighbourhood must be odd, got {self.neighbourhood}")
        return self


class ModelParams(Section):
    kind: Literal["auto", "adps", "memory_bank", "adps+memory_bank"] = "auto"
    backbone: BackboneName = "efficientnet_lite0"
    teacher_weights: str = "auto"
    patches: int = Field(4, ge=1, le=16)
    split_after: tuple[Literal[0, 1, 2], ...] = (0,)
    teacher_bn_calibration: bool = True
    psm_head_channels: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (32, 16)
    memory_bank: MemoryBankParams = MemoryBankParams()

    @model_validator(mode="after")
    def _check_weights(self) -> ModelParams:
        if self.teacher_weights not in ("auto", "imagenet", "none") and not self.teacher_weights.strip():
            raise ValueError("model.teacher_weights must be auto, imagenet, none or a state-dict file path")
        return self


class PhaseParams(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_milestones: tuple[float, ...] = (0.8, 0.9)
    lr_gamma: float = Field(0.2, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)


class PsmPhaseParams(PhaseParams):
    epochs: int = Field(50, ge=1)
    joint: bool = False
    student_lr: float = Field(1e-4, gt=0)


class TrainParams(Section):
    distill: PhaseParams = PhaseParams()
    psm: PsmPhaseParams = PsmPhaseParams()


class LossParams(Section):
    push_weight: float = Field(1.0, ge=0)
    push_floor: float | None = 0.0
    mask_threshold: float = Field(0.5, gt=0, lt=1)
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float | None = Field(None, gt=0, lt=1)
    seg_weight: float = Field(1.0, ge=0)


class ScoreParams(Section):
    method: Literal["max", "topk"] = "max"
    sigma: float = Field(2.0, ge=0)
    topk: int = Field(100, ge=1)


class ThresholdParams(Section):
    strategy: Literal["f1", "percentile"] = "f1"
    percentile: float = Field(99.0, gt=0, lt=100)


class EvaluationParams(Section):
    batch_size: int = Field(16, ge=1)
    n_heatmaps: int = Field(4, ge=0)
    aupro_fpr_limit: float = Field(0.3, gt=0, le=1)
    curve_points: int = Field(200, ge=10)


class TrackingParams(Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "adps"


class RegistryParams(Section):
    auto_promote: bool = False
    promote_metric: MetricName = "pixel_ap"
    min_delta: float = Field(0.0, ge=0)


class ScheduleParams(Section):
    cron: str = "0 2 * * *"


class ProductionParams(Section):
    """What happens to predictions in production: the prediction log and the review queue."""

    log: str | None = "sqlite:///predictions.db"
    review_dir: Path = Path("data/review")
    keep_flagged: bool = True
    keep_passed_fraction: float = Field(0.02, ge=0, le=1)
    keep_max_mb: float = Field(500.0, ge=0)
    max_pending: int = Field(10000, ge=1)
    # pixel budget of `adps predict` and the served model, checked before decoding (adps.inference.PixelBudget)
    max_image_megapixels: float = Field(16.0, gt=0)
    max_request_megapixels: float = Field(16.0, gt=0)

    @model_validator(mode="after")
    def _check_budget(self) -> ProductionParams:
        if self.max_image_megapixels > self.max_request_megapixels:
            raise ValueError(
                f"production.max_image_megapixels ({self.max_image_megapixels:g}) must not exceed "
                f"production.max_request_megapixels ({self.max_request_megapixels:g}): one image is a request"
            )
        return self


class MonitorParams(Section):
    """The drift monitor (flow ``adps-monitor``): windows of logged predictions against the champion's reference."""

    cron: str = "0 * * * *"
    window_hours: float = Field(24.0, gt=0)
    min_predictions: int = Field(30, ge=5)
    alpha: float = Field(0.01, gt=0, lt=1)
    expected_defect_rate: float = Field(0.02, ge=0, lt=1)
    expected_error_rate: float = Field(0.01, ge=0, lt=1)
    feature_components: int = Field(8, ge=1)


class FloatDistribution(Section):
    type: Literal["float"]
    low: FiniteFloat
    high: FiniteFloat
    log: bool = False


class IntDistribution(Section):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False


class CategoricalDistribution(Section):
    type: Literal["categorical"]
    choices: tuple[str | int | float | bool | None, ...] = Field(min_length=1)


Distribution = Annotated[FloatDistribution | IntDistribution | CategoricalDistribution, Field(discriminator="type")]


class TuneBudgetParams(Section):
    distill_epochs: int = Field(8, ge=1)
    psm_epochs: int = Field(8, ge=1)


class TuneParams(Section):
    n_trials: int = Field(10, ge=1)
    timeout: float | None = Field(None, gt=0)
    sampler: Literal["tpe", "random"] = "tpe"
    sampler_seed: int = 0
    pruner: Literal["median", "none"] = "median"
    pruner_warmup_epochs: int = Field(2, ge=0)
    heartbeat_seconds: int = Field(60, ge=1)
    storage: str = "sqlite:///optuna.db"
    study_name: str = "adps"
    objective: Literal["decision_f1", MetricName] = "decision_f1"
    budget: TuneBudgetParams = TuneBudgetParams()
    space: dict[str, Distribution] = Field(default_factory=dict)  # the default space lives in params.yaml

    @model_validator(mode="after")
    def _check_bounds(self) -> TuneParams:
        for key, dist in self.space.items():
            if isinstance(dist, CategoricalDistribution):
                continue
            if not dist.low < dist.high:
                raise ValueError(f"tune.space.{key}: low must be below high (got {dist.low} and {dist.high})")
            if dist.log and dist.low <= 0:
                raise ValueError(
                    f"tune.space.{key}: a log range must start above 0 (got low {dist.low}); set log: false"
                )
        return self


class Params(Section):
    """All pipeline parameters; one instance per params file.

    ``root`` is the project root every path of :mod:`adps.paths` is resolved against: the params
    file's folder (or the working directory for params built in code). It is not a parameter: it
    is not dumped, logged or tuned, and :meth:`at` gives the same params for another root.
    """

    _root: Path = PrivateAttr(default_factory=lambda: Path.cwd().resolve())

    runtime: RuntimeParams = RuntimeParams()
    data: DataParams = DataParams()
    synthetic: SyntheticParams = SyntheticParams()
    anomalies: AnomalyParams = AnomalyParams()
    validation: ValidationParams = ValidationParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    loss: LossParams = LossParams()
    score: ScoreParams = ScoreParams()
    threshold: ThresholdParams = ThresholdParams()
    evaluation: EvaluationParams = EvaluationParams()
    tracking: TrackingParams = TrackingParams()
    registry: RegistryParams = RegistryParams()
    schedule: ScheduleParams = ScheduleParams()
    tune: TuneParams = TuneParams()
    production: ProductionParams = ProductionParams()
    monitor: MonitorParams = MonitorParams()

    @property
    def root(self) -> Path:
        return self._root

    def at(self, root: Path | str) -> Params:
        """The same params for a project at ``root`` (e.g. a tuning trial's own folder)."""
        moved = self.model_copy()
        moved._root = Path(root).resolve()
        return moved

    @model_validator(mode="after")
    def _check_tune_space(self) -> Params:
        tunable = set(flatten_params(self, include_tune=False))
        unknown = sorted(set(self.tune.space) - tunable)
        if unknown:
            close = {k: next(iter(difflib.get_close_matches(renamed_key(k) or k, tunable, n=1)), None) for k in unknown}
            hints = ", ".join(f"'{k}'" + (f" (did you mean '{c}'?)" if c else "") for k, c in close.items())
            raise ValueError(f"tune.space names parameters that do not exist: {hints}")
        fixed = {key: why for key in self.tune.space if (why := not_tunable(key))}
        if fixed:
            raise ValueError(
                "tune.space names parameters a trial cannot tune: "
                + "; ".join(f"'{key}' ({why})" for key, why in fixed.items())
            )
        return self

    @model_validator(mode="after")
    def _check_tune_values(self) -> Params:
        """Every value a trial can draw must be valid for its target: both ends of a range (and a
        fractional value of a float range, which an int target refuses), and every choice."""
        base = self.model_dump(mode="json")
        base["tune"]["space"] = {}
        for key, dist in self.tune.space.items():
            for label, value in probe_values(dist):
                trial = copy.deepcopy(base)
                set_dotted(trial, key, value)
                try:
                    Params.model_validate(trial)
                except ValidationError as err:
                    why = "; ".join(describe_error(e) for e in err.errors())
                    raise ValueError(f"tune.space.{key}: {label} {value!r} cannot be used: {why}") from None
        return self

    @model_validator(mode="after")
    def _check_patch_geometry(self) -> Params:
        problem = patch_geometry_problem(self.data.image_size, self.model.patches, self.model.split_after)
        if problem:
            raise ValueError(problem)
        return self


RENAMED = {"synthesis": "anomalies"}  # params sections renamed since 0.1.0: old name -> new name


def renamed_key(key: str) -> str | None:
    """The current name of a dotted params key whose section was renamed (``synthesis.x`` -> ``anomalies.x``)."""
    section, dot, rest = key.partition(".")
    return RENAMED[section] + dot + rest if section in RENAMED else None


NOT_TUNABLE = {  # key prefix -> why a trial cannot tune it
    "train.distill.epochs": "every trial trains tune.budget.distill_epochs",
    "train.psm.epochs": "every trial trains tune.budget.psm_epochs",
    "runtime.": "runtime settings are not hyperparameters",
    "data.source": "a study tunes on one dataset",
    "data.categories": "a study tunes one category",
    "data.import_path": "a study tunes on one dataset",
    "data.folder.": "a study tunes on one dataset",
    "synthetic.": "the embedded dataset is made by `adps prepare`, not by a trial",
    "validation.": "dataset checks do not run in a trial",
    "data.val_defect_fraction": "it changes the validation split that trials are compared on",
    "model.kind": "a trial tunes the ADPS parts; the kind is chosen by `adps evaluate` (model.kind: auto)",
    "model.memory_bank.": "a trial scores the ADPS parts only; bank settings do not reach its objective",
    "tracking.": "not part of a trial's result",
    "registry.": "not part of a trial's result",
    "schedule.": "not part of a trial's result",
    "production.": "not part of a trial's result",
    "monitor.": "not part of a trial's result",
}


def not_tunable(key: str) -> str | None:
    """Why ``key`` cannot be in ``tune.space`` (a trial overrides it, or it changes nothing a trial measures)."""
    return next((why for prefix, why in NOT_TUNABLE.items() if key == prefix or key.startswith(prefix)), None)


def probe_values(dist: FloatDistribution | IntDistribution | CategoricalDistribution) -> list[tuple[str, Any]]:
    """(label, value) pairs a trial can draw that stand for all it can draw (see Params._check_tune_values)."""
    if isinstance(dist, CategoricalDistribution):
        return [("choice", choice) for choice in dist.choices]
    probes: list[tuple[str, Any]] = [("low", dist.low), ("high", dist.high)]
    if isinstance(dist, FloatDistribution):
        middle = math.floor((dist.low + dist.high) / 2) + 0.5
        probes.append(("a value", middle if dist.low < middle < dist.high else (dist.low + dist.high) / 2))
    elif dist.low + 1 < dist.high:
        probes.append(("a value", dist.low + 1))  # steps such as data.image_size's multiples of 32
    return probes


def patch_geometry_problem(image_size: int, k: int, split_after: tuple[int, ...]) -> str | None:
    """Why the student's k x k patches do not fit the image and the backbone strides, or None.

    Each patch must be divisible by the stride still ahead of it (16 from the input, 4 after layer1,
    2 after layer2), so that the stitched student maps have the teacher's size.
    """
    if k == 1:
        return None
    size = image_size
    for boundary, stride, remaining in ((0, 4, 16), (1, 2, 4), (2, 2, 2)):
        if boundary in split_after:
            if size % k or (size // k) % remaining:
                return (
                    f"model.patches={k} with model.split_after containing {boundary}: a {size}px map cannot be cut "
                    f"into {k}x{k} patches divisible by {remaining}; lower model.patches or raise data.image_size"
                )
            size //= k
        size //= stride
    return None


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (else the last one wins in silence)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is written twice in one section", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping)


def find_params(start: Path | None = None) -> Path | None:
    """The project's params.yaml: in ``start`` (default: the working directory) or the nearest folder above it."""
    start = (start or Path.cwd()).resolve()
    return next((f / PARAMS_FILE for f in (start, *start.parents) if (f / PARAMS_FILE).is_file()), None)


def params_path_or_project(path: Path | str | None) -> Path:
    """``path`` when given, else the params.yaml of the project the working directory lies in.

    Raises:
        ParamsError: no path given and the working directory is in no project.
    """
    if path is not None:
        return Path(path)
    found = find_params()
    if found is None:
        raise ParamsError(
            f"not in an ADPS project: no {PARAMS_FILE} in {Path.cwd()} or any folder above it. "
            "Run the command inside the project, or pass --params PATH."
        )
    return found


def load_params(path: Path | str | None = None) -> Params:
    """Load and validate a params file (default: the project's, found from the working directory).

    Raises:
        ParamsError: the file is missing, is not YAML, or has unknown keys or bad values.
    """
    path = params_path_or_project(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}. Give the project's params.yaml with --params PATH.")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # a SafeLoader
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path} is not UTF-8 text ({err}); save it as UTF-8.") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from err
    if raw is None:
        raise ParamsError(f"{path} is empty: copy the project's params.yaml and edit it (defaults are never implied).")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return params_from_dict(raw, source=str(path), root=path.resolve().parent)


def params_from_dict(raw: dict[str, Any], source: str = "params", root: Path | str | None = None) -> Params:
    """Validate a params mapping, turning pydantic errors into one readable ParamsError.

    ``root``: the project root (default: the working directory).
    """
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        lines = [describe_error(e) for e in err.errors()]
        raise ParamsError(f"{source}: invalid parameters:\n  - " + "\n  - ".join(lines)) from None
    return params if root is None else params.at(root)


def describe_error(error: dict[str, Any]) -> str:
    """One line for one pydantic error: key path, bad value, what is allowed."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<root>"
    if error["type"] == "extra_forbidden":
        if new := renamed_key(key):
            return f"'{key}' was renamed '{new}': rename it in the params file"
        allowed = allowed_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" (did you mean '{'.'.join([*loc[:-1], close[0]])}'?)" if close else ""
        return f"unknown key '{key}'{hint}; allowed here: {', '.join(allowed)}"
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error.get("input"), dict):  # a whole-section check: the message names the keys
        return message if key == "<root>" or message.startswith(f"{key}.") else f"{key}: {message}"
    return f"{key}: {message} (got {error.get('input')!r})"


def allowed_keys(loc: list[str]) -> list[str]:
    """Field names of the params section at ``loc`` (empty when it is not a section)."""
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, Section)):
            return []
        model = field.annotation
    return list(model.model_fields)


def flatten_tree(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"section.key": value}`` (leaves are non-mappings)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_tree(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def set_dotted(tree: Any, key: str, value: Any) -> None:
    """Set ``tree["a"]["b"]`` for ``key="a.b"``, creating missing levels (works on any mutable mapping)."""
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def dotted_value(params: Params, key: str) -> Any:
    """The JSON value of a params key or section, ``"loss.push_weight"`` or ``"model"``."""
    value: Any = params.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    return value


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``; the inverse of :func:`flatten_tree`."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        set_dotted(nested, key, value)
    return nested


def flatten_params(params: Params, include_tune: bool = True) -> dict[str, Any]:
    """Params as ``{"section.key": value}``, for logging, tracking and tuning."""
    dumped = params.model_dump(mode="json")
    if not include_tune:
        dumped.pop("tune")
    return flatten_tree(dumped)


def override_params(params: Params, values: dict[str, Any]) -> Params:
    """A validated copy of ``params`` with ``{"section.key": value}`` overrides applied."""
    raw = params.model_dump(mode="json")
    for key, value in values.items():
        set_dotted(raw, key, value)
    return params_from_dict(raw, source="overrides", root=params.root)
