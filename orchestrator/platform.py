"""Running the platform: Ray, the Serve applications, the cascade and the gRPC server, and stopping them.

With no ``ray.address`` this process starts a local Ray (and its dashboard) that it owns: stopping the platform
(Ctrl-C, SIGTERM or ``riskcascade down``) stops the gRPC server after in-flight calls finish, flushes the store
and the traces, deletes our Serve applications and shuts that Ray down, so no process is left behind. With an
address it attaches to that cluster and, on stop, leaves the cluster running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import yaml

from riskcascade.core.config import SECRET_FIELDS, Settings, secret_env_var

log = logging.getLogger("riskcascade.platform")

THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
# Throughput mode also opens an HTTP and a gRPC listener in every replica ("direct ingress") with a 30 s minimum
# drain on shutdown. Our orchestrator is the only ingress and reaches replicas through handles, so it stays off.
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
# This process always calls ray.init itself. Off, a Ray API used after ray.shutdown (a Serve long-poll update that
# lands while the platform stops attached to a cluster) fails instead of starting a local Ray of its own, or joining
# another Ray of this machine.
AUTO_CONNECT_ENV = "RAY_ENABLE_AUTO_CONNECT"


class PlatformError(RuntimeError):
    pass


def serve_config_with_settings(settings: Settings) -> dict[str, Any]:
    """deploy/serve.yaml with this process's resolved settings injected as every stage's builder args."""
    path = settings.ray.serve_config
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PlatformError(f"Ray Serve config not found: {path} (ray.serve_config)") from None
    wire = settings.to_wire()
    for app in config.get("applications", []):
        app["args"] = {"settings": wire}
    check_replica_counts(config, settings)
    return with_stage_resources(config, settings)


def most_replicas(deployment: dict[str, Any]) -> int:
    """The most replicas a deployment of a Serve config may run: ``num_replicas`` or its autoscaling maximum."""
    autoscaling = deployment.get("autoscaling_config") or {}
    count = deployment.get("num_replicas", 1)
    if autoscaling or count == "auto":
        return int(autoscaling.get("max_replicas", 1) if autoscaling else 1)  # Serve's own default maximum is 1
    return int(count)


def check_replica_counts(config: dict[str, Any], settings: Settings) -> None:
    """Refuse, by name, a Serve config whose stages would run more replicas than their state allows: scorer replicas
    share the entity state only through Redis (state.backend: redis), and reasoner replicas their case memory only
    on a Qdrant server (retrieval.backend: qdrant with qdrant_url); Qdrant Edge and qdrant-client's local mode are
    one folder owned by one process."""
    shared_memory = settings.retrieval.backend == "qdrant" and bool(settings.retrieval.qdrant_url)
    needs = {settings.ray.scorer_app: (settings.state.backend == "redis", "state.backend: redis"),
             settings.ray.reasoner_app: (shared_memory, "retrieval.backend: qdrant with retrieval.qdrant_url")}
    for app in config.get("applications", []):
        allowed, what = needs.get(app.get("name"), (True, ""))
        for deployment in [] if allowed else app.get("deployments") or []:
            if (most := most_replicas(deployment)) > 1:
                raise PlatformError(
                    f"{settings.ray.serve_config}: {app['name']}/{deployment.get('name')} may run {most} replicas, "
                    f"which share their state only with {what}")


def with_stage_resources(config: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``config`` with ray.scorer_resources / ray.reasoner_resources merged into the ``ray_actor_options.resources``
    of every deployment of the scorer / reasoner application (a configured resource wins over the file's), so each
    stage's replicas are placed only on nodes that advertise those custom resources. Changes ``config`` in place."""
    placement = {settings.ray.scorer_app: settings.ray.scorer_resources,
                 settings.ray.reasoner_app: settings.ray.reasoner_resources}
    for app in config.get("applications", []):
        resources = placement.get(app.get("name"))
        if not resources:
            continue
        if not app.get("deployments"):
            raise PlatformError(f"the {app['name']} application in {settings.ray.serve_config} lists no deployment "
                                "to place by ray resources (list its deployments by name)")
        for deployment in app["deployments"]:
            options = deployment.setdefault("ray_actor_options", {})
            options["resources"] = {**(options.get("resources") or {}), **resources}
    return config


