"""The status page in a real headless browser (tests/browser.py), in each state a person meets.

Each test brings the in-process broker into a state the way production gets there, loads
`/` in chromium and reads the DOM it built: the state word, its CSS class, and the colour
the page's own stylesheet gives that class.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from broker.server.status_page import STATE_COLOURS
from tests.browser import chromium_binary, dump_dom, screenshot
from tests.conftest import Broker, assert_no_leak

SCREENSHOT = Path(__file__).parents[2] / "docs" / "status-page.png"


@pytest.fixture
def chromium() -> str:
    return chromium_binary()


async def _calls(broker: Broker, count: int) -> None:
    for _ in range(count):
        await (await broker.client.get("/api/v4/leads")).read()


async def _until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 -- the sandbox counts in plain ints: no event
            await asyncio.sleep(0.01)


async def _seen(broker: Broker, chromium: str, tmp_path: Path, state: str) -> str:
    """Load / in the browser; check the state a person sees, by word, class and colour."""
    dom = await dump_dom(chromium, tmp_path / "profile", str(broker.client.make_url("/")))
    badge = re.search(r'<span class="state state-([a-z_]+)" data-state="([a-z_]+)">([^<]*)<', dom)
    assert badge is not None, dom[:2000]
    assert badge.groups() == (state, state, state)
    assert f".state-{state}{{background:{STATE_COLOURS[state]}}}" in dom
    pair = broker.manager.pair
    if pair is not None:
        assert_no_leak(dom, pair.access_token, pair.refresh_token, broker.sandbox.client_secret)
    return dom


async def test_ok_shows_green_with_countdown_rotations_pace_and_answers(
    broker: Broker, chromium: str, tmp_path: Path
) -> None:
    """ok: green, the expiry countdown, the rotation history, pace, queue and 2xx answers."""
    await _calls(broker, 3)
    dom = await _seen(broker, chromium, tmp_path, "ok")
    assert STATE_COLOURS["ok"] == "#1a7f37"  # green
    assert re.search(r"expires in \d+[dh] \d+[hm] \(\d{4}-", dom)
    assert "imported" in dom  # the seeded pair's row in the recent rotations
    assert "<th>2xx answers</th><td>3</td>" in dom
    assert "<th>queue now</th><td>0 of 100000</td>" in dom
    path = tmp_path / "page.png"
    await screenshot(chromium, tmp_path / "profile", str(broker.client.make_url("/")), path)
    if os.environ.get("UPDATE_SCREENSHOT"):  # scripts/status-page-screenshot
        shutil.copyfile(path, SCREENSHOT)


async def test_a_refresh_in_flight_shows_blue(
    broker: Broker, chromium: str, tmp_path: Path
) -> None:
    """refreshing: blue while amoCRM holds the refresh; ok again, one generation on, after."""
    gate = asyncio.Event()
    broker.sandbox.token_gate = gate
    broker.sandbox.expire_access_tokens()
    refresh = asyncio.create_task(broker.manager.refresh("expiry"))
    await _until(lambda: broker.sandbox.token_calls == 1)
    await _seen(broker, chromium, tmp_path, "refreshing")
    assert STATE_COLOURS["refreshing"] == "#0969da"  # blue
    gate.set()
    await refresh
    dom = await _seen(broker, chromium, tmp_path, "ok")
    assert "<th>generation</th><td>2</td>" in dom


async def test_a_refused_grant_shows_reauth_required_in_red_with_the_error(
    broker: Broker, chromium: str, tmp_path: Path
) -> None:
    """reauth_required: red, with the reason a person must act on."""
    broker.sandbox.revoke_refresh_tokens()
    broker.sandbox.expire_access_tokens()
    await _calls(broker, 1)
    dom = await _seen(broker, chromium, tmp_path, "reauth_required")
    assert STATE_COLOURS["reauth_required"] == "#cf222e"  # red
    assert '<p class="error">Last error:' in dom
    assert "re-authorise" in dom
    assert "rejected" in dom  # the refused attempt in the recent rotations


async def test_a_block_by_amocrm_shows_red_with_its_end(
    broker: Broker, chromium: str, tmp_path: Path
) -> None:
    """blocked: red, with when the block ends and amoCRM's 403s among its answers."""
    broker.sandbox.blocked = True
    await _calls(broker, 3)  # block_after: three HTML 403s in a row
    dom = await _seen(broker, chromium, tmp_path, "blocked")
    assert STATE_COLOURS["blocked"] == "#cf222e"  # red
    assert "<th>4xx answers</th><td>3</td>" in dom
    assert re.search(r"<th>blocked until</th><td>\d{4}-\d\d-\d\dT", dom)


async def _break_store(broker: Broker) -> Callable[[], Awaitable[None]]:
    # The store's own connection refuses writes, as a read-only disk makes it (see
    # tests/store/test_store_faults.py); the returned coroutine heals it.
    db = broker.store._db
    await db.execute("PRAGMA query_only = ON")

    async def heal() -> None:
        await db.execute("PRAGMA query_only = OFF")

    return heal


async def test_a_store_that_refuses_the_new_pair_shows_orange(
    broker: Broker, chromium: str, tmp_path: Path
) -> None:
    """store_degraded: orange, with the warning that the pair in use is not persisted."""
    gate = asyncio.Event()  # the store breaks while amoCRM answers: the old pair is spent
    broker.sandbox.token_gate = gate
    broker.sandbox.expire_access_tokens()
    call = asyncio.create_task(_calls(broker, 1))
    await _until(lambda: broker.sandbox.token_calls == 1)
    heal = await _break_store(broker)
    gate.set()
    await call
    assert broker.manager.state == "store_degraded"
    dom = await _seen(broker, chromium, tmp_path, "store_degraded")
    assert STATE_COLOURS["store_degraded"] == "#d4700a"  # orange
    assert "not persisted" in dom
    await heal()
