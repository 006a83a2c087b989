"""The cost model of the cascade: what 1,000 decisions cost in money, from measured stage costs and a price table.

A decision always pays for the fast path (its CPU-seconds: the model's own, or the whole platform's orchestrator
and scorer processes when a load benchmark measured them); an escalated one also pays for one reasoner call (its
CPU-seconds and, with a hosted LLM backend, its prompt and answer tokens). So with ``s`` the share escalated::

    USD per 1,000 decisions = 1000 * (fast + s * escalation)
    fast       = fast CPU-seconds / 3600 * pricing.fast_path_usd_per_cpu_hour
    escalation = reasoner CPU-seconds / 3600 * pricing.reasoner_usd_per_cpu_hour
                 + input tokens / 1000 * pricing.llm_input_usd_per_1k_tokens
                 + output tokens / 1000 * pricing.llm_output_usd_per_1k_tokens

Three points name the trade-off: fast-only (``s = 0``), the cascade at a band's measured share, and everything
escalated (``s = 1``). The figures come from ``python -m loadtest.band_sweep`` (which measures the stage costs);
prices come from the ``pricing`` section of the config (riskcascade/core/config.py). Plain arithmetic, no I/O but the
benchmark-file reader at the end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from riskcascade.core.config import PricingSettings

SECONDS_PER_HOUR = 3600.0
TOKENS_PER_PRICE_UNIT = 1000.0  # prices are per 1,000 tokens
DECISIONS_PER_FIGURE = 1000.0  # costs are reported per 1,000 decisions
PLATFORM_CPU_FIELD = "cpu_ms_per_decision"  # what a load benchmark's result calls the platform's CPU per decision
FAST_ONLY, AT_BAND, ALL_ESCALATED = "fast-only", "cascade at band", "everything escalated"


@dataclass(frozen=True)
class StageCosts:
    """What each stage uses per unit of work, as measured."""

    fast_cpu_s_per_decision: float  # CPU-seconds the fast path spends on one decision
    reasoner_cpu_s_per_call: float  # CPU-seconds one reasoner call spends (retrieval, embedding, LLM step, ...)
    llm_input_tokens_per_case: float = 0.0  # prompt tokens a hosted LLM is sent per escalated case
    llm_output_tokens_per_case: float = 0.0  # answer tokens it returns per escalated case

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"StageCosts.{f.name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class CostPoint:
    name: str
    escalated_share: float
    usd_per_1000: float


def fast_usd_per_decision(costs: StageCosts, pricing: PricingSettings) -> float:
    """What the fast path costs for one decision, in USD."""
    return costs.fast_cpu_s_per_decision / SECONDS_PER_HOUR * pricing.fast_path_usd_per_cpu_hour


def escalation_usd_per_case(costs: StageCosts, pricing: PricingSettings) -> float:
    """What one escalation adds on top of the fast path, in USD: the reasoner's CPU and the LLM's tokens."""
    cpu = costs.reasoner_cpu_s_per_call / SECONDS_PER_HOUR * pricing.reasoner_usd_per_cpu_hour
    tokens = (costs.llm_input_tokens_per_case * pricing.llm_input_usd_per_1k_tokens
              + costs.llm_output_tokens_per_case * pricing.llm_output_usd_per_1k_tokens) / TOKENS_PER_PRICE_UNIT
    return cpu + tokens


def cost_per_1000(costs: StageCosts, escalated_share: float, pricing: PricingSettings) -> float:
    """USD per 1,000 decisions when ``escalated_share`` (in [0, 1]) of them go to the reasoner."""
    if not (math.isfinite(escalated_share) and 0.0 <= escalated_share <= 1.0):
        raise ValueError(f"escalated_share must be in [0, 1], got {escalated_share!r}")
    per_decision = fast_usd_per_decision(costs, pricing) + escalated_share * escalation_usd_per_case(costs, pricing)
    return DECISIONS_PER_FIGURE * per_decision


def named_points(costs: StageCosts, band_share: float, pricing: PricingSettings) -> tuple[CostPoint, ...]:
    """Fast-only, the cascade at a band escalating ``band_share``, and everything escalated."""
    return tuple(
        CostPoint(name, share, cost_per_1000(costs, share, pricing))
        for name, share in ((FAST_ONLY, 0.0), (AT_BAND, band_share), (ALL_ESCALATED, 1.0))
    )


def platform_cpu_ms_per_decision(results: Any, label_contains: str) -> float | None:
    """The platform's CPU-milliseconds per decision from a load benchmark's results (loadtest/bench.py's JSON):
    the ``cpu_ms_per_decision`` of the one result whose name contains ``label_contains`` (e.g. the orchestrator on
    clear cases: the fast path alone). A result's name is its place in the document, its ``id`` and its ``label``
    (``modes[1].results[3] orch-clear-c16 orchestrator, clear cases (c=16)``), so a mode or a row can be picked.
    None when no result carries a figure there (a null one counts as none); ValueError when several match, naming
    them, so the caller picks one rather than getting an arbitrary figure."""
    found = [(name, value) for name, value in _cpu_fields(results, "") if label_contains in name]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"several results carry {PLATFORM_CPU_FIELD} and contain {label_contains!r} in their "
                         f"name: {[name for name, _ in found]}; name one")
    name, value = found[0]
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{PLATFORM_CPU_FIELD} of {name!r} is not a finite number >= 0: {value!r}")
    return float(value)


def read_platform_cpu_ms_per_decision(path: Path, label_contains: str) -> float | None:
    """``platform_cpu_ms_per_decision`` of a results file."""
    return platform_cpu_ms_per_decision(json.loads(Path(path).read_text()), label_contains)


def _cpu_fields(node: Any, where: str) -> list[tuple[str, Any]]:
    """(name, value) of every mapping in ``node`` whose PLATFORM_CPU_FIELD is not null; its name is its path in
    the document, its ``id`` and its ``label``."""
    out: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        if node.get(PLATFORM_CPU_FIELD) is not None:
            name = " ".join(str(part) for part in (where or "<root>", node.get("id"), node.get("label")) if part)
            out.append((name, node[PLATFORM_CPU_FIELD]))
        for key, value in node.items():
            out += _cpu_fields(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _cpu_fields(value, f"{where}[{i}]")
    return out
