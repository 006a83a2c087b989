"""Opening the live entity state that the settings name: one interface, local or shared (``StateSettings.backend``).

The embedded backend is the default and needs nothing else; the Redis backend's client library is imported only
when it is chosen.
"""

from __future__ import annotations

from riskcascade.core.config import StateSettings
from riskcascade.core.entity_state import EmbeddedEntityState, EntityState, StateLayout


def open_entity_state(settings: StateSettings, layout: StateLayout) -> EntityState:
    """``EmbeddedEntityState`` on ``settings.log_path``, or ``RedisEntityState`` at ``settings.redis_url``."""
    if settings.backend == "redis":
        from riskcascade.core.state_redis import RedisEntityState

        if not settings.redis_url:  # StateSettings refuses this already; settings built with model_construct do not
            raise ValueError("state.backend=redis needs state.redis_url")
        return RedisEntityState(layout, settings.redis_url, settings.key_prefix, settings.redis_timeout_s,
                                settings.redis_late_allowance_s)
    return EmbeddedEntityState(layout, settings.log_path, settings.trim_every_events)
