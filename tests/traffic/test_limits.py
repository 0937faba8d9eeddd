"""The account's limits against the sandbox: pacing at amoCRM's 7 per second, 429s, blocks.

The sandbox enforces 7 calls per second (sliding window, nginx-style HTML 429 past it) and
records when each /api/v4 call arrived, so these tests count what amoCRM would have seen.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from broker.sandbox.server import Sandbox
from broker.server.clients import ClientRegistry, add_client
from broker.service import build_app, open_runtime
from tests.conftest import (
    Broker,
    ConfigFactory,
    log_events,
    most_in_one_second,
    seed_store,
)
from tests.procs import until

AiohttpClient = Callable[..., object]


@asynccontextmanager
async def paced_broker(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    aiohttp_client: AiohttpClient,
    clients: ClientRegistry | None = None,
    **env: str,
) -> AsyncIterator[Broker]:
    """A broker at amoCRM's real pace (7 per second, bursts of 7), unless `env` says else."""
    config = make_config(**{"BROKER_RPS": "7", "BROKER_BURST": "7", **env})
    await seed_store(config, sandbox)
    async with open_runtime(config) as runtime:
        app = build_app(runtime, config, proactive=False, clients=clients)
        client = await aiohttp_client(app)  # type: ignore[operator]
        yield Broker(client, runtime.manager, runtime.store, sandbox, config)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse /metrics with prometheus-client's own parser: {(name, labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(
    parsed: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **want: str
) -> float:
    """Sum the samples of `name` whose labels include `want`."""
    return sum(
        value
        for (sample, labels), value in parsed.items()
        if sample == name and set(want.items()) <= set(labels)
    )


