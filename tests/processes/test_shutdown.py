"""How a real `amo-broker serve` process ends: SIGTERM's drain, a repeated signal, SIGHUP, and
a SIGKILL in the middle of storing a rotation.

The sandbox amoCRM runs in the test's event loop; its `api_delay` and `token_delay` keep a
request or a refresh in flight while the test signals the broker. Each test checks that the
work it means to catch was still in flight when the broker logged the signal, so a pass proves
the behaviour, never a race won the other way. A `drain_seconds` below the production bound
lets a test outlast the drain quickly.
"""

from __future__ import annotations

import asyncio
import signal
import struct
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from broker.config.model import Config
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.store.opener import open_store
from tests.fixtures_processes import Background
from tests.procs import (
    LEADS,
    Issued,
    Processes,
    Reply,
    Serve,
    assert_stored_generation,
    get,
    is_live,
    until,
)

pytestmark = pytest.mark.slow


async def post(http: aiohttp.ClientSession, serve: Serve) -> Reply:
    """POST a lead: unlike a GET, aiohttp does not resend it when the connection is cut."""
    async with http.post(serve.url + LEADS, json=[{"name": "Cut short"}]) as response:
        return Reply(response.status, dict(response.headers), await response.read())


async def stop_with_request_in_flight(serve: Serve, pending: asyncio.Task[Reply]) -> None:
    """Send SIGTERM and wait for `stopping`, checking that `pending` was still in flight."""
    serve.signal(signal.SIGTERM)
    stopping = await serve.logged("stopping")
    assert not pending.done(), "the request finished before serve began to stop"
    assert stopping["in_flight"] == 1


def uncommitted_wal_frames(wal: Path) -> int:
    """Count the WAL's frames written after its last commit frame (sqlite.org/fileformat2).

    The header (32 bytes) gives the page size and the salts; each frame is a 24-byte header
    (page number, database size in pages on a commit frame else 0, the salts, a checksum) and
    one page. Frames whose salts differ are left over from before a checkpoint: not counted.
    """
    data = wal.read_bytes()
    if len(data) < 32:
        return 0
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    count, offset = 0, 32
    while offset + 24 + page_size <= len(data) and data[offset + 8 : offset + 16] == salts:
        committed = struct.unpack(">I", data[offset + 4 : offset + 8])[0] != 0
        count = 0 if committed else count + 1
        offset += 24 + page_size
    return count


async def test_sigterm_lets_a_slow_request_finish_and_refuses_new_connections(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    issued: Issued,
    background: Background,
) -> None:
    """SIGTERM refuses new connections, answers the request in flight with 200, exits 0."""
    serve = await procs.start()
    sandbox.api_delay = 1.0
    pending = background(get(http, serve))
    await until(lambda: sandbox.api_calls == 1, "the request reaches amoCRM")

    await stop_with_request_in_flight(serve, pending)
    url = URL(serve.url)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(url.host, url.port)
    assert (await pending).status == 200
    assert await serve.wait() == 0

    assert [e["status"] for e in serve.named("request")] == [200]
    assert serve.named("requests_cut") == []
    assert [len(serve.named(name)) for name in ("stopping", "stopped")] == [1, 1]
    assert sandbox.api_calls == 1
    procs.assert_no_leak(issued)


async def test_sigterm_during_a_refresh_stores_amocrms_answer(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    config: Config,
    seeded: TokenPair,
    issued: Issued,
    background: Background,
) -> None:
    """A refresh in flight at SIGTERM is committed, its request answered, then serve exits 0."""
    serve = await procs.start()
    sandbox.token_delay = 1.0
    sandbox.expire_access_tokens()
    pending = background(get(http, serve))
    await until(lambda: sandbox.token_calls == 1, "the refresh reaches amoCRM")

    await stop_with_request_in_flight(serve, pending)
    assert (await pending).status == 200
    assert await serve.wait() == 0

    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)
    assert not is_live(sandbox, seeded)
    access, refresh = issued[-2:]  # the pair amoCRM granted for the refresh
    await assert_stored_generation(config, 2, refresh, access)
    assert sandbox.is_refresh_token_live(refresh)
    assert len(serve.named("token_refreshed")) == 1
    assert serve.named("requests_cut") == []
    procs.assert_no_leak(issued)


async def test_a_refresh_outliving_the_drain_is_still_committed(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    config: Config,
    seeded: TokenPair,
    issued: Issued,
    background: Background,
) -> None:
    """When the drain cuts the request waiting on a refresh, the refresh is still stored."""
    serve = await procs.start(drain_seconds=0.2)
    sandbox.token_delay = 1.0
    sandbox.expire_access_tokens()
    pending = background(post(http, serve))
    await until(lambda: sandbox.token_calls == 1, "the refresh reaches amoCRM")

    await stop_with_request_in_flight(serve, pending)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await pending
    assert await serve.wait() == 0

    assert [e["count"] for e in serve.named("requests_cut")] == [1]
    assert len(serve.named("stopping_after_refresh")) == 1
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)
    access, refresh = issued[-2:]
    await assert_stored_generation(config, 2, refresh, access)
    assert sandbox.is_refresh_token_live(refresh)
    assert len(serve.named("token_refreshed")) == 1
    procs.assert_no_leak(issued)


