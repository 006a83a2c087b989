"""Domain errors of the decision API and the one place they become gRPC statuses."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from orchestrator.validation import InvalidField


class ApiError(Exception):
    """An error the caller should see as a specific gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidField):
        return ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field)
    raise exc


def grpc_status(error: ApiError) -> grpc.Status:
    """A grpc.Status; INVALID_ARGUMENT carries a google.rpc.BadRequest naming the field."""
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
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)

