"""Who may reach the gRPC server: TLS and mutual TLS, per-client tokens and roles, public health checks, secrets
kept out of the Serve arguments, and the refusal to expose a plaintext server.

The fast tests run a real DecisionServer in this process (real TLS, the real interceptor, dev material from
riskcascade/dev_secrets.py) in front of a small servicer that answers every DecisionService method, since what is
under test is the edge, not the cascade. The slow ones use the session platform (tests/conftest.py), which
`riskcascade up` started with TLS and tokens on and its dev material written under ``<workdir>/secrets``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import yaml
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator.auth import AccessPolicy, RefusalLog, SecurityError, token_sha256
from orchestrator.client import channel_credentials, open_aio_channel
from orchestrator.server import DecisionServer, ServerMaterial
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc, model_pb2, model_pb2_grpc
from riskcascade.core.config import SecuritySettings, load_settings, settings_from_wire
from riskcascade.dev_secrets import DevMaterialError, ensure_dev_material
from tests.conftest import platform_security, platform_settings

CALL_TIMEOUT_S = 10
TOKENS = {"admin": "admin-token-1", "decider": "decide-token-2", "reviewer": "feedback-token-3"}
ROLES = {"admin": ["admin"], "decider": ["decide"], "reviewer": ["feedback"]}
AUTH_LOGGER = "riskcascade.auth"


class EdgeProbe(decision_pb2_grpc.DecisionServiceServicer):
    """Answers every DecisionService method with an empty success: a call that reaches it passed the edge."""

    async def Decide(self, request, context):
        return pb.DecideResponse()

    async def DecideBatch(self, request, context):
        return pb.DecideBatchResponse()

    async def DecideStream(self, request_iterator, context):
        async for request in request_iterator:
            yield pb.DecideBatchResult(request_id=request.request_id)

    async def SubmitFeedback(self, request, context):
        return pb.SubmitFeedbackResponse()

    async def GetDecision(self, request, context):
        return pb.GetDecisionResponse()

    async def GetServiceInfo(self, request, context):
        return pb.ServiceInfo(model_version="edge-probe")


def dev_security(secrets_dir: Path, **overrides) -> SecuritySettings:
    """TLS and tokens on, dev material written; besides the dev client, three with known tokens and roles."""
    security = SecuritySettings(**{**platform_security(secrets_dir), **overrides})
    ensure_dev_material(security)
    clients = {name: {"token_sha256": token_sha256(TOKENS[name]), "roles": ROLES[name]} for name in TOKENS}
    dev_token = security.client_token_file.read_text().strip()  # the one channel_credentials(security) sends
    clients["dev"] = {"token_sha256": token_sha256(dev_token), "roles": ["admin"]}
    security.tokens_file.write_text(yaml.safe_dump({"clients": clients}))
    return security


@asynccontextmanager
async def serving(security: SecuritySettings) -> AsyncIterator[str]:
    # ModelService as registered, answering UNIMPLEMENTED: a call that passes the edge's checks says so
    server = await DecisionServer.open(EdgeProbe(), "127.0.0.1", 0, security,
                                       models=model_pb2_grpc.ModelServiceServicer())
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop(0)


def tls_only(security: SecuritySettings) -> SecuritySettings:
    """The same trust (and client certificate) without a token."""
    return security.model_copy(update={"tokens": False})


def with_token(security: SecuritySettings, token: str) -> grpc.ChannelCredentials:
    return grpc.composite_channel_credentials(
        channel_credentials(tls_only(security)), grpc.access_token_call_credentials(token)
    )


async def code_of(call) -> grpc.StatusCode:  # noqa: ANN001 - an awaitable RPC
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def method_codes(target: str, credentials: grpc.ChannelCredentials | None) -> dict[str, grpc.StatusCode]:
    async with open_aio_channel(target, credentials) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        calls = {
            "Decide": lambda: stub.Decide(pb.DecideRequest(), timeout=CALL_TIMEOUT_S),
            "DecideBatch": lambda: stub.DecideBatch(pb.DecideBatchRequest(), timeout=CALL_TIMEOUT_S),
            "DecideStream": lambda: _opened_and_closed(stub.DecideStream(timeout=CALL_TIMEOUT_S)),
            "GetDecision": lambda: stub.GetDecision(pb.GetDecisionRequest(), timeout=CALL_TIMEOUT_S),
            "GetServiceInfo": lambda: stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=CALL_TIMEOUT_S),
            "SubmitFeedback": lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(), timeout=CALL_TIMEOUT_S),
            "UseModel": lambda: models.UseModel(model_pb2.UseModelRequest(), timeout=CALL_TIMEOUT_S),
        }
        models = model_pb2_grpc.ModelServiceStub(channel)
        return {name: await code_of(call()) for name, call in calls.items()}


async def _opened_and_closed(call) -> None:  # noqa: ANN001 - a DecideStream call
    """Open a stream, send nothing and close it: the edge decides on the call's metadata alone. (A client still
    writing when the server refuses may see grpc.aio's own INTERNAL instead of the server's status.)"""
    try:
        await call.done_writing()
    except Exception:  # noqa: BLE001 - the call already ended (grpc raises its own internal error types here)
        pass  # its status, below, says why
    code = await call.code()
    if code is not grpc.StatusCode.OK:
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), await call.details())


async def health_code(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    async with open_aio_channel(target, credentials) as channel:
        return await code_of(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                        timeout=CALL_TIMEOUT_S))


OK, DENIED, UNAUTH = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED


def test_each_role_reaches_its_methods_and_is_denied_the_rest(tmp_path):
    security = dev_security(tmp_path)

    async def scenario():
        async with serving(security) as target:
            return {name: await method_codes(target, with_token(security, TOKENS[name])) for name in TOKENS}

    codes = asyncio.run(scenario())
    # model control is the admin role's alone (admin passes the edge: the probe server has no switcher behind it)
    assert codes["admin"] == {**dict.fromkeys(codes["admin"], OK), "UseModel": grpc.StatusCode.UNIMPLEMENTED}
    assert codes["decider"] == {"Decide": OK, "DecideBatch": OK, "DecideStream": OK, "GetDecision": OK,
                                "GetServiceInfo": OK, "SubmitFeedback": DENIED, "UseModel": DENIED}
    assert codes["reviewer"] == {"Decide": DENIED, "DecideBatch": DENIED, "DecideStream": DENIED,
                                 "GetDecision": DENIED, "GetServiceInfo": DENIED, "SubmitFeedback": OK,
                                 "UseModel": DENIED}


def test_missing_or_unknown_token_is_unauthenticated_with_one_log_line_and_no_token_text(tmp_path, caplog):
    security = dev_security(tmp_path, refusal_log_interval_s=3600)
    wrong = "not-a-known-token-4242"

    async def scenario():
        async with serving(security) as target:
            async with open_aio_channel(target, channel_credentials(tls_only(security))) as channel:
                unknown_method = channel.unary_unary("/risk.v1.DecisionService/NoSuchMethod")
                return (
                    await method_codes(target, channel_credentials(tls_only(security))),
                    await method_codes(target, with_token(security, wrong)),
                    await code_of(unknown_method(b"", timeout=CALL_TIMEOUT_S)),
                )

    with caplog.at_level(logging.WARNING, logger=AUTH_LOGGER):
        no_token, wrong_token, unknown_method = asyncio.run(scenario())
    assert set(no_token.values()) == {UNAUTH} and set(wrong_token.values()) == {UNAUTH}
    assert unknown_method == UNAUTH  # a stranger learns nothing about which methods exist
    refusals = [r for r in caplog.records if r.name == AUTH_LOGGER]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]  # eleven refusals within the interval: one line
    line = refusals[0]
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert "missing or unknown bearer token" in line.getMessage() and "/risk.v1.DecisionService/" in line.getMessage()
    assert not any(wrong in r.getMessage() or "Traceback" in r.getMessage() for r in caplog.records)


def test_refusal_log_is_one_line_per_interval_and_counts_the_skipped(caplog):
    now = [0.0]
    refusals = RefusalLog(interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=AUTH_LOGGER):
        for t in (0.0, 1.0, 2.0, 9.9, 10.0, 25.0):
            now[0] = t
            refusals.refused("/m", "ipv4:127.0.0.1:1", "missing or unknown bearer token")
    lines = [r.getMessage() for r in caplog.records if r.name == AUTH_LOGGER]
    assert len(lines) == 3
    assert "more refused" not in lines[0] and "and 3 more refused calls" in lines[1] and "more refused" not in lines[2]


def test_health_answers_without_a_token_unless_configured_otherwise(tmp_path):
    public = dev_security(tmp_path)
    private = public.model_copy(update={"public_health": False})

    async def scenario():
        results = {}
        for name, security in (("public", public), ("private", private)):
            async with serving(security) as target:
                no_token = channel_credentials(tls_only(security))
                async with open_aio_channel(target, no_token) as channel:
                    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                                       timeout=CALL_TIMEOUT_S)
                    first = await code_of(watch.read()) if name == "private" else OK
                    watch.cancel()
                results[name] = (await health_code(target, no_token), first,
                                 await health_code(target, with_token(security, TOKENS["decider"])))
        return results

    results = asyncio.run(scenario())
    assert results["public"] == (OK, OK, OK)
    assert results["private"] == (UNAUTH, UNAUTH, OK)  # Watch (server streaming) is refused as well


def test_reflection_needs_a_token(tmp_path):
    security = dev_security(tmp_path)

    async def list_services(credentials) -> tuple[grpc.StatusCode, list[str]]:  # noqa: ANN001
        async with serving(security) as target, open_aio_channel(target, credentials) as channel:
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=CALL_TIMEOUT_S)
            try:
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                answer = await call.read()
                await call.done_writing()
            except grpc.aio.AioRpcError as err:
                return err.code(), []
            if answer is grpc.aio.EOF:
                return (await call.code()), []
            return grpc.StatusCode.OK, [s.name for s in answer.list_services_response.service]

    no_token = asyncio.run(list_services(channel_credentials(tls_only(security))))
    decider = asyncio.run(list_services(with_token(security, TOKENS["decider"])))
    assert no_token == (UNAUTH, [])
    assert decider[0] == OK and "risk.v1.DecisionService" in decider[1]


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path):
    security = dev_security(tmp_path, require_client_cert=True)
    without_cert = security.model_copy(update={"require_client_cert": False})

    async def scenario():
        async with serving(security) as target:
            return (
                await health_code(target, channel_credentials(tls_only(without_cert))),
                await health_code(target, channel_credentials(tls_only(security))),
                (await method_codes(target, channel_credentials(security)))["GetServiceInfo"],
            )

    assert asyncio.run(scenario()) == (grpc.StatusCode.UNAVAILABLE, OK, OK)


def test_tokens_without_tls_travel_on_loopback_local_credentials(tmp_path):
    security = dev_security(tmp_path, tls=False)

    async def scenario():
        async with serving(security) as target:
            return (
                (await method_codes(target, channel_credentials(security)))["GetServiceInfo"],
                (await method_codes(target, None))["GetServiceInfo"],
            )

    assert asyncio.run(scenario()) == (OK, UNAUTH)


def test_the_served_serve_config_carries_no_secret_value(tmp_path, monkeypatch):
    from orchestrator.platform import serve_config_with_settings

    llm_key, qdrant_key = "sk-live-llm-0123456789", "qdrant-key-9876543210"
    key_file = tmp_path / "llm.key"
    key_file.write_text(llm_key + "\n")
    settings = load_settings(llm={"api_key": llm_key}, retrieval={"qdrant_api_key": qdrant_key})
    config = serve_config_with_settings(settings)
    text = json.dumps(config)
    assert config["applications"] and all("settings" in app["args"] for app in config["applications"])
    assert llm_key not in text and qdrant_key not in text
    assert llm_key not in repr(settings) and llm_key not in str(settings.model_dump())
    # a replica reads the secrets from its own environment ...
    monkeypatch.setenv("RISKCASCADE_LLM__API_KEY", llm_key)
    monkeypatch.setenv("RISKCASCADE_RETRIEVAL__QDRANT_API_KEY", qdrant_key)
    wire = config["applications"][0]["args"]["settings"]
    replica = settings_from_wire(wire)
    assert replica.llm.api_key_text() == llm_key and replica.retrieval.qdrant_api_key_text() == qdrant_key
    # ... or from a file whose path (not content) travels
    monkeypatch.delenv("RISKCASCADE_LLM__API_KEY")
    by_file = serve_config_with_settings(load_settings(llm={"api_key_file": str(key_file)}))
    assert llm_key not in json.dumps(by_file)
    from services.reasoning.llm.openai_compatible import OpenAICompatibleLLM

    replica_llm = settings_from_wire(by_file["applications"][1]["args"]["settings"]).llm
    assert OpenAICompatibleLLM.from_settings(replica_llm).api_key == llm_key


def test_a_plaintext_server_on_a_non_loopback_host_is_refused(tmp_path):
    exposed = SecuritySettings(tls=False)
    assert exposed.exposure_problem("127.0.0.1") is None and exposed.exposure_problem("::1") is None
    assert "security.tls" in exposed.exposure_problem("0.0.0.0")
    assert "security.tls" in SecuritySettings(tokens=False).exposure_problem("10.1.2.3")
    assert SecuritySettings().exposure_problem("0.0.0.0") is None  # TLS and tokens
    assert SecuritySettings(tls=False, allow_insecure=True).exposure_problem("0.0.0.0") is None
    with pytest.raises(SecurityError, match="not a loopback address"):
        DecisionServer(EdgeProbe(), "0.0.0.0", 0, exposed, ServerMaterial(None, None))
    # and `riskcascade up` says so before any training or indexing
    from riskcascade.cli import main

    config = tmp_path / "exposed.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "0.0.0.0", "pid_file": str(tmp_path / "rc.pid")},
        "model": {"dir": str(tmp_path / "model")},
        "security": {"tls": False},
    }))
    result = CliRunner().invoke(main, ["up", "--config", str(config), "--quiet"])
    assert result.exit_code == 1 and "not a loopback address" in result.output
    assert "training" not in result.output and not (tmp_path / "model").exists()


def test_dev_material_is_private_loadable_and_never_overwritten(tmp_path):
    security = SecuritySettings(**platform_security(tmp_path / "secrets"), require_client_cert=True)
    written = ensure_dev_material(security)
    assert {p.name for p in written} == {"ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key",
                                         "client.token", "tokens.yaml"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written)
    before = {p: p.read_bytes() for p in written}
    assert ensure_dev_material(security) == [] and all(p.read_bytes() == b for p, b in before.items())
    policy = AccessPolicy.load(security.tokens_file)
    token = security.client_token_file.read_text().strip()
    client = policy.authenticate([("authorization", f"Bearer {token}")])
    assert client is not None and client.methods is None  # the dev client has every role
    assert token not in security.tokens_file.read_text()
    security.tls_key_file.unlink()
    with pytest.raises(DevMaterialError, match="server.crt exists but"):
        ensure_dev_material(security)


@pytest.mark.parametrize(
    "entry, key",
    [
        ({"token_sha256": "abc", "roles": ["decide"]}, "clients.c.token_sha256"),
        ({"token_sha256": "0" * 64, "roles": ["superuser"]}, "clients.c.roles"),
        ({"token_sha256": "0" * 64, "methods": ["risk.v1.DecisionService/Nope"]}, "clients.c.methods"),
        ({"token_sha256": "0" * 64}, "roles or methods"),
    ],
)
def test_tokens_file_errors_name_the_key(tmp_path, entry, key):
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"clients": {"c": entry}}))
    with pytest.raises(SecurityError, match=key.replace(".", r"\.")):
        AccessPolicy.load(path)


# --- the session platform, as `riskcascade up` serves it ---


def _platform_codes(platform, credentials: grpc.ChannelCredentials | None) -> dict[str, grpc.StatusCode]:
    async def scenario():
        return {**await method_codes(platform.target, credentials), "health": await health_code(platform.target,
                                                                                                credentials)}
    return asyncio.run(scenario())


@pytest.mark.slow
def test_platform_answers_a_valid_token_and_refuses_missing_or_unknown_ones(platform, stub):
    assert stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=CALL_TIMEOUT_S).model_version
    security = platform_settings(platform).security
    wrong = "wrong-token-for-the-platform-7777"
    no_token = _platform_codes(platform, channel_credentials(tls_only(security)))
    wrong_token = _platform_codes(platform, with_token(security, wrong))
    for codes in (no_token, wrong_token):
        assert codes.pop("health") == OK  # probes send no token
        assert set(codes.values()) == {UNAUTH}
    log = platform.log_path.read_text()
    assert wrong not in log and security.client_token_file.read_text().strip() not in log
    lines = log.splitlines()
    refusals = [i for i, line in enumerate(lines) if "riskcascade.auth: refused /risk.v1.DecisionService/" in line]
    assert refusals and all("missing or unknown bearer token" in lines[i] for i in refusals)
    assert not any(lines[i + 1 : i + 2] == ["Traceback (most recent call last):"] for i in refusals)  # one line each


@pytest.mark.slow
def test_platform_refuses_a_plaintext_client(platform):
    codes = _platform_codes(platform, None)
    assert set(codes.values()) == {grpc.StatusCode.UNAVAILABLE}


@pytest.mark.slow
def test_up_wrote_private_dev_material_and_said_where(platform):
    security = platform_settings(platform).security
    files = [security.ca_file, security.tls_cert_file, security.tls_key_file, security.tokens_file,
             security.client_token_file]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    log = platform.log_path.read_text()
    assert "wrote development TLS and token material" in log and str(security.client_token_file) in log


def _listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net: hex, 32-bit words in host order)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = b"".join(int(address[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(address), 8))
            found.add(ipaddress.ip_address(raw))
    return found


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.slow
def test_platform_grpc_port_and_ray_dashboard_listen_on_loopback_only(platform):
    for port in (platform.port, platform.dashboard_port):
        addresses = _listening_addresses(port)
        assert addresses and all(_loopback(a) for a in addresses), (port, addresses)