async def test_a_request_outliving_the_drain_is_cut_and_serve_exits_0(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    config: Config,
    seeded: TokenPair,
    issued: Issued,
    background: Background,
) -> None:
    """A request still running when the drain ends is cut; serve logs it and exits 0."""
    serve = await procs.start(drain_seconds=0.2)
    sandbox.api_delay = 1.0
    pending = background(post(http, serve))
    await until(lambda: sandbox.api_calls == 1, "the request reaches amoCRM")

    await stop_with_request_in_flight(serve, pending)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await pending
    assert await serve.wait() == 0

    assert [e["count"] for e in serve.named("requests_cut")] == [1]
    assert [len(serve.named(name)) for name in ("stopping", "stopped")] == [1, 1]
    assert sandbox.token_calls == 0
    await assert_stored_generation(config, 1, seeded.refresh_token or "", seeded.access_token)
    procs.assert_no_leak(issued)


async def test_a_second_sigterm_cuts_the_drain_short(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    issued: Issued,
    background: Background,
) -> None:
    """SIGTERM again while draining cuts the request in flight at once; serve still exits 0."""
    serve = await procs.start()  # the production drain bound, far longer than api_delay
    sandbox.api_delay = 1.0
    pending = background(post(http, serve))
    await until(lambda: sandbox.api_calls == 1, "the request reaches amoCRM")

    await stop_with_request_in_flight(serve, pending)
    serve.signal(signal.SIGTERM)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await pending
    assert await serve.wait() == 0

    assert [e["signal"] for e in serve.named("stop_signal_repeated")] == ["SIGTERM"]
    assert [e["count"] for e in serve.named("requests_cut")] == [1]
    assert len(serve.named("stopped")) == 1
    procs.assert_no_leak(issued)


async def test_sighup_reloads_and_serving_goes_on_on_the_same_connection(
    procs: Processes,
    sandbox: Sandbox,
    seeded: TokenPair,
    issued: Issued,
    background: Background,
) -> None:
    """SIGHUP reloads the accounts (one account: nothing to add or remove); the request in
    flight and its keep-alive connection live on."""
    serve = await procs.start()
    opened, reused = [], []
    trace = aiohttp.TraceConfig()

    async def on_create(*_: object) -> None:
        opened.append(1)

    async def on_reuse(*_: object) -> None:
        reused.append(1)

    trace.on_connection_create_end.append(on_create)
    trace.on_connection_reuseconn.append(on_reuse)
    # One connection at most: every request below must travel over the same one.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1),
        timeout=aiohttp.ClientTimeout(total=20),
        trace_configs=[trace],
    ) as one:
        assert (await get(one, serve)).status == 200
        sandbox.api_delay = 1.0
        pending = background(get(one, serve))
        await until(lambda: sandbox.api_calls == 2, "the request reaches amoCRM")
        serve.signal(signal.SIGHUP)
        reloaded = await serve.logged("accounts_reloaded")
        assert not pending.done(), "the request finished before serve saw SIGHUP"
        assert (await pending).status == 200
        sandbox.api_delay = 0.0
        assert (await get(one, serve, "/status")).status == 200
        assert (len(opened), len(reused)) == (1, 2)

    assert (reloaded["added"], reloaded["removed"], reloaded["accounts"]) == ([], [], 1)
    assert serve.proc.returncode is None
    assert serve.named("stopping") == []
    assert await serve.terminate() == 0
    assert len(serve.named("reload_requested")) == 1
    procs.assert_no_leak(issued)


async def test_kill_during_the_commit_leaves_the_whole_old_pair(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    config: Config,
    seeded: TokenPair,
    db_path: Path,
    issued: Issued,
) -> None:
    """SIGKILL inside store_pair's transaction rolls it all back: old pair whole, then reauth."""
    crashing = await procs.start(procs.env(AMO_BROKER_FAULT="during_commit"))
    sandbox.expire_access_tokens()
    with pytest.raises(aiohttp.ClientError):
        await get(http, crashing)
    assert await crashing.wait() == -signal.SIGKILL
    assert sandbox.refresh_calls == 1  # amoCRM granted a pair whose commit never happened
    assert not is_live(sandbox, seeded)
    # The new pair's pages reached the WAL, uncommitted: opening the store must discard them.
    assert uncommitted_wal_frames(db_path.with_name(db_path.name + "-wal")) > 0

    async with open_store(config) as store:
        info = await store.info()
        stored = await store.load()
        counts = await store.outcome_counts()
        orphan = await store.lease()
    assert info is not None
    assert stored is not None
    old = (1, seeded.refresh_fingerprint, seeded.access_fingerprint)
    assert (info.generation, info.refresh_fingerprint, info.access_fingerprint) == old
    # Both ciphertexts open, to the old pair: no half of the new one was left behind.
    assert (
        stored.generation,
        stored.pair.refresh_fingerprint,
        stored.pair.access_fingerprint,
    ) == old
    # The history entry and the lease release were in the same transaction: gone with it.
    assert counts == {"imported": 1}
    assert orphan is not None
    assert (orphan.holder.split(":")[1], orphan.generation) == (str(crashing.pid), 1)

    restarted = await procs.start()
    first = await get(http, restarted)
    more = await asyncio.gather(*(get(http, restarted) for _ in range(5)))
    for reply in (first, *more):
        assert reply.status == 503
        assert reply.json()["error"] == "reauth_required"
    # One try with the spent token, refused; then no more calls to amoCRM's token endpoint.
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 1)
    status = (await get(http, restarted, "/status")).json()
    assert (status["state"], status["generation"]) == ("reauth_required", 1)
    assert status["refresh_token_fingerprint"] == seeded.refresh_fingerprint
    assert "did not finish" in status["last_error"]
    assert await restarted.terminate() == 0
    assert sandbox.token_calls == 2
    procs.assert_no_leak(issued)
