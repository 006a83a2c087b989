"""The Kubernetes manifests in deploy/k8s: each object has the keys its kind needs, the objects agree with each other
(Services select pods and reach their ports, every Secret and ConfigMap named exists with the key named), the
RayService serves exactly deploy/serve.yaml's applications, and the riskcascade config they mount validates with
the typed settings and names only Services defined here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
SERVE_YAML = REPO / "deploy" / "serve.yaml"
CONFIG_MAP = "riskcascade-config"
CONFIG_KEY = "riskcascade.yaml"
# what a pod template's spec must hold, by the kind that owns it; every kind in the folder must be listed here
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
KNOWN_KINDS = WORKLOAD_KINDS | {"Service", "ConfigMap", "Secret", "RayService"}
PLACEHOLDER = "REPLACE-"


def manifests() -> list[dict]:
    objects = []
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append({**doc, "_file": path.name})
    return objects


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod template) for every pod an object creates."""
    if obj["kind"] in WORKLOAD_KINDS:
        yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]
    elif obj["kind"] == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        yield f"RayService/{obj['metadata']['name']}/head", cluster["headGroupSpec"]["template"]
        for group in cluster["workerGroupSpecs"]:
            yield f"RayService/{obj['metadata']['name']}/{group['groupName']}", group["template"]


def all_pod_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    return [t for o in objects for t in pod_templates(o)]


def service_ports(objects: list[dict]) -> dict[str, set[int]]:
    """Host name -> ports reachable there: our Services, and the head Service KubeRay makes for a RayService."""
    hosts = {name: {p["port"] for p in svc["spec"]["ports"]} for name, svc in by_kind(objects, "Service").items()}
    for name, rs in by_kind(objects, "RayService").items():
        head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        hosts[f"{name}-head-svc"] = {p["containerPort"] for p in head["ports"]}
    return hosts


def riskcascade_config_text(objects: list[dict]) -> str:
    return by_kind(objects, "ConfigMap")[CONFIG_MAP]["data"][CONFIG_KEY]


