"""Tests for first authorisation without copy-paste: `authorize-url` and `GET /oauth/callback`.

The callback runs in a minimal application holding just its route, over the real sandbox's
token endpoint and a real store in tmp_path; the state comes from the real `authorize-url`
command where the flow starts there. No code, state or token is ever an argument of an
`assert` (pytest would print it): leak checks go through `assert_no_leak`.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from broker.cli.main import main
from broker.config.load import load_config
from broker.config.model import Config, OAuthClientConfig, Secret
from broker.logs import configure_logging
from broker.sandbox.server import Sandbox
from broker.server.oauth_callback import (
    CALLBACK_PATH,
    STATE_TTL,
    CallbackRefused,
    check_referer,
    consent_url,
    make_callback_handler,
    new_state,
    state_hash,
)
from broker.server.proxy import CALLER
from broker.service import new_session
from broker.store.api import Store
from broker.store.opener import open_store
from broker.tokens.manager import TokenManager
from tests.cli_harness import Run, assert_user_error
from tests.conftest import ConfigFactory, assert_no_leak, log_events, seed_store

ClientFactory = Callable[..., Any]


@dataclass
class Account:
    config: Config
    store: Store
    manager: TokenManager


@dataclass
class Harness:
    """The callback route in a running app, with each account's store and manager."""

    client: TestClient[Any, Any]
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    accounts: dict[str, Account]
    sandbox: Sandbox
    referer: str

    @property
    def default(self) -> Account:
        return self.accounts["default"]

    async def call(
        self, *, accept: str | None = None, **params: str | None
    ) -> tuple[int, dict[str, str], str]:
        query = {k: v for k, v in params.items() if v is not None}
        headers = {"Accept": accept} if accept else {}
        async with self.client.get(CALLBACK_PATH, params=query, headers=headers) as response:
            return response.status, dict(response.headers), await response.text()

    async def issue_state(self, account: str = "default", *, age: float = 0.0) -> str:
        state = new_state()
        await self.default.store.put_oauth_state(state_hash(state), account, time.time() - age)
        return state


@asynccontextmanager
async def serving(
    configs: dict[str, Config], sandbox: Sandbox, aiohttp_client: ClientFactory
) -> AsyncIterator[Harness]:
    """Serve only the callback route, for these accounts, as `serve` would: no access log."""
    async with AsyncExitStack() as stack:
        session = await stack.enter_async_context(new_session())
        accounts: dict[str, Account] = {}
        for name, config in configs.items():
            store = await stack.enter_async_context(open_store(config))
            manager = TokenManager(store, None, margin=config.margin_seconds)
            await manager.load()
            accounts[name] = Account(config, store, manager)

        def resolve(name: str) -> tuple[Config, TokenManager]:
            return accounts[name].config, accounts[name].manager  # KeyError: not served

        app = web.Application()
        handler = make_callback_handler(
            resolve, session, refresh_timeout=5.0, states=next(iter(accounts.values())).store
        )
        # No HEAD: a HEAD request would spend a state as a GET does.
        app.router.add_get(CALLBACK_PATH, handler, allow_head=False)
        server = TestServer(app)
        # The access log would print the query (code and state); `serve` runs without one.
        await server.start_server(access_log=None)
        client = await aiohttp_client(server)
        base_url = str(next(iter(configs.values())).base_url)
        yield Harness(client, handler, accounts, sandbox, str(urlsplit(base_url).hostname))


@pytest.fixture
async def harness(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: ClientFactory
) -> AsyncIterator[Harness]:
    async with serving({"default": make_config()}, sandbox, aiohttp_client) as h:
        yield h


@pytest.fixture
def cli_env(clean_env: None, monkeypatch: pytest.MonkeyPatch, broker_env: dict[str, str]) -> None:
    """Point the in-process CLI at the sandbox and the test's store (after `clean_env`)."""
    for name, value in broker_env.items():
        monkeypatch.setenv(name, value)


