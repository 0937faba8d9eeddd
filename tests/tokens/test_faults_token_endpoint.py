"""Token endpoint faults: the pair survives, callers get a bounded 503, one call, backoff, recovery.

Time is a frozen FakeClock shared by the manager and the sandbox: the access token expires
and the backoff passes only when a test advances it, so "within the backoff" is exact.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from broker.pair import DEFAULT_ACCESS_LIFETIME, jwt_expiry, needs_refresh
from broker.sandbox.server import Sandbox
from broker.server.app import create_app
from broker.service import new_session
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.tokens.endpoint import OAuthClient
from broker.tokens.manager import TokenManager
from tests.conftest import ConfigFactory, assert_no_leak, seed_store

ACCESS_TTL = 7200  # not amoCRM's 24 h, so a fallback to the JWT is told from the default
CALLERS = 25
BOUND = 5.0  # seconds: a guard so a hung broker fails the test instead of stalling it


class FrozenClock:
    """Wall and monotonic time that move only when the test advances them."""

    def __init__(self) -> None:
        self._wall = time.time()
        self._mono = time.monotonic()

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds


@dataclass
class Rig:
    client: TestClient
    manager: TokenManager
    store: TokenStore
    sandbox: Sandbox
    clock: FrozenClock


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def sandbox(clock: FrozenClock) -> Sandbox:
    """The conftest sandbox, on the test's clock (every fixture built on it follows)."""
    return Sandbox(clock=clock.time, access_ttl=ACCESS_TTL)


@pytest.fixture
async def rig(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    clock: FrozenClock,
    aiohttp_client: Callable[..., object],
) -> AsyncIterator[Rig]:
    """A broker wired as `serve` wires it, with a 0.3 s refresh timeout and the frozen clock."""
    config = make_config(BROKER_REFRESH_TIMEOUT="0.3")
    await seed_store(config, sandbox)
    store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    session = new_session()
    try:
        oauth = OAuthClient(session, config.require_oauth(), config.refresh_timeout)
        manager = TokenManager(store, oauth, margin=config.margin_seconds, clock=clock)
        await manager.load()
        app = create_app(manager, session, base_url=str(config.base_url), proactive=False)
        client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
        yield Rig(client, manager, store, sandbox, clock)
        await manager.wait_idle()
    finally:
        if sandbox.token_gate is not None:
            sandbox.token_gate.set()  # never leave a sandbox handler parked at teardown
        await session.close()
        await store.close()


async def _stored(rig: Rig) -> tuple[int, str | None, str | None]:
    """What the store holds, by generation and fingerprints (never the tokens)."""
    info = await rig.store.info()
    assert info is not None
    return info.generation, info.access_fingerprint, info.refresh_fingerprint


async def _status(rig: Rig) -> dict[str, object]:
    response = await rig.client.get("/status")
    text = await response.text()
    pair = rig.manager.pair
    assert pair is not None
    assert_no_leak(text, pair.access_token, pair.refresh_token, rig.sandbox.client_secret)
    doc: dict[str, object] = json.loads(text)
    return doc


async def _assert_unavailable(response: aiohttp.ClientResponse, rig: Rig) -> None:
    """A clear 503 `token_endpoint_unavailable` with an integer Retry-After of at least 1."""
    assert response.status == 503
    assert response.content_type == "application/problem+json"
    text = await response.text()
    pair = rig.manager.pair
    assert pair is not None
    assert_no_leak(text, pair.access_token, pair.refresh_token, rig.sandbox.client_secret)
    assert json.loads(text)["error"] == "token_endpoint_unavailable"
    retry_after = response.headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) >= 1


async def _wave(rig: Rig, n: int = CALLERS) -> list[aiohttp.ClientResponse]:
    async with asyncio.timeout(BOUND):
        return await asyncio.gather(*(rig.client.get("/api/v4/leads") for _ in range(n)))


