"""Operators hear of trouble from real `serve` processes: one POST per transition, by one replica.

The receiver is a real aiohttp app in the test's loop; the brokers are separate processes on
one SQLite store, notified through BROKER_NOTIFY_URL exactly as a deployment configures them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from broker.config.model import Config
from broker.notify.detect import DAY
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from tests.conftest import pair_from_sandbox, seed_store
from tests.fixtures_processes import Background
from tests.notify.receiver import Receiver
from tests.procs import Env, Issued, Processes, Serve, get, status_of, until

pytestmark = pytest.mark.slow

SECRET = "notify-signing-secret"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = await Receiver().start()
    yield hook
    await hook.stop()


def notified(procs: Processes, receiver: Receiver) -> Env:
    return procs.env(BROKER_NOTIFY_URL=receiver.url, BROKER_NOTIFY_SECRET=SECRET)


async def refuse_the_pair(sandbox: Sandbox, http: aiohttp.ClientSession, serve: Serve) -> None:
    """Revoke the refresh token and drop the access token: the next call finds reauth_required."""
    sandbox.revoke_refresh_tokens()
    sandbox.expire_access_tokens()
    assert (await get(http, serve)).status == 503


async def test_reauth_required_is_told_once_and_an_import_tells_recovered(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    receiver: Receiver,
    issued: Issued,
) -> None:
    """A refused pair posts one signed reauth_required, however many calls; import: recovered."""
    serve = await procs.start(notified(procs, receiver))
    await refuse_the_pair(sandbox, http, serve)
    for _ in range(5):
        assert (await get(http, serve)).status == 503
    await receiver.until(1)
    await asyncio.sleep(2.5)  # more than two polls: nothing more may come
    assert receiver.events() == ["reauth_required"]
    got = receiver.got[0]
    expected = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers["X-Broker-Signature"] == f"sha256={expected}"
    doc = got.json()
    assert (doc["account"], doc["state"], doc["generation"]) == ("default", "reauth_required", 1)
    assert "revoked" in doc["message"].lower() and "reauth_required" in doc["text"]

    fresh = pair_from_sandbox(sandbox)
    issued.extend((fresh.access_token, fresh.refresh_token or ""))
    importing = procs.env(
        AMOCRM_REFRESH_TOKEN=fresh.refresh_token or "", AMOCRM_ACCESS_TOKEN=fresh.access_token
    )
    code, _, err = await procs.cli("import", env=importing)
    assert code == 0, err[-2000:]
    await receiver.until(2)
    assert receiver.events() == ["reauth_required", "recovered"]
    assert receiver.got[1].json()["generation"] == 2
    assert (await get(http, serve)).status == 200
    for received in receiver.got:
        for token in issued:
            assert token not in received.body.decode()
    procs.assert_no_leak(issued)


async def test_two_replicas_on_one_store_send_one_notification(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    receiver: Receiver,
) -> None:
    """Both replicas see reauth_required; the store lets only one of them post it."""
    env = notified(procs, receiver)
    a, b = await asyncio.gather(procs.start(env), procs.start(env))
    await refuse_the_pair(sandbox, http, a)
    assert (await get(http, b)).status == 503  # b learns of the refusal from the store
    for serve in (a, b):
        await until_state(http, serve, "reauth_required")
    await asyncio.sleep(2.5)
    assert receiver.events() == ["reauth_required"]
    quiet = [s for s in (a, b) if s.named("notify_claimed_elsewhere")]
    assert len(quiet) == 1


async def test_a_receiver_down_for_a_while_gets_the_notification_when_back(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    receiver: Receiver,
) -> None:
    """Failed posts are retried in the background; the event arrives once the receiver is up."""
    await receiver.stop()
    serve = await procs.start(notified(procs, receiver))
    await refuse_the_pair(sandbox, http, serve)
    failure = await serve.logged("notify_failed")
    assert failure["to"] == f"http://127.0.0.1:{receiver.port}"  # the origin, never the path
    await receiver.start()
    await receiver.until(1)
    assert receiver.events() == ["reauth_required"]


async def until_state(http: aiohttp.ClientSession, serve: Serve, state: str) -> None:
    """Wait until the process's /status says `state`."""
    states: list[str] = []

    async def look() -> None:
        while True:
            states.append((await status_of(http, serve))["state"])
            if states[-1] == state:
                return
            await asyncio.sleep(0.2)

    try:
        async with asyncio.timeout(10):
            await look()
    except TimeoutError:
        raise AssertionError(f"{serve.url} stayed {states[-1:]} instead of {state}") from None


async def test_notify_test_reports_the_receivers_answer(
    procs: Processes, receiver: Receiver
) -> None:
    """`notify test` posts a signed test event: exit 0 on 2xx, 1 with one clear line otherwise."""
    code, out, err = await procs.cli("notify", "test", env=notified(procs, receiver))
    assert (code, out.strip()) == (0, f"notify test: http://127.0.0.1:{receiver.port} answered 200")
    assert receiver.events() == ["test"]
    receiver.statuses = [500]
    code, out, _ = await procs.cli("notify", "test", env=notified(procs, receiver))
    assert (code, out.strip()) == (1, f"notify test: http://127.0.0.1:{receiver.port} answered 500")
    code, _, err = await procs.cli("notify", "test")
    assert code != 0 and "BROKER_NOTIFY_URL" in err


