"""Upstream faults: refused, reset, stalled and huge answers; no leaked connections; no replays.

Most tests put a raw asyncio server on loopback in amoCRM's place, so every byte it sends, every
stall and every TCP reset is scripted; the broker in front of it runs with a 0.3 s proxy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from broker.pair import TokenPair
from broker.server.accounts import UPSTREAM_CONNECTIONS
from broker.server.app import PROXY
from broker.server.links import MAX_REWRITE
from broker.server.proxy import Proxy
from broker.service import Runtime, build_app, open_runtime
from tests.conftest import Broker, ConfigFactory

BOUND = 5.0  # seconds: a guard so a hung handler fails the test instead of stalling it
FAR_FUTURE = 4102444800.0  # 2100-01-01: the seeded token never expires during a test


@dataclass
class Exchange:
    """One request as the raw upstream read it, with the connection to answer on."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


Script = Callable[[Exchange], Awaitable[bool]]  # answers; True keeps the connection open


@dataclass(repr=False)
class RawUpstream:
    """A loopback HTTP/1.1 server whose answers are scripts: exact bytes, stalls, TCP resets."""

    script: Script
    url: str = ""
    connections_total: int = 0
    open_now: int = 0
    open_max: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=BOUND)
        await self._server.wait_closed()

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.requests if m == method)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections_total += 1
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        try:
            keep_open = True
            while keep_open:
                exchange = await _read_request(reader, writer)
                self.requests.append((exchange.method, exchange.target))
                keep_open = await self.script(exchange)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the broker hung up: that is what several scripts wait for
        finally:
            self.open_now -= 1
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Exchange:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    request_line, *lines = head.split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Exchange(method, target, headers, body, reader, writer)


async def _until(condition: Callable[[], bool], seconds: float = BOUND) -> None:
    """Wait, bounded, until a fake's counter says so."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 -- the fakes count in plain ints: no event
            await asyncio.sleep(0.01)


def _head(status: str, *, length: int | None = None, ctype: str = "application/json") -> bytes:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{framing}\r\n\r\n".encode()


async def answer(ex: Exchange, status: str = "200 OK", body: bytes = b"{}") -> bool:
    ex.writer.write(_head(status, length=len(body)) + body)
    await ex.writer.drain()
    return True


async def reset(ex: Exchange) -> bool:
    """Drop the connection with a TCP RST (SO_LINGER 0), not a polite FIN."""
    sock = ex.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ex.writer.transport.abort()
    return False


async def close_before_headers(ex: Exchange) -> bool:
    return False


async def reset_before_headers(ex: Exchange) -> bool:
    return await reset(ex)


# A declared length past the links' bound: a JSON answer this long streams (broker/server/links.py).
STREAMED = MAX_REWRITE + 1


async def reset_mid_length(ex: Exchange) -> bool:
    ex.writer.write(_head("200 OK", length=STREAMED) + b"x" * 30_000)
    await ex.writer.drain()
    await asyncio.sleep(0.02)  # let the broker relay headers and the first bytes
    return await reset(ex)


async def reset_mid_chunked(ex: Exchange) -> bool:
    chunk = b"y" * 8192
    ex.writer.write(_head("200 OK") + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3)
    await ex.writer.drain()
    await asyncio.sleep(0.02)
    return await reset(ex)


async def stall_before_headers(ex: Exchange) -> bool:
    await ex.reader.read()  # until the broker gives up and hangs up
    return False


async def reset_mid_whole(ex: Exchange) -> bool:
    """Cut a HAL answer short that the broker reads whole (to move its links)."""
    ex.writer.write(_head("200 OK", length=100_000, ctype="application/hal+json") + b"x" * 30_000)
    await ex.writer.drain()
    await asyncio.sleep(0.02)
    return await reset(ex)


async def stall_mid_body(ex: Exchange) -> bool:
    ex.writer.write(_head("200 OK", length=STREAMED) + b"z" * 10_000)
    await ex.writer.drain()
    await ex.reader.read()
    return False


async def drip(ex: Exchange) -> bool:
    """Dribble a body past the links' bound in 16 KiB pieces until the broker hangs up."""
    piece = b"d" * 16384
    ex.writer.write(_head("200 OK", length=257 * len(piece)))
    for _ in range(257):
        ex.writer.write(piece)
        await ex.writer.drain()
        await asyncio.sleep(0.01)
    return True


