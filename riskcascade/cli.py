"""The `riskcascade` command: set up, run and stop the platform.

    riskcascade up       train and index if needed, then serve until Ctrl-C / SIGTERM / `riskcascade down`
    riskcascade down     stop a running platform cleanly
    riskcascade train    train, calibrate and export the fast model (synthetic data by default)
    riskcascade eval     train on each split of a data set and report quality (metrics, plots)
    riskcascade data     write a built-in data set in the documented format
    riskcascade index    build the retrieval indexes (Qdrant): cases and policies; idempotent
    riskcascade distill  retrain the fast model with the reasoner's verdicts as soft labels; report
    riskcascade text-lift  train with and without the text model on one split; report what the text adds
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import click

from riskcascade.core.config import ConfigError, Settings, load_settings
from riskcascade.core.model_registry import ModelRegistry, UnknownModelVersion, live_model_dir

INDEX_MANIFEST = "index-manifest.json"


def _settings(config: str | None, **overrides: object) -> Settings:
    try:
        return load_settings(config, **overrides)
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
    from riskcascade.modelling.datasets import open_dataset
    from riskcascade.modelling.datasets.format import DatasetFormatError

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
    from riskcascade.modelling.training import train_model

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


@main.command()
@config_option
@click.option("--events", "events_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="events in the generator's CSV format (e.g. written by `riskcascade data`)")
@click.option("--split", type=click.Choice(["valid", "test"]), default=None,
              help="or one of the data set's own splits")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/drift", show_default=True,
              help="folder for drift.md, drift.json and drift.png")
def drift(config: str | None, events_file: str | None, split: str | None, out_dir: str) -> None:
    """Population stability of events against the deployed model's training reference: each input, the score,
    and the escalation share against the band's (table, JSON, PNG)."""
    if (events_file is None) == (split is None):
        raise click.UsageError("give exactly one of --events FILE and --split valid|test")
    from riskcascade.drift_report import DriftReportError, run_drift_report

    settings = _settings(config)
    try:
        report = run_drift_report(settings, Path(out_dir), Path(events_file) if events_file else None, split)
    except (DriftReportError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    moved = [f for f in report["features"] if f["status"] != "stable"]
    click.echo(f"{report['n_events']:,} events: score PSI {report['score']['psi']:.3f} ({report['score']['status']}), "
               f"{len(moved)} of {len(report['features'])} inputs moved, escalation share "
               f"{report['escalation_share']['live']:.1%}; report in {out_dir}/drift.md")


@main.command()
@config_option
@click.option("--model-dir", "model_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="a model registry or version folder  [default: the live model in model.dir]")
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="only the split's first N events")
@click.option("--examples", type=click.IntRange(min=0), default=3, show_default=True,
              help="events shown in full, with an APPROVE change found and without")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/counterfactual",
              show_default=True, help="folder for report.md and report.json")
def explain(config: str | None, model_dir: str | None, split: str, limit: int | None, examples: int,
            out_dir: str) -> None:
    """Counterfactual explanations of the fast model on a data set split: for each event it does not approve, the
    smallest change to the model card's actionable features that would flip it (what Decide returns with
    explain=true)."""
    from riskcascade.explain_report import explain_split, write_explain_report

    settings = _settings(config)
    folder = live_model_dir(Path(model_dir) if model_dir else settings.model.dir)
    report = explain_split(settings, folder, _data_events(settings), split, limit, examples, _command_line())
    if not report["actionable"]:
        click.echo(f"model {report['model_version']} declares no actionable features (a card written before them, or "
                   "a data set without them): every search finds none; retrain to write them", err=True)
    md, _ = write_explain_report(report, Path(out_dir))
    asked = report["at_or_above_band"]
    found = report["outcomes"].get("approve:found", 0)
    click.echo(f"{report['events']:,} events, {asked:,} not approved by the fast model; an actionable change to "
               f"APPROVE found for {found:,} ({found / max(asked, 1):.1%}); report in {md}")


@main.command()
@config_option
@click.option("--model", "version", default=None,
              help="the candidate model version in the registry (`riskcascade model list`)")
