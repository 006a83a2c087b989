"""The riskcascade command's error paths: clear messages and non-zero exits, never a traceback."""

from pathlib import Path

from click.testing import CliRunner

from riskcascade.cli import main


def test_bad_config_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: not-a-port\n")
    result = CliRunner().invoke(main, ["up", "--config", str(cfg)])
    assert result.exit_code != 0
    assert "server.port" in result.output and "Traceback" not in result.output


def test_index_without_a_model_says_what_to_run(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  dir: {tmp_path / 'model'}\ndata:\n  dir: {tmp_path / 'data'}\n")
    result = CliRunner().invoke(main, ["index", "--config", str(cfg), "--quiet"])
    assert result.exit_code != 0 and "riskcascade train" in result.output


def test_down_when_nothing_runs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server:\n  pid_file: {tmp_path / 'none.pid'}\n")
    result = CliRunner().invoke(main, ["down", "--config", str(cfg)])
    assert result.exit_code == 0 and "not running" in result.output


def test_up_refuses_to_start_twice(tmp_path):
    import os

    pid_file = tmp_path / "rc.pid"
    pid_file.write_text(str(os.getpid()))  # this test process stands in for a running platform
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server:\n  pid_file: {pid_file}\n")
    result = CliRunner().invoke(main, ["up", "--config", str(cfg)])
    assert result.exit_code != 0 and "already running" in result.output


# -- index: the indexing `up` runs on first start, on a small data set ---------------------------------------------


def _small_platform(tmp_path):
    """A model card and training data as `riskcascade train` leaves them (no model file is needed to index)."""
    import shutil

    import numpy as np

    from riskcascade.core.model_card import (
        CalibrationSpec,
        FeatureScaling,
        ModelCard,
        OnnxSpec,
        Thresholds,
        write_model_card,
    )
    from riskcascade.modelling.synthetic import FEATURE_NAMES, generate_events, split_events, write_events_csv

    events = generate_events(500, seed=4)  # fraud comes in bursts: 500 events put both labels in every part
    for name, part in split_events(events, 4).items():  # `index` reads every split (labels carry their time)
        write_events_csv(tmp_path / "data" / f"{name}.csv", part)
    x = np.array([[e.features[f] for f in FEATURE_NAMES] for e in events])
    (tmp_path / "model").mkdir()
    write_model_card(tmp_path / "model", ModelCard(
        version="cli-test", created_at="2025-01-01T00:00:00Z", feature_names=list(FEATURE_NAMES),
        feature_descriptions={f: f for f in FEATURE_NAMES}, calibration=CalibrationSpec(a=1.0, b=0.0),
        thresholds=Thresholds(band_low=0.1, band_high=0.9, target_escalation_share=0.1),
        onnx=OnnxSpec(parity_max_abs_diff=0.0),
        feature_scaling=FeatureScaling(mean=x.mean(axis=0).tolist(), std=x.std(axis=0).tolist()),
    ))
    shutil.copytree(Path(__file__).resolve().parent.parent / "retrieval" / "policies", tmp_path / "policies")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model:\n  dir: {tmp_path / 'model'}\ndata:\n  dir: {tmp_path / 'data'}\n"
        f"retrieval:\n  edge_path: {tmp_path / 'edge'}\n  policy_dir: {tmp_path / 'policies'}\n"
        f"  embedding_dir: {Path(__file__).resolve().parent.parent / 'var' / 'embedding'}\n"
    )
    return cfg, len(events)


