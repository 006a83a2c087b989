"""Ray Serve application builders named by deploy/serve.yaml (``import_path: services.app:build_...``).

Each takes ``args`` from the Serve config: either ``settings`` (a resolved settings dict, which the orchestrator
injects when it applies the config) or ``config`` (a riskcascade YAML path, for operators running
``serve deploy`` themselves); with neither, settings come from the replica's environment.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from riskcascade.core.config import load_settings, settings_from_wire


class StageArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] | None = None
    config: str | None = None

    def wire_settings(self) -> dict[str, Any]:
        if self.settings is not None:
            return settings_from_wire(self.settings).to_wire()
        return load_settings(self.config).to_wire()


def build_scorer_app(args: dict[str, Any]) -> Application:
    from services.scorer.deployment import FastScorer

    return FastScorer.bind(StageArgs.model_validate(args).wire_settings())


def build_reasoner_app(args: dict[str, Any]) -> Application:
    from services.reasoning.deployment import Reasoner

    return Reasoner.bind(StageArgs.model_validate(args).wire_settings())
