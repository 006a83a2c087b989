"""The model version the gateway serves, and switching it without a restart. No Ray or gRPC import.

A ``ServingModel`` is everything the gateway applies for one model version: the version the scorer is asked for,
the escalation band on that version's score, the inputs a request is validated against and their declared
ranges. A decision picks the live one once, at the start, and uses it throughout (validation, scoring, routing,
the record), so a decision is never validated for one version and routed on another's band.

``ModelSwitcher.use`` switches: it checks the version in the registry, has every scorer replica load it beside the
live one (the Serve ``user_config``: a reconfigure, no restart; ``apply_versions`` is the platform's), asks the
scorer to describe it (``probe_calls`` concurrent calls, each waiting for its replica's load), then replaces the
live ServingModel in one assignment and moves the registry's pointer, so a restart serves the same version. Calls
in flight keep the version they picked, which stays loaded; a rollback switches back to the previous version the
same way (it is still loaded: instant).

``ModelSwitcher.shadow`` runs a candidate beside the live model: a version loaded the same way (or the live one)
on its own band. The scorer scores each row with both from one fold of the entity state; the cascade records the
candidate's decision with the live one (riskcascade/core/shadow.py) and never returns it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from riskcascade.core.config import EscalationSettings
from riskcascade.core.domain import ScorerInfo
from riskcascade.core.features import FeatureLayout
from riskcascade.core.model_registry import ModelRegistry, UnknownModelVersion
from riskcascade.core.policy import EscalationPolicy, escalation_policy
from riskcascade.core.shadow import candidate_policy

log = logging.getLogger("riskcascade.models")


@dataclass(frozen=True)
class ServingModel:
    info: ScorerInfo
    policy: EscalationPolicy
    feature_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_names", frozenset(self.info.feature_names))

    @property
    def version(self) -> str:
        return self.info.model_version

    @property
    def feature_ranges(self) -> Mapping[str, tuple[float, float]]:
        return self.info.feature_ranges

    @classmethod
    def of(cls, info: ScorerInfo, escalation: EscalationSettings) -> "ServingModel":
        """The version as the gateway routes it: the config's band edges win over the card's, as at start-up."""
        return cls(info, escalation_policy(escalation, info.band_low, info.band_high))


@dataclass(frozen=True)
class Shadow:
    """A candidate beside the live model: a model version (or the live one) on its own band, recorded only."""

    model: ServingModel
    policy_version: str


class ModelSelection:
    """The live ServingModel, the one it replaced (what a rollback returns to) and the shadow, if any."""

    def __init__(self, live: ServingModel):
        self.live = live
        self.previous: ServingModel | None = None
        self.shadow: Shadow | None = None

    def kept(self, *first: str) -> tuple[str, ...]:
        """The versions the replicas keep: ``first``, then the live, the shadow's and the previous (no repeats)."""
        versions = [*first, self.live.version, self.shadow.model.version if self.shadow else "",
                    self.previous.version if self.previous else ""]
        return tuple(dict.fromkeys(v for v in versions if v))


class SwitchRefused(ValueError):
    """The version cannot be switched to; the message says why (unknown, or not servable beside the live one)."""


class UnknownVersion(SwitchRefused):
    pass


class DescribingScorer(Protocol):
    async def info(self, timeout_s: float, version: str | None = None) -> ScorerInfo: ...


@dataclass(frozen=True)
class SwitchResult:
    previous: ServingModel
    live: ServingModel

    @property
    def changed(self) -> bool:
        return self.previous.version != self.live.version


