"""Plots of load-test results (PNG, matplotlib's Agg backend), written beside the results file.

- ``latency_over_time``: per second of scheduled sends, p50 and p99 of the answered units and how many were
  answered, for a few rows (the ``series`` of a load generator result).
- ``latency_vs_load``: p50 and p99 against the offered rate of open-loop rows, with the floor's beside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)

DPI = 120


def latency_over_time(rows: Sequence[Mapping], path: Path, title: str) -> Path | None:
    """One line pair per row (p50 solid, p99 dashed) over the run's seconds; answered units per second below."""
    rows = [r for r in rows if r.get("series")]
    if not rows:
        return None
    fig, (lat_ax, rate_ax) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(2, 1))
    for i, row in enumerate(rows):
        color = f"C{i}"
        series = row["series"]
        seconds = [s["second"] for s in series]
        lat_ax.plot(seconds, [_nan(s["p50"]) for s in series], color=color, marker=".", label=f"{row['label']} p50")
        lat_ax.plot(seconds, [_nan(s["p99"]) for s in series], color=color, linestyle="--", marker=".",
                    label=f"{row['label']} p99")
        rate_ax.plot(seconds, [s["ok"] for s in series], color=color, marker=".", label=row["label"])
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("latency, ms (log)")
    lat_ax.set_title(title)
    lat_ax.grid(True, which="both", alpha=0.3)
    lat_ax.legend(fontsize=7)
    rate_ax.set_ylabel("answered per second")
    rate_ax.set_xlabel("second of the measured run, by scheduled send (the last one may be partial)")
    rate_ax.grid(True, alpha=0.3)
    return _save(fig, path)


def latency_vs_load(rows: Sequence[Mapping], path: Path, title: str,
                    floor: Mapping[str, float | None] | None = None) -> Path | None:
    """p50 and p99 against offered rate (open-loop rows), floor lines, and on a second axis the rate sent (on
    schedule) and answered (over the whole measured time, the drain of the last sends included)."""
    rows = sorted((r for r in rows if r.get("rate")), key=lambda r: r["rate"])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    rates = [r["rate"] for r in rows]
    ax.plot(rates, [_nan(r["latency_ms"]["p50"]) for r in rows], marker="o", label="p50")
    ax.plot(rates, [_nan(r["latency_ms"]["p99"]) for r in rows], marker="o", label="p99")
    for key, style in (("p50", ":"), ("p99", "-.")):
        if floor and floor.get(key) is not None:
            ax.axhline(floor[key], color="grey", linestyle=style, label=f"floor {key}")
    for r in rows:
        errors = sum(r["errors"].values())
        if errors or r["late_sends"]:
            ax.annotate(f"errors {errors}, late {r['late_sends']}", (r["rate"], _nan(r["latency_ms"]["p99"])),
                        fontsize=7, textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate, requests/s (log)")
    ax.set_ylabel("latency from the scheduled send, ms (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    achieved = ax.twinx()
    achieved.plot(rates, [r["requests_per_s"] for r in rows], color="C2", marker="s", alpha=0.5, label="answered/s")
    achieved.plot(rates, [r["sent_per_s"] for r in rows], color="C2", linestyle=":", alpha=0.5, label="sent/s")
    achieved.set_ylim(bottom=0)
    achieved.set_ylabel("per second")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = achieved.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=8, loc="upper left")
    return _save(fig, path)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
