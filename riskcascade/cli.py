"""The `riskcascade` command: set up, run and stop the platform.

    riskcascade up       train and index if needed, then serve until Ctrl-C / SIGTERM / `riskcascade down`
    riskcascade down     stop a running platform cleanly
    riskcascade train    train, calibrate and export the fast model (synthetic data by default)
    riskcascade eval     train on each split of a data set and report quality (metrics, plots)
    riskcascade data     write a built-in data set in the documented format
    riskcascade index    build the case memory (Qdrant) from the training data; idempotent
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import click

from riskcascade.config import ConfigError, Settings, load_settings

STOP_TIMEOUT_S = 60.0
INDEX_MANIFEST = "index-manifest.json"


def _settings(config: str | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), default=None,
    help="riskcascade YAML config (default: $RISKCASCADE_CONFIG, else built-in defaults)",
)


@click.group()
def main() -> None:
    """riskcascade: a gRPC cascade decision platform for e-commerce risk."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")


dataset_option = click.option(
    "--dataset", default="synthetic", show_default=True,
    help="synthetic (generated), yelpchi (real, from the UGFraud package) or the path of a dataset.yaml",
)


def _open_dataset(settings: Settings, name: str, write_synthetic_csv: bool = False):  # noqa: ANN202
    from riskcascade.datasets import open_dataset
    from riskcascade.datasets.format import DatasetFormatError

    try:
        return open_dataset(name, settings, write_synthetic_csv=write_synthetic_csv)
    except DatasetFormatError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@config_option
@dataset_option
@click.option("--quiet", is_flag=True, help="no progress bars")
def train(config: str | None, dataset: str, quiet: bool) -> None:
    """Train the fast model, calibrate it, choose its band and export it to ONNX (into model.dir)."""
    settings = _settings(config)
    _train(settings, progress=not quiet, dataset=dataset)


def _train(settings: Settings, progress: bool, dataset: str = "synthetic") -> None:
    from riskcascade.training import train_model

    started = time.monotonic()
    data, source = _open_dataset(settings, dataset, write_synthetic_csv=dataset == "synthetic")
    card = train_model(settings, data, progress=progress, data=source)
    m = card.metrics
    click.echo(
        f"trained {card.version} on {data.spec.name} in {time.monotonic() - started:.1f} s -> {settings.model.dir}\n"
        f"  test ROC-AUC {m['roc_auc']:.4f}  AP {m['average_precision']:.4f}  "
        f"recall@1%FPR {m['recall_at_1pct_fpr']:.3f}  ECE {m['ece']:.4f}  "
        f"ONNX parity max |diff| {card.onnx.parity_max_abs_diff:.2e}\n"
        f"  escalation band [{card.thresholds.band_low:.4f}, {card.thresholds.band_high:.4f}) by {card.thresholds.rule}"
        f" rule: {m['escalation_share']:.1%} of test events"
    )


@main.command(name="eval")
@config_option
@dataset_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="report folder (default: var/eval/<data set>)")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="stratified splits to draw when the data set has no fixed splits")
@click.option("--quiet", is_flag=True, help="no progress bars")
def evaluate(config: str | None, dataset: str, out_dir: str | None, repeats: int, quiet: bool) -> None:
    """Train on each split of a data set; report ROC-AUC, AP, recall at 1%/5% FPR, calibration, and PNG plots."""
    from riskcascade.evaluate_model import run_evaluation

    settings = _settings(config)
    data, _ = _open_dataset(settings, dataset)
    out = Path(out_dir) if out_dir else Path("var/eval") / data.spec.name
    started = time.monotonic()
    result = run_evaluation(data, settings, out, repeats=repeats, progress=not quiet)
    click.echo(result.report)
    click.echo(f"\n{len(result.per_split)} split(s) in {time.monotonic() - started:.1f} s; wrote "
               + ", ".join(str(f) for f in result.files))


@main.command()
@config_option
@click.argument("name", type=click.Choice(["synthetic", "yelpchi"]))
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--format", "table_format", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True)
def data(config: str | None, name: str, folder: str, table_format: str) -> None:
    """Write a built-in data set in the documented format (table + dataset.yaml) into FOLDER."""
    from riskcascade.datasets.format import write_dataset

    settings = _settings(config)
    dataset, _ = _open_dataset(settings, name)
    path = write_dataset(dataset, folder, table_name=f"table.{table_format}")
    click.echo(f"wrote {len(dataset)} rows of {name} to {path}")


