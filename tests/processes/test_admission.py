"""Admission and pacing measured where they count: real `serve` processes, arrivals at amoCRM.

Each test runs the broker exactly as production does (`amo-broker serve`, its own runner and
settings) and counts what the emulated amoCRM received, not what the broker thinks it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest

from broker.sandbox.server import Sandbox
from tests.conftest import ConfigFactory, most_in_one_second, seed_store
from tests.procs import LEADS, Processes, Serve, status_of

pytestmark = pytest.mark.slow


@pytest.fixture
async def crowd() -> AsyncIterator[aiohttp.ClientSession]:
    """Callers without a client-side connection limit: every one reaches the broker at once."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def _call(
    http: aiohttp.ClientSession, serve: Serve, method: str = "GET", *, body: bytes = b""
) -> tuple[int, float, str | None]:
    """One caller: its status, how long it waited in all, and its Retry-After."""
    started = time.monotonic()
    data = io.BytesIO(body) if body else None  # raw bytes over 1 MiB make aiohttp warn
    async with http.request(method, serve.url + LEADS, data=data) as response:
        await response.read()
        return response.status, time.monotonic() - started, response.headers.get("Retry-After")


async def test_every_waiting_caller_counts_against_the_queue_and_the_wait_bound(
    procs: Processes, crowd: aiohttp.ClientSession, sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """300 callers at 50/s with a 2 s bound: those past it get 503 at once, none waits longer.

    The old broker queued callers on a 64-slot semaphore before the pacer saw them: all 300
    got a 200, the last after about 6 s, and the queue depth never passed 64.
    """
    await seed_store(make_config(), sandbox)
    env = procs.env(BROKER_RPS="50", BROKER_BURST="5", BROKER_MAX_WAIT="2", BROKER_MAX_QUEUE="1000")
    serve = await procs.start(env)
    replies = await asyncio.gather(*(_call(crowd, serve) for _ in range(300)))
    statuses = Counter(status for status, _, _ in replies)
    served = [waited for status, waited, _ in replies if status == 200]
    refused = [(waited, after) for status, waited, after in replies if status == 503]
    assert set(statuses) == {200, 503}, statuses
    # 2 s at 50/s admit about 100, more when the 300 arrive spread over a busy machine's
    # second (each later arrival has its own 2 s); the old broker refused none of them.
    assert len(served) >= 60 and len(refused) >= 100, statuses
    assert max(served) <= 2.0 + 1.5  # the bound, plus the client's own connect and read
    assert all(after is not None and int(after) >= 1 for _, after in refused)
    assert sandbox.api_calls == len(served)  # a refused caller sent nothing
    limits = (await status_of(crowd, serve))["limits"]
    assert limits["wait_seconds_max"] <= 2.0
    assert limits["rejected_total"] == len(refused)


async def test_the_queue_bound_counts_callers_waiting_for_an_upstream_connection(
    procs: Processes, crowd: aiohttp.ClientSession, sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """Slow answers hold every connection: waiters for one count in queue_depth and max_queue."""
    await seed_store(make_config(), sandbox)
    sandbox.api_delay = 3.0  # 64 connections busy for 3 s each
    env = procs.env(BROKER_RPS="1000", BROKER_BURST="1000", BROKER_MAX_QUEUE="20")
    serve = await procs.start(env)
    callers = [asyncio.ensure_future(_call(crowd, serve)) for _ in range(120)]
    replies = await asyncio.gather(*callers)
    statuses = Counter(status for status, _, _ in replies)
    # 64 go out at once, 20 more may wait for a connection, the other 36 are refused.
    assert statuses == {200: 84, 503: 36}, statuses
    assert sandbox.api_calls == 84


async def test_a_body_over_the_buffer_budget_is_refused_before_anything_is_sent(
    procs: Processes, crowd: aiohttp.ClientSession, sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """Waiting bodies are bounded: of four 1 MB bodies, 3 MiB holds three; the fourth gets 503."""
    await seed_store(make_config(), sandbox)
    sandbox.api_delay = 1.0
    env = procs.env(
        BROKER_RPS="1000",
        BROKER_BURST="1000",
        BROKER_MAX_BODY_BYTES=str(2 << 20),
        BROKER_MAX_BUFFERED_BYTES=str(3 << 20),
    )
    serve = await procs.start(env)
    body = b"[" + b"0," * 499_999 + b"0]"  # a million bytes: three fit in 3 MiB, four not
    replies = await asyncio.gather(*(_call(crowd, serve, "POST", body=body) for _ in range(4)))
    statuses = Counter(status for status, _, _ in replies)
    # Three reach amoCRM (whose emulation answers 400 to a body of zeros), one does not.
    assert statuses[503] == 1, statuses
    assert all(after is not None for status, _, after in replies if status == 503)
    posts = [r for r in sandbox.requests if r.method == "POST"]
    assert len(posts) == 3 and all(len(r.body) == len(body) for r in posts)


async def test_callers_who_hang_up_while_queued_are_never_sent(
    procs: Processes, sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """At 1/s, one POST goes out; five callers who give up after 0.3 s leave no ghost POST."""
    await seed_store(make_config(), sandbox)
    serve = await procs.start(procs.env(BROKER_RPS="1", BROKER_BURST="1"))
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        first = asyncio.ensure_future(_call(http, serve, "POST", body=b"[{}]"))
        await asyncio.sleep(0.1)
        impatient = aiohttp.ClientTimeout(total=0.3)

        async def hang_up() -> None:
            with contextlib.suppress(TimeoutError):
                async with http.post(serve.url + LEADS, data=b"[{}]", timeout=impatient) as r:
                    await r.read()

        await asyncio.gather(*(hang_up() for _ in range(5)))
        assert (await first)[0] == 200
        await asyncio.sleep(3.5)  # the old broker sent one ghost a second from here
    posts = [r for r in sandbox.requests if r.method == "POST"]
    assert len(posts) == 1
    assert len(serve.named("caller_went_away")) == 5


async def test_a_call_already_sent_finishes_and_says_its_caller_went_away(
    procs: Processes, sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """A caller gone after the send: amoCRM still answers it, logged as caller_went_away."""
    await seed_store(make_config(), sandbox)
    sandbox.api_delay = 1.0
    serve = await procs.start()
    async with aiohttp.ClientSession() as http:
        with contextlib.suppress(TimeoutError):
            async with http.post(
                serve.url + LEADS, data=b"[{}]", timeout=aiohttp.ClientTimeout(total=0.3)
            ) as r:
                await r.read()
    gone = await serve.logged("caller_went_away")
    assert (gone["stage"], gone["status"]) == ("sent", 200)  # amoCRM did answer it
    assert sandbox.api_calls == 1
    assert serve.named("request")[0]["status"] == 499  # the caller saw no answer


async def test_the_pace_holds_at_amocrm_through_a_jittery_network(
    procs: Processes, crowd: aiohttp.ClientSession, sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """Arrivals delayed 0 to 100 ms, a fresh connection now and then: never over 7 in any second."""
    await seed_store(make_config(), sandbox)
    sandbox.arrival_jitter = 0.1
    sandbox.fresh_connection_every = 3
    serve = await procs.start(procs.env(BROKER_RPS="7", BROKER_BURST=""))  # the defaults
    replies = await asyncio.gather(*(_call(crowd, serve) for _ in range(40)))
    assert [status for status, _, _ in replies] == [200] * 40
    assert len(sandbox.arrivals) == 40
    assert most_in_one_second(sandbox.arrivals) <= 7


async def test_connect_on_an_api_path_is_method_not_allowed(
    procs: Processes, sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """CONNECT is refused like every other method outside the allow-list: 405, not 404."""
    await seed_store(make_config(), sandbox)
    serve = await procs.start()
    host, port = serve.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"CONNECT /api/v4/leads HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"405", status_line
    assert sandbox.api_calls == 0