async def server_error(ex: Exchange) -> bool:
    status = {"/api/v4/e502": "502 Bad Gateway", "/api/v4/e503": "503 Service Unavailable"}
    return await answer(ex, status.get(ex.target, "500 Internal Server Error"), b'{"status":5}')


async def by_path(ex: Exchange) -> bool:
    """Pick the fault by the path's last segment, so one server plays every kind."""
    scripts: dict[str, Script] = {
        "ok": answer,
        "close-head": close_before_headers,
        "reset-head": reset_before_headers,
        "reset-length": reset_mid_length,
        "reset-whole": reset_mid_whole,
        "reset-chunked": reset_mid_chunked,
        "stall-head": stall_before_headers,
        "stall-body": stall_mid_body,
        "drip": drip,
    }
    return await scripts.get(ex.target.rsplit("/", 1)[-1], server_error)(ex)


@dataclass
class Front:
    """The broker in front of a fake upstream, served as `serve` serves it, and a caller."""

    client: aiohttp.ClientSession
    runtime: Runtime
    proxy: Proxy

    @property
    def connector(self) -> aiohttp.BaseConnector:
        connector = self.runtime.session.connector
        assert connector is not None
        return connector


@pytest.fixture
async def front(make_config: ConfigFactory) -> AsyncIterator[Callable[[str], Awaitable[Front]]]:
    """Build brokers on a fake upstream's URL, holding a never-expiring token, 0.3 s timeout.

    Served by a plain AppRunner like `serve`, not aiohttp's TestServer: that one cancels a
    handler when its caller hangs up, which production does not do.
    """
    async with contextlib.AsyncExitStack() as stack:

        async def make(base_url: str) -> Front:
            config = make_config(AMOCRM_BASE_URL=base_url, BROKER_UPSTREAM_TIMEOUT="0.3")
            runtime = await stack.enter_async_context(open_runtime(config))
            pair = TokenPair("access-0", "refresh-0", FAR_FUTURE, time.time())
            await runtime.store.store_pair(pair, reason="import", outcome="imported")
            await runtime.manager.load()
            app = build_app(runtime, config, proactive=False)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=BOUND)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            port = runner.addresses[0][1]
            client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
            stack.push_async_callback(client.close)
            return Front(client, runtime, app[PROXY])

        yield make


async def _error_of(response: aiohttp.ClientResponse) -> str:
    assert response.content_type == "application/problem+json"
    return str(json.loads(await response.read())["error"])


async def _cut(response: aiohttp.ClientResponse) -> bool:
    """Read the whole body; tell whether the stream was cut (never a clean, short EOF)."""
    try:
        async with asyncio.timeout(BOUND):
            await response.read()
    except aiohttp.ClientPayloadError:
        return True
    return False


async def test_connection_refused_is_502_json(
    front: Callable[[str], Awaitable[Front]],
) -> None:
    """amoCRM refusing the connection gives the caller 502 JSON bad_gateway."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        broker = await front(f"http://127.0.0.1:{port}")
        response = await broker.client.get("/api/v4/leads")
    assert response.status == 502
    assert await _error_of(response) == "bad_gateway"


@pytest.mark.parametrize("kind", ["close-head", "reset-head"])
async def test_connection_lost_before_headers_is_502_json(
    front: Callable[[str], Awaitable[Front]], kind: str
) -> None:
    """amoCRM closing or resetting the connection before any header gives 502 JSON."""
    async with RawUpstream(by_path) as upstream:
        broker = await front(upstream.url)
        response = await broker.client.get(f"/api/v4/{kind}")
        assert response.status == 502
        assert await _error_of(response) == "bad_gateway"


@pytest.mark.parametrize("kind", ["reset-length", "reset-chunked", "stall-body"])
async def test_broken_body_cuts_the_callers_stream(
    front: Callable[[str], Awaitable[Front]], kind: str
) -> None:
    """A reset or a stall after the headers cuts the caller's stream; no short body looks whole."""
    async with RawUpstream(by_path) as upstream:
        broker = await front(upstream.url)
        async with asyncio.timeout(BOUND):
            response = await broker.client.get(f"/api/v4/{kind}")
            assert response.status == 200  # the headers had gone out already
            assert await _cut(response)
        assert broker.proxy.stats.upstream_errors_total == 1