async def authorize_url(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    """Run `amo-broker authorize-url` in a thread: it runs its own event loop."""
    code = await asyncio.to_thread(main, ["authorize-url", *argv])
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def store_bytes(db_path: Path) -> bytes:
    """Everything SQLite wrote for the store: the file and its write-ahead log."""
    files = (db_path, db_path.with_name(db_path.name + "-wal"))
    return b"".join(f.read_bytes() for f in files if f.exists())


def state_of(url: str) -> str:
    return parse_qs(urlsplit(url.strip()).query)["state"][0]


async def assert_nothing_stored(h: Harness, code_calls: int = 0) -> None:
    __tracebackhide__ = True
    assert await h.default.store.info() is None
    assert h.default.manager.state == "no_tokens"
    assert h.sandbox.code_calls == code_calls


# -- the pure parts ---------------------------------------------------------------------------


def test_a_state_is_random_and_only_its_hash_is_kept() -> None:
    """new_state gives 43 urlsafe characters (32 bytes), never twice; its hash is SHA-256 hex."""
    states = {new_state() for _ in range(100)}
    assert len(states) == 100
    state = states.pop()
    assert len(state) == 43 and state.replace("-", "").replace("_", "").isalnum()
    digest = state_hash(state)
    assert len(digest) == 64 and int(digest, 16) >= 0 and state not in digest


@pytest.mark.parametrize(
    ("base_url", "page"),
    [
        ("https://shop.amocrm.ru", "https://www.amocrm.ru/oauth"),
        ("https://shop.kommo.com", "https://www.kommo.com/oauth"),
        ("https://SHOP.Kommo.com", "https://www.kommo.com/oauth"),
        ("https://shop.notkommo.com", "https://www.amocrm.ru/oauth"),
        ("http://127.0.0.1:8080", "https://www.amocrm.ru/oauth"),
    ],
)
def test_the_consent_url_names_the_client_and_the_state(base_url: str, page: str) -> None:
    """The consent page is Kommo's for *.kommo.com, amoCRM's otherwise, with client_id and state."""
    client = OAuthClientConfig(base_url, "client-1", Secret("x"), "https://b/oauth/callback")
    url = consent_url(client, "s" * 43)
    assert url.split("?")[0] == page
    assert parse_qs(urlsplit(url).query) == {
        "client_id": ["client-1"],
        "state": ["s" * 43],
        "mode": ["post_message"],
    }


def test_a_referer_matching_the_host_in_any_case_passes() -> None:
    """amoCRM's bare `referer` host passes when it is the base URL's host, whatever its case."""
    check_referer("shop.amocrm.ru", "https://shop.amocrm.ru")
    check_referer("Shop.AmoCRM.ru", "https://shop.amocrm.ru")
    check_referer("127.0.0.1", "http://127.0.0.1:8080")


@pytest.mark.parametrize(
    "referer",
    [
        None,
        "",
        "other.amocrm.ru",
        "shop.amocrm.ru.evil.com",
        "evil-shop.amocrm.ru",
        "https://shop.amocrm.ru",
        "shop.amocrm.ru:443",
        "shop.amocrm.ru.",
        "shop.amocrm.ru/",
        "user@shop.amocrm.ru",
        " shop.amocrm.ru",
        "amocrm.ru",
    ],
)
def test_any_other_referer_is_refused(referer: str | None) -> None:
    """Only the exact host passes: no scheme, port, path, userinfo, suffix or parent domain."""
    with pytest.raises(CallbackRefused) as caught:
        check_referer(referer, "https://shop.amocrm.ru")
    assert caught.value.http_status == 403


# -- the callback -------------------------------------------------------------------------------


@pytest.mark.usefixtures("cli_env")
async def test_authorize_url_then_the_callback_authorises_the_account(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    aiohttp_client: ClientFactory,
    capsys: pytest.CaptureFixture[str],
    log_stream: io.StringIO,
) -> None:
    """The flow end to end: the state authorize-url stored opens the callback, the pair is used."""
    started = await authorize_url(capsys)
    assert started.code == 0
    state = state_of(started.out)
    configure_logging("json", "info", stream=log_stream)  # the command set up its own
    async with serving({"default": make_config()}, sandbox, aiohttp_client) as h:
        code = sandbox.issue_code()
        status, headers, body = await h.call(code=code, state=state, referer=h.referer)
        assert status == 200
        assert "default" in body and "generation 1" in body
        assert headers["Content-Type"].startswith("text/html")
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert headers["Cache-Control"] == "no-store"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert await h.default.store.generation() == 1
        assert h.default.manager.state == "ok" and h.default.manager.generation == 1
        assert sandbox.code_calls == 1
        assert_no_leak(body, code, state)
    [event] = log_events(log_stream, "authorized")
    pair = h.default.manager.pair
    assert pair is not None
    assert event["account"] == "default" and event["generation"] == 1
    assert event["refresh_fingerprint"] == pair.refresh_fingerprint
    assert_no_leak(log_stream.getvalue(), code, state)


async def test_the_callback_answers_json_when_asked(harness: Harness) -> None:
    """With `Accept: application/json` the answer is a JSON document with fingerprints only."""
    state, code = await harness.issue_state(), harness.sandbox.issue_code()
    status, headers, body = await harness.call(
        code=code, state=state, referer=harness.referer, accept="application/json"
    )
    assert status == 200 and headers["Cache-Control"] == "no-store"
    pair = harness.default.manager.pair
    assert pair is not None
    assert json.loads(body) == {
        "authorized": True,
        "account": "default",
        "generation": 1,
        "refresh_token_fingerprint": pair.refresh_fingerprint,
    }
    assert_no_leak(body, code, state, pair.access_token, pair.refresh_token)


async def test_the_callback_ends_reauth_required(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: ClientFactory
) -> None:
    """An account stuck in reauth_required is in state ok, on the new pair, right after."""
    config = make_config()
    await seed_store(config, sandbox)
    async with open_store(config) as store:
        await store.set_state("reauth_required", "amoCRM refused the grant", 1)
    async with serving({"default": config}, sandbox, aiohttp_client) as h:
        assert h.default.manager.state == "reauth_required"
        state = await h.issue_state()
        status, _, _ = await h.call(code=sandbox.issue_code(), state=state, referer=h.referer)
        assert status == 200
        assert h.default.manager.state == "ok" and h.default.manager.generation == 2
        assert await h.default.store.state() is None


async def test_a_state_works_once(harness: Harness) -> None:
    """A second callback with the same state is refused, even with a fresh code."""
    state = await harness.issue_state()
    first, _, _ = await harness.call(
        code=harness.sandbox.issue_code(), state=state, referer=harness.referer
    )
    assert first == 200
    code = harness.sandbox.issue_code()
    status, _, body = await harness.call(code=code, state=state, referer=harness.referer)
    assert status == 400 and "already used" in body
    assert await harness.default.store.generation() == 1
    assert harness.sandbox.code_calls == 1
    assert_no_leak(body, code, state)


async def test_an_expired_state_is_refused(harness: Harness) -> None:
    """A state older than 10 minutes opens nothing, and nothing goes to amoCRM."""
    state = await harness.issue_state(age=STATE_TTL + 1)
    code = harness.sandbox.issue_code()
    status, _, body = await harness.call(code=code, state=state, referer=harness.referer)
    assert status == 400 and "expired" in body
    await assert_nothing_stored(harness)
    assert_no_leak(body, code, state)


@pytest.mark.parametrize("state", [None, "", "x", "a" * 500, "not issued by this broker!"])
async def test_a_missing_or_unknown_state_is_refused(harness: Harness, state: str | None) -> None:
    """Without a state this broker issued, the callback stores nothing and calls no one."""
    code = harness.sandbox.issue_code()
    status, _, body = await harness.call(code=code, state=state, referer=harness.referer)
    assert status == 400
    await assert_nothing_stored(harness)
    assert_no_leak(body, code, *([state] if state and len(state) > 8 else []))


async def test_an_unissued_well_formed_state_is_refused(harness: Harness) -> None:
    """A state of the right shape that was never issued is refused like an expired one."""
    state, code = new_state(), harness.sandbox.issue_code()
    status, _, body = await harness.call(
        code=code, state=state, referer=harness.referer, accept="application/json"
    )
    assert status == 400 and json.loads(body)["error"] == "unknown_state"
    await assert_nothing_stored(harness)
    assert_no_leak(body, code, state)


@pytest.mark.parametrize("referer", [None, "evil.amocrm.ru", "127.0.0.1.evil.com"])
async def test_a_wrong_referer_is_refused_and_spends_the_state(
    harness: Harness, referer: str | None
) -> None:
    """A code for another host is never exchanged; the state is spent, so no retry with it."""
    state, code = await harness.issue_state(), harness.sandbox.issue_code()
    status, headers, body = await harness.call(code=code, state=state, referer=referer)
    assert status == 403
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    await assert_nothing_stored(harness)
    assert_no_leak(body, code, state)
    again, _, _ = await harness.call(code=code, state=state, referer=harness.referer)
    assert again == 400
    await assert_nothing_stored(harness)


@pytest.mark.parametrize(("error", "shown"), [("access_denied", True), ("<b>x</b>", False)])
async def test_a_declined_consent_is_refused(harness: Harness, error: str, shown: bool) -> None:
    """error=access_denied is 403, spends the state, and only a plain word is ever echoed."""
    state = await harness.issue_state()
    status, _, body = await harness.call(error=error, state=state, accept="application/json")
    assert status == 403
    doc = json.loads(body)
    assert doc["error"] == "access_denied" and (error in doc["message"]) is shown
    await assert_nothing_stored(harness)
    again, _, _ = await harness.call(
        code=harness.sandbox.issue_code(), state=state, referer=harness.referer
    )
    assert again == 400


async def test_a_missing_code_is_refused(harness: Harness) -> None:
    """A callback with a valid state but no code is 400 and calls no one."""
    state = await harness.issue_state()
    status, _, _ = await harness.call(state=state, referer=harness.referer)
    assert status == 400
    await assert_nothing_stored(harness)


@pytest.mark.parametrize(
    ("fail_status", "spent", "reason"),
    [
        (400, False, "code_refused"),
        (None, True, "code_refused"),
        (503, False, "token_endpoint_unavailable"),
    ],
)
async def test_a_token_endpoint_refusal_stores_nothing(
    harness: Harness, fail_status: int | None, spent: bool, reason: str
) -> None:
    """amoCRM refusing the code (or failing) is 502 with the cause; the store stays empty."""
    code = harness.sandbox.issue_code()
    if spent:  # a code already exchanged once: amoCRM says it has been revoked
        spender = await harness.issue_state()
        await harness.call(code=code, state=spender, referer=harness.referer)
    harness.sandbox.token_fail_status = fail_status
    state = await harness.issue_state()
    before = await harness.default.store.generation()
    status, headers, body = await harness.call(
        code=code, state=state, referer=harness.referer, accept="application/json"
    )
    assert status == 502 and headers["Cache-Control"] == "no-store"
    assert json.loads(body)["error"] == reason
    assert await harness.default.store.generation() == before
    assert_no_leak(body, code, state)


async def test_a_state_for_an_account_no_longer_served_is_refused(harness: Harness) -> None:
    """A state whose account is not configured any more is 400 and nothing is exchanged."""
    state = await harness.issue_state("gone")
    code = harness.sandbox.issue_code()
    status, _, body = await harness.call(code=code, state=state, referer=harness.referer)
    assert status == 400 and "gone" in body
    await assert_nothing_stored(harness)
    assert_no_leak(body, code, state)


def two_accounts(tmp_path: Path, sandbox: Sandbox, sandbox_url: str) -> Path:
    """A config file with two accounts on the sandbox: `main` (the default) and `second`."""
    tables = "".join(
        f'[[accounts]]\nname = "{name}"\ndefault = {str(name == "main").lower()}\n'
        f'base_url = "{sandbox_url}"\nclient_id = "{sandbox.client_id}"\n'
        f'client_secret = "{sandbox.client_secret}"\nredirect_uri = "{sandbox.redirect_uri}"\n\n'
        for name in ("main", "second")
    )
    path = tmp_path / "accounts.toml"
    path.write_text(f'[store]\npath = "{tmp_path / "broker.db"}"\n\n{tables}')
    path.chmod(0o600)
    return path


async def test_the_state_decides_which_account_is_authorised(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    key: str,
    sandbox: Sandbox,
    sandbox_url: str,
    aiohttp_client: ClientFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """authorize-url --account second: the pair lands in that account's row, not the default's."""
    path = two_accounts(tmp_path, sandbox, sandbox_url)
    monkeypatch.setenv("BROKER_ENCRYPTION_KEY", key)
    started = await authorize_url(capsys, "--config", str(path), "--account", "second")
    assert started.code == 0 and "'second'" in started.err
    config = load_config(path)
    configs = {"main": config, "second": config.for_account("second")}
    async with serving(configs, sandbox, aiohttp_client) as h:
        state = state_of(started.out)
        status, _, body = await h.call(code=sandbox.issue_code(), state=state, referer=h.referer)
        assert status == 200 and "second" in body
        assert await h.accounts["second"].store.generation() == 1
        assert h.accounts["second"].manager.state == "ok"
        assert await h.accounts["main"].store.info() is None
        assert h.accounts["main"].manager.state == "no_tokens"


# -- the command ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("cli_env")
async def test_authorize_url_prints_the_link_and_stores_only_the_hash(
    make_config: ConfigFactory, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stdout is the consent URL alone; the store holds the state's hash, for the account."""
    result = await authorize_url(capsys)
    assert result.code == 0
    url = result.out.strip()
    assert "\n" not in url and url.startswith("https://www.amocrm.ru/oauth?")
    assert "10 minutes" in result.err and "oauth_callback = true" in result.err
    state = state_of(url)
    assert_no_leak(store_bytes(db_path), state)
    async with open_store(make_config()) as store:
        assert await store.take_oauth_state(state_hash(state), time.time(), STATE_TTL) == "default"


@pytest.mark.usefixtures("cli_env")
async def test_authorize_url_warns_when_the_redirect_uri_is_not_the_callback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A redirect URI that is not /oauth/callback still prints the link, with a note why."""
    monkeypatch.setenv("AMOCRM_REDIRECT_URI", "https://example.com/amo")
    result = await authorize_url(capsys)
    assert result.code == 0 and "does not end in /oauth/callback" in result.err


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize(
    ("argv", "unset", "names"),
    [
        ((), "AMOCRM_CLIENT_ID", "AMOCRM_CLIENT_ID"),
        (("--account", "nope"), None, "nope"),
    ],
)
async def test_authorize_url_refuses_without_oauth_settings_or_account(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    unset: str | None,
    names: str,
) -> None:
    """A missing OAuth setting or an unknown account is one error line naming it, exit 2."""
    if unset:
        monkeypatch.delenv(unset)
    result = await authorize_url(capsys, *argv)
    assert names in assert_user_error(result)
    assert result.out == ""


def from_peer(peer: str, query: dict[str, str]) -> web.Request:
    """A callback request as if it came from `peer` over TCP."""
    transport = mock.Mock()
    extra = {"peername": (peer, 40000)}
    transport.get_extra_info.side_effect = lambda name, default=None: extra.get(name, default)
    return make_mocked_request("GET", f"{CALLBACK_PATH}?{urlencode(query)}", transport=transport)


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("203.0.113.9", False),
        ("10.0.0.7", False),
        ("::ffff:203.0.113.9", False),
    ],
)
async def test_only_this_host_may_call_back(harness: Harness, peer: str, local: bool) -> None:
    """A peer beyond loopback is 403 before the state is touched; a local one gets that far."""
    state = await harness.issue_state()
    response = await harness.handler(from_peer(peer, {"error": "access_denied", "state": state}))
    assert response.status == 403
    left = await harness.default.store.take_oauth_state(state_hash(state), time.time(), 600)
    # A local peer spent the state (declined consent); a stranger could not even do that.
    assert (left is None) is local


async def test_an_authenticated_caller_may_call_back_from_afar(harness: Harness) -> None:
    """With caller authentication on, a caller it let through may complete the flow remotely."""
    state, code = await harness.issue_state(), harness.sandbox.issue_code()
    request = from_peer("203.0.113.9", {"code": code, "state": state, "referer": harness.referer})
    request[CALLER] = "operator"
    response = await harness.handler(request)
    assert response.status == 200
    assert await harness.default.store.generation() == 1


async def test_a_refusal_is_logged_without_the_query(
    harness: Harness, log_stream: io.StringIO
) -> None:
    """authorize_refused names the reason and the account, never the code or the state."""
    state, code = await harness.issue_state(), harness.sandbox.issue_code()
    status, _, _ = await harness.call(code=code, state=state, referer="evil.amocrm.ru")
    assert status == 403
    [event] = log_events(log_stream, "authorize_refused")
    assert event["reason"] == "wrong_referer" and event["account"] == "default"
    assert_no_leak(log_stream.getvalue(), code, state)


async def test_the_served_broker_completes_the_flow_past_caller_auth(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    sandbox_url: str,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
) -> None:
    """With BROKER_OAUTH_CALLBACK on, `serve`'s app takes the callback from a local browser
    that has no caller secret, while every other path still demands one."""
    from broker.server.clients import ClientRegistry, add_client
    from broker.service import build_app, open_runtime

    tokens_file = tmp_path / "clients"
    add_client(tokens_file, "svc")
    config = make_config(BROKER_OAUTH_CALLBACK="true")
    async with open_runtime(config, every_account=True) as runtime:
        state = new_state()
        await runtime.store.put_oauth_state(state_hash(state), "default", time.time())
        app = build_app(runtime, config, proactive=False, clients=ClientRegistry(tokens_file))
        client = await aiohttp_client(app)
        host = urlsplit(sandbox_url).hostname
        query = urlencode({"code": sandbox.issue_code(), "state": state, "referer": host})
        page = await client.get(f"/oauth/callback?{query}")
        assert page.status == 200
        assert runtime.manager.state == "ok"
        assert runtime.manager.generation == 1
        assert (await client.get("/status")).status == 401