async def test_a_block_is_told_and_its_end_too(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    receiver: Receiver,
) -> None:
    """amoCRM blocks the account: one `blocked`; the probe finds it lifted: one `unblocked`."""
    env = notified(procs, receiver)
    serve = await procs.start(procs.env(**env, BROKER_BLOCK_COOLDOWN="1", BROKER_MAX_WAIT="0.5"))
    sandbox.blocked = True
    for _ in range(3):
        assert (await get(http, serve)).status == 403
    assert (await get(http, serve)).status == 503
    await receiver.until(1)
    assert receiver.events() == ["blocked"]
    sandbox.blocked = False
    await asyncio.sleep(1.2)  # the cool-down; the next call is the probe
    assert (await get(http, serve)).status == 200
    await receiver.until(2)
    assert receiver.events() == ["blocked", "unblocked"]
    assert receiver.got[0].json()["state"] == "blocked"


def file_size_limit(serve: Serve, size: int | None) -> None:
    """Cap the size any file of the process may grow to (None: lift the cap).

    Past it a write fails with EFBIG (CPython ignores SIGXFSZ): a full disk for that process
    only, set from outside while it runs, with no privilege the test does not have.
    """
    limit = resource.RLIM_INFINITY if size is None else size
    resource.prlimit(serve.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


async def test_a_store_refusing_the_new_pair_is_told_and_its_recovery_too(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    receiver: Receiver,
    db_path: Path,
    background: Background,
) -> None:
    """The store refuses the granted pair: one `store_degraded`; it takes it: `store_recovered`."""
    # Warnings only: the log must stay below the cap the WAL file hits.
    env = procs.env(**notified(procs, receiver), BROKER_LOG_LEVEL="warning")
    serve = await procs.start(env)
    sandbox.token_gate = asyncio.Event()
    sandbox.expire_access_tokens()
    call = background(get(http, serve))
    # The lease is committed before amoCRM is called: from here the next WAL frame is the pair's.
    await until(lambda: sandbox.token_calls == 1, "the refresh reaches amoCRM")
    wal = db_path.with_name(db_path.name + "-wal").stat().st_size
    assert serve.log_path.stat().st_size < wal - 4096
    file_size_limit(serve, wal)
    sandbox.token_gate.set()
    reply = await call
    assert reply.status == 200  # served from memory
    assert "store_degraded" in reply.headers["X-Broker-Warning"]
    await receiver.until(1)
    assert receiver.events() == ["store_degraded"]
    assert "refuses writes" in receiver.got[0].json()["message"]
    file_size_limit(serve, None)
    await receiver.until(2)  # the held pair is written again within a second
    await asyncio.sleep(1.2)  # one more poll: nothing more may come
    assert receiver.events() == ["store_degraded", "store_recovered"]
    assert (await status_of(http, serve))["state"] == "ok"


async def test_a_failing_refresh_is_told_after_the_threshold_and_its_end_too(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    receiver: Receiver,
) -> None:
    """The token endpoint answers 500 past the threshold: one `refresh_failing`; `recovered`."""
    env = procs.env(**notified(procs, receiver), BROKER_NOTIFY_FAILING_AFTER="1")
    serve = await procs.start(env)
    sandbox.token_fail_status = 500
    sandbox.expire_access_tokens()
    assert (await get(http, serve)).status == 503
    await receiver.until(1)
    assert receiver.events() == ["refresh_failing"]
    assert "500" in receiver.got[0].json()["message"]
    sandbox.token_fail_status = None
    await until_ok(http, serve)  # past the back-off, the next call's refresh works
    await receiver.until(2)
    await asyncio.sleep(1.2)
    assert receiver.events() == ["refresh_failing", "recovered"]
    assert receiver.got[1].json()["generation"] == 2


async def until_ok(http: aiohttp.ClientSession, serve: Serve) -> None:
    """Call until a call goes through (bounded)."""
    async with asyncio.timeout(10):
        # Each look is a call through the broker, with no event to wait on.
        while (await get(http, serve)).status != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.3)


async def test_a_long_lived_token_near_its_end_is_told_once(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    receiver: Receiver,
) -> None:
    """A long-lived token ten days from its end: one `long_lived_expiring` soon after start."""
    sandbox.access_ttl = 10 * 86_400
    token = sandbox.issue_pair()["access_token"]
    env = procs.env(**notified(procs, receiver), AMOCRM_LONG_LIVED_TOKEN=token)
    serve = await procs.start(env)
    assert (await get(http, serve)).status == 200
    await receiver.until(1)
    await asyncio.sleep(2.5)  # more than two polls: nothing more may come
    assert receiver.events() == ["long_lived_expiring"]
    assert "expires in 10.0 days" in receiver.got[0].json()["message"]
    assert token not in receiver.got[0].body.decode()


async def test_a_refresh_token_unrotated_for_a_month_is_told_once(
    procs: Processes,
    config: Config,
    sandbox: Sandbox,
    receiver: Receiver,
) -> None:
    """A stored refresh token obtained 31 days ago: one `refresh_token_aging` soon after start."""
    aged = replace(pair_from_sandbox(sandbox), refresh_obtained_at=time.time() - 31 * DAY)
    await seed_store(config, sandbox, aged)
    await procs.start(notified(procs, receiver))
    await receiver.until(1)
    await asyncio.sleep(2.5)
    assert receiver.events() == ["refresh_token_aging"]
    assert "no successful rotation for 31 days" in receiver.got[0].json()["message"]