def test_index_builds_cases_and_policies_idempotently(tmp_path):
    from riskcascade.cli import _stale_index_parts
    from riskcascade.core.config import load_settings

    cfg, n_events = _small_platform(tmp_path)
    settings = load_settings(cfg)
    assert _stale_index_parts(settings) == ("cases", "policies")  # what `up` would index on first start
    first = CliRunner().invoke(main, ["index", "--config", str(cfg), "--quiet"])
    assert first.exit_code == 0, first.output
    assert f"cases: wrote {n_events} (+{n_events} new, {n_events} in total)" in first.output
    assert "policies: wrote 38 chunks (+38 new, 38 in total)" in first.output
    assert _stale_index_parts(settings) == ()
    again = CliRunner().invoke(main, ["index", "--config", str(cfg), "--quiet"])
    assert again.exit_code == 0 and f"(+0 new, {n_events} in total)" in again.output and "(+0 new, 38" in again.output

    policy = tmp_path / "policies" / "collusion.md"
    policy.write_text(policy.read_text() + "\n")
    assert _stale_index_parts(settings) == ("policies",)  # a policy edit re-indexes the policies only
    only = CliRunner().invoke(main, ["index", "--config", str(cfg), "--quiet", "--only", "policies"])
    assert only.exit_code == 0 and "cases:" not in only.output and "policies: wrote 38" in only.output
    assert _stale_index_parts(settings) == ()
    assert sorted(p.name for p in (tmp_path / "edge").iterdir()) == ["adjudicated_cases", "risk_policies"]


def test_index_reports_bad_policies_and_the_old_edge_layout_cleanly(tmp_path):
    from retrieval.edge_store import QdrantEdgeVectorStore

    cfg, _ = _small_platform(tmp_path)
    (tmp_path / "policies" / "broken.md").write_text("no front matter\n")
    bad = CliRunner().invoke(main, ["index", "--config", str(cfg), "--quiet", "--only", "policies"])
    assert bad.exit_code != 0 and "broken.md: does not start" in bad.output and "Traceback" not in bad.output
    QdrantEdgeVectorStore(tmp_path / "edge", 4).close()  # edge_path itself a shard: the layout before this one
    old = CliRunner().invoke(main, ["index", "--config", str(cfg), "--quiet", "--only", "cases"])
    assert old.exit_code != 0 and "rm -r" in old.output and "Traceback" not in old.output


def test_eval_cascade_options_are_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  dir: {tmp_path / 'no-model'}\ndata:\n  dir: {tmp_path / 'no-data'}\n")
    alone = CliRunner().invoke(main, ["eval", "--config", str(cfg), "--backend", "llama_cpp"])
    assert alone.exit_code == 2 and "only with --cascade" in alone.output
    yelp = CliRunner().invoke(main, ["eval", "--config", str(cfg), "--cascade", "--dataset", "yelpchi"])
    assert yelp.exit_code == 2 and "synthetic" in yelp.output
    missing = CliRunner().invoke(main, ["eval", "--config", str(cfg), "--cascade", "--quiet"])
    assert missing.exit_code == 1 and "riskcascade train" in missing.output


# -- eval --repeats: refused where it would not draw new splits -----------------------------------------------------


def _tiny_dataset(folder: Path, split_column: bool) -> Path:
    """A 40-row data set in the documented format with a time column, and a split column if asked."""
    import yaml

    rows = ["id,label,x,at,split"]
    parts = ("train", "valid", "test", "train", "valid", "test", "train")
    for i in range(40):
        rows.append(f"e{i},{i % 2},{i},2025-01-{1 + i // 24:02d}T{i % 24:02d}:00:00+00:00,{parts[i % len(parts)]}")
    (folder / "events.csv").write_text("\n".join(rows) + "\n")
    descriptor = {"name": "tiny", "table": "events.csv", "numeric_features": ["x"], "time_column": "at"}
    if split_column:
        descriptor["split_columns"] = ["split"]
    path = folder / "dataset.yaml"
    path.write_text(yaml.safe_dump(descriptor))
    return path


def test_eval_refuses_repeats_with_fixed_split_columns(tmp_path):
    path = _tiny_dataset(tmp_path, split_column=True)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", "--dataset", str(path), "--repeats", "3", "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "the data set brings its own split columns (split); --repeats draws new splits" in result.output
    assert "Traceback" not in result.output and not out.exists()  # refused before any training


def test_eval_refuses_repeats_with_a_time_split(tmp_path):
    path = _tiny_dataset(tmp_path, split_column=False)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", "--dataset", str(path), "--repeats", "2", "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "split by its time column (at" in result.output and "a time split is deterministic" in result.output
    assert "Traceback" not in result.output and not out.exists()