async def test_a_burst_from_five_callers_keeps_the_account_at_seven_per_second(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    """50 calls from 5 callers at once: all 200, never over 7 in a second, near the ideal time.

    The metrics, parsed with prometheus-client's parser, count what the sandbox counted.
    """
    sandbox.rate_limit_rps = 7
    tokens_file = tmp_path / "clients"
    secrets = {f"svc{n}": add_client(tokens_file, f"svc{n}") for n in range(5)}
    async with paced_broker(
        make_config, sandbox, aiohttp_client, clients=ClientRegistry(tokens_file)
    ) as broker:

        async def call(secret: str) -> int:
            response = await broker.client.get("/api/v4/leads", headers={"X-Broker-Key": secret})
            await response.read()
            return response.status

        statuses = await asyncio.gather(*(call(s) for s in secrets.values() for _ in range(10)))
        status = await (await broker.client.get("/status", headers=_key(secrets))).json()
        metrics = await (await broker.client.get("/metrics", headers=_key(secrets))).text()
        unauthenticated = await broker.client.get("/metrics")

    assert statuses == [200] * 50
    assert sandbox.throttled_api_calls == 0
    assert most_in_one_second(sandbox.arrivals) <= 7
    # 7 per second from a standing start: the 50th call can start 7 s after the first.
    ideal = math.floor(49 / 7)
    span = sandbox.arrivals[-1] - sandbox.arrivals[0]
    assert ideal <= span <= ideal + 1.5  # a window and a guard per second, plus the answers
    assert status["limits"]["waited_total"] == 43  # all but the first burst of 7
    assert status["limits"]["queue_depth"] == 0
    assert status["upstream"]["responses"] == {"2xx": 50}

    parsed = samples(metrics)
    for name in secrets:
        assert total(parsed, "amo_broker_requests_total", caller=name, status_class="2xx") == 10
    assert total(parsed, "amo_broker_upstream_responses_total") == sandbox.api_calls == 50
    assert total(parsed, "amo_broker_upstream_latency_seconds_count", resource="leads") == 50
    assert total(parsed, "amo_broker_queue_wait_seconds_count") == 50
    assert total(parsed, "amo_broker_upstream_throttled_total") == 0
    assert total(parsed, "amo_broker_state", state="ok") == 1
    assert unauthenticated.status == 401  # /metrics sits behind caller authentication


def _key(secrets: dict[str, str]) -> dict[str, str]:
    return {"X-Broker-Key": secrets["svc0"]}


async def test_a_429_backs_the_whole_account_off_and_a_get_is_retried(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """Two 429s: the GET is retried after ~1 s, then ~2 s; another caller waits out the pause."""
    sandbox.api_script.extend([429, 429])
    async with paced_broker(make_config, sandbox, aiohttp_client) as broker:
        first = asyncio.create_task(broker.client.get("/api/v4/leads"))
        await until(lambda: bool(sandbox.arrivals), "the first call reached amoCRM")
        await asyncio.sleep(0.3)  # the first 429 is in: the account is backing off
        second = await broker.client.get("/api/v4/contacts")
        assert (await first).status == 200
        assert second.status == 200
        status = await (await broker.client.get("/status")).json()
        metrics = samples(await (await broker.client.get("/metrics")).text())

    first_call, *later = sandbox.arrivals
    assert sandbox.throttled_api_calls == 2
    assert len(later) == 3  # two retries of the GET, one call of the second caller
    assert min(later) - first_call >= 1.0  # nothing at all went out during the first pause
    assert max(later) - first_call >= 3.0  # the second pause doubled
    assert status["upstream"]["throttled_total"] == 2
    assert status["upstream"]["retries_total"] == 2
    assert total(metrics, "amo_broker_retries_total", reason="throttled") == 2
    assert total(metrics, "amo_broker_upstream_throttled_total") == 2


async def test_a_post_turned_away_by_amocrms_limiter_is_retried(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """An HTML 429 (amoCRM's limiter: not processed) is retried for a POST too, by default."""
    async with paced_broker(make_config, sandbox, aiohttp_client) as broker:
        sandbox.api_script.append(429)
        response = await broker.client.post("/api/v4/leads", json=[{"name": "a"}])
        assert response.status == 200
    assert sandbox.api_calls == 2
    assert sandbox.throttled_api_calls == 1


async def test_a_post_is_not_retried_when_writes_are_not_or_the_429_is_the_applications(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """retry_writes off, or a JSON 429: the POST's 429 goes back; X-Broker-Retry: 1 retries it."""
    async with paced_broker(
        make_config, sandbox, aiohttp_client, BROKER_RETRY_WRITES="false"
    ) as broker:
        sandbox.api_script.append(429)
        plain = await broker.client.post("/api/v4/leads", json=[{"name": "a"}])
        assert plain.status == 429
        assert int(plain.headers["Retry-After"]) >= 1
        assert "Too Many Requests" in await plain.text()
        assert sandbox.api_calls == 1

        sandbox.api_script.append(429)
        safe = await broker.client.post(
            "/api/v4/leads", json=[{"name": "b"}], headers={"X-Broker-Retry": "1"}
        )
        assert safe.status == 200
    assert sandbox.api_calls == 3
    forwarded = {name.lower() for name, _ in sandbox.requests[-1].headers}
    assert "x-broker-retry" not in forwarded

    sandbox.throttle_json = True
    async with paced_broker(make_config, sandbox, aiohttp_client) as broker:
        sandbox.api_script.append(429)
        answered = await broker.client.post("/api/v4/leads", json=[{"name": "c"}])
        assert answered.status == 429
        assert answered.content_type == "application/problem+json"
        sandbox.api_script.append(429)
        refused = await broker.client.get("/api/v4/leads", headers={"X-Broker-Retry": "0"})
        assert refused.status == 429
    assert sandbox.api_calls == 5


async def test_the_retry_budget_is_bounded(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """Past BROKER_MAX_RETRIES the GET's 429 goes back to the caller; nothing more is sent."""
    sandbox.api_script.extend([429, 429, 429])
    async with paced_broker(make_config, sandbox, aiohttp_client, BROKER_MAX_RETRIES="1") as broker:
        response = await broker.client.get("/api/v4/leads")
    assert response.status == 429
    assert "Retry-After" in response.headers
    assert sandbox.api_calls == 2


async def test_a_full_queue_answers_503_rate_limited_with_retry_after(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """Over the queue's bound a caller gets 503 {"error": "rate_limited"} and nothing is sent."""
    async with paced_broker(
        make_config,
        sandbox,
        aiohttp_client,
        BROKER_RPS="1",
        BROKER_BURST="1",
        BROKER_MAX_QUEUE="1",
    ) as broker:
        responses = await asyncio.gather(*(broker.client.get("/api/v4/leads") for _ in range(3)))
        metrics = samples(await (await broker.client.get("/metrics")).text())
    statuses = sorted(r.status for r in responses)
    assert statuses == [200, 200, 503]
    refused = next(r for r in responses if r.status == 503)
    assert (await refused.json())["error"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert sandbox.api_calls == 2
    assert total(metrics, "amo_broker_refused_total", reason="rate_limited") == 1


async def test_a_block_engages_refuses_without_sending_and_lifts(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    aiohttp_client: AiohttpClient,
    log_stream: io.StringIO,
) -> None:
    """Three HTML 403s block the account: 503 account_blocked, nothing sent; a probe lifts it."""
    async with paced_broker(
        make_config,
        sandbox,
        aiohttp_client,
        BROKER_BLOCK_AFTER="3",
        BROKER_BLOCK_COOLDOWN="1",
        BROKER_MAX_WAIT="0.5",  # shorter than the cool-down: no waiting it out
    ) as broker:
        sandbox.blocked = True
        forbidden = [(await broker.client.get("/api/v4/leads")).status for _ in range(3)]
        refused = await broker.client.get("/api/v4/leads")
        status = await (await broker.client.get("/status")).json()
        ready = await broker.client.get("/readyz")
        metrics = samples(await (await broker.client.get("/metrics")).text())
        assert forbidden == [403, 403, 403]
        assert refused.status == 503
        assert (await refused.json())["error"] == "account_blocked"
        assert 1 <= int(refused.headers["Retry-After"]) <= 2
        assert sandbox.api_calls == 3  # the refused call never left
        assert status["state"] == "blocked"
        assert status["blocked_until"] is not None
        assert ready.status == 503
        assert total(metrics, "amo_broker_state", state="blocked") == 1
        assert total(metrics, "amo_broker_refused_total", reason="account_blocked") == 1

        sandbox.blocked = False
        await asyncio.sleep(1.1)
        lifted = await broker.client.get("/api/v4/leads")
        after = await (await broker.client.get("/status")).json()
    assert lifted.status == 200
    assert after["state"] == "ok"
    assert after["blocked_until"] is None
    assert len(log_events(log_stream, "account_blocked")) == 1
    assert len(log_events(log_stream, "account_unblocked")) == 1


async def test_a_short_block_is_waited_out_by_reads_and_probed_once(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """A cool-down within max_wait: GETs wait in the queue, one probe at a time, then 200s.

    The first probe meets the block again (one 403, the cool-down doubles), the second
    finds it lifted. A POST is still refused at once: it may not wait for a probe.
    """
    async with paced_broker(
        make_config, sandbox, aiohttp_client, BROKER_BLOCK_AFTER="3", BROKER_BLOCK_COOLDOWN="1"
    ) as broker:
        sandbox.blocked = True
        for _ in range(3):
            assert (await broker.client.get("/api/v4/leads")).status == 403
        post = await broker.client.post("/api/v4/leads", json=[{"name": "a"}])
        assert post.status == 503
        assert (await post.json())["error"] == "account_blocked"
        waiting = [asyncio.ensure_future(broker.client.get("/api/v4/leads")) for _ in range(4)]
        await until(lambda: sandbox.blocked_api_calls == 4, "the first probe met the block")
        sandbox.blocked = False
        replies = [await w for w in waiting]
    statuses = sorted(r.status for r in replies)
    # The probe that met the block takes amoCRM's 403 back; the others waited it out.
    assert statuses == [200, 200, 200, 403]
    assert sandbox.blocked_api_calls == 4  # never two probes at once
    assert sandbox.api_calls == 4 + 3


async def test_a_read_that_runs_out_of_patience_in_a_block_is_told_of_the_block(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """Waiting out a block that the probe renews: past max_wait, 503 account_blocked."""
    async with paced_broker(
        make_config,
        sandbox,
        aiohttp_client,
        BROKER_BLOCK_AFTER="3",
        BROKER_BLOCK_COOLDOWN="1",
        BROKER_MAX_WAIT="2.5",  # outlasts the cool-down by a second, not the renewed one
    ) as broker:
        sandbox.blocked = True
        for _ in range(3):
            assert (await broker.client.get("/api/v4/leads")).status == 403
        replies = await asyncio.gather(*(broker.client.get("/api/v4/leads") for _ in range(3)))
        codes = []
        for reply in replies:
            code = (await reply.json())["error"] if reply.status == 503 else ""
            codes.append([reply.status, code])
    assert sorted(codes) == [[403, ""], [503, "account_blocked"], [503, "account_blocked"]]
    assert sandbox.blocked_api_calls == 4  # three to engage it, one probe


async def test_refresh_and_replay_counters_match_the_sandbox(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """After an expiry, /metrics counts the refresh and the replay the sandbox saw."""
    async with paced_broker(make_config, sandbox, aiohttp_client) as broker:
        sandbox.expire_access_tokens()
        assert (await broker.client.get("/api/v4/leads")).status == 200
        assert (await broker.client.get("/api/v4/no_such_thing_42")).status == 404
        text = await (await broker.client.get("/metrics")).text()
    metrics = samples(text)
    assert sandbox.refresh_calls == 1
    rotated = total(metrics, "amo_broker_refreshes_total", reason="unauthorized", outcome="rotated")
    assert rotated == sandbox.refresh_calls
    assert total(metrics, "amo_broker_retries_total", reason="unauthorized") == 1
    assert total(metrics, "amo_broker_access_token_expires_in_seconds") > 3600
    assert total(metrics, "amo_broker_token_generation") == 2
    # Label values stay bounded: an unknown resource is `other`, never the raw path.
    assert "no_such_thing_42" not in text
    assert total(metrics, "amo_broker_upstream_latency_seconds_count", resource="other") == 1
