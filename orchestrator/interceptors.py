"""gRPC server interceptors of the DecisionService: tracing and the decode guard (both stay out of the servicer).

``TracingInterceptor`` opens one span per DecisionService call (a DecideStream call is one span; its items' spans
are children of it). A client that sends W3C ``traceparent`` metadata
gets its trace continued; otherwise the call starts a trace.

``DecodeGuardInterceptor`` parses request bodies itself. grpc.aio treats a deserializer that raises as a servicer
bug: the caller gets UNKNOWN with a Python exception text and the log a full traceback, per request. Behind the
guard an undecodable body (random bytes, a truncated message, invalid UTF-8 in a string field) is the caller's
error: INVALID_ARGUMENT naming the expected message type, and one WARNING line. In a DecideStream the first
undecodable message ends the reading: the items before it are answered, then the call ends with INVALID_ARGUMENT
naming its position.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError

from riskcascade.core.telemetry import span

log = logging.getLogger(__name__)

TRACED_PREFIX = "/risk.v1."


CallObserver = Callable[[str, str, float], None]  # (method, status code name, seconds)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """One span per call; and, given ``on_call_end``, the call's method, status code and time (metrics)."""

    def __init__(self, on_call_end: CallObserver | None = None):
        self._on_call_end = on_call_end

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(TRACED_PREFIX):
            return handler
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        if handler.stream_stream is not None:
            return _traced_stream(method, carrier, handler, self._on_call_end)
        if handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        on_call_end = self._on_call_end

        async def traced(request, context):
            with _call_span(method, carrier, context, on_call_end):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@contextmanager
def _call_span(method: str, carrier: dict[str, str], context: grpc.aio.ServicerContext,
               on_call_end: CallObserver | None = None) -> Iterator[None]:
    """The call's span, with the status code the call ended with (told to ``on_call_end`` too)."""
    started = time.perf_counter()
    unset = grpc.StatusCode.OK  # what the call ended with when the servicer set no code
    with span(method[1:], carrier=carrier, **{"rpc.system": "grpc", "rpc.method": method}) as current:
        try:
            yield
        except asyncio.CancelledError:
            unset = grpc.StatusCode.CANCELLED  # the client went away
            raise
        except BaseException:
            unset = grpc.StatusCode.UNKNOWN  # raised past the servicer: grpc answers UNKNOWN
            raise
        finally:
            code = context.code()
            current.set_attribute("rpc.grpc.status_code", code.value[0] if code else 0)
            if on_call_end is not None:
                on_call_end(method, (code if code is not None else unset).name, time.perf_counter() - started)


def _traced_stream(method: str, carrier: dict[str, str], handler: grpc.RpcMethodHandler,
                   on_call_end: CallObserver | None = None) -> grpc.RpcMethodHandler:
    """A bidirectional stream gets one span for the whole call; its items' spans are its children."""
    inner = handler.stream_stream

    async def traced(request_iterator, context):
        with _call_span(method, carrier, context, on_call_end):
            async for response in inner(request_iterator, context):
                yield response

    return grpc.stream_stream_rpc_method_handler(
        traced,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Every unary-unary handler gets raw bytes from grpc and parses them inside its behaviour, where a
    DecodeError (upb raises it for invalid UTF-8 too) can become INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _guarded_stream(method, request_type(method), handler.request_deserializer, handler.stream_stream),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:
            return handler
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


def _guarded_stream(method: str, type_name: str, parse: Callable[[bytes], object], inner):
    """A stream whose messages are parsed here: an undecodable one ends the call with INVALID_ARGUMENT naming the
    message type and its position (the items already accepted are decided and stored all the same)."""

    async def guarded(bodies, context: grpc.aio.ServicerContext):
        undecodable: list[str] = []

        async def parsed():
            position = 0
            async for body in bodies:
                try:
                    request = parse(body)
                except DecodeError as exc:
                    reason = str(exc).split(": ", 1)[-1]
                    log.warning("%s: refused an undecodable %s (stream item %d, %d bytes) from %s: %s",
                                method, type_name, position, len(body), context.peer(), reason)
                    undecodable.append(f"stream item {position} is not a valid {type_name}: {reason}")
                    return  # no more requests: the items accepted so far are answered, then the call ends
                position += 1
                yield request

        async for response in inner(parsed(), context):
            yield response
        if undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable[0])

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


def service_interceptors(on_call_end: CallObserver | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The DecisionService's own interceptors, outermost first (the server puts authentication before them).

    Tracing is outside the decode guard, so a refused body still gets its one span, with its status code (and is
    counted by ``on_call_end``)."""
    return [TracingInterceptor(on_call_end), DecodeGuardInterceptor()]
