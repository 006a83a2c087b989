"""Opening a channel to the DecisionService the way the server's ``security`` settings expect: TLS verified
against ``ca_file`` (plus ``client_cert_file`` under mutual TLS) and the bearer token of ``client_token_file`` as
call credentials, so every call carries ``authorization: Bearer <token>``.

    from orchestrator.client import open_channel
    with open_channel(load_settings("riskcascade.yaml")) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)

Reading the files blocks: an asyncio client builds ``channel_credentials`` before its loop runs and passes them
to ``grpc.aio.secure_channel``.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from riskcascade.core.config import SecuritySettings, Settings


class ClientSecurityError(RuntimeError):
    """A file the client needs is missing or unreadable; the message names the setting."""


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientSecurityError(
            f"cannot read security.{key} {path}: {exc.strerror} (`riskcascade up` writes dev material there)"
        ) from None


def client_token(security: SecuritySettings) -> str | None:
    """The bearer token this client sends, or None when the server checks none."""
    if not security.tokens:
        return None
    return _read(security.client_token_file, "client_token_file").decode().strip()


def channel_credentials(security: SecuritySettings) -> grpc.ChannelCredentials | None:
    """Credentials for a secure channel, or None when the server is plaintext without tokens.

    Without TLS a token still needs a secure channel type to travel as call credentials: local credentials give
    one on loopback only (the one place plaintext is allowed without ``allow_insecure``)."""
    token = client_token(security)
    if security.tls:
        client_pair = (
            {
                "private_key": _read(security.client_key_file, "client_key_file"),
                "certificate_chain": _read(security.client_cert_file, "client_cert_file"),
            }
            if security.require_client_cert else {}
        )
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(security.ca_file, "ca_file"), **client_pair)
    elif token is not None:
        credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return None
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return credentials


def server_target(settings: Settings) -> str:
    """host:port of the configured server (a wildcard bind address is reached on loopback)."""
    host = settings.server.host
    return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{settings.server.port}"


def open_channel(settings: Settings, target: str | None = None) -> grpc.Channel:
    """A blocking-API channel to ``target`` (default: the configured server) with the settings' credentials."""
    target = target or server_target(settings)
    credentials = channel_credentials(settings.security)
    return grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)


def open_aio_channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """An asyncio channel from credentials built beforehand by ``channel_credentials`` (None: plaintext)."""
    return grpc.aio.insecure_channel(target) if credentials is None else grpc.aio.secure_channel(target, credentials)