class ModelSwitcher:
    def __init__(
        self,
        selection: ModelSelection,
        scorer: DescribingScorer,
        apply_versions: Callable[[tuple[str, ...]], Awaitable[None]],
        registry: ModelRegistry,
        escalation: EscalationSettings,
        describe_timeout_s: float,
        probe_calls: int,
        on_switch: Callable[[ServingModel, ServingModel], None] | None = None,
    ):
        self.selection = selection
        self._scorer = scorer
        self._apply_versions = apply_versions
        self._registry = registry
        self._escalation = escalation
        self._describe_timeout_s = describe_timeout_s
        self._probe_calls = probe_calls
        self._on_switch = on_switch
        self._lock = asyncio.Lock()  # one switch at a time

    async def use(self, version: str, reason: str) -> SwitchResult:
        async with self._lock:
            live = self.selection.live
            if version == live.version:
                return SwitchResult(live, live)
            info = await self._load_everywhere(version, live.version)
            chosen = ServingModel.of(info, self._escalation)
            self.selection.previous, self.selection.live = live, chosen  # the switch: one step
            await asyncio.to_thread(self._registry.set_live, version, reason)
            log.warning("switched model %s -> %s (%s): band [%.3f, %.3f)", live.version, version, reason,
                        chosen.policy.band_low, chosen.policy.band_high)
            if self._on_switch is not None:  # metrics and the ready file: file writes, off the loop
                await asyncio.to_thread(self._on_switch, live, chosen)
            return SwitchResult(live, chosen)

    async def shadow(self, version: str | None, band: tuple[float | None, float | None], policy_version: str
                     ) -> Shadow | None:
        """Run a candidate beside the live model: ``version`` (None: the live one) on its band, the config's edges
        and then ``band``'s overriding the card's. Its decisions are recorded with the live ones, never returned.
        ``shadow_off`` ends it."""
        async with self._lock:
            live = self.selection.live
            version = version or live.version
            info = live.info if version == live.version else await self._load_everywhere(version, live.version)
            shadow = Shadow(ServingModel(info, candidate_policy(self._escalation, info.band_low, info.band_high,
                                                                band)), policy_version)
            self.selection.shadow = shadow
            log.warning("shadow %s (policy %s) beside %s: band [%.3f, %.3f)", version, policy_version, live.version,
                        shadow.model.policy.band_low, shadow.model.policy.band_high)
            return shadow

    async def shadow_off(self) -> Shadow | None:
        async with self._lock:
            ended, self.selection.shadow = self.selection.shadow, None
            if ended is not None:
                log.warning("shadow %s ended", ended.model.version)
            return ended

    async def _load_everywhere(self, version: str, live_version: str) -> ScorerInfo:
        """Check ``version``, have every replica keep it (with the live, shadow and previous ones), and return its
        description once the replicas answering have it."""
        await asyncio.to_thread(self._check, version, live_version)
        await self._apply_versions(self.selection.kept(version))
        # each call waits until the replica it reaches has loaded the version; several concurrent ones reach
        # every replica of a small deployment (and a replica missed loads it on its first request)
        described = await asyncio.gather(*[self._scorer.info(self._describe_timeout_s, version)
                                           for _ in range(self._probe_calls)])
        if {d.model_version for d in described} != {version}:
            raise SwitchRefused(f"the scorer describes {sorted({d.model_version for d in described})}, not {version}")
        return described[0]

    async def rollback(self, reason: str) -> SwitchResult:
        previous = self.selection.previous
        version = previous.version if previous is not None else await asyncio.to_thread(self._registry.previous)
        if version is None:
            raise SwitchRefused("no earlier version to roll back to")
        return await self.use(version, reason)

    def _check(self, version: str, live_version: str) -> None:
        """The version is published and its entity-state layout is the live one's (the replicas' one state feeds
        every loaded version; a different layout needs a state built for it: start the platform on it)."""
        try:
            folder = self._registry.path(version)
        except UnknownModelVersion as exc:
            raise UnknownVersion(str(exc)) from None
        try:
            live_folder: Path | None = self._registry.path(live_version)
        except UnknownModelVersion:
            live_folder = None  # a live model outside the registry: nothing to compare with
        if live_folder is not None and FeatureLayout.load(folder).state != FeatureLayout.load(live_folder).state:
            raise SwitchRefused(
                f"model {version} keeps a different entity state than {live_version} (links, windows or "
                "aggregates differ): the live state cannot feed it; `riskcascade model use --offline` and restart")
