"""deploy/serve.yaml as operators use it: stage placement by Ray custom resources (ray.scorer_resources and
ray.reasoner_resources merged into the config the platform applies), the autoscaling blocks its comments offer, and
`serve deploy` of the file against a Ray head of its own (not the session platform's), with a custom resource that
only that head advertises carrying the reasoner."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator.platform import PlatformError, serve_config_with_settings, with_stage_resources
from riskcascade.core.config import ConfigError, load_settings
from tests.conftest import alive, descendants, free_port

REPO = Path(__file__).resolve().parent.parent
SERVE_YAML = REPO / "deploy" / "serve.yaml"
RESOURCE = "rc_test_reasoner_node"
# generous for a loaded 2-core machine: the head starts in ~15 s, training and indexing 1,000 events take ~35 s and
# both applications run ~30 s after the deploy
HEAD_START_TIMEOUT_S = 180
PREPARE_TIMEOUT_S = 300
RUNNING_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60
POLL_S = 1.0
SMALL_EVENTS = 1000  # the least data.n_events accepts


def _settings(**ray):
    return load_settings(ray={"serve_config": str(SERVE_YAML), **ray})


def _deployments(config: dict, app: str) -> list[dict]:
    (found,) = [a for a in config["applications"] if a["name"] == app]
    return found["deployments"]


# -- placement by custom resource ---------------------------------------------------------------------------------


def test_stage_resources_are_merged_into_each_deployment_of_their_stage():
    plain = serve_config_with_settings(_settings())
    placed = serve_config_with_settings(_settings(scorer_resources={"gpu_node": 0.5},
                                                  reasoner_resources={"reasoner_node": 1}))
    file = yaml.safe_load(SERVE_YAML.read_text())
    for app, resources in (("scorer", {"gpu_node": 0.5}), ("reasoner", {"reasoner_node": 1})):
        for deployment, before, source in zip(_deployments(placed, app), _deployments(plain, app),
                                              _deployments(file, app)):
            assert deployment["ray_actor_options"]["resources"] == resources
            # everything else is the file's: num_cpus, replicas, batching
            deployment["ray_actor_options"].pop("resources")
            assert deployment == before == source
    # without configured resources the served config is the file's (args aside)
    def without_args(apps: list[dict]) -> list[dict]:
        return [{k: v for k, v in a.items() if k != "args"} for a in apps]

    assert without_args(plain["applications"]) == without_args(file["applications"])


def test_a_configured_resource_wins_over_the_files_and_the_others_stay(tmp_path):
    config = yaml.safe_load(SERVE_YAML.read_text())
    _deployments(config, "reasoner")[0]["ray_actor_options"]["resources"] = {"reasoner_node": 2, "ssd": 1}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(ray={"serve_config": str(path), "reasoner_resources": {"reasoner_node": 1}})
    (reasoner,) = _deployments(serve_config_with_settings(settings), "reasoner")
    assert reasoner["ray_actor_options"]["resources"] == {"reasoner_node": 1, "ssd": 1}


def test_resources_for_an_application_that_lists_no_deployment_are_refused_by_name():
    config = {"applications": [{"name": "reasoner", "import_path": "services.app:build_reasoner_app"}]}
    with pytest.raises(PlatformError, match="reasoner application .* lists no deployment"):
        with_stage_resources(config, _settings(reasoner_resources={"reasoner_node": 1}))
    assert with_stage_resources(config, _settings()) == config  # nothing to place: nothing asked


def test_stage_resources_come_from_the_environment_and_must_be_positive(monkeypatch):
    monkeypatch.setenv("RISKCASCADE_RAY__REASONER_RESOURCES", '{"reasoner_node": 1}')
    assert load_settings().ray.reasoner_resources == {"reasoner_node": 1.0}
    monkeypatch.delenv("RISKCASCADE_RAY__REASONER_RESOURCES")
    with pytest.raises(ConfigError, match="ray.scorer_resources"):
        load_settings(ray={"scorer_resources": {"gpu_node": 0}})


@pytest.mark.parametrize("stage, replicas, state, retrieval, refused", [
    ("reasoner", {"num_replicas": 3}, {}, {"backend": "edge"}, "retrieval.backend: qdrant"),
    ("reasoner", {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}, {}, {"backend": "qdrant",
     "qdrant_path": "var/qdrant"}, "retrieval.backend: qdrant"),
    ("reasoner", {"num_replicas": 3}, {}, {"backend": "qdrant", "qdrant_url": "http://qdrant:6333"}, None),
    ("scorer", {"num_replicas": 2}, {}, {}, "state.backend: redis"),
    ("scorer", {"num_replicas": 2}, {"backend": "redis", "redis_url": "redis://redis:6379/0"}, {}, None),
    ("scorer", {"num_replicas": 1}, {}, {}, None),
])
def test_more_replicas_than_a_stages_state_can_share_are_refused_by_name(tmp_path, stage, replicas, state, retrieval,
                                                                         refused):
    config = yaml.safe_load(SERVE_YAML.read_text())
    (deployment,) = _deployments(config, stage)
    deployment.pop("num_replicas", None)
    deployment.update(replicas)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(ray={"serve_config": str(path)}, state=state, retrieval=retrieval)
    if refused is None:
        serve_config_with_settings(settings)
    else:
        with pytest.raises(PlatformError, match=f"{stage}/{deployment['name']} may run .* {refused}"):
            serve_config_with_settings(settings)


# -- autoscaling, as the comments of deploy/serve.yaml offer it ------------------------------------------------------


def _commented_autoscaling(text: str) -> dict[str, dict]:
    """The commented-out ``autoscaling_config`` block under each deployment of serve.yaml, by deployment name."""
    blocks, current, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- name: (\w+)$", line):
            current = m.group(1)
        if re.match(r"\s*# autoscaling_config:\s*$", line):
            body = ["autoscaling_config:"]
            for following in lines[i + 1:]:
                if not re.match(r"\s*#   ", following):
                    break
                body.append(following.split("#", 1)[1])
            blocks[current] = yaml.safe_load("\n".join(body))["autoscaling_config"]
    return blocks


def test_the_autoscaling_configs_offered_in_serve_yaml_deploy_and_keep_batches_full():
    """Uncommented in place of num_replicas, each block makes a config Serve accepts; the scorer's target stays
    within max_ongoing_requests and reaches its max_batch_size (a replica scales out only once its batches run full),
    and max_ongoing_requests stays >= max_batch_size (or batches never fill)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    text = SERVE_YAML.read_text()
    blocks = _commented_autoscaling(text)
    config = yaml.safe_load(text)
    assert set(blocks) == {d["name"] for app in config["applications"] for d in app["deployments"]}
    for app in config["applications"]:
        for deployment in app["deployments"]:
            block = blocks[deployment["name"]]
            unknown = set(block) - set(AutoscalingConfig.model_fields)  # Ray ignores unknown keys silently
            assert not unknown, f"{deployment['name']}: autoscaling_config has no {unknown}"
            AutoscalingConfig.model_validate(block)
            assert block["min_replicas"] <= block["max_replicas"]
            assert block["target_ongoing_requests"] < deployment["max_ongoing_requests"]
            assert block["upscale_delay_s"] < block["downscale_delay_s"]
            if batch := (deployment.get("user_config") or {}).get("max_batch_size"):
                assert deployment["max_ongoing_requests"] >= batch
                assert block["target_ongoing_requests"] >= batch
            deployment.pop("num_replicas")
            deployment["autoscaling_config"] = block
    ServeDeploySchema.model_validate(config)


