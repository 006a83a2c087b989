"""Who may call what on the gRPC server: per-client bearer tokens, checked by a server interceptor.

Clients send metadata ``authorization: Bearer <token>``. The tokens file (``security.tokens_file``, YAML) names
each known client and stores only the SHA-256 of its token::

    clients:
      checkout:                      # a name for the logs (never the token)
        token_sha256: 3f0a...        # hex SHA-256 of the token: printf %s "$TOKEN" | sha256sum
        roles: [decide]
      case-review:
        token_sha256: 9c1e...
        roles: [feedback]
      audit:
        token_sha256: 77aa...
        methods: [risk.v1.DecisionService/GetDecision]   # single methods, besides or instead of roles

Roles: ``decide`` = Decide, DecideBatch, DecideStream, GetDecision, GetServiceInfo; ``feedback`` = SubmitFeedback; ``admin`` =
every method. Every known client may also use server reflection and health checking; health answers without a
token while ``security.public_health`` is on (Kubernetes probes send none).

No token or an unknown one: UNAUTHENTICATED (whatever the method, so a stranger learns nothing of the API). A known
client calling a method it may not call: PERMISSION_DENIED. Each refusal is one WARNING line naming the method,
the peer and the client (never the token), at most one line per ``refusal_log_interval_s``: the next line counts
the refusals in between.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import yaml
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from risk.v1 import decision_pb2

log = logging.getLogger("riskcascade.auth")

AUTHORIZATION_KEY = "authorization"  # gRPC metadata keys arrive lower-case
BEARER_SCHEME = "bearer"
HEALTH_PREFIX = f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/"
REFLECTION_PREFIX = "/grpc.reflection."  # v1alpha and v1 alike
ANY_CLIENT_PREFIXES = (HEALTH_PREFIX, REFLECTION_PREFIX)

_DECISION = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"]
DECISION_METHODS = frozenset(f"/{_DECISION.full_name}/{m.name}" for m in _DECISION.methods)
Role = Literal["decide", "feedback", "admin"]
ROLE_METHODS: dict[str, frozenset[str] | None] = {  # None: every method
    "decide": frozenset(
        f"/{_DECISION.full_name}/{name}"
        for name in ("Decide", "DecideBatch", "DecideStream", "GetDecision", "GetServiceInfo")
    ),
    "feedback": frozenset({f"/{_DECISION.full_name}/SubmitFeedback"}),
    "admin": None,
}
SHA256_HEX = r"^[0-9a-f]{64}$"


class SecurityError(RuntimeError):
    """The security settings cannot be served: a missing or unreadable file, a bad tokens file, or a host that is
    not loopback without TLS and tokens. The message names the file or the setting."""


def token_sha256(token: str) -> str:
    """Hex SHA-256 of a token, as the tokens file stores it (tokens are random, so no salt or stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _full_method(name: str) -> str:
    return name if name.startswith("/") else f"/{name}"


class _ClientEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    token_sha256: str = Field(pattern=SHA256_HEX)
    roles: tuple[Role, ...] = ()
    methods: tuple[str, ...] = ()

    @field_validator("token_sha256", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in methods if _full_method(m) not in DECISION_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(m[1:] for m in DECISION_METHODS)}")
        return methods

    @model_validator(mode="after")
    def _grants_something(self) -> "_ClientEntry":
        if not self.roles and not self.methods:
            raise ValueError("a client needs roles or methods")
        return self


class _TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    clients: dict[str, _ClientEntry]


@dataclass(frozen=True)
class Client:
    """A known caller: its name, its token's digest and the DecisionService methods it may call (None: all)."""

    name: str
    digest: bytes
    methods: frozenset[str] | None

    def may_call(self, method: str) -> bool:
        return self.methods is None or method in self.methods or method.startswith(ANY_CLIENT_PREFIXES)


class AccessPolicy:
    """The known clients and what each may call; plain logic, no I/O after loading."""

    def __init__(self, clients: Iterable[Client]):
        self.clients = tuple(clients)

    @classmethod
    def load(cls, path: Path) -> "AccessPolicy":
        """Read a tokens file; SecurityError names the file and the bad key."""
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise SecurityError(f"cannot read security.tokens_file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SecurityError(f"security.tokens_file {path} is not valid YAML: {exc}") from None
        try:
            parsed = _TokensFile.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
            )
            raise SecurityError(f"security.tokens_file {path}: {problems}") from None
        return cls(_client(name, entry) for name, entry in parsed.clients.items())

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Client | None:
        """The client whose token the call carries, or None. Every digest is compared in constant time."""
        token = bearer_token(metadata)
        if token is None:
            return None
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for client in self.clients:  # no early exit: the time taken does not tell which client matched
            if hmac.compare_digest(presented, client.digest):
                found = client
        return found


def _client(name: str, entry: _ClientEntry) -> Client:
    methods: set[str] | None = {_full_method(m) for m in entry.methods}
    for role in entry.roles:
        granted = ROLE_METHODS[role]
        if granted is None:
            methods = None
            break
        methods |= granted
    return Client(name, bytes.fromhex(entry.token_sha256), None if methods is None else frozenset(methods))


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` entry, or None."""
    for key, value in metadata or ():
        if key != AUTHORIZATION_KEY or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == BEARER_SCHEME and token.strip():
            return token.strip()
    return None


class RefusalLog:
    """One WARNING line per refused call, at most one per ``interval_s``; the next line counts those skipped."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self._interval_s = interval_s
        self._clock = clock
        self._next_at: float | None = None
        self._skipped = 0

    def refused(self, method: str, peer: str, reason: str) -> None:
        now = self._clock()
        if self._next_at is not None and now < self._next_at:
            self._skipped += 1
            return
        more = f" (and {self._skipped} more refused calls since the last line)" if self._skipped else ""
        log.warning("refused %s from %s: %s%s", method, peer, reason, more)
        self._skipped = 0
        self._next_at = now + self._interval_s


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Outermost server interceptor: a refused call never reaches tracing, validation or the servicer."""

    def __init__(self, policy: AccessPolicy, public_health: bool, refusals: RefusalLog):
        self._policy = policy
        self._public_health = public_health
        self._refusals = refusals

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if self._public_health and method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        client = self._policy.authenticate(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)  # a lookup only: nothing runs yet
        if client is None:
            return self._refusal(
                handler, method, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token",
                "missing or unknown bearer token (send metadata `authorization: Bearer <token>`)",
            )
        if not client.may_call(method):
            return self._refusal(
                handler, method, grpc.StatusCode.PERMISSION_DENIED, f"client {client.name} may not call it",
                f"client {client.name!r} may not call {method}",
            )
        return handler

    def _refusal(
        self, handler: grpc.RpcMethodHandler | None, method: str, code: grpc.StatusCode, reason: str, details: str
    ) -> grpc.RpcMethodHandler:
        """A handler of the same kind as the refused one that answers ``code`` without reading the request."""

        async def refuse(_request, context: grpc.aio.ServicerContext) -> None:
            self._refusals.refused(method, context.peer(), reason)
            await context.abort(code, details)

        if handler is not None and handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)