async def _until(condition: Callable[[], bool], seconds: float = BOUND) -> None:
    """Wait, bounded, until a fake's counter says so."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 -- the fakes count in plain ints: no event
            await asyncio.sleep(0.01)


def _raw(status: str, body: bytes, *, length: int | None = None, ctype: str = "json") -> bytes:
    """A whole HTTP/1.1 answer as bytes; `length` may promise more than `body` holds."""
    content_type = "application/json" if ctype == "json" else ctype
    size = len(body) if length is None else length
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {size}\r\n\r\n"
    return head.encode() + body


@dataclass(frozen=True)
class Fault:
    name: str
    apply: Callable[[Sandbox], None]


def _fail_status(status: int) -> Callable[[Sandbox], None]:
    def apply(sandbox: Sandbox) -> None:
        sandbox.token_fail_status = status

    return apply


def _raw_answer(raw: bytes) -> Callable[[Sandbox], None]:
    def apply(sandbox: Sandbox) -> None:
        sandbox.token_raw = raw

    return apply


def _stall(sandbox: Sandbox) -> None:
    # Stalls until healed: callers can only be answered by the broker's own timeout. It
    # stands in front of the OAuth server (nothing is spent); see the xfail test below.
    sandbox.token_gate = asyncio.Event()
    sandbox.grant_after_hangup = False


_PROBLEM_500 = b'{"title": "Internal Server Error", "status": 500}'
FAULTS = [
    Fault("slow", _stall),
    Fault("500-problem-json", _raw_answer(_raw("500 Internal Server Error", _PROBLEM_500))),
    Fault("502-html", _fail_status(502)),
    Fault("503-html", _fail_status(503)),
    Fault("200-html", _fail_status(200)),
    Fault("reset-before-headers", _raw_answer(b"")),
    Fault("reset-mid-answer", _raw_answer(_raw("200 OK", b'{"access_token": "eyJ', length=900))),
    Fault("200-truncated-json", _raw_answer(_raw("200 OK", b'{"access_token": "a", "refre'))),
    Fault("200-json-array", _raw_answer(_raw("200 OK", b"[1, 2, 3]"))),
    Fault("200-no-access-token", _raw_answer(_raw("200 OK", b'{"token_type": "Bearer"}'))),
    Fault("200-not-utf8", _raw_answer(_raw("200 OK", b"\xff\xfe\x00{garbage"))),
]


def _heal(sandbox: Sandbox) -> None:
    gate = sandbox.token_gate
    sandbox.token_gate = None
    sandbox.token_fail_status = None
    sandbox.token_raw = None
    if gate is not None:
        gate.set()  # the parked call finds its client gone and is dropped


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_outage_keeps_pair_gives_bounded_503_backs_off_and_recovers(
    rig: Rig, fault: Fault
) -> None:
    """A token endpoint fault keeps the pair, answers 503 after one call, backs off, heals."""
    before = await _stored(rig)
    fault.apply(rig.sandbox)
    rig.clock.advance(ACCESS_TTL)  # the access token expired: every call needs a refresh

    for response in await _wave(rig):
        await _assert_unavailable(response, rig)
    # A stalled request outlives the callers' bounded wait, up to its own hard limit.
    await rig.manager.wait_idle()
    assert rig.sandbox.token_calls == 1  # one shared attempt for every waiting caller
    assert rig.sandbox.refresh_calls == 0  # nothing was granted, nothing spent
    assert await _stored(rig) == before
    assert (rig.manager.state, rig.manager.generation) == ("ok", 1)
    history = await rig.store.history()
    assert history[0]["outcome"] == "failed"

    await _assert_unavailable(await rig.client.get("/api/v4/contacts"), rig)
    assert rig.sandbox.token_calls == 1  # within the backoff: amoCRM is not asked again
    doc = await _status(rig)
    assert doc["state"] == "ok"
    assert isinstance(doc["last_error"], str) and doc["last_error"]
    assert doc["next_attempt_at"] is not None

    _heal(rig.sandbox)
    assert rig.manager.stats.next_attempt_at is not None
    rig.clock.advance(rig.manager.stats.next_attempt_at - rig.clock.time() + 0.01)
    await rig.manager.tick()  # the proactive loop's round: no caller needed to recover

    assert rig.sandbox.refresh_calls == 1
    assert rig.sandbox.rejected_refresh_calls == 0
    generation, access_fp, refresh_fp = await _stored(rig)
    assert generation == 2 == rig.manager.generation
    assert access_fp != before[1] and refresh_fp != before[2]
    doc = await _status(rig)
    assert doc["last_error"] is None
    assert doc["next_attempt_at"] is None
    assert (await rig.client.get("/api/v4/leads")).status == 200
    assert rig.sandbox.token_calls == 2


async def test_slow_endpoint_never_answering_still_frees_callers(rig: Rig) -> None:
    """Callers of a token call that never returns get 503 in time; the call itself is dropped."""
    _stall(rig.sandbox)
    rig.clock.advance(ACCESS_TTL)
    responses = await _wave(rig)  # the gate is still shut: only the timeout could end it
    for response in responses:
        await _assert_unavailable(response, rig)
    assert rig.sandbox.token_calls == 1
    await rig.manager.wait_idle()  # the request's hard limit ends it: a failure, backed off
    assert rig.manager.stats.refresh_failures_total == 1
    assert (rig.manager.state, rig.manager.generation) == ("ok", 1)
    _heal(rig.sandbox)
    await _until(lambda: rig.sandbox.dropped_token_calls == 1)  # amoCRM never granted it
    assert rig.sandbox.refresh_calls == 0


async def test_late_answer_after_timeout_is_not_lost(rig: Rig) -> None:
    """A grant amoCRM answers after callers stopped waiting is still committed and used."""
    rig.sandbox.token_delay = 1.0  # slower than the 0.3 s callers wait, within the request's
    rig.clock.advance(ACCESS_TTL)
    for response in await _wave(rig, 3):
        await _assert_unavailable(response, rig)  # bounded: callers are told to retry
    await rig.manager.wait_idle()  # the one request went on to amoCRM's answer
    rig.sandbox.token_delay = 0.0
    assert (rig.sandbox.token_calls, rig.sandbox.refresh_calls) == (1, 1)
    assert rig.sandbox.rejected_refresh_calls == 0
    assert rig.manager.state == "ok"
    generation, _, _ = await _stored(rig)
    assert generation == 2
    assert (await rig.client.get("/api/v4/leads")).status == 200
    assert rig.sandbox.token_calls == 1


async def test_answer_without_refresh_token_keeps_the_old_one(rig: Rig) -> None:
    """A 200 without refresh_token keeps the old refresh token, and the next refresh uses it."""
    _, first_access, first_refresh = await _stored(rig)
    rig.sandbox.token_fields = {"refresh_token": None}
    rig.clock.advance(ACCESS_TTL)
    assert (await rig.client.get("/api/v4/leads")).status == 200

    generation, access_fp, refresh_fp = await _stored(rig)
    assert generation == 2
    assert access_fp != first_access
    assert refresh_fp == first_refresh  # the old refresh token was kept, not dropped
    pair = rig.manager.pair
    assert pair is not None and pair.refresh_fingerprint == first_refresh

    rig.sandbox.token_fields = {}
    rig.clock.advance(ACCESS_TTL)
    assert (await rig.client.get("/api/v4/leads")).status == 200
    assert rig.sandbox.refresh_calls == 2
    assert rig.sandbox.rejected_refresh_calls == 0  # the kept token was still good
    generation, _, refresh_fp = await _stored(rig)
    assert generation == 3
    assert refresh_fp != first_refresh


async def test_kept_refresh_token_keeps_its_obtained_at(rig: Rig) -> None:
    """A 200 without refresh_token keeps the date the old refresh token was obtained."""
    before = await rig.store.info()
    assert before is not None and before.refresh_obtained_at is not None
    rig.sandbox.token_fields = {"refresh_token": None}
    rig.clock.advance(ACCESS_TTL)
    assert (await rig.client.get("/api/v4/leads")).status == 200
    after = await rig.store.info()
    assert after is not None and after.generation == 2
    assert after.refresh_obtained_at == before.refresh_obtained_at
    assert (await _status(rig))["refresh_token_obtained_at"] is not None


@pytest.mark.parametrize(
    "expires_in",
    [None, -(10**9), -5, 0],
    ids=["missing", "far-in-the-past", "negative", "zero"],
)
async def test_unusable_expires_in_falls_back_to_jwt_exp_without_storm(
    rig: Rig, expires_in: int | None
) -> None:
    """A missing, negative or zero expires_in uses the JWT exp; a tick then refreshes nothing."""
    rig.sandbox.token_fields = {"expires_in": expires_in}
    rig.clock.advance(ACCESS_TTL)
    refreshed_at = rig.clock.time()
    assert (await rig.client.get("/api/v4/leads")).status == 200
    assert rig.sandbox.token_calls == 1

    pair = rig.manager.pair
    assert pair is not None
    jwt_exp = jwt_expiry(pair.access_token)
    assert pair.expires_at == jwt_exp == int(refreshed_at) + ACCESS_TTL
    info = await rig.store.info()
    assert info is not None and info.expires_at == pair.expires_at
    assert not needs_refresh(pair, rig.clock.time(), 600)

    for _ in range(3):
        await rig.manager.tick()
    assert rig.sandbox.token_calls == 1  # no refresh storm
    assert rig.manager.generation == 2


def _jwt_with_exp(exp: int) -> str:
    """An access token whose payload carries `exp` as written (the signature is not read)."""
    segment = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=")
    return f"eyJhbGciOiJIUzI1NiJ9.{segment.decode()}.c2ln"


@pytest.mark.parametrize("exp", [10**400, 10**308], ids=["beyond-float", "beyond-any-clock"])
async def test_a_grant_whose_jwt_exp_is_absurd_is_committed(rig: Rig, exp: int) -> None:
    """A JWT exp no clock can show is ignored: the granted pair is stored, with the 24 h default."""
    rig.sandbox.token_fields = {"access_token": _jwt_with_exp(exp), "expires_in": None}
    refreshed_at = rig.clock.time()
    stored = await rig.manager.refresh("manual")
    generation, _, refresh_fp = await _stored(rig)
    assert (stored.generation, generation, rig.sandbox.refresh_calls) == (2, 2, 1)
    assert refresh_fp == stored.pair.refresh_fingerprint
    assert stored.pair.expires_at == refreshed_at + DEFAULT_ACCESS_LIFETIME
    assert rig.sandbox.live_refresh_tokens == [stored.pair.refresh_token]
