"""The token probe: only amoCRM serving the token proves it works; nothing else is a verdict.

Against the sandbox amoCRM and a real SQLite store (defect R8 of issue 22). The pace here is
a pass-through or a refusal, the very edge: the account's real pace is tested with the
limiter in tests/server/test_own_calls.py and with real processes in
tests/processes/test_probe_pace.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from broker.config.model import Config
from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.tokens.endpoint import OAuthClient
from broker.tokens.manager import TokenManager
from broker.tokens.probe import PROBE_PATH, SEND_MIN, Answer, Send, account_probe, verdict
from tests.conftest import ConfigFactory, seed_store
from tests.procs import free_port


@pytest.fixture
async def parts(
    make_config: ConfigFactory, sandbox: Sandbox
) -> AsyncIterator[tuple[Config, aiohttp.ClientSession]]:
    config = make_config()
    await seed_store(config, sandbox)
    async with aiohttp.ClientSession() as session:
        yield config, session


def probes(sandbox: Sandbox) -> int:
    return sum(r.raw_path == PROBE_PATH for r in sandbox.requests)


async def through(send: Send, patience: float) -> Answer | None:
    """A pace that lets every call go at once."""
    return await send()


async def refusing(send: Send, patience: float) -> Answer | None:
    """A pace whose queue has no turn within the bound (full, or the account blocked)."""
    return None


def test_only_a_2xx_says_alive_and_only_a_401_says_refused() -> None:
    """A 429, a 403, a 5xx or no answer at all proves nothing about the token."""
    assert [verdict(s) for s in (200, 204, 401)] == ["alive", "alive", "refused"]
    assert {verdict(s) for s in (429, 403, 404, 500, 502, 503, 504, None)} == {"unknown"}


def _indeterminate(sandbox: Sandbox, kind: str) -> tuple[float, str | None]:
    """Make the sandbox answer probes with `kind`; return the probe timeout and base URL."""
    if kind == "429":
        sandbox.api_script.extend([429] * 20)
    elif kind == "5xx":
        sandbox.api_script.extend([502, 503, 500] * 7)
    elif kind == "timeout":
        sandbox.api_delay = 2.0
        return 0.2, None
    else:  # nobody listens there: no answer at all
        return 5.0, f"http://127.0.0.1:{free_port()}"
    return 5.0, None


@pytest.mark.parametrize("kind", ["429", "5xx", "timeout", "no answer"])
async def test_a_probe_that_proves_nothing_is_never_taken_for_a_working_token(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox, kind: str
) -> None:
    """A 401 in the cool-down whose probe learns nothing rotates; it never goes back as is.

    The old manager read any answer but a 401 as "the token works": after a 429 (the probe
    sent past the pace) it resent the call with the dropped token and the caller got a 401.
    """
    config, session = parts
    store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    oauth = OAuthClient(session, config.require_oauth(), timeout=5)
    timeout, elsewhere = _indeterminate(sandbox, kind)
    probe = account_probe(session, elsewhere or str(config.base_url), timeout)
    manager = TokenManager(store, oauth, margin=600, probe=probe)
    await manager.load()
    try:
        sandbox.expire_access_tokens()
        assert await manager.unauthorized(manager.generation)  # the first 401: rotate at once
        sandbox.expire_access_tokens()  # dropped again, within the cool-down
        assert await manager.unauthorized(manager.generation)  # probed, learnt nothing: rotate
    finally:
        await store.close()
    assert sandbox.refresh_calls == 2
    assert manager.generation == 3
    assert manager.stats.unauthorized_after_refresh == 0
    if elsewhere is None:
        assert probes(sandbox) >= 1


async def test_a_probe_asks_again_until_an_answer_proves_something(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """A 429, then a 502: the probe asks a third time, and amoCRM's 200 decides."""
    config, session = parts
    sandbox.api_script.extend([429, 502])
    token = sandbox.issue_pair()["access_token"]
    probe = account_probe(session, str(config.base_url), 5, pace=through, patience=10)
    assert await probe(token) == 200
    assert probes(sandbox) == 3


async def test_a_probe_that_never_learns_anything_gives_up_within_its_bound(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """amoCRM answering 503 to everything: a few asks with growing pauses, over in time."""
    config, session = parts
    sandbox.api_script.extend([503] * 50)
    token = sandbox.issue_pair()["access_token"]
    probe = account_probe(session, str(config.base_url), 5, pace=through, patience=1.0)
    started = time.monotonic()
    assert await probe(token) == 503
    assert time.monotonic() - started <= 1.0 + SEND_MIN
    assert 2 <= probes(sandbox) <= 4  # asked at 0, 0.25, 0.75 s: not a storm


async def test_a_probe_without_a_turn_in_the_pace_sends_nothing_and_proves_nothing(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """A pace with no turn within the bound: the probe reports no answer, amoCRM saw nothing."""
    config, session = parts
    token = sandbox.issue_pair()["access_token"]
    probe = account_probe(session, str(config.base_url), 5, pace=refusing, patience=0.5)
    assert verdict(await probe(token)) == "unknown"
    assert probes(sandbox) == 0


async def test_callers_meeting_one_inconclusive_probe_share_it_and_one_refresh(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """Ten 401s in the cool-down while amoCRM throttles: one probe episode, one rotation."""
    config, session = parts
    store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    oauth = OAuthClient(session, config.require_oauth(), timeout=5)
    probe = account_probe(session, str(config.base_url), 5, pace=through, patience=0.5)
    manager = TokenManager(store, oauth, margin=600, probe=probe)
    await manager.load()
    try:
        assert await manager.unauthorized(manager.generation)
        sandbox.api_script.extend([429] * 20)
        generation = manager.generation
        asks: list[Callable[[], Awaitable[bool]]] = [
            lambda: manager.unauthorized(generation) for _ in range(10)
        ]
        replays = await asyncio.gather(*(ask() for ask in asks))
    finally:
        await store.close()
    assert replays == [True] * 10
    assert sandbox.refresh_calls == 2
    assert probes(sandbox) <= 3  # one episode: asked at 0 and 0.25 s


async def test_a_pair_rotated_while_the_probe_was_out_is_tried_before_any_401_goes_back(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """The probe finds the old token working, but a refresh landed meanwhile: replay, no 401."""
    config, session = parts
    store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    oauth = OAuthClient(session, config.require_oauth(), timeout=5)
    out, back = asyncio.Event(), asyncio.Event()

    async def slow_probe(token: str) -> int | None:
        out.set()
        await back.wait()
        return 200

    manager = TokenManager(store, oauth, margin=600, probe=slow_probe)
    await manager.load()
    try:
        assert await manager.unauthorized(manager.generation)  # the first 401: rotate
        asked = asyncio.create_task(manager.unauthorized(manager.generation))
        await out.wait()
        await manager.refresh("manual")  # e.g. the proactive refresh, while the probe is out
        back.set()
        assert await asked  # sent again with the new token, not back to the caller
    finally:
        await store.close()
    assert sandbox.refresh_calls == 2
    assert manager.stats.unauthorized_after_refresh == 0