@click.option("--model-dir", "model_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="the candidate model folder  [default: the live version of model.dir]")
@click.option("--band-low", type=click.FloatRange(0, 1), default=None,
              help="candidate band's low edge  [default: escalation.band_low, else the candidate card's]")
@click.option("--band-high", type=click.FloatRange(0, 1), default=None,
              help="candidate band's high edge  [default: escalation.band_high, else the candidate card's]")
@click.option("--since", default=None, help="first event time compared (ISO 8601; UTC if no zone)")
@click.option("--until", default=None, help="last event time replayed (ISO 8601; UTC if no zone)")
@click.option("--as-of", "as_of", default=None, help="labels known by this time (ISO 8601)  [default: now]")
@click.option("--store", "store", default=None,
              help="the decision store to replay: a SQLite file or a PostgreSQL URL  [default: store.url, else "
              "store.sqlite_path]")
@click.option("--review", is_flag=True,
              help="review the events only the candidate escalates with the reasoner offline (needs `index`); "
              "otherwise they count as merge.undecided_action")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/backtest", show_default=True,
              help="folder for backtest.md and backtest.json")
@click.option("--quiet", is_flag=True, help="no progress bars")
def backtest(config: str | None, version: str | None, model_dir: str | None, band_low: float | None,
             band_high: float | None,
             since: str | None, until: str | None, as_of: str | None, store: str | None, review: bool, out_dir: str,
             quiet: bool) -> None:
    """Replay recorded decisions (time order, labels as they arrived) through a candidate model or band and
    report what would have changed: actions, escalations, fraud caught, false positives, cost per 1,000."""

    from riskcascade.backtest import BacktestError, parse_time, run_backtest

    times = {}
    for option, value in (("--since", since), ("--until", until), ("--as-of", as_of)):
        try:
            times[option] = parse_time(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    settings = _settings(config)
    if version is not None:
        if model_dir is not None:
            raise click.UsageError("give --model or --model-dir, not both")
        try:
            model_dir = str(ModelRegistry(settings.model.dir).path(version))
        except UnknownModelVersion as exc:
            raise click.ClickException(str(exc)) from None
    try:
        run_backtest(
            settings, Path(out_dir), model_dir=Path(model_dir) if model_dir else None, band=(band_low, band_high),
            since=times["--since"], until=times["--until"], as_of=times["--as-of"],
            store=_store_option(store), review=review, progress=not quiet,
            command=_command_line(), message=click.echo,
        )
    except (BacktestError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"report in {out_dir}/backtest.md")


@main.command()
@config_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/distill", show_default=True,
              help="folder for distill.md, distill.json and distill.png")
@click.option("--quiet", is_flag=True, help="no progress bars")
def distill(config: str | None, out_dir: str, quiet: bool) -> None:
    """Retrain the fast model with the reasoner's verdicts on escalated events as soft labels (labels only as they
    had arrived), in rounds over later periods; publish each round's winner (not live) and report every variant
    on a later period (needs `train` and `index`; settings under distill:)."""
    from riskcascade.distill import run_distillation

    settings = _settings(config)
    try:
        report = run_distillation(settings, Path(out_dir), command=_command_line(), progress=not quiet)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for rnd in report["rounds"]:
        click.echo(f"round {rnd['round']}: winner {rnd['winner']}, published {rnd['published']} (not live)")
    click.echo(f"report in {out_dir}/distill.md")


@main.command(name="text-lift")
@config_option
@dataset_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/text-model", show_default=True,
              help="folder for report.md and report.json")
@click.option("--bootstrap", "bootstrap_rounds", type=click.IntRange(min=10), default=200, show_default=True,
              help="paired bootstrap rounds of the average-precision difference")
@click.option("--quiet", is_flag=True, help="no progress bars")
def text_lift(config: str | None, dataset: str, out_dir: str, bootstrap_rounds: int, quiet: bool) -> None:
    """Train the fast model with and without the text model on the same split and seed; report both on the test
    period, the difference with a bootstrap interval, and the events the numbers leave uncertain."""
    from riskcascade.text_lift import TextLiftError, run_text_lift

    settings = _settings(config)
    data, source = _open_dataset(settings, dataset)
    try:
        report = run_text_lift(settings, data, source, Path(out_dir), _command_line(), bootstrap_rounds,
                               progress=not quiet)
    except TextLiftError as exc:
        raise click.ClickException(str(exc)) from None
    figures = report["figures"]
    click.echo("average precision: {:.4f} without text, {:.4f} with text".format(
        figures["without text"]["average_precision"], figures["with text"]["average_precision"]))
    click.echo(f"report in {out_dir}/report.md")