async def reset_mid_close_delimited(ex: Exchange) -> bool:
    ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
    ex.writer.write(b"w" * 30_000)
    await ex.writer.drain()
    await asyncio.sleep(0.02)
    return await reset(ex)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "aiohttp (client_proto.ResponseHandler.connection_lost) ends a body delimited by "
        "connection close cleanly on any connection loss, a TCP RST included, so the proxy "
        "reads a clean EOF and finishes the caller's chunked stream: a truncated body passes "
        "as whole. Not fixable in broker/server/proxy.py (aiohttp gives it no signal); amoCRM's "
        "nginx always sends Content-Length or chunked, which are covered above."
    ),
)
async def test_reset_of_close_delimited_body_cuts_the_callers_stream(
    front: Callable[[str], Awaitable[Front]],
) -> None:
    """A reset in a body framed by connection close cuts the caller's stream too."""
    async with RawUpstream(reset_mid_close_delimited) as upstream:
        broker = await front(upstream.url)
        response = await broker.client.get("/api/v4/leads")
        assert response.status == 200
        assert await _cut(response)


async def test_stall_before_headers_is_504_json(
    front: Callable[[str], Awaitable[Front]],
) -> None:
    """amoCRM silent past the proxy timeout before any header gives 504 JSON gateway_timeout."""
    async with RawUpstream(by_path) as upstream:
        broker = await front(upstream.url)
        async with asyncio.timeout(BOUND):
            response = await broker.client.get("/api/v4/stall-head")
        assert response.status == 504
        assert await _error_of(response) == "gateway_timeout"
        assert upstream.count("GET") == 1


async def test_huge_slow_body_streams_through_intact(
    front: Callable[[str], Awaitable[Front]], aiohttp_server: Callable[..., object]
) -> None:
    """8 MiB dribbled out for longer than the proxy timeout arrives byte for byte."""
    payload = os.urandom(8 << 20)
    chunk = 64 * 1024

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(payload)
        await response.prepare(request)
        for start in range(0, len(payload), chunk):
            await response.write(payload[start : start + chunk])
            await asyncio.sleep(0.004)  # 128 pauses: well past 0.3 s in all, each far below
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/api/v4/files/huge", huge)
    server = await aiohttp_server(app)  # type: ignore[operator]
    broker = await front(str(server.make_url("")).rstrip("/"))
    digest, size = hashlib.sha256(), 0
    async with asyncio.timeout(15):
        response = await broker.client.get("/api/v4/files/huge")
        assert response.status == 200
        async for piece in response.content.iter_chunked(chunk):
            digest.update(piece)
            size += len(piece)
    assert size == len(payload)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


EXPECTED = {
    "close-head": (502, "bad_gateway"),
    "reset-head": (502, "bad_gateway"),
    "stall-head": (504, "gateway_timeout"),
    "reset-length": (200, "cut"),
    "reset-whole": (502, "bad_gateway"),  # read whole, so still a clean error
    "reset-chunked": (200, "cut"),
    "stall-body": (200, "cut"),
    "e500": (500, "relayed"),
    "e503": (503, "relayed"),
    "ok": (200, "whole"),
}


async def _outcome(client: aiohttp.ClientSession, kind: str) -> tuple[int, str]:
    response = await client.get(f"/api/v4/{kind}")
    if response.status in (502, 504):
        return response.status, await _error_of(response)
    if response.status >= 500:
        await response.read()
        return response.status, "relayed"
    return response.status, "cut" if await _cut(response) else "whole"


async def test_two_hundred_faults_leak_no_pooled_connection(
    front: Callable[[str], Awaitable[Front]],
) -> None:
    """After 200 concurrent faulted calls of mixed kinds, no pool connection stays acquired."""
    async with RawUpstream(by_path) as upstream:
        broker = await front(upstream.url)
        kinds = list(itertools.islice(itertools.cycle(EXPECTED), 200))
        async with asyncio.timeout(15):
            outcomes = await asyncio.gather(*(_outcome(broker.client, k) for k in kinds))
        assert outcomes == [EXPECTED[k] for k in kinds]
        connector = broker.connector
        assert len(connector._acquired) == 0  # the connector keeps no public count
        assert not any(connector._waiters.values())
        # The account's queue bounds its connections (the session has no cap of its own).
        assert upstream.open_max <= UPSTREAM_CONNECTIONS
        assert upstream.open_now <= UPSTREAM_CONNECTIONS
        assert await _outcome(broker.client, "ok") == (200, "whole")  # the pool still works


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("kind", ["stall-head", "e500", "e502", "e503", "reset-head"])
async def test_non_idempotent_request_is_sent_once_on_failure(
    front: Callable[[str], Awaitable[Front]], method: str, kind: str
) -> None:
    """A POST or PATCH that times out, meets a 5xx or a reset is never sent upstream twice."""
    async with RawUpstream(by_path) as upstream:
        broker = await front(upstream.url)
        warm = await broker.client.get("/api/v4/ok")  # a pooled connection the next call reuses
        assert warm.status == 200
        async with asyncio.timeout(BOUND):
            response = await broker.client.request(
                method, f"/api/v4/leads/{kind}", json=[{"name": "once"}]
            )
            await response.read()
        assert response.status in (500, 502, 503, 504)
        assert upstream.count(method) == 1
        assert upstream.connections_total == 1  # it went out on the reused connection
        assert broker.proxy.stats.replays_total == 0


