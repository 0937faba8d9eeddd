"""The PostgreSQL store on a network path that goes silent: bounded calls, a granted pair kept.

A relay on 127.0.0.1 stands between the store and the real server, as a NAT or a load
balancer does. `silence()` makes it forget its flows without a word (no FIN, no RST): bytes
from either side are read and dropped, and connections opened meanwhile go nowhere either.
`resume()` lets new connections through again; the forgotten ones stay dead, as they do
behind a NAT, so the store must notice and reconnect by itself.
"""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import psycopg
import pytest

from broker.config.keyfile import decode_key
from broker.config.model import Config
from broker.errors import StoreError
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.store.opener import open_store
from broker.store.postgres.backend import PgTokenStore
from broker.store.postgres.schema import ACCOUNT_LOCK, SCHEMA
from broker.store.sealing import Sealer
from broker.tokens.endpoint import OAuthClient
from broker.tokens.manager import TokenManager
from tests.conftest import ConfigFactory, assert_no_leak, pair_from_sandbox

T = TypeVar("T")

BOUND = "1"  # BROKER_STORE_TIMEOUT for these tests: one second per store call
GUARD = 8.0  # a call still pending this long hangs: fail the test instead of waiting on


class _Flow:
    """One relayed connection; `dead` once the relay forgot it."""

    def __init__(self, dead: bool) -> None:
        self.dead = dead
        self.writers: list[asyncio.StreamWriter] = []


