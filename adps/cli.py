"""The ``adps`` command: one thin command per pipeline stage, each calling :mod:`adps.stages`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adps import paths, stages
from adps.config import Params, find_params, load_params
from adps.errors import AdpsError, ValidationFailed
from adps.files import finite_json, path_text
from adps.inference import PixelBudget, Predictor, predict_to_folder
from adps.runtime import pin_cpu_kernels

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Engine(StrEnum):
    torch = "torch"
    onnx = "onnx"


class ExportFormat(StrEnum):
    onnx = "onnx"


ParamsOption = Annotated[
    Path | None,
    typer.Option(
        "--params",
        "-p",
        help="Params file (YAML) to read every setting from [default: the project's params.yaml, found from the "
        "working directory up]",
        show_default=False,
    ),
]


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level`` (``runtime.log_level``): the command is the application, so it owns logging."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("great_expectations", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


DEBUG = {"on": False}


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of unexpected errors.")] = False,
) -> None:
    """ADPS anomaly detection pipeline: prepare data, validate, train, evaluate, predict."""
    DEBUG["on"] = debug


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """User errors become one message and exit 1; anything unexpected exits 2 (traceback with --debug)."""
    try:
        yield
    except ValidationFailed as err:
        print_failures(err.failures)
        console.print(f"[bold red]error:[/] {shown(err)}")
        raise typer.Exit(1) from None
    except AdpsError as err:
        console.print(f"[bold red]error:[/] {shown(err)}")
        raise typer.Exit(1) from None
    except Exception as err:
        if DEBUG["on"] or logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        console.print(
            f"[bold red]error:[/] unexpected {type(err).__name__}: {shown(err)}\n"
            "Run the same command as `adps --debug ...` to see the traceback."
        )
        raise typer.Exit(2) from None


def run_stage(stage: Callable[..., dict[str, Any]], params_path: Path | None, *args: Any) -> dict[str, Any]:
    """Load params, run one stage, print its result; errors are reported by :func:`reported_errors`."""
    with reported_errors():
        params = load_params(params_path)
        configure_logging(params.runtime.log_level)
        result = stage(params, *args)
    typer.echo(json_output(result))
    return result


def shown(value: object) -> str:
    """A message or name as terminal text: file names are bytes (a latin-1 name), and rich reads ``[x]`` in them as
    markup (a file named ``[/x].png`` would crash the error report). Line breaks of a message stay."""
    return escape("\n".join(path_text(line) for line in str(value).split("\n")))


def json_output(result: Any) -> str:
    """A command's result as valid JSON on stdout (NaN, an undefined metric, as null)."""
    return json.dumps(finite_json(result), indent=2, default=str, allow_nan=False)


def print_failures(failures: list[dict[str, str]]) -> None:
    table = Table(title="Dataset validation failures", show_lines=False)
    for column in ("file", "check", "reason"):
        table.add_column(column, overflow="fold")
    for failure in failures:
        table.add_row(shown(failure["file"]), shown(failure["check"]), shown(failure["reason"]))
    console.print(table)


def prepare_command(params: ParamsOption = None) -> None:
    run_stage(stages.prepare, params)


CategoryOption = Annotated[str, typer.Option("--category", "-c", help="Category to work on (one of data.categories).")]


def validate_command(
    category: Annotated[
        str | None, typer.Option("--category", "-c", help="Category to check (default: every one of data.categories).")
    ] = None,
    params: ParamsOption = None,
) -> None:
    with reported_errors():
        loaded = load_params(params)
        configure_logging(loaded.runtime.log_level)
        failed: list[ValidationFailed] = []
        for name in [category] if category else loaded.data.categories:
            try:
                typer.echo(json_output(stages.validate(loaded, name)))
            except ValidationFailed as err:
                failed.append(err)
        if failed:
            raise ValidationFailed("\n".join(map(str, failed)), [f for err in failed for f in err.failures])


def export_command(
    category: CategoryOption,
    format: Annotated[ExportFormat, typer.Option("--format", help="Export format.")] = ExportFormat.onnx,
    params: ParamsOption = None,
) -> None:
    run_stage(stages.export, params, category)


def category_command(stage: stages.Stage) -> Callable[..., None]:
    """The command of a per-category stage that takes nothing but the category and the params file."""

    def command(category: CategoryOption, params: ParamsOption = None) -> None:
        run_stage(stage.run, params, category)

    return command


