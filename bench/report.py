"""Turn per-round results into one table: medians per target, ratios taken pair by pair.

A ratio is computed inside each round (broker and yardstick measured minutes apart would
compare two different machines' moods), then the median of those ratios is shown.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Results = list[dict[str, Any]]  # rows: {"round", "scenario", "target", metric: value, ...}

PROXIES = ("broker", "broker-uvloop", "yardstick", "nginx")
COLUMNS = ("direct", *PROXIES)
RATIOS = (("broker", "yardstick"), ("broker", "nginx"), ("broker", "direct"))


@dataclass(frozen=True)
class Row:
    scenario: str
    metric: str
    label: str
    unit: str
    target: str = ""
    check: Callable[[dict[str, float], dict[str, float]], bool] | None = None
    worst: bool = False  # show and check the worst round, not the median (one-off events)


ROWS = (
    Row(
        "1k",
        "rps",
        "1 KB JSON, 32 conn",
        "req/s",
        "broker/yardstick ≥ 1.0",
        lambda v, r: r.get("broker/yardstick", 0) >= 1.0,
    ),
    Row("1k", "p50_ms", "1 KB JSON, 32 conn", "p50 ms"),
    Row("1k", "p99_ms", "1 KB JSON, 32 conn", "p99 ms"),
    Row("1k", "peak_rss_mb", "1 KB JSON, 32 conn", "peak RSS MB"),
    Row(
        "256k",
        "rps",
        "256 KB JSON, 32 conn",
        "req/s",
        "broker/yardstick ≥ 1.0",
        lambda v, r: r.get("broker/yardstick", 0) >= 1.0,
    ),
    Row("256k", "p99_ms", "256 KB JSON, 32 conn", "p99 ms"),
    Row("256k", "peak_rss_mb", "256 KB JSON, 32 conn", "peak RSS MB"),
    Row("light", "p50_ms", "1 KB, 1 conn sequential", "p50 ms"),
    Row("light", "p99_ms", "1 KB, 1 conn sequential", "p99 ms"),
    Row(
        "light",
        "added_p50_ms",
        "1 KB, 1 conn sequential",
        "added p50 ms",
        "broker ≤ 0.5",
        lambda v, r: v.get("broker", math.inf) <= 0.5,
    ),
    Row(
        "light",
        "added_p99_ms",
        "1 KB, 1 conn sequential",
        "added p99 ms",
        "broker ≤ 1.5",
        lambda v, r: v.get("broker", math.inf) <= 1.5,
    ),
    Row("1g", "mbps", "1 GiB streamed", "MB/s"),
    Row(
        "1g",
        "peak_rss_mb",
        "1 GiB streamed",
        "peak RSS MB",
        "broker ≤ 80",
        lambda v, r: v.get("broker", math.inf) <= 80,
        worst=True,
    ),
    Row(
        "idle",
        "idle_rss_mb",
        "idle, fresh process",
        "RSS MB",
        "broker ≤ 60",
        lambda v, r: v.get("broker", math.inf) <= 60,
        worst=True,
    ),
    Row("held", "rest_rss_mb", "at rest after the load above", "RSS MB"),
    Row(
        "held",
        "held_rss_mb",
        "256 open client conns",
        "RSS MB",
        "broker ≤ 120",
        lambda v, r: v.get("broker", math.inf) <= 120,
        worst=True,
    ),
    Row(
        "401",
        "refresh_calls",
        "1000 concurrent, one 401",
        "refresh calls",
        "exactly 1",
        lambda v, r: v.get("broker") == 1,
        worst=True,
    ),
    Row(
        "401",
        "after_token_ms",
        "1000 concurrent, one 401",
        "last answer after token, ms",
        "broker ≤ 1000",
        lambda v, r: v.get("broker", math.inf) <= 1000,
        worst=True,
    ),
    Row(
        "401",
        "from_first_ms",
        "1000 concurrent, one 401",
        "last answer after first, ms",
        worst=True,
    ),
)
_LOWER_IS_BETTER = ("ms", "rss", "refresh")


def add_derived(results: Results) -> None:
    """Add latency over direct to each light-load row, within its own round."""
    direct = {
        r["round"]: r for r in results if r["scenario"] == "light" and r["target"] == "direct"
    }
    for row in results:
        base = direct.get(row["round"])
        if row["scenario"] == "light" and base is not None:
            row["added_p50_ms"] = row["p50_ms"] - base["p50_ms"]
            row["added_p99_ms"] = row["p99_ms"] - base["p99_ms"]


def _values(results: Results, row: Row) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        value = r.get(row.metric)
        if r["scenario"] == row.scenario and isinstance(value, int | float):
            found.setdefault(r["target"], []).append((r["round"], float(value)))
    return found


def _pick(values: list[float], row: Row) -> float:
    if not row.worst:
        return statistics.median(values)
    lower_better = any(word in row.metric for word in _LOWER_IS_BETTER)
    return max(values) if lower_better else min(values)


def summarise(results: Results) -> list[dict[str, Any]]:
    """One line per table row: the value per target and the ratios, with the verdict."""
    lines = []
    for row in ROWS:
        found = _values(results, row)
        if not found:
            continue
        values = {t: _pick([v for _, v in pairs], row) for t, pairs in found.items()}
        ratios: dict[str, float] = {}
        pairs = [*RATIOS, ("broker-uvloop", "broker")] if "broker-uvloop" in found else RATIOS
        for a, b in pairs:
            by_round_a, by_round_b = dict(found.get(a, [])), dict(found.get(b, []))
            per_round = [
                by_round_a[n] / by_round_b[n]
                for n in by_round_a
                if n in by_round_b and by_round_b[n] != 0
            ]
            if per_round and not row.metric.startswith("added"):
                ratios[f"{a}/{b}"] = statistics.median(per_round)
        verdict = ""
        if row.check is not None and "broker" in values:
            verdict = "PASS" if row.check(values, ratios) else "FAIL"
        lines.append({"row": row, "values": values, "ratios": ratios, "verdict": verdict})
    return lines


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit in ("req/s", "MB/s"):
        return f"{value:,.0f}"
    if unit == "refresh calls":
        return f"{value:g}"
    if "ms" in unit:
        return f"{value:.2f}"
    return f"{value:.1f}"


def markdown_table(lines: list[dict[str, Any]]) -> str:
    """Render the summary as one markdown table (also what is printed)."""
    present = [c for c in COLUMNS if any(c in line["values"] for line in lines)]
    ratio_names = [f"{a}/{b}" for a, b in RATIOS]
    if "broker-uvloop" in present:
        ratio_names.append("broker-uvloop/broker")
    head = ["scenario", "metric", *present, *ratio_names, "target", "verdict"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for line in lines:
        row: Row = line["row"]
        unit = row.unit + (" (worst)" if row.worst and row.scenario != "401" else "")
        cells = [row.label, unit]
        cells += [_fmt(line["values"].get(c), row.unit) for c in present]
        cells += [f"{line['ratios'][n]:.2f}" if n in line["ratios"] else "-" for n in ratio_names]
        cells += [row.target or "", line["verdict"]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def per_round_table(results: Results) -> str:
    """Every measurement as taken, for anyone who distrusts medians."""
    keys = (
        "rps",
        "p50_ms",
        "p99_ms",
        "mbps",
        "peak_rss_mb",
        "idle_rss_mb",
        "rest_rss_mb",
        "held_rss_mb",
        "refresh_calls",
        "after_token_ms",
        "from_first_ms",
        "errors",
    )
    out = [
        "| round | scenario | target | " + " | ".join(keys) + " |",
        "|" + "---|" * (len(keys) + 3),
    ]
    for r in results:
        cells = [str(r["round"]), r["scenario"], r["target"]]
        for key in keys:
            value = r.get(key)
            cells.append(
                ""
                if value is None
                else (f"{value:.2f}" if isinstance(value, float) else str(value))
            )
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
