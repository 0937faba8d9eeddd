"""Delivery against a real local receiver: signed bodies, retries, outages, a bounded queue."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from broker.notify.deliver import Delivery
from broker.notify.detect import Event
from broker.notify.message import SIGNATURE_HEADER, body
from tests.notify.receiver import Receiver
from tests.procs import until

EVENT = Event("reauth_required", "main", "reauth_required", 1_800_000_000.0, 5, "revoked", "k")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = await Receiver().start()
    yield hook
    await hook.stop()


def fast(**kw: float) -> Delivery:
    return Delivery(secret="s3cret", base_delay=0.05, max_delay=0.2, **kw)  # type: ignore[arg-type]


async def test_a_body_arrives_signed_with_the_hmac_of_its_exact_bytes(receiver: Receiver) -> None:
    """The receiver can verify X-Broker-Signature with the shared secret."""
    async with fast().running() as delivery:
        delivery.submit([receiver.url], body(EVENT), event="reauth_required", account="main")
        await receiver.until(1)
    got = receiver.got[0]
    expected = hmac.new(b"s3cret", got.body, hashlib.sha256).hexdigest()
    assert got.headers[SIGNATURE_HEADER] == f"sha256={expected}"
    doc = got.json()
    assert {k: doc[k] for k in ("event", "account", "state", "generation", "message")} == {
        "event": "reauth_required",
        "account": "main",
        "state": "reauth_required",
        "generation": 5,
        "message": "revoked",
    }
    assert doc["since"] == "2027-01-15T08:00:00Z"
    assert doc["text"].startswith(":rotating_light: amo-broker: account main: reauth_required")


async def test_a_template_shapes_the_body_with_json_escaped_values(receiver: Receiver) -> None:
    """A template gets its placeholders filled with escaped values and stays valid JSON."""
    tricky = Event("blocked", "main", "blocked", 0.0, 1, 'a "quote"\nand a line', "k")
    template = '{"chat_id": "42", "text": "{text}", "who": "{account}"}'
    async with fast().running() as delivery:
        delivery.submit([receiver.url], body(tricky, template), event="blocked", account="main")
        await receiver.until(1)
    doc = receiver.got[0].json()
    assert doc["chat_id"] == "42" and doc["who"] == "main"
    assert doc["text"].endswith('blocked — a "quote"\nand a line')


async def test_a_500_is_retried_until_the_receiver_takes_it(receiver: Receiver) -> None:
    """Answers of 500 are retried with back-off and logged notify_failed; then it arrives."""
    receiver.statuses = [500, 500, 503]
    with capture_logs() as logs:
        async with fast().running() as delivery:
            delivery.submit([receiver.url], body(EVENT), event="reauth_required", account="main")
            await receiver.until(1)
    assert receiver.answered == [500, 500, 503, 200]
    failed = [e for e in logs if e["event"] == "notify_failed"]
    assert [e["error"] for e in failed] == ["HTTP 500", "HTTP 500", "HTTP 503"]
    assert all(e["to"] == f"http://127.0.0.1:{receiver.port}" for e in failed)


async def test_a_receiver_down_for_a_while_gets_it_once_back(receiver: Receiver) -> None:
    """While the receiver is down the job waits; it is delivered once it listens again."""
    await receiver.stop()
    async with fast().running() as delivery:
        delivery.submit([receiver.url], body(EVENT), event="reauth_required", account="main")
        await asyncio.sleep(0.5)
        assert delivery.jobs and delivery.jobs[0].attempts >= 2
        await receiver.start()
        await receiver.until(1)
    assert receiver.events() == ["reauth_required"]


async def test_a_job_is_given_up_after_its_time(receiver: Receiver) -> None:
    """A job still failing past give_up_after is dropped with notify_dropped."""
    receiver.statuses = [500] * 100
    with capture_logs() as logs:
        async with fast(give_up_after=0.3).running() as delivery:
            delivery.submit([receiver.url], body(EVENT), event="reauth_required", account="main")
            await until(lambda: not delivery.jobs, "the job is dropped")
    dropped = [e for e in logs if e["event"] == "notify_dropped"]
    assert [d["reason"] for d in dropped] == ["gave_up"]


async def test_a_full_queue_drops_its_oldest_job(receiver: Receiver) -> None:
    """Past max_queue the oldest job goes, with a log line; submit never waits."""
    await receiver.stop()
    with capture_logs() as logs:
        async with Delivery(max_queue=3).running() as delivery:
            for n in range(5):
                payload = json.dumps({"n": n}).encode()
                delivery.submit([receiver.url], payload, event=f"e{n}", account="main")
            assert [json.loads(j.payload)["n"] for j in delivery.jobs] == [2, 3, 4]
    dropped = [e for e in logs if e["event"] == "notify_dropped"]
    assert [(d["notice"], d["reason"]) for d in dropped] == [
        ("e0", "queue_full"),
        ("e1", "queue_full"),
    ]