OWN_OPTIONS = {"prepare": prepare_command, "validate": validate_command, "export": export_command}
for pipeline_stage in stages.PIPELINE:  # one command per stage of the table, in its order, with its summary
    command = OWN_OPTIONS.get(pipeline_stage.name) or category_command(pipeline_stage)
    app.command(name=pipeline_stage.name, help=pipeline_stage.summary)(command)


@app.command()
def promote(
    category: CategoryOption,
    version: Annotated[str, typer.Option("--version", "-v", help="Registered model version to make champion.")],
    params: ParamsOption = None,
) -> None:
    """Move the champion alias of adps-<category> to a version (as the MLflow UI does)."""
    run_stage(stages.promote, params, category, version)


@app.command()
def tune(
    category: CategoryOption,
    trials: Annotated[
        int | None, typer.Option("--trials", "-n", min=1, help="Trials to add (default tune.n_trials).")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes sharing the study.")] = 1,
    apply: Annotated[
        bool, typer.Option("--apply", help="Write the best params into the params file and stop.")
    ] = False,
    params: ParamsOption = None,
) -> None:
    """Tune loss, learning-rate, score and threshold params with Optuna on the validation split."""
    from adps import tuning

    if apply:
        run_stage(lambda _params: tuning.apply_best_params(params, category), params)
        return
    result = run_stage(tuning.tune, params, category, trials, workers)
    typer.echo(f"\nApply with:  adps tune --category {category} --apply   or:  {result['dvc_exp_run']}")


@app.command()
def report(params: ParamsOption = None) -> None:
    """Print the per-category metrics table (from reports/metrics) and where to look next."""
    with reported_errors():
        rows, notes = stages.summarize(load_params(params))
    table = Table(title="ADPS test metrics per category")
    table.add_column("category")
    columns = list(next(iter(rows.values()), {}))
    for column in columns:
        table.add_column(column, justify="right")
    for category, values in rows.items():
        table.add_row(category, *[table_cell(values[c]) for c in columns])
    if len(rows) > 1:
        means = [mean_of([r[c] for r in rows.values()]) if c != "kind" else "" for c in columns]
        table.add_row("mean", *[table_cell(m) for m in means], style="bold")
    Console(width=None if sys.stdout.isatty() else 140).print(table)
    for category, note in notes.items():
        typer.echo(f"{category}: {note}")
    typer.echo("Heatmaps: reports/heatmaps/<category>/  Curves: dvc plots show  Metrics: dvc metrics show")
    typer.echo(
        "MLflow UI: make up (or: mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000), "
        "then open http://127.0.0.1:5000"
    )


def table_cell(value: float | str | None) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.3f}"


def mean_of(values: list[float | None]) -> float | None:
    """Mean of the values present (a category without a metric does not count as 0)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def load_predictor(model: str, params_path: Path | None, device: str, engine: str = "torch") -> Predictor:
    """A model folder, or a registry URI ``models:/adps-<category>@champion`` (tracking URI from params)."""
    if engine == "onnx":
        if model.startswith("models:/"):
            raise AdpsError("--engine onnx takes a model folder with model.onnx (adps export), not a registry URI")
        from adps.export import onnx_predictor

        return onnx_predictor(Path(model)).to(device)
    if not model.startswith("models:/"):
        return Predictor.from_dir(Path(model), device)
    from adps import tracking

    tracking.connect(registry_params(params_path), create=False)
    return tracking.load_registered_predictor(model).to(device)


def registry_params(params_path: Path | None) -> Params:
    """The params that say where the registry is: the project's, or none needed when MLFLOW_TRACKING_URI is set."""
    if params_path is None and find_params() is None and os.environ.get("MLFLOW_TRACKING_URI"):
        return Params()
    return load_params(params_path)