def _start_ray(settings: Settings) -> bool:
    """Connect to or start Ray; True when this process started (and so owns) it."""
    import ray

    options: dict[str, Any] = {
        "namespace": settings.ray.namespace,
        "log_to_driver": False,
        "configure_logging": True,
        "logging_level": logging.WARNING,
    }
    if settings.ray.address:
        ray.init(address=settings.ray.address, **options)
        return False
    # Workers of a Ray started here inherit this environment: secrets set in YAML or overrides reach replicas this
    # way, never through Serve args (settings_from_wire reads them back).
    for section, name in SECRET_FIELDS:
        field = getattr(settings, section)
        value = getattr(field, name)
        if value is not None and value != type(field).model_fields[name].default:
            os.environ.setdefault(secret_env_var(section, name), value.get_secret_value())
    security = settings.security
    ray.init(
        include_dashboard=settings.ray.include_dashboard,
        dashboard_host=security.ray_dashboard_host,
        dashboard_port=settings.ray.dashboard_port,
        num_cpus=settings.ray.num_cpus,
        # Ray 2.60 binds its metrics export port on every interface (127.0.0.1 is mapped to the node's address)
        _system_config={"enable_metrics_collection": security.ray_metrics_export},
        **({"_metrics_export_port": settings.ray.metrics_export_port}
           if security.ray_metrics_export and settings.ray.metrics_export_port else {}),
        **options,
    )
    return True


def deploy_serve_config(config_dict: dict[str, Any]) -> list[str]:
    """Apply a Serve config (the `serve deploy` format); returns its application names."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    # The same two calls `serve deploy`/`serve run config.yaml` make, so the YAML is applied exactly as an
    # operator's `serve deploy deploy/serve.yaml` would apply it.
    config = ServeDeploySchema.model_validate(config_dict)
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
    )
    client.deploy_apps(config, _blocking=False)
    return [app.name for app in config.applications]


def set_scorer_versions(scorer_app: str, versions: tuple[str, ...]) -> None:
    """Re-apply the running Serve config with ``model_versions`` set in the scorer's ``user_config``: Serve calls
    each replica's ``reconfigure`` (a lightweight update, no restart). The other applications are re-applied as
    deployed, so nothing else changes. Blocking (controller calls): run it in a thread."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails

    client = _get_global_client()
    details = ServeInstanceDetails(**client.get_serve_details())
    applications = []
    for name, app in details.applications.items():
        config = app.deployed_app_config
        if config is None:
            raise PlatformError(f"Serve application {name} was not deployed from a config: cannot update it")
        if name == scorer_app:
            if not config.deployments:
                raise PlatformError(f"the {name} application's config lists no deployment to set user_config on")
            for deployment in config.deployments:
                deployment.user_config = {**(deployment.user_config or {}), "model_versions": list(versions)}
        applications.append(config)
    client.deploy_apps(ServeDeploySchema(
        proxy_location=details.proxy_location, http_options=details.http_options,
        grpc_options=details.grpc_options, applications=applications,
    ))


