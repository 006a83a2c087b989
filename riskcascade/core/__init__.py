"""The ground floor: what every process of the platform may import, and which imports nothing of ours above it.

Domain types (``domain``), the one typed configuration (``config``), tracing (``telemetry``), the feature layout and
the live entity state it is served from (``features``, ``entity_state``, ``state_replay``, ``state_backends``,
``state_redis``, ``graph_features``), the model card and calibration (``model_card``, ``calibration``), the band
(``thresholds``), and the pure decision rules: escalation policy and merge (``policy``, ``merge``).

Only the standard library, third-party packages and ``riskcascade.core`` itself are imported here
(``tests/test_layers.py`` checks it).
"""
