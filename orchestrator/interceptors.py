"""gRPC server interceptors of the DecisionService: tracing and the decode guard (both stay out of the servicer).

``TracingInterceptor`` opens one span per DecisionService call. A client that sends W3C ``traceparent`` metadata
gets its trace continued; otherwise the call starts a trace.

``DecodeGuardInterceptor`` parses request bodies itself. grpc.aio treats a deserializer that raises as a servicer
bug: the caller gets UNKNOWN with a Python exception text and the log a full traceback, per request. Behind the
guard an undecodable body (random bytes, a truncated message, invalid UTF-8 in a string field) is the caller's
error: INVALID_ARGUMENT naming the expected message type, and one WARNING line.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError

from riskcascade.telemetry import span

log = logging.getLogger(__name__)

TRACED_PREFIX = "/risk.v1."


class TracingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(TRACED_PREFIX):
            return handler
        inner = handler.unary_unary
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}

        async def traced(request, context):
            with span(method[1:], carrier=carrier, **{"rpc.system": "grpc", "rpc.method": method}) as current:
                try:
                    return await inner(request, context)
                finally:
                    code = context.code()
                    current.set_attribute("rpc.grpc.status_code", code.value[0] if code else 0)

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Every unary-unary handler gets raw bytes from grpc and parses them inside its behaviour, where a
    DecodeError (upb raises it for invalid UTF-8 too) can become INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        return grpc.unary_unary_rpc_method_handler(
            _guarded(method, request_type(method), handler.request_deserializer, handler.unary_unary),
            request_deserializer=None,  # raw bytes in: parsing is the guarded behaviour's first step
            response_serializer=handler.response_serializer,
        )


def _guarded(method: str, type_name: str, parse: Callable[[bytes], object], inner):
    async def guarded(body: bytes, context: grpc.aio.ServicerContext):
        try:
            request = parse(body)
        except DecodeError as exc:
            reason = str(exc).split(": ", 1)[-1]  # upb: "Error parsing message with type '...': <reason>"
            log.warning("%s: refused an undecodable %s of %d bytes from %s: %s",
                        method, type_name, len(body), context.peer(), reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request body is not a valid {type_name}: {reason}")
        return await inner(request, context)

    return guarded


@functools.cache  # one entry per registered method: unknown methods have no handler and never get here
def request_type(method: str) -> str:
    """The full name of ``method``'s request message ("/risk.v1.DecisionService/Decide" -> risk.v1.DecideRequest),
    or the method path when its service is not in the default descriptor pool."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        return descriptor_pool.Default().FindServiceByName(service).methods_by_name[name].input_type.full_name
    except KeyError:
        return f"request of {method}"


def service_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The DecisionService's own interceptors, outermost first (the server puts authentication before them).

    Tracing is outside the decode guard, so a refused body still gets its one span, with its status code."""
    return [TracingInterceptor(), DecodeGuardInterceptor()]
