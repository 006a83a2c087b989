"""The cost model (loadtest/cost.py), its price table (config `pricing`) and the band sweep's pure part
(loadtest/band_sweep.py): arithmetic checked against figures worked out here from each test's own inputs."""

import json
import math

import numpy as np
import pytest

from loadtest.band_sweep import DEFAULT_BAND, BandPoint, BandSpec, band_grid, escalated, goal_check, sweep_bands
from loadtest.cost import (
    ALL_ESCALATED,
    AT_BAND,
    FAST_ONLY,
    StageCosts,
    cost_per_1000,
    named_points,
    platform_cpu_ms_per_decision,
    read_platform_cpu_ms_per_decision,
)
from riskcascade.core.config import ConfigError, PricingSettings, load_settings
from riskcascade.core.policy import EscalationPolicy, Route

# Prices chosen so the arithmetic is easy by hand: 0.036 USD per CPU-hour = 0.00001 USD per CPU-second.
PRICING = PricingSettings(
    fast_path_usd_per_cpu_hour=0.036, reasoner_usd_per_cpu_hour=0.072,
    llm_input_usd_per_1k_tokens=0.001, llm_output_usd_per_1k_tokens=0.002,
)
COSTS = StageCosts(fast_cpu_s_per_decision=0.002, reasoner_cpu_s_per_call=0.040,
                   llm_input_tokens_per_case=500, llm_output_tokens_per_case=100)
FAST_USD = 0.002 * 0.00001  # 2 CPU-ms at 0.00001 USD per CPU-second
ESCALATION_USD = 0.040 * 0.00002 + 500 / 1000 * 0.001 + 100 / 1000 * 0.002  # reasoner CPU + input + output tokens


# --- the cost arithmetic ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_cost_per_1000_is_the_fast_path_plus_the_escalated_share_of_the_reasoner(share):
    assert cost_per_1000(COSTS, share, PRICING) == pytest.approx(1000 * (FAST_USD + share * ESCALATION_USD))


def test_the_reasoner_and_the_fast_path_are_priced_at_their_own_rates():
    cpu_only = StageCosts(fast_cpu_s_per_decision=3600.0, reasoner_cpu_s_per_call=7200.0)
    pricing = PricingSettings(fast_path_usd_per_cpu_hour=1.0, reasoner_usd_per_cpu_hour=5.0,
                              llm_input_usd_per_1k_tokens=100.0, llm_output_usd_per_1k_tokens=100.0)
    # one CPU-hour of fast path per decision (1 USD) plus half the decisions at two reasoner CPU-hours (10 USD)
    assert cost_per_1000(cpu_only, 0.5, pricing) == pytest.approx(1000 * (1.0 + 0.5 * 10.0))


def test_the_three_named_points():
    points = {p.name: p for p in named_points(COSTS, 0.12, PRICING)}
    assert points[FAST_ONLY].escalated_share == 0 and points[FAST_ONLY].usd_per_1000 == pytest.approx(1000 * FAST_USD)
    assert points[AT_BAND].escalated_share == 0.12
    assert points[AT_BAND].usd_per_1000 == pytest.approx(1000 * (FAST_USD + 0.12 * ESCALATION_USD))
    assert points[ALL_ESCALATED].usd_per_1000 == pytest.approx(1000 * (FAST_USD + ESCALATION_USD))


@pytest.mark.parametrize("share", [-0.01, 1.01, math.nan])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match="escalated_share"):
        cost_per_1000(COSTS, share, PRICING)


@pytest.mark.parametrize("field", ["fast_cpu_s_per_decision", "reasoner_cpu_s_per_call", "llm_input_tokens_per_case"])
@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_stage_costs_must_be_finite_and_non_negative(field, value):
    kwargs = {"fast_cpu_s_per_decision": 0.001, "reasoner_cpu_s_per_call": 0.01, field: value}
    with pytest.raises(ValueError, match=field):
        StageCosts(**kwargs)


# --- the price table ----------------------------------------------------------------------------------------------


def test_pricing_defaults_are_positive_illustrative_and_in_the_settings():
    settings = load_settings()
    assert settings.pricing == PricingSettings()
    for name, field in PricingSettings.model_fields.items():
        assert getattr(settings.pricing, name) > 0, name
        assert "illustrative" in (field.description or ""), name
    assert "operator" in (PricingSettings.__doc__ or "")


