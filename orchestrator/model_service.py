"""risk.v1.ModelService: the operators' model control, a thin gRPC shell over ModelSwitcher and the registry.

Every method needs the ``admin`` role (orchestrator/auth.py: only ``admin`` grants methods outside
DecisionService). A switch takes as long as the replicas need to load the version (seconds); the caller's
deadline bounds how long it waits, not the switch itself, which goes on and lands (or fails) whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from orchestrator.errors import ApiError, api_error, grpc_status
from orchestrator.models import ModelSwitcher, SwitchRefused, UnknownVersion
from orchestrator.validation import InvalidField, validate_id
from risk.v1 import decision_pb2, model_pb2, model_pb2_grpc
from riskcascade.core.model_registry import ModelRegistry

log = logging.getLogger("riskcascade.models")


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, switcher: ModelSwitcher, registry: ModelRegistry,
                 service_info: Callable[[], decision_pb2.ServiceInfo], policy_version: str):
        self._switcher = switcher
        self._policy_version = policy_version
        self._registry = registry
        self._service_info = service_info

    async def ListModels(self, request: model_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> model_pb2.ListModelsResponse:
        versions = await asyncio.to_thread(self._registry.versions)
        live = self._switcher.selection.live.version
        previous = self._switcher.selection.previous
        return model_pb2.ListModelsResponse(
            versions=[
                model_pb2.ModelVersionInfo(
                    version=v.version, created_at=v.card.created_at, band_low=v.card.thresholds.band_low,
                    band_high=v.card.thresholds.band_high, live=v.version == live,
                    test_roc_auc=float(v.card.metrics.get("roc_auc", 0.0)),
                    dataset=str(v.card.data.get("dataset", "")),
                )
                for v in versions
            ],
            live_version=live,
            previous_version=previous.version if previous is not None else "",
        )

    async def UseModel(self, request: model_pb2.UseModelRequest, context: grpc.aio.ServicerContext
                       ) -> model_pb2.UseModelResponse:
        started = time.monotonic()
        try:
            if request.rollback == bool(request.version):
                raise InvalidField("version", "name a version, or set rollback (not both)")
            reason = request.reason.strip() or ("rollback" if request.rollback else "UseModel")
            # shielded: a caller that gives up does not leave the switch half done
            if request.rollback:
                switch = self._switcher.rollback(reason)
            else:
                switch = self._switcher.use(validate_id(request.version, "version"), reason)
            result = await asyncio.shield(switch)
        except UnknownVersion as exc:
            await context.abort_with_status(grpc_status(ApiError(grpc.StatusCode.NOT_FOUND, str(exc))))
        except SwitchRefused as exc:
            await context.abort_with_status(grpc_status(ApiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc))))
        except InvalidField as exc:
            await context.abort_with_status(grpc_status(api_error(exc)))
        except Exception as exc:  # noqa: BLE001 - replicas or Serve failed the switch; the live version is unchanged
            log.warning("model switch failed: %s: %s", type(exc).__name__, exc)
            await context.abort_with_status(grpc_status(ApiError(
                grpc.StatusCode.UNAVAILABLE, f"switch failed, still serving "
                f"{self._switcher.selection.live.version}: {type(exc).__name__}: {exc}")))
        return model_pb2.UseModelResponse(
            previous_version=result.previous.version, changed=result.changed, info=self._service_info(),
            switch_ms=(time.monotonic() - started) * 1000.0,
        )

    async def SetShadow(self, request: model_pb2.SetShadowRequest, context: grpc.aio.ServicerContext
                        ) -> model_pb2.SetShadowResponse:
        try:
            if request.off:
                await self._switcher.shadow_off()
                return model_pb2.SetShadowResponse(on=False)
            band = (request.band_low if request.HasField("band_low") else None,
                    request.band_high if request.HasField("band_high") else None)
            for name, edge in zip(("band_low", "band_high"), band):
                if edge is not None and not 0.0 <= edge <= 1.0:
                    raise InvalidField(name, "must be within [0, 1]")
            version = validate_id(request.version, "version") if request.version else None
            policy = (validate_id(request.policy_version, "policy_version") if request.policy_version
                      else f"{self._policy_version}+shadow")
            shadow = await asyncio.shield(self._switcher.shadow(version, band, policy))
        except UnknownVersion as exc:
            await context.abort_with_status(grpc_status(ApiError(grpc.StatusCode.NOT_FOUND, str(exc))))
        except SwitchRefused as exc:
            await context.abort_with_status(grpc_status(ApiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc))))
        except (InvalidField, ValueError) as exc:  # ValueError: a band whose edges are out of order
            await context.abort_with_status(grpc_status(api_error(
                exc if isinstance(exc, InvalidField) else InvalidField("band_low", str(exc)))))
        except Exception as exc:  # noqa: BLE001 - replicas or Serve failed to load it; nothing changed
            log.warning("shadow failed: %s: %s", type(exc).__name__, exc)
            await context.abort_with_status(grpc_status(ApiError(
                grpc.StatusCode.UNAVAILABLE, f"shadow not started: {type(exc).__name__}: {exc}")))
        policy = shadow.model.policy
        return model_pb2.SetShadowResponse(on=True, version=shadow.model.version, band_low=policy.band_low,
                                           band_high=policy.band_high, policy_version=shadow.policy_version)
