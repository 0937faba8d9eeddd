"""The status page for people: content negotiation, escaping, strict headers, no token, auth."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from broker.sandbox.server import Sandbox
from broker.server.clients import ClientRegistry, add_client
from broker.server.status_page import prefers_html, render
from broker.service import build_app, open_runtime
from tests.conftest import Broker, ConfigFactory, assert_no_leak, seed_store

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
STRICT = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("text/*;q=0.9, application/json;q=0.5", True),
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("text/html;q=0.5, application/json", False),
        ("text/html, application/json", False),
        ("text/html;q=bogus, */*;q=0.1", False),
    ],
)
def test_only_an_accept_that_ranks_html_above_json_gets_the_page(
    accept: str | None, html: bool
) -> None:
    """/status answers HTML only when HTML outranks JSON; a tie stays JSON for scripts."""
    assert prefers_html(accept) is html


def test_every_value_is_escaped() -> None:
    """Markup in any value (account name, error, warning, rotation) reaches the page as text."""
    evil = '<script>alert("x")</script>&'
    page = render(
        {
            "version": evil,
            "accounts": [
                {
                    "account": evil,
                    "state": evil,
                    "last_error": evil,
                    "warnings": [evil],
                    "access_token_fingerprint": evil,
                    "limits": {"rps": evil},
                    "upstream": {"responses": {evil: 1}, "errors": {evil: 2}},
                    "recent_rotations": [{"at": evil, "error": evil, "new_fingerprint": evil}],
                }
            ],
        }
    )
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    assert 'class="state state-unknown"' in page  # an unknown state gets no colour of another


def test_the_page_shows_countdown_age_and_reloads_itself() -> None:
    """Expiry as a countdown, the refresh token's age, and a five-second meta refresh."""
    page = render(
        {
            "version": "1",
            "accounts": [
                {
                    "account": "main",
                    "state": "ok",
                    "seconds_until_expiry": 3 * 3600 + 120,
                    "refresh_token_obtained_at": "2026-01-01T00:00:00Z",
                }
            ],
        },
        now=1767225600 + 2 * 86400 + 3600,  # 2026-01-03T01:00:00Z
    )
    assert "expires in 3h 2m" in page
    assert "obtained 2d 1h ago" in page
    assert '<meta http-equiv="refresh" content="5">' in page


async def test_get_root_serves_the_page_with_strict_headers_and_no_token(broker: Broker) -> None:
    """GET / is HTML with CSP, nosniff and no-store, shows the state, and holds no token."""
    await (await broker.client.get("/api/v4/leads")).read()
    response = await broker.client.get("/")
    page = await response.text()
    assert response.status == 200
    assert response.content_type == "text/html"
    for name, value in STRICT.items():
        assert response.headers[name] == value
    assert 'data-state="ok"' in page
    assert "2xx answers" in page
    pair = broker.manager.pair
    assert pair is not None
    assert pair.access_fingerprint in page
    assert_no_leak(page, pair.access_token, pair.refresh_token, broker.sandbox.client_secret)
    assert broker.sandbox.api_calls == 1  # the page itself sent nothing upstream


async def test_status_answers_html_to_a_browser_and_json_to_a_script(broker: Broker) -> None:
    """/status keeps JSON for scripts and gives a browser's Accept the page."""
    as_json = await broker.client.get("/status")
    assert as_json.content_type == "application/json"
    assert (await as_json.json())["state"] == "ok"
    as_html = await broker.client.get("/status", headers={"Accept": BROWSER_ACCEPT})
    assert as_html.content_type == "text/html"
    assert as_html.headers["Content-Security-Policy"] == STRICT["Content-Security-Policy"]
    assert 'data-state="ok"' in await as_html.text()


@pytest.fixture
async def guarded(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    aiohttp_client: Callable[..., object],
    tmp_path: Path,
) -> AsyncIterator[tuple[TestClient, str]]:
    """A broker with caller authentication on, and one registered caller's secret."""
    path = tmp_path / "clients.json"
    secret = add_client(path, "ops")
    config = make_config(BROKER_CLIENT_TOKENS_FILE=str(path))
    await seed_store(config, sandbox)
    async with open_runtime(config) as runtime:
        app = build_app(runtime, config, proactive=False, clients=ClientRegistry(path))
        client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
        yield client, secret


async def test_the_page_sits_behind_caller_authentication(
    guarded: tuple[TestClient, str],
) -> None:
    """Without a caller secret / and /status (HTML) are 401; with one they show the page."""
    client, secret = guarded
    for path in ("/", "/status"):
        refused = await client.get(path, headers={"Accept": BROWSER_ACCEPT})
        assert refused.status == 401
        assert "amo-broker</h1>" not in await refused.text()
        shown = await client.get(path, headers={"Accept": BROWSER_ACCEPT, "X-Broker-Key": secret})
        assert shown.status == 200
        page = await shown.text()
        assert 'data-state="ok"' in page
        assert_no_leak(page, secret)
