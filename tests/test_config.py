"""The typed configuration: sources, precedence and errors that name the key."""

import pytest

from riskcascade.config import ConfigError, load_settings


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
    from riskcascade.config import settings_from_wire

    s = load_settings()
    assert settings_from_wire(s.to_wire()) == s
