"""End-to-end tests through real `amo-broker serve` processes: restarts, kills, two processes.

The sandbox amoCRM runs in the test's event loop on a loopback port; the brokers are separate
processes sharing one store file, so these tests see what a deployment sees: what survives a
SIGKILL, what two processes agree on, what a restart makes of a half-finished rotation.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from broker.config.model import Config
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.store.opener import open_store
from broker.store.sealing import new_key
from tests.conftest import pair_from_sandbox, unavailable
from tests.procs import Issued, Processes, Serve, get, is_live, status_of, until

pytestmark = pytest.mark.slow


async def crash_at(
    point: str, procs: Processes, http: aiohttp.ClientSession, sandbox: Sandbox
) -> Serve:
    """Start serve with a crash point, make a request that rotates, and see it SIGKILLed."""
    crashing = await procs.start(procs.env(AMO_BROKER_FAULT=point))
    sandbox.expire_access_tokens()
    with pytest.raises(aiohttp.ClientError):
        await get(http, crashing)
    assert await crashing.wait() == -signal.SIGKILL
    return crashing


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_restart_after_kill_ignores_the_spent_bootstrap_token(
    procs: Processes, http: aiohttp.ClientSession, sandbox: Sandbox, issued: Issued
) -> None:
    """A restart whose environment still names a spent refresh token serves the stored pair."""
    boot = pair_from_sandbox(sandbox)
    env = procs.env(
        AMOCRM_REFRESH_TOKEN=boot.refresh_token or "", AMOCRM_ACCESS_TOKEN=boot.access_token
    )
    first = await procs.start(env)
    assert (await get(http, first)).status == 200
    sandbox.expire_access_tokens()
    assert (await get(http, first)).status == 200
    assert sandbox.refresh_calls == 1
    assert not is_live(sandbox, boot)
    assert (await status_of(http, first))["generation"] == 2
    assert len(first.named("tokens_imported")) == 1
    assert await first.kill() == -signal.SIGKILL

    second = await procs.start(env)
    assert (await get(http, second)).status == 200
    status = await status_of(http, second)
    assert (status["state"], status["generation"]) == ("ok", 2)
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)
    ignored = second.named("bootstrap_tokens_ignored")
    assert [e["level"] for e in ignored] == ["warning"]
    assert ignored[0]["env_fingerprint"] == boot.refresh_fingerprint
    assert second.named("tokens_imported") == []
    procs.assert_no_leak(issued)


async def test_two_processes_sharing_a_store_refresh_once(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    issued: Issued,
) -> None:
    """Two serve processes on one store spend the refresh token once between them."""
    a, b = await asyncio.gather(procs.start(), procs.start())
    sandbox.expire_access_tokens()
    replies = await asyncio.gather(*(get(http, serve) for serve in [a, b] * 20))
    assert [r.status for r in replies] == [200] * 40
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)
    statuses = [await status_of(http, serve) for serve in (a, b)]
    assert [(s["state"], s["generation"]) for s in statuses] == [("ok", 2), ("ok", 2)]
    assert sum(s["refreshes_total"] for s in statuses) == 1
    procs.assert_no_leak(issued)


async def test_serve_and_refresh_commands_at_once_lose_no_rotation(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    config: Config,
    seeded: TokenPair,
    issued: Issued,
) -> None:
    """Concurrent `refresh` commands and a serving process store every rotation exactly once."""
    serve = await procs.start()
    sandbox.expire_access_tokens()
    refreshes = asyncio.gather(*(procs.cli("refresh") for _ in range(10)))
    try:
        # Send the requests once the commands are rotating, so serve's refresh (the 401s
        # make one) contends with theirs for the lease instead of finishing before they start.
        await until(lambda: sandbox.token_calls > 0, "a refresh command calls amoCRM")
        replies = await asyncio.gather(*(get(http, serve) for _ in range(20)))
    finally:
        commands = await refreshes

    assert [code for code, _, _ in commands] == [0] * 10, [err[-2000:] for _, _, err in commands]
    assert [r.status for r in replies] == [200] * 20
    assert sandbox.rejected_refresh_calls == 0
    assert sandbox.refresh_calls >= 1
    async with open_store(config) as store:
        info = await store.info()
        counts = await store.outcome_counts()
    assert info is not None
    assert info.generation == 1 + sandbox.refresh_calls
    assert counts == {"imported": 1, "rotated": sandbox.refresh_calls}
    # Each rotation amoCRM granted was logged by exactly one process.
    rotations = sum(err.count('"event": "token_refreshed"') for _, _, err in commands)
    rotations += len(serve.named("token_refreshed"))
    assert rotations == sandbox.refresh_calls
    procs.assert_no_leak(issued)


async def test_kill_after_amocrm_answered_ends_in_reauth_required(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    config: Config,
    seeded: TokenPair,
    issued: Issued,
) -> None:
    """A rotation killed before its commit leaves the spent pair: one rejected refresh, reauth."""
    await crash_at("after_answer", procs, http, sandbox)
    assert sandbox.refresh_calls == 1  # amoCRM granted a pair that nobody stored
    assert not is_live(sandbox, seeded)
    async with open_store(config) as store:
        info = await store.info()
    assert info is not None
    assert (info.generation, info.refresh_fingerprint, info.access_fingerprint) == (
        1,
        seeded.refresh_fingerprint,
        seeded.access_fingerprint,
    )

    restarted = await procs.start()
    first = await get(http, restarted)
    more = await asyncio.gather(*(get(http, restarted) for _ in range(5)))
    for reply in (first, *more):
        assert reply.status == 503
        assert reply.json()["error"] == "reauth_required"
        assert "Retry-After" in reply.headers
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 1)

    status = await status_of(http, restarted)
    assert (status["state"], status["generation"]) == ("reauth_required", 1)
    assert status["refresh_token_fingerprint"] == seeded.refresh_fingerprint
    assert status["access_token_fingerprint"] == seeded.access_fingerprint
    assert "did not finish" in status["last_error"]
    assert "exchange-code" in status["last_error"]
    assert "import" in status["last_error"]
    procs.assert_no_leak(issued)


async def test_kill_after_lease_is_taken_over_on_restart(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    config: Config,
    seeded: TokenPair,
    issued: Issued,
) -> None:
    """The lease of a process killed before it called amoCRM is taken over; the refresh works."""
    crashing = await crash_at("after_lease", procs, http, sandbox)
    assert sandbox.token_calls == 0
    assert is_live(sandbox, seeded)
    async with open_store(config) as store:
        orphan = await store.lease()
    # Unexpired: only the dead pid tells the restart it may take the lease at once.
    assert orphan is not None
    assert (orphan.holder.split(":")[1], orphan.generation) == (str(crashing.pid), 1)
    assert orphan.expires_at > time.time()

    restarted = await procs.start()
    assert (await get(http, restarted)).status == 200
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)
    status = await status_of(http, restarted)
    assert (status["state"], status["generation"]) == ("ok", 2)
    async with open_store(config) as store:
        assert await store.lease() is None
    procs.assert_no_leak(issued)


async def test_wrong_key_exits_2_without_touching_store_or_amocrm(
    procs: Processes,
    sandbox: Sandbox,
    seeded: TokenPair,
    db_path: Path,
    issued: Issued,
) -> None:
    """serve with a key that cannot open the store exits 2 with one error line, changing nothing."""
    before = digest(db_path)
    serve = await procs.spawn(procs.env(BROKER_ENCRYPTION_KEY=new_key()))
    assert await serve.wait() == 2
    stderr = serve.log_text()
    errors = [line for line in stderr.splitlines() if line.startswith("amo-broker: error:")]
    assert len(errors) == 1, stderr
    assert "key" in errors[0]
    assert "Traceback" not in stderr
    assert len(sandbox.requests) == 0
    procs.assert_no_leak(issued)
    assert digest(db_path) == before


async def test_sigterm_exits_0_and_stops_answering(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    issued: Issued,
) -> None:
    """SIGTERM stops serve with exit code 0, and /healthz no longer answers."""
    serve = await procs.start()
    assert (await get(http, serve, "/healthz")).status == 200
    assert await serve.terminate() == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, serve, "/healthz")
    assert len(serve.named("stopping")) == 1
    procs.assert_no_leak(issued)


def libfaketime() -> Path:
    """Find libfaketime (Debian's `faketime`); skip without it, but fail under CI."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if found:
        return found[0]
    unavailable("libfaketime is not installed (apt-get install faketime)")


async def test_a_wall_clock_step_in_one_process_never_takes_a_live_lease(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    issued: Issued,
) -> None:
    """A process whose wall clock is an hour ahead waits for the lease a slow refresh holds."""
    stepped = {
        "LD_PRELOAD": str(libfaketime()),
        "FAKETIME": "+1h",  # an NTP step or a resumed VM: this process's wall clock only
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # monotonic and boot clocks go on as the host's
    }
    steady = await procs.start()
    ahead = await procs.start(procs.env(**stepped))
    sandbox.token_delay = 2.0  # steady's refresh holds the lease while `ahead` meets a 401
    sandbox.expire_access_tokens()
    first = asyncio.ensure_future(get(http, steady))
    await until(lambda: sandbox.token_calls == 1, "steady's refresh reaches amoCRM")
    second = await get(http, ahead)
    assert ((await first).status, second.status) == (200, 200)
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)
    procs.assert_no_leak(issued)