async def wait_running(apps: list[str], timeout_s: float, poll_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        states = {name: (statuses[name].status if name in statuses else "NOT_STARTED") for name in apps}
        failed = {n: s for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            messages = "; ".join(f"{n}: {statuses[n].message}" for n in failed)
            raise PlatformError(f"Ray Serve applications failed: {messages}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            waiting = "; ".join(
                f"{n}/{d}: {dep.message}" for n in apps if n in statuses
                for d, dep in statuses[n].deployments.items() if dep.message
            )
            raise PlatformError(f"Ray Serve applications not running after {timeout_s:.0f} s: {states} {waiting}")
        await asyncio.sleep(poll_s)


async def run_platform(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then stop everything this process started."""
    if settings.ray.throughput_optimized:
        os.environ[THROUGHPUT_ENV] = "1"  # read by ray.serve at import, here and in the local cluster
        os.environ.setdefault(DIRECT_INGRESS_ENV, "0")
    os.environ.setdefault(AUTO_CONNECT_ENV, "0")
    from ray import serve  # noqa: F401 - imported after the environment is set

    from orchestrator.breaker import CircuitBreaker
    from orchestrator.cascade import Cascade, LocalEscalationBudget, StageLimits
    from orchestrator.feedback import FeedbackFanout
    from orchestrator.health import StageHealth
    from orchestrator.metrics import GatewayMetrics
    from orchestrator.model_service import ModelServicer
    from orchestrator.models import ModelSelection, ModelSwitcher, ServingModel
    from orchestrator.server import DecisionServer
    from orchestrator.servicer import DecisionServicer
    from orchestrator.stages import ServeReasonerStage, ServeScorerStage
    from orchestrator.store import open_decision_store, sweep_retention
    from risk.v1 import decision_pb2 as pb
    from riskcascade.core.merge import MergeRules
    from riskcascade.core.model_registry import ModelRegistry
    from riskcascade.core.telemetry import configure_tracing, shutdown_tracing

    configure_tracing(settings.tracing, "orchestrator")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    owns_ray = False
    server = None
    store = None
    retention = None
    stage_health = None
    shared = None  # escalation budget and circuit openings shared with other orchestrators (shared.redis_url)
    metrics = GatewayMetrics(settings.metrics) if settings.metrics.enabled else None
    try:
        owns_ray = _start_ray(settings)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        apps = [settings.ray.scorer_app, settings.ray.reasoner_app]
        if settings.ray.deploy_on_start:
            deploy_serve_config(serve_config_with_settings(settings))
        await wait_running(apps, settings.ray.start_timeout_s, settings.ray.app_poll_interval_s)
        scorer = ServeScorerStage(serve.get_app_handle(settings.ray.scorer_app), settings.batching)
        reasoner = ServeReasonerStage(serve.get_app_handle(settings.ray.reasoner_app))
        info = await scorer.info(settings.ray.scorer_info_timeout_s)
        esc = settings.escalation
        res = settings.resilience
        selection = ModelSelection(ServingModel.of(info, esc))
        policy = selection.live.policy
        stage_health = StageHealth()

        def circuit_changed(name: str, state: Any) -> None:
            stage_health.changed(name, state)
            if metrics is not None:
                metrics.circuit_changed(name, state.value)

        if settings.shared.redis_url:
            from orchestrator.shared_limits import SharedLimits

            shared = SharedLimits.connect(settings.shared, esc.max_in_flight,
                                          metrics.observe_shared_outage if metrics is not None else None)
            log.warning("escalation budget and circuit openings shared through Redis under %s:* as %s",
                        settings.shared.key_prefix, shared.owner)
        breakers = {
            name: CircuitBreaker(name, res.breaker_failures, res.breaker_open_s, res.breaker_half_open_probes,
                                 on_change=circuit_changed, on_trip=shared.circuits.tripped if shared else None)
            for name in ("fast_model", "reasoner")
        }
        cascade = Cascade(
            scorer,
            reasoner,
            selection,
            MergeRules.from_settings(settings.merge),
            esc.policy_version,
            settings.server.reserve_ms,
            StageLimits.from_settings(res),
            breakers["fast_model"],
            breakers["reasoner"],
            esc.max_per_call,
            shared.budget if shared else LocalEscalationBudget(esc.max_in_flight),
        )
        store = await asyncio.to_thread(open_decision_store, settings.store)  # a database server is network I/O
        if settings.store.retention_s > 0:
            retention = asyncio.create_task(sweep_retention(store, settings.store), name="store-retention")
        # the model's fields (version, provider, band, features) come from the live ServingModel at each call
        service_info = pb.ServiceInfo(policy_version=esc.policy_version, retrieval_backend=settings.retrieval.backend)
        feedback = FeedbackFanout(scorer, reasoner, settings.server.feedback_timeout_ms / 1000.0)
        servicer = DecisionServicer(cascade, store, info.feature_names, settings.server, service_info, feedback,
                                    feature_ranges=info.feature_ranges, validation=settings.validation,
                                    metrics=metrics)
        registry = ModelRegistry(settings.model.dir)

        async def apply_versions(versions: tuple[str, ...]) -> None:
            await asyncio.to_thread(set_scorer_versions, settings.ray.scorer_app, versions)
            await wait_running([settings.ray.scorer_app], settings.ray.start_timeout_s,
                               settings.ray.app_poll_interval_s)

        def model_metrics(live: ServingModel) -> None:
            """What decides now, in the metrics (at start and at each switch)."""
            if metrics is not None:
                metrics.serving(live.version, esc.policy_version, live.info.provider, live.policy.band_low,
                                live.policy.band_high, live.info.target_escalation_share,
                                lambda: servicer.active_decisions)

        def switched(_: ServingModel, live: ServingModel) -> None:
            model_metrics(live)
            _write_state(settings, server.port, live.info, live.policy, metrics_port)

        switcher = ModelSwitcher(selection, scorer, apply_versions, registry, esc, settings.ray.scorer_info_timeout_s,
                                 settings.model.switch_probe_calls, on_switch=switched)
        server = await DecisionServer.open(servicer, settings.server.host, settings.server.port, settings.security,
                                           on_call_end=metrics.observe_rpc if metrics is not None else None,
                                           models=ModelServicer(switcher, registry, servicer.service_info,
                                                               esc.policy_version))
        metrics_port = None
        if metrics is not None:
            model_metrics(selection.live)
            metrics_port = await asyncio.to_thread(metrics.start_server, settings.security)
        await server.start()
        await stage_health.attach(server.health, breakers)
        stage_health.start_probes(
            {"fast_model": scorer.ping, "reasoner": reasoner.ping}, breakers, res.probe_interval_s,
            res.probe_timeout_ms / 1000.0,
        )
        if shared is not None:
            shared.circuits.start(breakers)
        _write_state(settings, server.port, info, policy, metrics_port)
        log.warning(
            "riskcascade serving risk.v1.DecisionService on %s:%d | model %s on %s (%s) | band [%.3f, %.3f)%s",
            settings.server.host, server.port, info.model_version, info.provider, info.provider_detail,
            policy.band_low, policy.band_high,
            f" | Ray dashboard http://127.0.0.1:{settings.ray.dashboard_port}" if owns_ray and settings.ray.include_dashboard else "",
        )
        await stop.wait()
        log.warning("stopping riskcascade")
    finally:
        if stage_health is not None:
            await stage_health.stop()
        if server is not None:
            await server.stop(settings.server.shutdown_grace_s)
        if shared is not None:  # after the calls in flight gave their escalation slots back
            await shared.close()
        if metrics is not None:
            metrics.stop_server()
        if retention is not None:
            retention.cancel()
        if store is not None:
            await asyncio.to_thread(store.close)  # the writer commits what is queued first
        _clear_state(settings)
        await _stop_ray(settings, owns_ray)
        shutdown_tracing()


async def _stop_ray(settings: Settings, owns_ray: bool) -> None:
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    if owns_ray:
        # the async form: a synchronous shutdown from inside a running event loop is only best effort
        await serve.shutdown_async()
    elif settings.ray.deploy_on_start:
        for app in (settings.ray.scorer_app, settings.ray.reasoner_app):
            serve.delete(app)
    ray.shutdown()


def _write_state(settings: Settings, port: int, info: Any, policy: Any, metrics_port: int | None) -> None:
    state = {
        "pid": os.getpid(),
        "port": port,
        "host": settings.server.host,
        "model_version": info.model_version,
        "provider": info.provider,
        "provider_detail": info.provider_detail,
        "band": [policy.band_low, policy.band_high],
        "metrics_port": metrics_port,
    }
    settings.server.pid_file.parent.mkdir(parents=True, exist_ok=True)
    settings.server.pid_file.write_text(str(os.getpid()))
    if settings.server.ready_file is not None:
        tmp = settings.server.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(settings.server.ready_file)


def _clear_state(settings: Settings) -> None:
    for path in (settings.server.pid_file, settings.server.ready_file):
        if path is not None and path.exists():
            path.unlink()
