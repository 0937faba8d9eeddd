"""A renamed subdomain: the broker asks amoCRM where the account went, moves there, stays there.

End to end against the sandbox, whose rename moves the account to a new host (a new port of
the same sandbox: broker/sandbox/hosts.py), with the broker in process as `serve` wires it.
"""

from __future__ import annotations

import io
import json

from aiohttp import ClientSession

from broker.sandbox.jwt import sign
from broker.sandbox.server import Sandbox
from broker.service import build_app, open_runtime
from broker.tokens.upstream import (
    build_subdomain_request,
    may_have_moved,
    parse_subdomain_answer,
)
from tests.conftest import Broker, ServeLikeServer, assert_no_leak, log_events


def _token(**claims: object) -> str:
    return sign(dict(claims), b"k")


def test_only_tokens_naming_an_api_domain_can_ask() -> None:
    """Tokens from before August 2024 (no api_domain) ask nothing; newer ones ask their domain."""
    assert build_subdomain_request("https://old.amocrm.ru", _token(exp=1), "r") is None
    assert build_subdomain_request("https://a.ru", _token(api_domain="x/evil.ru"), "r") is None
    request = build_subdomain_request(
        "https://old.amocrm.ru", _token(api_domain="api-b.amocrm.ru"), "R1"
    )
    assert request is not None
    assert request.url == "https://api-b.amocrm.ru/oauth2/account/current/subdomain"
    assert request.headers["X-Refresh-Token"] == "R1"
    assert "R1" not in repr(request)


def test_an_answer_moves_only_within_the_same_parent_domain() -> None:
    """A new host under the same parent domain is taken; the same, a foreign or a bad one is not."""
    old = "https://old.amocrm.ru"

    def answer(domain: object, status: int = 200) -> str | None:
        return parse_subdomain_answer(status, json.dumps({"domain": domain}).encode(), old)

    assert answer("new.amocrm.ru") == "https://new.amocrm.ru"
    assert answer("old.amocrm.ru") is None
    assert answer("new.evil.example") is None
    assert answer("new.amocrm.ru/x") is None
    assert answer(7) is None
    assert answer("new.amocrm.ru", status=401) is None
    assert parse_subdomain_answer(200, b"not json", old) is None


def test_only_404_and_401_send_the_broker_looking() -> None:
    """A 400 (refused grant at the right host) or a 5xx is no sign of a move."""
    assert [s for s in (200, 400, 401, 403, 404, 500) if may_have_moved(s)] == [401, 404]


async def test_sandbox_rename_retires_the_old_host(sandbox: Sandbox, sandbox_url: str) -> None:
    """After a rename the old host answers 404 and 401, and the API domain names the new one."""
    pair = sandbox.issue_pair()
    new_url = await sandbox.hosts.rename()
    async with ClientSession() as http:
        grant = {"grant_type": "refresh_token", "refresh_token": pair["refresh_token"]}
        async with http.post(sandbox_url + "/oauth2/access_token", json=grant) as answer:
            assert answer.status == 404
        auth = {"Authorization": "Bearer " + pair["access_token"]}
        async with http.get(sandbox_url + "/api/v4/account", headers=auth) as answer:
            assert answer.status == 401
        async with http.get(new_url + "/api/v4/account", headers=auth) as answer:
            assert answer.status == 200
        ask = f"http://{sandbox.hosts.api_domain}/oauth2/account/current/subdomain"
        async with http.get(ask, headers={"X-Refresh-Token": pair["refresh_token"]}) as answer:
            assert answer.status == 200
            assert (await answer.json())["domain"] == new_url.removeprefix("http://")
        async with http.get(ask, headers={"X-Refresh-Token": "def50200nope"}) as answer:
            assert answer.status == 401


async def test_a_call_after_a_rename_finds_the_new_host(
    broker: Broker, log_stream: io.StringIO, aiohttp_client: object
) -> None:
    """A 401 at the old host leads to the new one: the call succeeds, the host is stored,
    /status shows it, a restart uses it, and reauth_required is never declared."""
    new_url = await broker.sandbox.hosts.rename()
    answer = await broker.client.get("/api/v4/leads")
    assert answer.status == 200
    assert broker.manager.state == "ok"
    stored = await broker.store.account_host()
    assert stored is not None and stored.base_url == new_url
    moved = log_events(log_stream, "subdomain_changed")
    assert [(e["old_host"], e["new_host"]) for e in moved] == [
        (broker.sandbox.hosts.retired[0], new_url.removeprefix("http://"))
    ]
    status = await (await broker.client.get("/status")).json()
    assert status["base_url_in_use"] == new_url
    assert status["base_url_since"] is not None
    assert log_events(log_stream, "reauth_required") == []
    pair = broker.manager.pair
    assert pair is not None
    assert_no_leak(log_stream.getvalue(), pair.access_token, pair.refresh_token)

    calls_before = broker.sandbox.hosts.retired_host_calls
    async with open_runtime(broker.config) as runtime:
        assert runtime.manager.upstream is not None
        assert runtime.manager.upstream.base_url == new_url
        app = build_app(runtime, broker.config, proactive=False)
        client = await aiohttp_client(ServeLikeServer(app))  # type: ignore[operator]
        assert (await client.get("/api/v4/contacts")).status == 200
    assert broker.sandbox.hosts.retired_host_calls == calls_before
    assert len(log_events(log_stream, "subdomain_changed")) == 1
    assert len(log_events(log_stream, "base_url_from_store")) == 1


async def test_a_refresh_after_a_rename_finds_the_new_host(
    broker: Broker, log_stream: io.StringIO
) -> None:
    """The proactive refresh meets 404 at the old host, asks, and rotates at the new one."""
    new_url = await broker.sandbox.hosts.rename()
    generation = broker.manager.generation
    await broker.manager.refresh("expiry")
    assert broker.manager.generation == generation + 1
    assert broker.manager.upstream is not None
    assert broker.manager.upstream.base_url == new_url
    assert broker.sandbox.hosts.subdomain_lookups == 1
    assert len(log_events(log_stream, "subdomain_changed")) == 1
    assert (await broker.client.get("/api/v4/leads")).status == 200


async def test_a_refused_grant_at_the_right_host_stays_refused(
    broker: Broker, log_stream: io.StringIO
) -> None:
    """A revoked refresh token is no move: the lookup changes nothing, reauth_required follows."""
    broker.sandbox.revoke_refresh_tokens()
    broker.sandbox.expire_access_tokens()
    assert (await broker.client.get("/api/v4/leads")).status == 503
    assert broker.manager.state == "reauth_required"
    assert log_events(log_stream, "subdomain_changed") == []
    assert await broker.store.account_host() is None


async def test_another_process_takes_the_stored_host_without_asking(
    broker: Broker, log_stream: io.StringIO
) -> None:
    """A second process sharing the store adopts the stored host with the pair it adopts:
    amoCRM is asked once, and subdomain_changed is logged once, by the first."""
    async with open_runtime(broker.config) as other:
        new_url = await broker.sandbox.hosts.rename()
        await broker.manager.refresh("expiry")
        await other.manager.refresh("expiry")
        assert other.manager.upstream is not None
        assert other.manager.upstream.base_url == new_url
        assert other.manager.state == "ok"
    assert broker.sandbox.hosts.subdomain_lookups == 1
    assert len(log_events(log_stream, "subdomain_changed")) == 1
