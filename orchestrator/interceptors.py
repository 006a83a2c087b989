"""gRPC server interceptor that opens one span per DecisionService call (tracing stays out of the servicer).

A client that sends W3C ``traceparent`` metadata gets its trace continued; otherwise the call starts a trace.
"""

from __future__ import annotations

import grpc

from riskcascade.telemetry import span

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