async def test_only_a_401_replays_a_post(front: Callable[[str], Awaitable[Front]]) -> None:
    """A POST that meets amoCRM's 401 is replayed once, with the new token and the same body."""
    seen: list[tuple[str, bytes]] = []

    async def script(ex: Exchange) -> bool:
        if ex.target == "/oauth2/access_token":
            grant = {"access_token": "access-1", "refresh_token": "refresh-1", "expires_in": 86400}
            return await answer(ex, body=json.dumps(grant).encode())
        seen.append((ex.headers.get("authorization", ""), ex.body))
        if ex.headers.get("authorization") == "Bearer access-1":
            return await answer(ex)
        return await answer(ex, "401 Unauthorized", b'{"status": 401}')

    async with RawUpstream(script) as upstream:
        broker = await front(upstream.url)
        response = await broker.client.post("/api/v4/leads", data=b'[{"name": "x"}]')
        assert response.status == 200
        assert [auth for auth, _ in seen] == ["Bearer access-0", "Bearer access-1"]
        assert seen[0][1] == seen[1][1] == b'[{"name": "x"}]'
        assert upstream.count("POST") == 3  # the 401'd call, the grant, the replay


async def test_thousand_concurrent_calls_through_one_401_make_one_refresh(
    broker: Broker,
) -> None:
    """1000 concurrent calls meet one 401: one refresh, none fails, only the pool's worth replays.

    Calls wait for a pooled connection before they read the token, so only the calls already
    in flight when amoCRM dropped the token send it; everyone behind them sends the new one.
    """
    calls, pool = 1000, UPSTREAM_CONNECTIONS
    gate = asyncio.Event()  # hold the refresh until every call in flight has met the 401
    broker.sandbox.token_gate = gate
    broker.sandbox.expire_access_tokens()
    connector = aiohttp.TCPConnector(limit=calls + 50)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = broker.client.make_url("/api/v4/leads")

        async def call() -> int:
            async with session.get(url) as response:
                await response.read()
                return response.status

        tasks = [asyncio.create_task(call()) for _ in range(calls)]
        try:
            async with asyncio.timeout(20):
                await _until(
                    lambda: (
                        broker.sandbox.unauthorized_api_calls == pool
                        and broker.sandbox.token_calls == 1
                    ),  # one refresh, parked at the gate
                    20,
                )
                await asyncio.sleep(0.2)  # no call but the pool's worth has met the old token
                assert broker.sandbox.unauthorized_api_calls == pool
                gate.set()
                statuses = await asyncio.gather(*tasks)
        finally:
            gate.set()
            for task in tasks:
                task.cancel()
    assert statuses == [200] * calls
    assert broker.sandbox.token_calls == broker.sandbox.refresh_calls == 1
    assert broker.sandbox.unauthorized_api_calls == pool
    assert broker.sandbox.api_calls == calls + pool
    assert sum(r.authorized for r in broker.sandbox.requests) == calls
    assert broker.client.app[PROXY].stats.replays_total == pool  # type: ignore[index]
    assert broker.manager.generation == 2


async def test_caller_hanging_up_mid_stream_frees_upstream_and_blames_no_one_upstream(
    front: Callable[[str], Awaitable[Front]],
) -> None:
    """A caller that goes away mid-body frees the upstream connection; amoCRM is not blamed."""
    async with RawUpstream(by_path) as upstream:
        broker = await front(upstream.url)
        async with asyncio.timeout(BOUND):
            response = await broker.client.get("/api/v4/drip")
            assert response.status == 200
            assert len(await response.content.readexactly(4096)) == 4096
            response.close()  # the caller hangs up with most of the body still to come
        await _until(lambda: not upstream.open_now and not broker.connector._acquired)
        assert upstream.connections_total == 1
        assert broker.proxy.stats.upstream_errors_total == 0
