"""Domain errors of the decision API and the one place they become gRPC statuses."""

from __future__ import annotations

import grpc
from dataclasses import dataclass

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from orchestrator.validation import InvalidField


class ApiError(Exception):
    """An error the caller should see as a specific gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "", retry_after_ms: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms


def api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidField):
        return ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field)
    raise exc


def grpc_status(error: ApiError) -> grpc.Status:
    """A grpc.Status; INVALID_ARGUMENT carries a google.rpc.BadRequest naming the field, and an error with a retry
    hint carries google.rpc.RetryInfo plus ``retry-after-ms`` metadata (for clients that read no details)."""
    details = []
    if error.code is grpc.StatusCode.INVALID_ARGUMENT and error.field:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
                ]
            )
        )
        details.append(detail)
    if error.retry_after_ms is not None:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=error.retry_after_ms // 1000, nanos=(error.retry_after_ms % 1000) * 1_000_000)))
        details.append(detail)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    converted = rpc_status.to_status(status)
    if error.retry_after_ms is None:
        return converted
    return _Status(converted.code, converted.details,
                   (*converted.trailing_metadata, (RETRY_AFTER_KEY, str(error.retry_after_ms))))


RETRY_AFTER_KEY = "retry-after-ms"


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple

