"""The ``cardioscan`` command line.

Each command is a thin wrapper: it parses options and calls the module that does the
work, imported lazily so that ``cardioscan --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="cardioscan",
    help="Digitize scanned and photographed 12-lead ECGs; serve them over DICOM and FHIR.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML configuration file.")]
EngineOption = Annotated[str, typer.Option("--engine", help="auto, classic or learned.")]
WeightsDirOption = Annotated[Path | None, typer.Option(
    "--weights-dir", help="Learned weights: a manifest.json or the seed's .pth files.")]


def _use_weights_dir(weights_dir: Path | None) -> None:
    """Point ``pipeline.models`` (and worker processes started later) at other weights."""
    if weights_dir is not None:
        os.environ["CARDIOSCAN_WEIGHTS_DIR"] = str(weights_dir.resolve())


@app.command()
def digitize(
    images: Annotated[list[Path], typer.Argument(help="PNG, JPEG, TIFF, BMP, WebP or PDF files.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the records.")],
    fs: Annotated[int, typer.Option("--fs", help="Output sampling rate, Hz.")] = 500,
    format: Annotated[str, typer.Option("--format", help="Comma list of wfdb, json, csv.")] = (
        "wfdb,json"
    ),
    engine: EngineOption = "auto",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds allowed per image.")] = 60.0,
    weights_dir: WeightsDirOption = None,
) -> None:
    """Digitize each IMAGE into DIR/<stem>.hea/.dat (WFDB) and DIR/<stem>.json."""
    from service.digitize_cli import run_digitize

    _use_weights_dir(weights_dir)

    raise typer.Exit(run_digitize(images, out, fs=fs, formats=format, engine=engine,
                                  timeout_s=timeout))


@app.command()
def bench(
    set_: Annotated[str, typer.Option("--set", help="synthetic-scan, synthetic-photo or a DIR.")],
    n: Annotated[int | None, typer.Option("--n", help="Number of images.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    engine: EngineOption = "auto",
    batch: Annotated[int, typer.Option("--batch", help="Images per batch.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write figures here.")] = None,
    weights_dir: WeightsDirOption = None,
) -> None:
    """Score the digitizer on a fixed synthetic set or a folder of image + WFDB pairs."""
    from service.bench import run_bench

    _use_weights_dir(weights_dir)

    raise typer.Exit(run_bench(set_, n=n, device=device, engine=engine, batch=batch,
                               json_path=json_out))


@app.command()
def synth(
    contact_sheet: Annotated[
        Path | None, typer.Option("--contact-sheet", help="Write a sheet of pages to this PNG.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write pages + ground truth here.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Number of pages.")] = 24,
    style: Annotated[str, typer.Option("--style", help="clean, scan or photo.")] = "mixed",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    speed: Annotated[
        bool, typer.Option("--speed", help="Time generation instead: pages/s per style.")
    ] = False,
    width: Annotated[
        int | None, typer.Option("--width", help="Page width px for --speed (default: training's).")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Processes for --speed.")] = 2,
) -> None:
    """Generate synthetic ECG pages with exact ground truth, or time their generation."""
    from service.synth_cli import run_speed, run_synth

    if speed:
        raise typer.Exit(run_speed(width=width, workers=workers, n=n))
    raise typer.Exit(run_synth(contact_sheet=contact_sheet, out=out, n=n, style=style, seed=seed))


@app.command()
def serve(
    config: ConfigOption = None,
) -> None:
    """Start the DICOM listener, the HTTP/FHIR API and the workers."""
    from service.runtime import run_serve

    raise typer.Exit(run_serve(config))


@app.command()
def worker(
    config: ConfigOption = None,
) -> None:
    """Start workers alone, for scale-out."""
    from service.runtime import run_worker

    raise typer.Exit(run_worker(config))


@app.command()
def status(
    config: ConfigOption = None,
) -> None:
    """Print the queue and the dead letters."""
    from service.ops_cli import run_status

    raise typer.Exit(run_status(config))


@app.command()
def retry(
    job: Annotated[str | None, typer.Argument(help="Job id.")] = None,
    all_dead: Annotated[bool, typer.Option("--all-dead", help="Retry every dead job.")] = False,
    config: ConfigOption = None,
) -> None:
    """Put a failed or dead job (and its deliveries) back in the queue."""
    from service.ops_cli import run_retry

    raise typer.Exit(run_retry(job, all_dead=all_dead, config_path=config))


@config_app.command("show")
def config_show(
    config: ConfigOption = None,
) -> None:
    """Print the effective configuration, secrets masked."""
    from service.ops_cli import run_config_show

    raise typer.Exit(run_config_show(config))


@app.command()
def train(
    stage: Annotated[str, typer.Option("--stage", help="waveform (more later).")] = "waveform",
    out: Annotated[Path, typer.Option("--out", help="Checkpoint folder.")] = Path("var/train"),
    steps: Annotated[int, typer.Option("--steps")] = 20000,
    batch: Annotated[int, typer.Option("--batch")] = 16,
    device: Annotated[str, typer.Option("--device")] = "cuda",
    resume: Annotated[bool, typer.Option("--resume/--no-resume")] = True,
    time_limit: Annotated[float | None, typer.Option(
        "--time-limit", help="Seconds; stop, checkpoint and export before this.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Data processes.")] = None,
    photos_dev: Annotated[Path | None, typer.Option(
        "--photos-dev", help="Folder of photo + WFDB pairs to validate on.")] = None,
    val_every: Annotated[int | None, typer.Option("--val-every", help="Steps.")] = None,
    budget: Annotated[float | None, typer.Option(
        "--budget", help="Training seconds over all runs; the schedule spans them.")] = None,
) -> None:
    """Train a learned stage from nothing on synthetic pages; resumes from a checkpoint."""
    from service.train_cli import run_train

    raise typer.Exit(run_train(stage=stage, out=out, steps=steps, batch=batch, device=device,
                               resume=resume, time_limit_s=time_limit, workers=workers,
                               photos_dev=photos_dev, val_every=val_every, budget_s=budget))


if __name__ == "__main__":
    app()
