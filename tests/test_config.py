"""The typed configuration: sources, precedence and errors that name the key."""

import asyncio
from pathlib import Path

import pytest

from riskcascade.core.config import ConfigError, load_settings


def test_defaults_resolve_paths_absolute():
    s = load_settings()
    assert s.server.port == 50051
    assert s.model.dir.is_absolute() and s.store.sqlite_path.is_absolute()


def test_yaml_then_env_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: 6000\n  max_batch_items: 7\nretrieval:\n  top_k: 4\n")
    monkeypatch.setenv("RISKCASCADE_SERVER__PORT", "6001")
    s = load_settings(cfg)
    assert s.server.port == 6001  # env beats YAML
    assert s.server.max_batch_items == 7 and s.retrieval.top_k == 4
    assert load_settings(cfg, server={"port": 6002}).server.port == 6002  # explicit beats env


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("server:\n  prot: 1\n", "server.prot"),
        ("retrieval:\n  top_k: 0\n", "retrieval.top_k"),
        ("retrieval:\n  backend: qdrant\n", "retrieval"),
        ("merge:\n  failure_action:\n    order: maybe\n", "merge.failure_action.order"),
    ],
)
def test_bad_values_name_the_key(tmp_path, yaml_text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(cfg)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad)


def test_wire_round_trip():
    from riskcascade.core.config import settings_from_wire

    s = load_settings()
    assert settings_from_wire(s.to_wire()) == s


def test_the_scorer_batching_is_set_once_in_the_serve_config_and_a_missing_key_is_named():
    """deploy/serve.yaml's user_config is the only place the scorer's batch size and wait are set: it validates,
    and a user_config without them is refused by name instead of served on Ray's own batch defaults."""
    import yaml

    from services.scorer.deployment import FastScorer, ScorerUserConfig

    serve = yaml.safe_load((Path(__file__).resolve().parent.parent / "deploy" / "serve.yaml").read_text())
    (scorer,) = [d for app in serve["applications"] for d in app["deployments"] if d["name"] == "FastScorer"]
    config = ScorerUserConfig.model_validate(scorer["user_config"])
    assert config.max_batch_size <= scorer["max_ongoing_requests"]  # or batches never fill (ray#43288)

    replica = FastScorer.func_or_class.__new__(FastScorer.func_or_class)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        asyncio.run(replica.reconfigure({"max_batch_size": 8}))
    with pytest.raises(ValueError, match="max_batch_sise"):
        asyncio.run(replica.reconfigure({"max_batch_sise": 8, "batch_wait_timeout_s": 0.001}))
