"""The Grafana dashboard and the Prometheus alert rules (deploy/) against the broker's metrics.

Every metric name a dashboard query or an alert rule reads must be one the broker exports:
a renamed metric fails here, not as an empty panel or an alert that can never fire. The
rules are also checked and unit-tested by promtool (Debian's `prometheus` package); without
it those tests skip and say why, except under CI (the variable CI set), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from broker.sandbox.server import Sandbox
from tests.conftest import Broker, ConfigFactory, serving_broker, unavailable

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "amo-broker.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
# A metric name in PromQL: ours and prometheus-client's process collector.
METRIC = re.compile(r"\b((?:amo_broker|process)_[a-z0-9_]+)\b")
# What a histogram family exports besides its name (prometheus-client's text format).
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def _alert_queries() -> list[str]:
    # One `expr:` a line (PyYAML is not a dependency; promtool parses the file for real).
    return re.findall(r"^\s+expr:\s*(.+)$", ALERTS.read_text(), flags=re.MULTILINE)


def _exported(text: str) -> set[str]:
    """Every sample name /metrics can carry, from its `# TYPE` lines and its samples."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable(
            "promtool is not installed (apt-get install --no-install-recommends prometheus)"
        )
    return found


async def _run(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=ALERTS.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    return text


async def test_promtool_accepts_the_alert_rules() -> None:
    """`promtool check rules` finds every rule in alerts.yml valid."""
    out = await _run(_promtool(), "check", "rules", ALERTS.name)
    assert f"SUCCESS: {len(_alert_queries())} rules found" in out


async def test_the_main_alerts_fire_on_synthetic_series() -> None:
    """`promtool test rules`: reauth_required, blocked, an expiring token (and more) fire."""
    out = await _run(_promtool(), "test", "rules", ALERT_TESTS.name)
    assert "SUCCESS" in out
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERT_TESTS.read_text()))
    assert {"AmoBrokerNeedsReauth", "AmoBrokerBlocked", "AmoBrokerTokenExpiring"} <= tested


@pytest.fixture
async def serving(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: Callable[..., object]
) -> AsyncIterator[Broker]:
    """A broker with its refresh scheduler running, as `serve` runs it (its metrics too)."""
    async with serving_broker(make_config(), sandbox, aiohttp_client, proactive=True) as broker:
        yield broker


async def test_every_metric_the_dashboard_and_alerts_query_is_exported(serving: Broker) -> None:
    """Each metric name in the dashboard's and the rules' queries is on the broker's /metrics."""
    broker = serving
    for path in ("/api/v4/leads", "/api/v4/contacts", "/api/v4/leads"):
        await (await broker.client.get(path)).read()
    broker.sandbox.expire_access_tokens()
    await (await broker.client.get("/api/v4/leads")).read()  # a 401, a refresh, a retry
    exported = _exported(await (await broker.client.get("/metrics")).text())
    for source, queries in (("dashboard", _dashboard_queries()), ("alerts", _alert_queries())):
        queried = {name for q in queries for name in METRIC.findall(q)}
        assert queried, source
        assert sorted(queried - exported) == [], f"{source} queries metrics the broker lacks"


def test_the_dashboard_is_portable_and_covers_every_part() -> None:
    """No hard-coded datasource, unique panel ids, and a panel for each part of the broker."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    queried = " ".join(_dashboard_queries())
    for metric in (
        "amo_broker_state",
        "amo_broker_access_token_expires_in_seconds",
        "amo_broker_refreshes_total",
        "amo_broker_queue_depth",
        "amo_broker_rate_limit_rps",
        "amo_broker_upstream_responses_total",
        "amo_broker_upstream_latency_seconds_bucket",
    ):
        assert metric in queried


def test_operations_points_at_the_rules_file_and_names_every_alert() -> None:
    """docs/operations.md sends readers to alerts.yml and names each alert it holds."""
    text = OPERATIONS.read_text()
    assert "deploy/prometheus/alerts.yml" in text
    assert "deploy/grafana/amo-broker.json" in text
    for name in re.findall(r"^\s+- alert:\s*(\w+)", ALERTS.read_text(), flags=re.MULTILINE):
        assert name in text