@main.command()
@config_option
@click.option("--quiet", is_flag=True, help="no progress bar")
def index(config: str | None, quiet: bool) -> None:
    """Build the case memory from the training data (re-running is idempotent)."""
    settings = _settings(config)
    _index(settings, progress=not quiet)


def _index(settings: Settings, progress: bool) -> None:
    from retrieval.case_memory import BehaviourEncoder
    from retrieval.indexing import build_case_index
    from riskcascade.model_card import load_model_card
    from riskcascade.synthetic import read_events_csv, to_adjudicated_case

    try:
        card = load_model_card(settings.model.dir)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    from riskcascade.datasets import SPLIT_FILES

    source = settings.data.dir / SPLIT_FILES["train"]
    if not source.exists():
        raise click.ClickException(f"no training data at {source}: run `riskcascade train` first")
    try:
        cases = [to_adjudicated_case(e) for e in read_events_csv(source)]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    report = build_case_index(
        settings.retrieval, cases, BehaviourEncoder.from_model_card(card), progress=progress
    )
    _manifest_path(settings).write_text(json.dumps(_index_identity(settings, card.version)))
    click.echo(
        f"indexed {report.added} cases ({report.total} in total) into {report.backend} at {report.location} "
        f"in {report.seconds:.1f} s"
    )


def _manifest_path(settings: Settings) -> Path:
    return settings.data.dir / INDEX_MANIFEST


def _index_identity(settings: Settings, model_version: str) -> dict[str, str]:
    r = settings.retrieval
    location = (r.qdrant_url or str(r.qdrant_path)) if r.backend == "qdrant" else str(r.edge_path)
    return {"model_version": model_version, "backend": r.backend, "location": location, "collection": r.collection}


def _index_is_current(settings: Settings) -> bool:
    from riskcascade.model_card import load_model_card

    path = _manifest_path(settings)
    if not path.exists():
        return False
    return json.loads(path.read_text()) == _index_identity(settings, load_model_card(settings.model.dir).version)


@main.command()
@config_option
@click.option("--quiet", is_flag=True, help="no progress bars during set-up")
def up(config: str | None, quiet: bool) -> None:
    """Start the platform on this machine (training and indexing first when needed)."""
    settings = _settings(config)
    _refuse_if_running(settings)
    from riskcascade.model_card import CARD_FILE

    if not (settings.model.dir / CARD_FILE).exists():
        click.echo(f"no model at {settings.model.dir}: training one (riskcascade train)")
        _train(settings, progress=not quiet)
    if not _index_is_current(settings):
        click.echo("case memory missing or built for another model: indexing (riskcascade index)")
        _index(settings, progress=not quiet)
    from orchestrator.platform import PlatformError, run_platform

    try:
        asyncio.run(run_platform(settings))
    except PlatformError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("riskcascade stopped")


def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs; an exited process its parent has not reaped yet (a zombie) counts as stopped."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.exists():  # Linux: read the state, so zombies are not mistaken for running
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running_pid(settings: Settings) -> int | None:
    path = settings.server.pid_file
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _process_alive(pid) else None


def _refuse_if_running(settings: Settings) -> None:
    pid = _running_pid(settings)
    if pid is not None:
        raise click.ClickException(
            f"riskcascade is already running (pid {pid}, {settings.server.pid_file}); `riskcascade down` stops it"
        )


@main.command()
@config_option
@click.option("--timeout", type=float, default=STOP_TIMEOUT_S, show_default=True, help="seconds to wait")
def down(config: str | None, timeout: float) -> None:
    """Stop the running platform cleanly (same as Ctrl-C in its terminal)."""
    settings = _settings(config)
    pid = _running_pid(settings)
    if pid is None:
        click.echo("riskcascade is not running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _process_alive(pid):
            click.echo(f"riskcascade (pid {pid}) stopped")
            return
        time.sleep(0.2)
    click.echo(f"riskcascade (pid {pid}) did not stop within {timeout:.0f} s", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