class Relay:
    """A TCP relay to PostgreSQL that can go silent without closing a socket."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._flows: list[_Flow] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.silent = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def silence(self) -> None:
        """Drop every byte of every flow from now on, and of new ones until `resume()`."""
        self.silent = True
        for flow in self._flows:
            flow.dead = True

    def resume(self) -> None:
        """Let new connections through; the flows already forgotten stay dead."""
        self.silent = False

    async def close(self) -> None:
        """Close every socket and wait for every flow to end (none is cancelled)."""
        self._closed.set()
        if self._server is not None:
            self._server.close()
        for flow in self._flows:
            for writer in flow.writers:
                writer.close()
        await asyncio.gather(*self._handlers)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        flow = _Flow(dead=self.silent)
        self._flows.append(flow)
        flow.writers.append(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
            flow.writers.append(server_w)
            await asyncio.gather(
                self._pump(client_r, server_w, flow), self._pump(server_r, client_w, flow)
            )
        except OSError:
            pass
        finally:
            for writer in flow.writers:
                writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: _Flow
    ) -> None:
        try:
            while data := await reader.read(65536):
                if not flow.dead:
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        if not flow.dead:  # a live flow passes the end on; a forgotten one says nothing
            writer.close()
        else:
            await self._closed.wait()  # hold the other side open, as a silent path does


@pytest.fixture
async def relay(pg_url: str) -> AsyncIterator[Relay]:
    """A relay in front of this test's database server."""
    parts = urlsplit(pg_url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    await relay.start()
    yield relay
    await relay.close()


def through(relay: Relay, pg_url: str, password: str | None = None) -> str:
    """`pg_url` with its host and port replaced by the relay's (and a password, if given)."""
    parts = urlsplit(pg_url)
    auth = f"{parts.username or 'postgres'}" + (f":{password}" if password else "")
    return parts._replace(netloc=f"{auth}@127.0.0.1:{relay.port}").geturl()


@pytest.fixture
def relayed_config(make_config: ConfigFactory, relay: Relay, pg_url: str) -> Config:
    """The broker's configuration with its PostgreSQL store behind the relay, one-second bound."""
    return make_config(BROKER_STORE_URL=through(relay, pg_url), BROKER_STORE_TIMEOUT=BOUND)


async def guarded(awaitable: Awaitable[T], what: str) -> T:
    """Await `awaitable`, failing the test (instead of hanging it) if it takes over GUARD s."""
    try:
        async with asyncio.timeout(GUARD):
            return await awaitable
    except TimeoutError:
        pytest.fail(f"{what} hung on the silent path for over {GUARD:g}s")


async def test_a_call_on_a_silent_path_fails_within_the_bound(
    relayed_config: Config, relay: Relay, sandbox: Sandbox
) -> None:
    """A call whose answer never comes raises StoreError, and so do the calls queued behind it."""
    async with open_store(relayed_config) as store:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
        relay.silence()
        calls = [store.generation(), store.lease(), store.load()]
        results = await guarded(asyncio.gather(*calls, return_exceptions=True), "a store call")
        assert [type(r) for r in results] == [StoreError] * 3, results
        relay.resume()
        assert await guarded(store.generation(), "the call after resume") == 1  # reconnected


async def test_a_transaction_on_a_silent_path_fails_within_the_bound(
    relayed_config: Config, relay: Relay, sandbox: Sandbox
) -> None:
    """A write transaction (lock, rows, COMMIT) on a silent path raises StoreError, not hangs."""
    async with open_store(relayed_config) as store:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
        relay.silence()
        with pytest.raises(StoreError, match="did not answer"):
            await guarded(store.store_pair(pair_from_sandbox(sandbox), reason="expiry"), "a write")
        relay.resume()
        assert await guarded(store.store_pair(pair_from_sandbox(sandbox), reason="expiry"), "") == 2


async def test_opening_on_a_silent_path_fails_within_the_bound(
    relayed_config: Config, relay: Relay
) -> None:
    """Opening a store whose server never answers raises StoreError instead of blocking `serve`."""
    relay.silence()
    with pytest.raises(StoreError, match="cannot connect"):
        await guarded(open_store(relayed_config).__aenter__(), "opening the store")


class SilenceOnAnswer:
    """The real OAuth client, except that the path to the store goes silent once amoCRM answered.

    The window that matters: the old refresh token is spent, the new pair exists only in this
    process, and its commit will never come back.
    """

    def __init__(self, oauth: OAuthClient, relay: Relay) -> None:
        self.oauth, self.relay = oauth, relay
        self.timeout_seconds = oauth.timeout_seconds

    async def refresh(
        self, refresh_token: str, *, now: float, access_token: str | None = None
    ) -> TokenPair:
        pair = await self.oauth.refresh(refresh_token, now=now)
        self.relay.silence()
        return pair


async def test_a_commit_lost_on_a_silent_path_keeps_the_pair_and_writes_it_later(
    relayed_config: Config, relay: Relay, sandbox: Sandbox
) -> None:
    """A granted pair whose commit never returns is served (store_degraded), stored on resume."""
    async with open_store(relayed_config) as store, aiohttp.ClientSession() as session:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
        oauth = OAuthClient(session, relayed_config.require_oauth(), timeout=5)
        manager = TokenManager(store, SilenceOnAnswer(oauth, relay), margin=600)
        await manager.load()

        stored = await guarded(manager.refresh("expiry", bounded=False), "the refresh")
        assert (stored.generation, manager.state, manager.store_degraded) == (
            2,
            "store_degraded",
            True,
        )
        token, generation = await manager.token()
        assert stored.pair.refresh_token in sandbox.live_refresh_tokens
        assert (token, generation) == (stored.pair.access_token, 2)
        assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)

        relay.resume()
        await guarded(manager.tick(), "the tick after resume")
        assert manager.state == "ok"
        in_store = await store.load()
        assert in_store is not None
        assert in_store.generation == 2
        assert in_store.pair.refresh_fingerprint == stored.pair.refresh_fingerprint
        assert sandbox.refresh_calls == 1