@app.command()
def predict(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model folder (models/<category>) or models:/adps-<category>@champion.")
    ],
    input: Annotated[Path, typer.Option("--input", "-i", help="An image file or a folder of images (recursive).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for predictions.csv and heatmaps/.")],
    save_maps: Annotated[
        Path | None,
        typer.Option("--save-maps", help="Folder for each raw anomaly map as float32 .npy, at the image's own size."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present.")] = Device.auto,
    engine: Annotated[
        Engine,
        typer.Option("--engine", "--runtime", help="torch, or onnx (the folder's model.onnx in ONNX Runtime)."),
    ] = Engine.torch,
    params: Annotated[
        Path | None,
        typer.Option(
            "--params",
            "-p",
            help="Params file, for tracking.uri of a registry URI, the prediction log and the pixel budget "
            "(production.*) [default: the project's params.yaml; outside a project: the defaults, and no params "
            "needed for a model folder or with MLFLOW_TRACKING_URI set]",
            show_default=False,
        ),
    ] = None,
    log: Annotated[
        bool,
        typer.Option(
            "--log/--no-log",
            help="Record each prediction in the project's prediction log (production.log, or ADPS_PREDICTION_LOG) "
            "and keep flagged inputs for `adps review`.",
        ),
    ] = True,
) -> None:
    """Score images with a trained model; unreadable files are reported on their row and the rest still run."""
    configure_logging()
    with reported_errors():
        project = project_params(params)
        pin_cpu_kernels((project or Params()).runtime.cpu_kernels)  # the kernels evaluate chose thresholds with
        predictor = load_predictor(model, params, device.value, engine.value)
        predictor.budget = PixelBudget.from_params(project)
        model_dir = None if model.startswith("models:/") else Path(model)
        recorder = prediction_log(project, model) if log else None
        result = predict_to_folder(
            predictor, input, output, batch_size, sys.stderr.isatty(), save_maps, model_dir, recorder
        )
    typer.echo(json_output(result))


def project_params(params_path: Path | None) -> Params | None:
    """The params ``adps predict`` runs under (kernels, pixel budget, log): the file given, the project's
    params.yaml found from the working directory, or None outside a project (the defaults apply)."""
    found = params_path or find_params()
    return load_params(found) if found else None


def prediction_log(project: Params | None, model: str):
    """The log of ``adps predict``: the project's, else the environment's."""
    from adps.production.log import PredictionLog, log_settings, settings_where_served

    settings = log_settings(project) if project is not None else settings_where_served()
    name = model if model.startswith("models:/") else path_text(Path(model).resolve())
    return PredictionLog(settings, "predict", name)


review_app = typer.Typer(
    no_args_is_help=True,
    help="The review queue: inputs the prediction log kept (flagged, and a sampled share of passed ones). "
    "A verdict moves the image into data.import_path, so the next nightly run trains or tests on it.",
)
app.add_typer(review_app, name="review")


def review_queue(params: Params):
    from adps.production.log import log_settings
    from adps.production.review import ReviewQueue

    return ReviewQueue(log_settings(params).review_dir)  # the folder the log keeps inputs in


@review_app.command("list")
def review_list(
    category: Annotated[str | None, typer.Option("--category", "-c", help="Only this category.")] = None,
    params: ParamsOption = None,
) -> None:
    """List the inputs waiting for a verdict, oldest first, with their heatmaps."""
    with reported_errors():
        items = review_queue(load_params(params)).items(category)
    table = Table(title=f"Review queue: {len(items)} waiting")
    for column in ("id", "category", "why kept", "score", "threshold", "input", "heatmap"):
        table.add_column(column, overflow="fold")
    for item in items:
        table.add_row(
            item["id"],
            item["category"],
            item["reason"],
            f"{item['score']:.3f}",
            f"{item['threshold']:.3f}",
            item["input_name"],
            item["heatmap"],
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def give_verdict(ids: list[str], verdict: str, params_path: Path | None, mask: Path | None = None) -> None:
    from adps.production.review import IncomingFolders

    with reported_errors():
        params = load_params(params_path)
        if mask is not None and len(ids) != 1:
            raise AdpsError("--mask belongs to one image: give one id with it")
        folder = params.data.folder
        incoming = IncomingFolders(
            paths.import_dir(params),
            folder.normal,
            folder.anomalous,
            folder.masks,
            folder.mask_suffix,
            params.validation.min_side,
            params.data.mask_threshold,
        )
        queue = review_queue(params)
        for item_id in ids:
            typer.echo(json.dumps(queue.judge(item_id, verdict, incoming, mask)))


ReviewIds = Annotated[list[str], typer.Argument(help="Item ids from `adps review list` (a unique end is enough).")]


@review_app.command("good")
def review_good(ids: ReviewIds, params: ParamsOption = None) -> None:
    """Mark images good (a false alarm, or a sampled pass confirmed): they join the normal images."""
    give_verdict(ids, "good", params)


@review_app.command("defect")
def review_defect(
    ids: ReviewIds,
    mask: Annotated[
        Path | None,
        typer.Option(
            "--mask",
            help="The defect's mask (white = defect, the image's size); without it the image "
            "counts for image-level metrics only.",
        ),
    ] = None,
    params: ParamsOption = None,
) -> None:
    """Mark images defective: they join the test split as labelled defects."""
    give_verdict(ids, "defect", params, mask)


if __name__ == "__main__":
    app()