def test_pricing_comes_from_yaml_and_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pricing:\n  reasoner_usd_per_cpu_hour: 0.5\n")
    monkeypatch.setenv("RISKCASCADE_PRICING__LLM_OUTPUT_USD_PER_1K_TOKENS", "0.01")
    pricing = load_settings(cfg).pricing
    assert pricing.reasoner_usd_per_cpu_hour == 0.5 and pricing.llm_output_usd_per_1k_tokens == 0.01
    assert pricing.fast_path_usd_per_cpu_hour == PricingSettings().fast_path_usd_per_cpu_hour


@pytest.mark.parametrize("value", ["-0.1", ".inf", ".nan", "cheap"])
def test_a_bad_price_is_refused_naming_the_key(tmp_path, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"pricing:\n  reasoner_usd_per_cpu_hour: {value}\n")
    with pytest.raises(ConfigError, match=r"pricing\.reasoner_usd_per_cpu_hour"):
        load_settings(cfg)


def test_an_unknown_price_key_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pricing:\n  gpu_usd_per_hour: 2\n")
    with pytest.raises(ConfigError, match=r"pricing\.gpu_usd_per_hour"):
        load_settings(cfg)


# --- the platform's CPU from a load benchmark's results ------------------------------------------------------------


def test_platform_cpu_is_read_from_the_result_with_the_label(tmp_path):
    results = {"modes": [{"results": [
        {"id": "orch-clear-c16", "label": "orchestrator, clear cases (c=16)", "cpu_ms_per_decision": 1.75},
        {"id": "orch-mix-c16", "label": "orchestrator, held-out mix (c=16)", "cpu_ms_per_decision": 9.5},
        {"id": "orch-mix-c1", "label": "orchestrator, held-out mix (c=1)", "cpu_ms_per_decision": None},
        {"label": "bare grpc.aio (c=16)"},
    ]}, {"results": [{"label": "orchestrator, clear cases (c=16)", "cpu_ms_per_decision": 2.5}]}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(results))
    assert read_platform_cpu_ms_per_decision(path, "modes[0].results[0]") == 1.75
    assert platform_cpu_ms_per_decision(results, "orch-clear-c16") == 1.75  # by id
    assert platform_cpu_ms_per_decision(results, "modes[1]") == 2.5  # by place: the other Serve mode
    assert platform_cpu_ms_per_decision(results, "held-out mix") == 9.5  # the c=1 row's null is no figure
    assert platform_cpu_ms_per_decision(results, "held-out mix (c=1)") is None
    assert platform_cpu_ms_per_decision(results, "no such label") is None
    with pytest.raises(ValueError, match="several"):
        platform_cpu_ms_per_decision(results, "clear cases")  # both modes have one
    with pytest.raises(ValueError, match="finite"):
        platform_cpu_ms_per_decision({"label": "x", "cpu_ms_per_decision": -1}, "x")


# --- the band sweep's pure part ------------------------------------------------------------------------------------

# Six events; the fast model ranks fraud 1, 1, then a legitimate one above the third fraud.
FAST = np.array([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
LABELS = np.array([0, 0, 1, 0, 1, 1])
# Had each been escalated: the reasoner lifts the fraud at 0.4 and lowers the legitimate one at 0.6, but would put
# the first legitimate event on top.
MERGED = np.array([0.99, 0.3, 0.9, 0.1, 0.8, 0.95])
AP_FAST = (1 + 1 + 3 / 4) / 3  # ranks: fraud, fraud, legit, fraud
AP_MERGED = (1 / 2 + 2 / 3 + 3 / 4) / 3  # ranks: legit, fraud, fraud, fraud


def _band(name, low, high):
    return BandSpec(name, low, high, validation_share=0.0)


def test_an_empty_band_costs_the_fast_path_only_and_keeps_the_fast_ap():
    [point] = sweep_bands(FAST, MERGED, LABELS, [_band("none", 0.5, 0.5)], COSTS, PRICING)
    assert point.escalated_share == 0.0
    assert point.usd_per_1000 == pytest.approx(1000 * FAST_USD)
    assert point.ap_fast == pytest.approx(AP_FAST) and point.ap_cascade == pytest.approx(AP_FAST)


def test_a_band_of_everything_costs_fast_plus_reasoner_and_scores_with_the_merged_score():
    [point] = sweep_bands(FAST, MERGED, LABELS, [_band("all", 0.0, math.inf)], COSTS, PRICING)
    assert point.escalated_share == 1.0
    assert point.usd_per_1000 == pytest.approx(1000 * (FAST_USD + ESCALATION_USD))
    assert point.ap_cascade == pytest.approx(AP_MERGED)


def test_a_middle_band_merges_only_the_events_inside_it():
    [point] = sweep_bands(FAST, MERGED, LABELS, [_band("middle", 0.3, 0.7)], COSTS, PRICING)
    assert point.escalated_share == pytest.approx(2 / 6)  # 0.4 and 0.6
    # cascade scores 0.05, 0.2, 0.9, 0.1, 0.8, 0.95: the three frauds on top; the 0.99 outside the band is unused
    assert point.ap_cascade == pytest.approx(1.0)
    assert point.usd_per_1000 == pytest.approx(1000 * (FAST_USD + 2 / 6 * ESCALATION_USD))


def test_sweep_refuses_arrays_of_different_lengths():
    with pytest.raises(ValueError, match="one length"):
        sweep_bands(FAST, MERGED[:-1], LABELS, [_band("x", 0.0, 1.0)], COSTS, PRICING)


def test_the_sweep_escalates_what_the_escalation_policy_escalates():
    scores = np.random.default_rng(0).random(500)
    scores[:3] = (0.2, 0.8, 1.0)  # the band's own edges and the top score
    for low, high in ((0.2, 0.8), (0.0, 1.0), (0.5, 0.5)):
        policy = EscalationPolicy(low, high, min_reasoner_budget_ms=0.0, max_in_flight=1)
        expected = [policy.route(float(s), remaining_ms=1.0, in_flight=0).route is Route.ESCALATE for s in scores]
        assert escalated(scores, low, high).tolist() == expected


def test_band_grid_takes_shares_of_the_validation_scores_and_adds_the_default_band():
    validation = np.linspace(0.0, 1.0, 1001)  # uniform: a share-s band about 0.5 is [0.5 - s/2, 0.5 + s/2)
    bands = band_grid(validation, (0.0, 0.2, 1.0), default=(0.45, 0.55), centre=0.5)
    assert [b.name for b in bands] == ["0%", DEFAULT_BAND, "20%", "100%"]  # by validation share
    by_name = {b.name: b for b in bands}
    assert by_name["0%"].validation_share == 0.0 and by_name["0%"].low == by_name["0%"].high
    assert by_name["20%"].validation_share == pytest.approx(0.2, abs=0.002)
    assert by_name["20%"].low == pytest.approx(0.4, abs=0.002) and by_name["20%"].high == pytest.approx(0.6, abs=0.002)
    assert by_name["100%"].validation_share == 1.0 and math.isinf(by_name["100%"].high)
    assert by_name[DEFAULT_BAND].validation_share == pytest.approx(0.1, abs=0.002)


def _point(name, share, ap, usd):
    return BandPoint(name, 0.0, 1.0, share, share, ap, ap, usd)


@pytest.mark.parametrize(
    "default_usd, default_ap, cost_met, ap_met",
    [(0.9, 0.98, True, True), (1.1, 0.98, False, True), (0.9, 0.96, True, False)],
)
def test_goal_check_compares_the_default_band_with_everything_escalated(default_usd, default_ap, cost_met, ap_met):
    points = [_point("0%", 0.0, 0.5, 0.2), _point(DEFAULT_BAND, 0.1, default_ap, default_usd),
              _point("100%", 1.0, 1.0, 10.0)]
    goal = goal_check(points, cost_ratio=0.1, ap_ratio=0.97)
    assert goal["cost_ratio"] == pytest.approx(default_usd / 10.0) and goal["ap_ratio"] == pytest.approx(default_ap)
    assert (goal["cost_met"], goal["ap_met"], goal["met"]) == (cost_met, ap_met, cost_met and ap_met)


def test_the_recorded_command_carries_the_settings_environment_but_no_secret(monkeypatch):
    from loadtest.band_sweep import command_line

    monkeypatch.setenv("RISKCASCADE_RETRIEVAL__EDGE_PATH", "/snapshot")
    monkeypatch.setenv("RISKCASCADE_LLM__API_KEY", "sk-do-not-print")
    command = command_line(["--events", "5"])
    assert command.endswith("python -m loadtest.band_sweep --events 5")
    assert "RISKCASCADE_RETRIEVAL__EDGE_PATH=/snapshot" in command and "sk-do-not-print" not in command