async def test_no_password_in_errors_or_logs_on_a_silent_path(
    make_config: ConfigFactory,
    relay: Relay,
    pg_url: str,
    sandbox: Sandbox,
    log_stream: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store's timeouts name the store without its password, in errors and in every log."""
    password = f"pw-{secrets.token_hex(8)}"  # trust auth: the server never asks for it
    url = through(relay, pg_url, password)
    config = make_config(BROKER_STORE_URL=url, BROKER_STORE_TIMEOUT=BOUND)
    messages: list[str] = []
    async with open_store(config) as store:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
        relay.silence()
        for call in (store.generation(), store.store_pair(pair_from_sandbox(sandbox), reason="x")):
            with pytest.raises(StoreError) as caught:
                await guarded(call, "a store call")
            messages.append(caught.value.message)
        assert store.location.count("***") == 1
        messages.append(store.location)
    with pytest.raises(StoreError) as refused:
        await guarded(open_store(config).__aenter__(), "opening the store")
    messages.append(refused.value.message)
    text = "\n".join([*messages, log_stream.getvalue(), caplog.text])
    assert_no_leak(text, password)
    assert all(str(relay.port) in m for m in messages), messages  # they do name the store


async def test_a_write_waiting_for_a_held_account_lock_fails_within_the_bound(
    relayed_config: Config, pg_url: str, sandbox: Sandbox
) -> None:
    """A write whose account lock another session holds fails (lock_timeout), not waits on."""
    async with open_store(relayed_config) as store:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
        holder = await psycopg.AsyncConnection.connect(pg_url)  # in a transaction from here
        try:
            await holder.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ACCOUNT_LOCK, store.account)
            )
            with pytest.raises(StoreError, match="lock timeout"):
                await guarded(store.store_pair(pair_from_sandbox(sandbox), reason="x"), "a write")
            await holder.rollback()
        finally:
            await holder.close()
        assert await store.store_pair(pair_from_sandbox(sandbox), reason="expiry") == 2


async def test_connections_carry_timeouts_and_keepalives_the_url_can_override(
    pg_url: str, key: str
) -> None:
    """Store connections get the server timeouts and TCP keepalives; the URL's own values win."""
    sealer = Sealer(decode_key(key, "key"))
    own = "connect_timeout=7&keepalives_idle=30&options=-c%20statement_timeout%3D9s"
    for url, statement, connect, idle in (
        (pg_url, "5s", "5", "10"),
        (f"{pg_url}?{own}", "9s", "7", "30"),
    ):
        store = await PgTokenStore.open(url, sealer)
        try:
            async with store._session() as conn:  # the pooled connection calls use
                server = {
                    name: await _show(conn, name)
                    for name in (
                        "statement_timeout",
                        "lock_timeout",
                        "idle_in_transaction_session_timeout",
                        "search_path",
                    )
                }
                assert server == {
                    "statement_timeout": statement,
                    "lock_timeout": "3s",
                    "idle_in_transaction_session_timeout": "20s",
                    "search_path": SCHEMA,
                }
                libpq = conn.info.get_parameters()
                names = ("connect_timeout", "keepalives", "keepalives_idle", "tcp_user_timeout")
                assert {name: libpq.get(name) for name in names} == {
                    "connect_timeout": connect,
                    "keepalives": "1",
                    "keepalives_idle": idle,
                    "tcp_user_timeout": "10000",
                }
        finally:
            await store.close()


async def _show(conn: psycopg.AsyncConnection[tuple[object, ...]], name: str) -> str:
    cursor = await conn.execute(f"SHOW {name}")
    row = await cursor.fetchone()
    return str(row[0]) if row else ""


async def test_after_a_silent_path_every_pooled_connection_is_replaced(
    relayed_config: Config, relay: Relay, sandbox: Sandbox
) -> None:
    """Once a call's cutoff fired, the idle connections of the same path are replaced too:
    calls made side by side after the path came back all answer.

    The old pool replaced only the connection whose call was cut; an idle one the relay had
    forgotten as well hung the next call that took it until its own bound.
    """
    async with open_store(relayed_config) as store:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
        await asyncio.gather(*(store.generation() for _ in range(4)))  # all 4 connections open
        relay.silence()
        with pytest.raises(StoreError):
            await guarded(store.generation(), "a call on the silent path")
        relay.resume()
        answers = await guarded(
            asyncio.gather(*(store.generation() for _ in range(4)), return_exceptions=True),
            "the calls after resume",
        )
        assert answers == [1] * 4