def load_k8s_settings(objects: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """The ConfigMap's riskcascade config through the project's loader (environment cleared: only the file counts)."""
    import os

    from riskcascade.core.config import load_settings

    for name in [n for n in os.environ if n.startswith("RISKCASCADE_")]:
        monkeypatch.delenv(name)
    path = tmp_path / CONFIG_KEY
    path.write_text(riskcascade_config_text(objects))
    return load_settings(path)


def serve_config_v2(objects: list[dict]) -> dict:
    (rayservice,) = by_kind(objects, "RayService").values()
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def advertised_resources(ray_start_params: dict) -> dict[str, float]:
    """A Ray group's `--resources`, in KubeRay's rayStartParams form '"{\\"name\\": n}"' (a quoted JSON string)."""
    text = ray_start_params.get("resources")
    if text is None:
        return {}
    text = text.strip()
    if text.startswith('"'):
        text = json.loads(text)
    return json.loads(text)


# -- each object on its own -------------------------------------------------------------------------------------------


def test_every_manifest_has_the_keys_of_its_kind():
    objects = manifests()
    assert objects, f"no manifest in {K8S}"
    names = set()
    for obj in objects:
        where = f"{obj['_file']}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        assert obj.get("apiVersion") and obj.get("kind") in KNOWN_KINDS, where
        assert obj["metadata"].get("name"), where
        assert (obj["kind"], obj["metadata"]["name"]) not in names, f"{where} defined twice"
        names.add((obj["kind"], obj["metadata"]["name"]))
        spec = obj.get("spec", {})
        if obj["kind"] in WORKLOAD_KINDS:
            assert obj["apiVersion"] == "apps/v1", where
            selector = spec["selector"]["matchLabels"]
            labels = spec["template"]["metadata"]["labels"]
            assert selector and selector.items() <= labels.items(), f"{where}: selector does not match its pods"
        if obj["kind"] == "StatefulSet":
            services = by_kind(objects, "Service")
            assert services[spec["serviceName"]]["spec"].get("clusterIP") == "None", f"{where}: governing Service"
            mounted = {m["name"] for c in spec["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
            claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
            assert claims and claims <= mounted, f"{where}: a volume claim template is not mounted"
            for claim in spec["volumeClaimTemplates"]:
                assert claim["spec"]["accessModes"] and claim["spec"]["resources"]["requests"]["storage"], where
        if obj["kind"] == "Service":
            assert spec["selector"] and spec["ports"], where
            assert all(isinstance(p["port"], int) and p.get("targetPort") for p in spec["ports"]), where
        if obj["kind"] == "ConfigMap":
            assert obj["data"], where
        if obj["kind"] == "Secret":
            assert obj.get("stringData") or obj.get("data"), where
        if obj["kind"] == "RayService":
            assert obj["apiVersion"] == "ray.io/v1", where
            assert isinstance(spec["serveConfigV2"], str), f"{where}: serveConfigV2 is a YAML string"
            cluster = spec["rayClusterConfig"]
            assert cluster["rayVersion"] and cluster["headGroupSpec"]["rayStartParams"] is not None, where
            for group in cluster["workerGroupSpecs"]:
                assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        for pod, template in pod_templates(obj):
            containers = template["spec"]["containers"]
            assert containers, pod
            for container in containers:
                image = container.get("image", "")
                assert container.get("name") and ":" in image and not image.endswith(":latest"), (
                    f"{pod}: every container has a name and a pinned image")
                for port in container.get("ports", []):
                    assert isinstance(port["containerPort"], int), f"{pod}/{container['name']}: {port}"


def test_secrets_hold_only_placeholders():
    """No secret value is committed: every value in a Secret is an obvious placeholder to replace."""
    for name, secret in by_kind(manifests(), "Secret").items():
        values = {**secret.get("stringData", {}), **secret.get("data", {})}
        for key, value in values.items():
            assert PLACEHOLDER in value, f"Secret {name} key {key} holds something other than a {PLACEHOLDER}... value"


# -- the objects together ---------------------------------------------------------------------------------------------


def test_every_service_selects_pods_and_targets_a_port_they_declare():
    objects = manifests()
    templates = all_pod_templates(objects)
    for name, service in by_kind(objects, "Service").items():
        selector = service["spec"]["selector"]
        selected = [(pod, t) for pod, t in templates if selector.items() <= t["metadata"].get("labels", {}).items()]
        assert selected, f"Service {name} selects no pod template (selector {selector})"
        declared = {(p.get("name"), p["containerPort"]) for _, t in selected
                    for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert any(target in (n, number) for n, number in declared), (
                f"Service {name} port {port['port']} targets {target!r}, which no selected container declares")


def test_every_secret_and_config_map_named_exists_with_the_key_named():
    objects = manifests()
    secrets = {n: {**s.get("stringData", {}), **s.get("data", {})} for n, s in by_kind(objects, "Secret").items()}
    config_maps = {n: c.get("data", {}) for n, c in by_kind(objects, "ConfigMap").items()}
    claims = {t["metadata"]["name"] for o in by_kind(objects, "StatefulSet").values()
              for t in o["spec"].get("volumeClaimTemplates", [])}
    references = 0
    for pod, template in all_pod_templates(objects):
        spec = template["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, f"{pod}: volume {volume['name']}"
                references += 1
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{pod}: volume {volume['name']}"
                references += 1
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes | claims, f"{pod}: mount of an undefined volume {mount['name']}"
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if ref := source.get("secretKeyRef"):
                    assert ref["key"] in secrets.get(ref["name"], {}), f"{pod}: {env['name']} from {ref}"
                    references += 1
                if ref := source.get("configMapKeyRef"):
                    assert ref["key"] in config_maps.get(ref["name"], {}), f"{pod}: {env['name']} from {ref}"
                    references += 1
    for rayservice in by_kind(objects, "RayService").values():
        auth = rayservice["spec"]["rayClusterConfig"].get("authOptions", {})
        if auth.get("mode") == "token":
            assert "auth_token" in secrets.get(auth.get("secretName"), {}), "authOptions.secretName: key auth_token"
            references += 1
    assert references, "the manifests reference no Secret or ConfigMap at all"


def test_the_orchestrator_mounts_its_config_and_the_tokens_file_it_names(tmp_path, monkeypatch):
    """The orchestrator runs with the ConfigMap's config, and security.tokens_file is a key of a Secret mounted at
    that path."""
    objects = manifests()
    settings = load_k8s_settings(objects, tmp_path, monkeypatch)
    template = by_kind(objects, "Deployment")["orchestrator"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            data = by_kind(objects, "ConfigMap")[volume["configMap"]["name"]]["data"]
        elif "secret" in volume:
            secret = by_kind(objects, "Secret")[volume["secret"]["secretName"]]
            data = {**secret.get("stringData", {}), **secret.get("data", {})}
        else:  # a writable folder (emptyDir): holds no file of ours
            data = {}
        files.update({f"{mount['mountPath']}/{key}": volume for key in data})
    config_path = container["command"][container["command"].index("--config") + 1]
    assert config_path in files and "configMap" in files[config_path], f"--config {config_path} is not mounted"
    assert settings.security.tokens, "the orchestrator must check tokens"
    assert str(settings.security.tokens_file) in files, f"security.tokens_file {settings.security.tokens_file}"
    assert "secret" in files[str(settings.security.tokens_file)], "the tokens file comes from a Secret"
    # the pid file is written at start: its folder must be a writable mount, not the image's read-only layers
    writable = {m["mountPath"] for m in container["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    assert str(settings.server.pid_file.parent) in writable, f"server.pid_file {settings.server.pid_file}"


def test_the_orchestrator_probes_are_grpc_health_probes_on_its_grpc_port(tmp_path, monkeypatch):
    """Readiness, liveness and start-up are Kubernetes' own gRPC probes on server.port, asking services the health
    servicer publishes; kubelet probes speak plaintext and send no token, so the config must let them in."""
    from orchestrator.health import PROCESS_SERVICE, SERVICE_NAME

    published = {"", SERVICE_NAME, PROCESS_SERVICE}  # orchestrator/health.py and server.py set these
    objects = manifests()
    settings = load_k8s_settings(objects, tmp_path, monkeypatch)
    (container,) = by_kind(objects, "Deployment")["orchestrator"]["spec"]["template"]["spec"]["containers"]
    grpc_ports = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
    assert grpc_ports == [settings.server.port], "the container's grpc port is server.port"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container[kind]["grpc"]
        assert probe["port"] == settings.server.port, f"{kind} asks port {probe['port']}"
        assert probe.get("service", "") in published, f"{kind} asks {probe.get('service')!r}, which is never published"
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    # a stage outage takes a pod out of the Service (readiness), it does not restart it
    assert container["livenessProbe"]["grpc"]["service"] == PROCESS_SERVICE
    assert settings.security.public_health, "gRPC probes send no token: security.public_health must be on"
    assert not settings.security.tls, "Kubernetes gRPC probes cannot speak TLS: with security.tls they all fail"
    assert settings.security.exposure_problem(settings.server.host) is None
    service = by_kind(objects, "Service")["orchestrator"]
    assert any(p["port"] == settings.server.port for p in service["spec"]["ports"])


def test_the_config_validates_and_names_only_services_defined_here(tmp_path, monkeypatch):
    objects = manifests()
    settings = load_k8s_settings(objects, tmp_path, monkeypatch)
    assert settings.ray.address and not settings.ray.deploy_on_start
    assert settings.state.backend == "redis" and settings.retrieval.backend == "qdrant"
    assert settings.tracing.exporter == "otlp"
    assert settings.store.url and settings.store.url.startswith("postgresql://")
    hosts = service_ports(objects)
    urls = {
        "ray.address": settings.ray.address,
        "state.redis_url": settings.state.redis_url,
        "shared.redis_url": settings.shared.redis_url,
        "store.url": settings.store.url,
        "retrieval.qdrant_url": settings.retrieval.qdrant_url,
        "tracing.otlp_endpoint": settings.tracing.otlp_endpoint,
    }
    for key, url in urls.items():
        parts = urlsplit(url)
        assert parts.hostname in hosts, f"{key} names host {parts.hostname}, no Service of deploy/k8s"
        assert parts.port in hosts[parts.hostname], f"{key}: {parts.hostname} serves no port {parts.port}"
        assert parts.password is None, f"{key} carries a password: it belongs in a Secret"
    # the collector listens for OTLP/gRPC where tracing.otlp_endpoint points
    collector = yaml.safe_load(by_kind(objects, "ConfigMap")["otel-collector-config"]["data"]["config.yaml"])
    endpoint = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert int(endpoint.rsplit(":", 1)[1]) == urlsplit(settings.tracing.otlp_endpoint).port
    assert "otlp" in collector["service"]["pipelines"]["traces"]["receivers"]


def test_the_rayservice_serves_the_applications_of_deploy_serve_yaml(tmp_path, monkeypatch):
    """serveConfigV2 and deploy/serve.yaml cannot drift: the same applications, import paths and deployments with
    the same options; they differ only in the builder args (the mounted config) and the placement resources, which
    must be the config's ray.*_resources."""
    from ray.serve.schema import ServeDeploySchema

    objects = manifests()
    settings = load_k8s_settings(objects, tmp_path, monkeypatch)
    ours = yaml.safe_load(SERVE_YAML.read_text())
    theirs = serve_config_v2(objects)
    ServeDeploySchema.model_validate(theirs)
    assert {k: v for k, v in theirs.items() if k != "applications"} == {
        k: v for k, v in ours.items() if k != "applications"}
    assert [a["name"] for a in theirs["applications"]] == [a["name"] for a in ours["applications"]]
    resources = {settings.ray.scorer_app: settings.ray.scorer_resources,
                 settings.ray.reasoner_app: settings.ray.reasoner_resources}
    mounted = {f"{m['mountPath']}/{CONFIG_KEY}" for _, t in pod_templates(by_kind(objects, "RayService")["riskcascade"])
               for c in t["spec"]["containers"] for m in c.get("volumeMounts", [])}
    for app, original in zip(theirs["applications"], ours["applications"]):
        assert {k: v for k, v in app.items() if k not in ("args", "deployments")} == {
            k: v for k, v in original.items() if k not in ("args", "deployments")}, app["name"]
        assert set(app["args"]) == {"config"} and app["args"]["config"] in mounted, (
            f"{app['name']}: args.config must be the riskcascade config mounted in the Ray pods")
        assert [d["name"] for d in app["deployments"]] == [d["name"] for d in original["deployments"]]
        for deployment, source in zip(app["deployments"], original["deployments"]):
            placed = deployment.get("ray_actor_options", {}).pop("resources", {})
            assert placed == {**source.get("ray_actor_options", {}).get("resources", {}), **resources[app["name"]]}, (
                f"{app['name']}/{deployment['name']}: resources {placed} are not the config's ray.*_resources")
            assert deployment == source, f"{app['name']}/{deployment['name']} differs from deploy/serve.yaml"


def test_each_placement_resource_is_advertised_by_a_worker_group():
    """A replica asking for a custom resource no Ray node advertises is never placed: some worker group must offer
    it, at least one replica's worth, and the head (which runs no replica) must not."""
    objects = manifests()
    cluster = by_kind(objects, "RayService")["riskcascade"]["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: advertised_resources(g["rayStartParams"]) for g in cluster["workerGroupSpecs"]}
    head = advertised_resources(cluster["headGroupSpec"]["rayStartParams"])
    asked = [(app["name"], name, amount) for app in serve_config_v2(objects)["applications"]
             for d in app["deployments"]
             for name, amount in d.get("ray_actor_options", {}).get("resources", {}).items()]
    assert asked, "no stage is placed by a custom resource"
    for app, name, amount in asked:
        offering = [g for g, offered in groups.items() if offered.get(name, 0) >= amount]
        assert offering, f"{app} asks for {name}: {amount}, which no worker group advertises"
        assert name not in head, f"the head advertises {name}"