@main.command(name="eval")
@config_option
@dataset_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="report folder (default: var/eval/<data set>)")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="stratified splits to draw when the data set has no fixed split columns and no time split "
              "(refused otherwise)")
@click.option("--cascade", is_flag=True,
              help="instead: the served model + reasoner on the escalated cases of the synthetic data's held-out "
              "split, average precision of the fast model vs the cascade (needs `train` and `index` first)")
@click.option("--backend", type=click.Choice(["evidence", "llama_cpp", "openai_compatible"]), default=None,
              help="with --cascade: the reasoning LLM backend (default: llm.backend from the config)")
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True,
              help="with --cascade: the held-out split to review")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="with --cascade: review at most this many escalated cases, spread evenly (for slow backends)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def evaluate(config: str | None, dataset: str, out_dir: str | None, repeats: int, cascade: bool,
             backend: str | None, split: str, limit: int | None, quiet: bool) -> None:
    """Train on each split of a data set; report ROC-AUC, AP, recall at 1%/5% FPR, calibration, and PNG plots.

    With --cascade: measure what the reasoner adds on the cases the fast model escalates."""
    from riskcascade.modelling.evaluate_model import EvaluationSetupError, run_evaluation

    if cascade:
        _evaluate_cascade(config, dataset, out_dir, backend, split, limit, quiet)
        return
    if backend or limit:
        raise click.UsageError("--backend and --limit apply only with --cascade")
    settings = _settings(config)
    data, _ = _open_dataset(settings, dataset)
    out = Path(out_dir) if out_dir else Path("var/eval") / data.spec.name
    started = time.monotonic()
    try:  # refused before any training: --repeats with fixed split columns or a time split, no usable split
        result = run_evaluation(data, settings, out, repeats=repeats, progress=not quiet)
    except EvaluationSetupError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(result.report)
    click.echo(f"\n{len(result.per_split)} split(s) in {time.monotonic() - started:.1f} s; wrote "
               + ", ".join(str(f) for f in result.files))


def _evaluate_cascade(config: str | None, dataset: str, out_dir: str | None, backend: str | None, split: str,
                      limit: int | None, quiet: bool) -> None:
    from riskcascade.evaluate_cascade import run_cascade_evaluation

    if dataset != "synthetic":
        raise click.UsageError("--cascade evaluates the synthetic data set (its cases carry entities and notes)")
    overrides = {"llm": {"backend": backend}} if backend else {}
    settings = _settings(config, **overrides)
    out = Path(out_dir) if out_dir else Path("var/eval") / f"cascade-{settings.llm.backend}"
    try:
        result = run_cascade_evaluation(settings, out, split=split, limit=limit, progress=not quiet)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc} (run `riskcascade train` and `riskcascade index` first)") from None
    click.echo(result.report)
    click.echo("\nwrote " + ", ".join(str(f) for f in result.files))


@main.command()
@config_option
@click.argument("name", type=click.Choice(["synthetic", "yelpchi"]))
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--format", "table_format", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True)
def data(config: str | None, name: str, folder: str, table_format: str) -> None:
    """Write a built-in data set in the documented format (table + dataset.yaml) into FOLDER."""
    from riskcascade.modelling.datasets.format import write_dataset

    settings = _settings(config)
    dataset, _ = _open_dataset(settings, name)
    path = write_dataset(dataset, folder, table_name=f"table.{table_format}")
    click.echo(f"wrote {len(dataset)} rows of {name} to {path}")


INDEX_PARTS = ("cases", "policies")


