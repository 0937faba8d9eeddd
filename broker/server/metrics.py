"""Expose the broker's counters in the Prometheus text format, through prometheus-client.

Each application gets its own registry (tests run many brokers in one process). Event
counts (requests, latencies, retries) are recorded as they happen; values that already
live elsewhere (token expiry, state, queue depth, refresh outcomes) are read at scrape time
by a collector, so there is one source of truth for each.

Labels stay bounded: methods from a fixed set, status classes, registered caller names,
and amoCRM's resource names from a fixed list (anything else is `other`) — never a raw path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.tokens.manager import TokenManager
from broker.traffic.limiter import AccountLimiter

# Every state /status can show; one gauge series each, 1 for the current one.
STATES = ("ok", "refreshing", "store_degraded", "reauth_required", "no_tokens", "blocked")
# amoCRM's /api/v4 top-level resources; a path outside them counts as `other`.
RESOURCES = frozenset(
    {
        "account", "calls", "catalogs", "chats", "companies", "contacts", "customers",
        "events", "files", "leads", "roles", "short_links", "sources", "talks", "tasks",
        "users", "webhooks", "websites", "widgets",
    }
)  # fmt: skip
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_WAIT_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class LiveAccount(Protocol):
    """What the scrape-time collector reads of each account (broker/server/routing.py's Account)."""

    name: str
    manager: TokenManager
    limiter: AccountLimiter


class SchedulerView(Protocol):
    """What the scrape-time collector reads of the refresh scheduler (server/background.py)."""

    enabled: bool

    @property
    def running(self) -> bool: ...

    @property
    def errors(self) -> dict[str, int]: ...


def resource_label(resource: str) -> str:
    return resource if resource in RESOURCES else "other"


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


class Metrics:
    """The broker's metrics in one registry; `render()` gives the text for /metrics."""

    def __init__(self, accounts: Callable[[], list[Any]]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "amo_broker_requests",
            "Calls answered by the broker, by method, status class and caller.",
            ["account", "method", "status_class", "caller"],
            registry=reg,
        )
        self.upstream_latency = Histogram(
            "amo_broker_upstream_latency_seconds",
            "Time from sending a call to amoCRM until its response headers arrived.",
            ["account", "resource"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.upstream_responses = Counter(
            "amo_broker_upstream_responses",
            "Answers from amoCRM, by status class (429 and 403 included).",
            ["account", "status_class"],
            registry=reg,
        )
        self.upstream_throttled = Counter(
            "amo_broker_upstream_throttled", "429 answers from amoCRM.", ["account"], registry=reg
        )
        self.upstream_errors = Counter(
            "amo_broker_upstream_errors",
            "Calls that got no (whole) answer from amoCRM, by kind.",
            ["account", "kind"],
            registry=reg,
        )
        self.retries = Counter(
            "amo_broker_retries",
            "Calls sent again: after a 401 (with a fresh token) or after a 429.",
            ["account", "reason"],
            registry=reg,
        )
        self.queue_wait = Histogram(
            "amo_broker_queue_wait_seconds",
            "Time a call waited for the account's pace before it was sent.",
            ["account"],
            buckets=_WAIT_BUCKETS,
            registry=reg,
        )
        self.refused = Counter(
            "amo_broker_refused",
            "Calls answered 503 without sending: rate_limited (queue full) or account_blocked.",
            ["account", "reason"],
            registry=reg,
        )
        self._request_children: dict[tuple[str, str, str, str], Any] = {}
        self._latency_children: dict[tuple[str, str], Any] = {}
        self._response_children: dict[tuple[str, str], Any] = {}
        reg.register(_LiveCollector(accounts))
        ProcessCollector(registry=reg)

    def count_request(self, account: str, method: str, status_class: str, caller: str) -> None:
        """Count one answered call (label children cached: `.labels()` locks and allocates)."""
        key = (account, method_label(method), status_class, caller)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(*key)
        child.inc()

    def observe_upstream(
        self, account: str, resource: str, status_class: str, seconds: float
    ) -> None:
        """Record one answer from amoCRM: its latency by resource, its status class."""
        latency = self._latency_children.get((account, resource))
        if latency is None:
            latency = self.upstream_latency.labels(account, resource)
            self._latency_children[account, resource] = latency
        latency.observe(seconds)
        responses = self._response_children.get((account, status_class))
        if responses is None:
            responses = self.upstream_responses.labels(account, status_class)
            self._response_children[account, status_class] = responses
        responses.inc()

    def watch_scheduler(self, scheduler: SchedulerView) -> None:
        """Export the scheduler's state and error counts (when it is meant to run at all)."""
        self.registry.register(_SchedulerCollector(scheduler))

    def render(self) -> bytes:
        """Return the registry in the Prometheus text format."""
        return generate_latest(self.registry)


class _SchedulerCollector(Collector):
    """Read whether the refresh scheduler runs, and its errors by call, at scrape time."""

    def __init__(self, scheduler: SchedulerView) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        scheduler = self._scheduler
        if not scheduler.enabled:
            return
        yield GaugeMetricFamily(
            "amo_broker_scheduler_running",
            "1 while the task driving every account's proactive refresh runs; 0: it stopped.",
            value=1.0 if scheduler.running else 0.0,
        )
        errors = CounterMetricFamily(
            "amo_broker_scheduler_errors",
            "Failed calls of the refresh scheduler (store reads, change waits, ticks), by call.",
            labels=["call"],
        )
        for call, count in sorted(scheduler.errors.items()):
            errors.add_metric([call], count)
        yield errors


class _LiveCollector(Collector):
    """Read the values that live in each account's token manager and limiter, at scrape time."""

    def __init__(self, accounts: Callable[[], list[LiveAccount]]) -> None:
        self._accounts = accounts

    def collect(self) -> Iterator[Metric]:
        accounts = self._accounts()
        state = GaugeMetricFamily(
            "amo_broker_state",
            "The account's state: 1 for the current one.",
            labels=["account", "state"],
        )
        expiry = GaugeMetricFamily(
            "amo_broker_access_token_expires_in_seconds",
            "Seconds until the access token in use expires (absent without one).",
            labels=["account"],
        )
        generation = GaugeMetricFamily(
            "amo_broker_token_generation", "Generation of the pair in use.", labels=["account"]
        )
        refreshes = CounterMetricFamily(
            "amo_broker_refreshes",
            "Refresh attempts by this process, by reason and outcome.",
            labels=["account", "reason", "outcome"],
        )
        incurable = CounterMetricFamily(
            "amo_broker_unauthorized_after_refresh",
            "401s that a fresh token did not cure, sent back to the caller instead of rotating.",
            labels=["account"],
        )
        lost = CounterMetricFamily(
            "amo_broker_leases_lost",
            "Renewals of the lease kept for an unsaved pair or refusal that found it gone.",
            labels=["account"],
        )
        depth = GaugeMetricFamily(
            "amo_broker_queue_depth",
            "Calls waiting for the account's pace now.",
            labels=["account"],
        )
        rate = GaugeMetricFamily(
            "amo_broker_rate_limit_rps", "The configured pace.", labels=["account"]
        )
        for account in accounts:
            name, manager, limiter = account.name, account.manager, account.limiter
            current = limiter.state or manager.state
            for each in STATES:
                state.add_metric([name, each], 1.0 if each == current else 0.0)
            left = manager.seconds_until_expiry
            if left is not None:
                expiry.add_metric([name], left)
            generation.add_metric([name], manager.generation)
            for (reason, outcome), count in sorted(manager.stats.outcomes.items()):
                refreshes.add_metric([name, reason, outcome], count)
            incurable.add_metric([name], manager.stats.unauthorized_after_refresh)
            lost.add_metric([name], manager.stats.leases_lost)
            depth.add_metric([name], limiter.pacer.depth)
            rate.add_metric([name], limiter.settings.rps)
        yield from (state, expiry, generation, refreshes, incurable, lost, depth, rate)
