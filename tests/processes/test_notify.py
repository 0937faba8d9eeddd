"""Operators hear of trouble from real `serve` processes: one POST per transition, by one replica.

The receiver is a real aiohttp app in the test's loop; the brokers are separate processes on
one SQLite store, notified through BROKER_NOTIFY_URL exactly as a deployment configures them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator

import aiohttp
import pytest

from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from tests.conftest import pair_from_sandbox
from tests.notify.receiver import Receiver
from tests.procs import Env, Issued, Processes, Serve, get, status_of

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