@main.command()
@config_option
@click.option("--only", type=click.Choice(INDEX_PARTS), default=None,
              help="index only the adjudicated cases or only the policy documents (default: both)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def index(config: str | None, only: str | None, quiet: bool) -> None:
    """Build the retrieval indexes: adjudicated cases from the training data, policies from retrieval.policy_dir
    (re-running is idempotent)."""
    settings = _settings(config)
    _index(settings, progress=not quiet, parts=(only,) if only else INDEX_PARTS)


def _index(settings: Settings, progress: bool, parts: tuple[str, ...] = INDEX_PARTS) -> None:
    from retrieval.edge_store import EdgeShardLockedError
    from retrieval.embedding import EmbeddingArtifactNotFoundError
    from retrieval.indexing import build_case_index, build_policy_index
    from retrieval.policy_documents import PolicyFormatError
    from retrieval.stores import LegacyEdgeLayoutError
    from retrieval.text_vectors import open_text_embedder

    recorded = _recorded_identity(settings)
    try:
        identity = _index_identity(settings)
        embedder = open_text_embedder(settings.retrieval)  # one for both parts: loading it takes ~0.2 s
        for part in parts:
            if part == "cases":
                cases, encoder = _cases_to_index(settings)
                report = build_case_index(settings.retrieval, cases, encoder, progress=progress, embedder=embedder)
                click.echo(
                    f"cases: wrote {report.added} ({report.new:+d} new, {report.total} in total), "
                    f"{report.texts_embedded} distinct narratives embedded, into {report.backend} at "
                    f"{report.location} in {report.seconds:.1f} s ({report.added / report.seconds:.0f} cases/s)"
                )
            else:
                report = build_policy_index(settings.retrieval, progress=progress, embedder=embedder)
                click.echo(
                    f"policies: wrote {report.added} chunks ({report.new:+d} new, {report.total} in total) "
                    f"from {settings.retrieval.policy_dir} into {report.backend} at {report.location} "
                    f"in {report.seconds:.1f} s"
                )
            recorded[part] = identity[part]
            _manifest_path(settings).parent.mkdir(parents=True, exist_ok=True)
            _manifest_path(settings).write_text(json.dumps(recorded, indent=1))
    except (
        EmbeddingArtifactNotFoundError,
        PolicyFormatError,
        LegacyEdgeLayoutError,
        EdgeShardLockedError,
        FileNotFoundError,
    ) as exc:
        raise click.ClickException(str(exc)) from None


def _cases_to_index(settings: Settings):  # noqa: ANN202 - (cases, BehaviourEncoder); imports stay lazy
    from retrieval.case_memory import BehaviourEncoder
    from riskcascade.core.model_card import load_model_card
    from riskcascade.modelling.synthetic import to_adjudicated_case

    try:
        card = load_model_card(live_model_dir(settings.model.dir))
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    # Every split: each case carries the time its label arrived, and retrieval for an event only sees cases whose
    # label was known by then, so a later case in the index is the feedback that production would have received.
    cases = [to_adjudicated_case(e) for part in _data_events(settings).values() for e in part]
    return cases, BehaviourEncoder.from_model_card(card)


def _seed_state(settings: Settings, progress: bool) -> None:
    """Fold the data set's events and label arrivals into an empty live entity state (a time-true model only)."""
    from riskcascade.core.features import FeatureLayout
    from riskcascade.core.state_backends import open_entity_state
    from riskcascade.core.state_replay import seed_state
    from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
    from riskcascade.modelling.layout_fitting import timeline_of

    layout = FeatureLayout.load(live_model_dir(settings.model.dir)).state
    if layout is None or not settings.state.seed_from_data:
        return
    state = open_entity_state(settings.state, layout)
    try:
        if state.event_count():
            return
        timeline = timeline_of(synthetic_dataset(_data_events(settings)))
        started = time.monotonic()
        events, labels = seed_state(state, timeline)
        if progress:
            click.echo(f"entity state ({settings.state.backend}): {events} events and {labels} labels folded in "
                       f"{time.monotonic() - started:.1f} s")
    finally:
        state.close()


def _data_events(settings: Settings):  # noqa: ANN202 - {split: list[LabelledEvent]}
    from riskcascade.modelling.datasets import read_split_events

    try:
        return read_split_events(settings.data.dir)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _manifest_path(settings: Settings) -> Path:
    return settings.data.dir / INDEX_MANIFEST


def _index_identity(settings: Settings) -> dict[str, dict[str, str]]:
    """What each index was built from: when any of it changes, `up` re-indexes that part.

    Cases: the model card (behaviour scaling), the text embedder, the narrative wording and the payload layout
    (label arrival times); policies: the embedder and the policy files' bytes. Both: where the index lives.
    """
    from retrieval.case_nodes import CASE_PAYLOAD_VERSION
    from retrieval.indexing import policy_dir_digest
    from retrieval.narrative import NARRATIVE_VERSION
    from retrieval.stores import edge_shard_path
    from retrieval.text_vectors import embedder_identity
    from riskcascade.core.model_card import CARD_FILE, load_model_card

    r = settings.retrieval
    embedder = embedder_identity(r.embedding_dir)

    def where(collection: str) -> dict[str, str]:
        if r.backend == "qdrant":
            location = r.qdrant_url or str(r.qdrant_path)
        else:
            location = str(edge_shard_path(r, collection))
        return {"backend": r.backend, "location": location, "collection": collection, "embedder": embedder}

    model_dir = live_model_dir(settings.model.dir)
    return {
        "cases": {
            **where(r.collection),
            "model_version": load_model_card(model_dir).version if (model_dir / CARD_FILE).exists() else "",
            "narrative_version": str(NARRATIVE_VERSION),
            "payload_version": str(CASE_PAYLOAD_VERSION),
        },
        "policies": {**where(r.policy_collection), "policies_sha256": policy_dir_digest(r.policy_dir)},
    }


def _recorded_identity(settings: Settings) -> dict[str, dict[str, str]]:
    """The identity the last `index` run recorded, per part ({} when none, or in an older format)."""
    path = _manifest_path(settings)
    try:
        recorded = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {part: recorded[part] for part in INDEX_PARTS if isinstance(recorded.get(part), dict)}


def _stale_index_parts(settings: Settings) -> tuple[str, ...]:
    """The parts (cases, policies) whose index is missing or was built from something else."""
    from retrieval.embedding import EmbeddingArtifactNotFoundError

    try:
        identity = _index_identity(settings)
    except EmbeddingArtifactNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    recorded = _recorded_identity(settings)
    return tuple(part for part in INDEX_PARTS if recorded.get(part) != identity[part])


@main.command()
@config_option
@click.option("--quiet", is_flag=True, help="no progress bars during set-up")
def up(config: str | None, quiet: bool) -> None:
    """Start the platform on this machine (training and indexing first when needed)."""
    settings = _settings(config)
    _refuse_if_running(settings)
    _prepare_security(settings)
    _prepare_in_child(settings, progress=not quiet)
    from orchestrator.auth import SecurityError
    from orchestrator.platform import PlatformError, run_platform

    try:
        asyncio.run(run_platform(settings))
    except (PlatformError, SecurityError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("riskcascade stopped")


def _prepare_in_child(settings: Settings, progress: bool) -> None:
    """Train, index and seed the entity state in a spawned child process, then return to serve.

    The gateway process that serves next never loads what set-up needs (LightGBM, onnxruntime, numba, the
    embedder): it stays small, and the orchestrator imports no replica runtime even after a first start
    (``tests/test_layers.py`` reads its memory map)."""
    child = multiprocessing.get_context("spawn").Process(
        target=_prepare_data, args=(settings, progress), name="riskcascade-setup"
    )
    child.start()
    try:
        child.join()
    finally:
        if child.is_alive():  # this process is being stopped (Ctrl-C): stop set-up with it
            child.terminate()
            child.join()
    if child.exitcode != 0:
        raise click.ClickException(f"set-up did not finish (exit code {child.exitcode}); its message is above")


def _prepare_data(settings: Settings, progress: bool) -> None:
    """The set-up child: a model, an up-to-date retrieval index and a seeded entity state, each only when needed."""
    try:
        from riskcascade.core.model_card import CARD_FILE

        if not (live_model_dir(settings.model.dir) / CARD_FILE).exists():
            click.echo(f"no model at {settings.model.dir}: training one (riskcascade train)")
            _train(settings, progress=progress)
        if adopted := ModelRegistry(settings.model.dir).adopt_flat():
            click.echo(f"model {adopted} moved into the version registry ({settings.model.dir}/versions)")
        if stale := _stale_index_parts(settings):
            click.echo(
                f"retrieval index of {' and '.join(stale)} missing or built from another model, embedder or policy "
                "text: indexing (riskcascade index)"
            )
            _index(settings, progress=progress, parts=stale)
        _seed_state(settings, progress=progress)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


def _prepare_security(settings: Settings) -> None:
    """Refuse an exposed host without TLS and tokens; write dev material for missing files (security.dev_material);
    say where a client finds what it needs."""
    from riskcascade.dev_secrets import DevMaterialError, ensure_dev_material, missing_files

    security = settings.security
    if problem := security.exposure_problem(settings.server.host):
        raise click.ClickException(problem)
    if security.dev_material:
        try:
            written = ensure_dev_material(security)
        except (DevMaterialError, OSError) as exc:
            raise click.ClickException(f"cannot write development security material: {exc}") from None
        if written:
            click.echo("wrote development TLS and token material (mode 0600, not for production): "
                       + ", ".join(str(p) for p in written))
    elif missing := missing_files(security):
        raise click.ClickException(
            "security files missing (security.dev_material is off): " + ", ".join(str(p) for p in missing)
        )
    if security.tls or security.tokens:
        parts = [f"TLS, verify the server with {security.ca_file}"] if security.tls else []
        if security.tls and security.require_client_cert:
            parts.append(f"present {security.client_cert_file} (mutual TLS)")
        if security.tokens:
            parts.append(f"send `authorization: Bearer <token>`, the token is in {security.client_token_file}")
        click.echo("clients: " + "; ".join(parts) + " (orchestrator.client.open_channel does all of it)")


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
@click.option("--timeout", type=float, default=None, help="seconds to wait  [default: server.stop_wait_s]")
def down(config: str | None, timeout: float | None) -> None:
    """Stop the running platform cleanly (same as Ctrl-C in its terminal)."""
    settings = _settings(config)
    pid = _running_pid(settings)
    if pid is None:
        click.echo("riskcascade is not running")
        return
    os.kill(pid, signal.SIGTERM)
    timeout = settings.server.stop_wait_s if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _process_alive(pid):
            click.echo(f"riskcascade (pid {pid}) stopped")
            return
        time.sleep(0.2)
    click.echo(f"riskcascade (pid {pid}) did not stop within {timeout:.0f} s", err=True)
    sys.exit(1)


@main.group()
def model() -> None:
    """Model versions: list them, switch the one that serves (live, without a restart), roll back."""


@model.command(name="list")
@config_option
def model_list(config: str | None) -> None:
    """The published versions, oldest first; * marks the live one."""
    settings = _settings(config)
    registry = ModelRegistry(settings.model.dir)
    versions = registry.versions()
    if not versions:
        click.echo(f"no published versions in {registry.versions_dir} (`riskcascade train` publishes one)")
        return
    for v in versions:
        t = v.card.thresholds
        click.echo(f"{'*' if v.live else ' '} {v.version}  created {v.card.created_at}  band [{t.band_low:.4f}, "
                   f"{t.band_high:.4f})  test ROC-AUC {v.card.metrics.get('roc_auc', float('nan')):.4f}  "
                   f"data {v.card.data.get('dataset', '?')}")
    if previous := registry.previous():
        click.echo(f"rollback goes to {previous}")


@model.command(name="use")
@config_option
@click.argument("version", required=False)
@click.option("--rollback", is_flag=True, help="switch back to the version the live one replaced")
@click.option("--reason", default="", help="recorded in the registry's history")
@click.option("--offline", is_flag=True,
              help="only move the registry's pointer (the next start serves it); refused while the platform runs")
def model_use(config: str | None, version: str | None, rollback: bool, reason: str, offline: bool) -> None:
    """Serve VERSION: a running platform switches without a restart (ModelService.UseModel: every scorer replica
    loads it, then the gateway's band, inputs and validation switch in one step); a stopped one starts on it."""
    settings = _settings(config)
    if rollback == bool(version):
        raise click.UsageError("name a VERSION or give --rollback (not both)")
    pid = _running_pid(settings)
    if pid is None:
        registry = ModelRegistry(settings.model.dir)
        target = registry.previous() if rollback else version
        if target is None:
            raise click.ClickException("no earlier version to roll back to")
        try:
            registry.set_live(target, reason or ("rollback" if rollback else "riskcascade model use"))
        except UnknownModelVersion as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{target} is live: the next `riskcascade up` serves it")
        return
    if offline:
        raise click.ClickException(f"riskcascade is running (pid {pid}): switch it with `riskcascade model use` "
                                   "(no --offline), or stop it first")
    _switch_running(settings, version or "", rollback, reason)


@model.command(name="shadow")
@config_option
@click.argument("version", required=False)
@click.option("--band-low", type=click.FloatRange(0, 1), default=None, help="the candidate's band low edge")
@click.option("--band-high", type=click.FloatRange(0, 1), default=None, help="the candidate's band high edge")
@click.option("--policy-version", default="", help="names the candidate policy in the records")
@click.option("--off", is_flag=True, help="end the shadow")
def model_shadow(config: str | None, version: str | None, band_low: float | None, band_high: float | None,
                 policy_version: str, off: bool) -> None:
    """Run a candidate beside the live model on live traffic (VERSION, or the live model on another band): each
    decision records what it would have decided, never returned; `riskcascade shadow-report` compares them."""
    from risk.v1 import model_pb2

    settings = _settings(config)
    request = model_pb2.SetShadowRequest(version=version or "", policy_version=policy_version, off=off)
    if band_low is not None:
        request.band_low = band_low
    if band_high is not None:
        request.band_high = band_high
    response = _call_models(settings, "SetShadow", request)
    if not response.on:
        click.echo("shadow ended")
        return
    click.echo(f"shadow {response.version} ({response.policy_version}) on band [{response.band_low:.4f}, "
               f"{response.band_high:.4f}) beside the live model")


def _call_models(settings: Settings, method: str, request: object) -> object:
    """One ModelService call to the running platform (admin token), its failure said in one line."""
    import grpc

    from orchestrator.client import ClientSecurityError, open_channel
    from risk.v1 import model_pb2_grpc

    if _running_pid(settings) is None:
        raise click.ClickException("riskcascade is not running")
    wait_s = settings.ray.start_timeout_s + settings.ray.scorer_info_timeout_s
    try:
        with open_channel(settings) as channel:
            return getattr(model_pb2_grpc.ModelServiceStub(channel), method)(request, timeout=wait_s)
    except ClientSecurityError as exc:
        raise click.ClickException(str(exc)) from None
    except grpc.RpcError as exc:
        raise click.ClickException(f"{exc.code().name}: {exc.details()}") from None


@main.command(name="shadow-report")
@config_option
@click.option("--since", default=None, help="first decision time compared (ISO 8601; UTC if no zone)")
@click.option("--as-of", "as_of", default=None, help="labels known by this time (ISO 8601)  [default: now]")
@click.option("--store", default=None,
              help="the decision store: a SQLite file or a PostgreSQL URL  [default: store.url, else "
              "store.sqlite_path]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/shadow", show_default=True)
def shadow_report(config: str | None, since: str | None, as_of: str | None, store: str | None, out_dir: str) -> None:
    """The shadow candidate's recorded decisions against the live ones and the outcomes known."""
    from riskcascade.backtest import BacktestError, parse_time
    from riskcascade.shadow_report import run_shadow_report

    settings = _settings(config)
    try:
        report = run_shadow_report(settings, Path(out_dir), since=parse_time(since), as_of=parse_time(as_of),
                                   store=_store_option(store), command=_command_line())
    except (BacktestError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    c = report["counts"]
    click.echo(f"{c['agree']:,} of {c['decisions']:,} actions agree ({c['labelled']:,} labelled); report in "
               f"{out_dir}/shadow.md")


def _store_option(store: str | None) -> Path | str | None:
    """``--store``: a PostgreSQL URL as given, a SQLite file as a path; None = the config's store."""
    from orchestrator.store import is_database_url

    if store is None:
        return None
    return store if is_database_url(store) else Path(store)


def _command_line() -> str:
    """The running command as a report records it: its name and the options given (not the defaults), quoted; a
    store URL's password masked."""
    import shlex

    from orchestrator.store import shown_location

    ctx = click.get_current_context()
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    given = [flags[name] + ("" if value is True else f" {shlex.quote(shown_location(value))}")
             for name, value in ctx.params.items()
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    return " ".join(["riskcascade", ctx.info_name, *given])


def _switch_running(settings: Settings, version: str, rollback: bool, reason: str) -> None:
    from risk.v1 import model_pb2

    response = _call_models(settings, "UseModel",
                            model_pb2.UseModelRequest(version=version, rollback=rollback, reason=reason))
    info = response.info
    if not response.changed:
        click.echo(f"{info.model_version} is already live")
        return
    click.echo(f"switched {response.previous_version} -> {info.model_version} in {response.switch_ms:.0f} ms: "
               f"band [{info.band_low:.4f}, {info.band_high:.4f})")


if __name__ == "__main__":
    main()