# -- serve deploy against a Ray head of our own -------------------------------------------------------------------


def _wait(what: str, timeout_s: float, check, log: Path | None = None):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while True:
        if (result := check()) is not None:
            return result
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: not within {timeout_s} s\n{tail}")
        time.sleep(POLL_S)


def _serve_applications(dashboard: str, token: str) -> dict | None:
    """Serve's application details from the dashboard (what `serve status` prints), or None while unreachable."""
    request = urllib.request.Request(f"{dashboard}/api/serve/applications/",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _stop_process_tree(process: subprocess.Popen, timeout_s: float) -> None:
    """Stop `ray start --block` (it stops the Ray processes it started), then kill whatever of its tree is left."""
    tree = descendants(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in tree:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _prepare_model_and_index(workdir: Path) -> tuple[Path, subprocess.Popen]:
    """A riskcascade config over a small model and Qdrant Edge index of its own, trained and indexed by the CLI in a
    child process (started now, so it runs while the Ray head starts)."""
    config = {
        "model": {"dir": str(workdir / "model")},
        "data": {"dir": str(workdir / "data"), "n_events": SMALL_EVENTS, "seed": 11},
        "state": {"log_path": str(workdir / "entity-state.sqlite")},
        "retrieval": {"backend": "edge", "edge_path": str(workdir / "edge"),
                      "embedding_dir": str(REPO / "var" / "embedding"),
                      "policy_dir": str(REPO / "retrieval" / "policies")},
        "tracing": {"exporter": "none"},
        "ray": {"serve_config": str(SERVE_YAML), "reasoner_resources": {RESOURCE: 1}},
    }
    path = workdir / "riskcascade.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "riskcascade.cli"]
    script = (f"{' '.join(cli)} train --config {path} --quiet && {' '.join(cli)} index --config {path} --quiet")
    log = (workdir / "prepare.log").open("w")
    return path, subprocess.Popen(["bash", "-c", script], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_serve_deploy_of_the_serve_config_runs_both_applications_on_a_ray_head_of_its_own(tmp_path):
    if not (REPO / "var" / "embedding" / "model.onnx").exists():
        pytest.skip("no text embedder at var/embedding (make embedding)")
    serve_cli = shutil.which("serve", path=str(Path(sys.executable).parent))
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    # a folder of its own in the temporary directory, kept short: Ray's unix sockets live under it (a 107-byte limit)
    ray_dir = Path(tempfile.mkdtemp(prefix="rc-ray-"))
    token_file = ray_dir / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    # our own token file: nothing written to ~/.ray, where other clusters of this machine keep theirs
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    dashboard_port = free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    ports = {"--port": free_port(), "--dashboard-port": dashboard_port, "--ray-client-server-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    config_path, prepare = _prepare_model_and_index(tmp_path)
    head_log = tmp_path / "ray-head.log"
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
         "--resources", json.dumps({RESOURCE: 1}), "--temp-dir", str(ray_dir), "--dashboard-host", "127.0.0.1",
         "--disable-usage-stats", *[str(x) for item in ports.items() for x in item]],
        cwd=REPO, env=env, stdout=head_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    started = time.monotonic()
    try:
        assert prepare.wait(timeout=PREPARE_TIMEOUT_S) == 0, (tmp_path / "prepare.log").read_text()[-4000:]
        _wait("Serve's API on the new head's dashboard", HEAD_START_TIMEOUT_S,
              lambda: _serve_applications(dashboard, token), head_log)
        assert head.poll() is None, head_log.read_text()[-4000:]

        # deploy/serve.yaml as an operator deploys it: the builder args name a riskcascade config, and the
        # reasoner is placed by the resource the config asks for (the platform's own merge)
        settings = load_settings(config_path)
        serve_config = with_stage_resources(yaml.safe_load(SERVE_YAML.read_text()), settings)
        for app in serve_config["applications"]:
            app["args"] = {"config": str(config_path)}
        deploy_file = tmp_path / "serve.yaml"
        deploy_file.write_text(yaml.safe_dump(serve_config))
        deployed = subprocess.run([serve_cli, "deploy", str(deploy_file), "--address", dashboard],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=RUNNING_TIMEOUT_S)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

        apps = [settings.ray.scorer_app, settings.ray.reasoner_app]

        def running() -> dict | None:
            details = _serve_applications(dashboard, token) or {}
            states = {n: a["status"] for n, a in (details.get("applications") or {}).items()}
            failed = {n: s for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
            assert not failed, json.dumps(details.get("applications"), indent=1)[-4000:]
            return details if all(states.get(n) == "RUNNING" for n in apps) else None

        details = _wait("both applications RUNNING", RUNNING_TIMEOUT_S, running, head_log)
        reasoner = details["applications"][settings.ray.reasoner_app]
        (options,) = [d["ray_actor_options"] for d in reasoner["deployed_app_config"]["deployments"]]
        assert options["resources"] == {RESOURCE: 1}  # placed by the resource only this head advertises
        status = subprocess.run([serve_cli, "status", "--address", dashboard], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=RUNNING_TIMEOUT_S)
        reported = yaml.safe_load(status.stdout)["applications"]
        assert {n: reported[n]["status"] for n in apps} == {n: "RUNNING" for n in apps}, status.stdout
        print(f"serve deploy: both applications RUNNING {time.monotonic() - started:.0f} s after the head started")
    finally:
        if prepare.poll() is None:
            prepare.kill()
            prepare.wait()
        if head.poll() is None:
            try:
                subprocess.run([serve_cli, "shutdown", "-y", "--address", dashboard], cwd=REPO, env=env,
                               capture_output=True, timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass  # the head's processes are stopped below either way
        _stop_process_tree(head, STOP_TIMEOUT_S)
        shutil.rmtree(ray_dir, ignore_errors=True)
