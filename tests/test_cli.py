"""The riskcascade command's error paths: clear messages and non-zero exits, never a traceback."""

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
