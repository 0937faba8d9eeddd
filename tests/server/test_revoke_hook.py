"""amoCRM's signed "integration switched off" hook puts the account into reauth_required at once.

The broker runs as `serve` wires it (build_app over open_runtime), with caller authentication
on, against the sandbox; amoCRM's call is forged here with the sandbox's client secret.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from aiohttp.test_utils import TestClient

from broker.sandbox.crm import ACCOUNT_ID
from broker.sandbox.server import Sandbox
from broker.server.clients import ClientRegistry, add_client
from broker.server.revoke_hook import refusal, signature
from broker.service import build_app, open_runtime
from broker.tokens.manager import TokenManager
from tests.conftest import ConfigFactory, assert_no_leak, log_events, seed_store

ClientMaker = Callable[..., Awaitable[TestClient]]


def _signed(sandbox: Sandbox, account_id: object = ACCOUNT_ID, **extra: str) -> str:
    fields = {
        "account_id": str(account_id),
        "client_uuid": sandbox.client_id,
        "signature": signature(sandbox.client_id, str(account_id), sandbox.client_secret),
        **extra,
    }
    return urlencode(fields)


def test_only_a_signature_by_the_client_secret_is_accepted() -> None:
    """Missing fields, another client, a wrong key or another amoCRM account are refused."""
    good = {"account_id": "7", "client_uuid": "cid", "signature": signature("cid", "7", "sec")}
    assert refusal(good, "cid", "sec") is None
    assert refusal(good, "cid", "sec", held_account_id=7) is None
    assert refusal({**good, "signature": ""}, "cid", "sec") is not None
    assert refusal(good, "other", "sec") is not None
    assert refusal(good, "cid", "another-secret") is not None
    assert refusal({**good, "account_id": "8"}, "cid", "sec") is not None
    assert refusal(good, "cid", "sec", held_account_id=8) is not None
    upper = {**good, "signature": good["signature"].upper()}
    assert refusal(upper, "cid", "sec") is None


@dataclass
class Served:
    client: TestClient
    manager: TokenManager
    secret: str  # a registered caller's


@asynccontextmanager
async def served(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    aiohttp_client: ClientMaker,
    tmp_path: Path,
    **env: str,
) -> AsyncIterator[Served]:
    tokens_file = tmp_path / "clients"
    secret = add_client(tokens_file, "svc")
    config = make_config(**env)
    await seed_store(config, sandbox)
    async with open_runtime(config, every_account=True) as runtime:
        app = build_app(runtime, config, proactive=False, clients=ClientRegistry(tokens_file))
        yield Served(await aiohttp_client(app), runtime.manager, secret)


async def test_a_signed_call_stops_the_account_at_once(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    sandbox_url: str,
    aiohttp_client: ClientMaker,
    tmp_path: Path,
    log_stream: io.StringIO,
) -> None:
    """amoCRM's signed call passes caller auth, persists reauth_required, and calls stop."""
    async with served(
        make_config, sandbox, aiohttp_client, tmp_path, BROKER_REVOKE_HOOK="true"
    ) as s:
        answer = await s.client.get("/oauth/revoked?" + _signed(sandbox))
        assert answer.status == 200
        assert s.manager.state == "reauth_required"
        stored = await s.manager.store.state()
        assert stored is not None and stored.state == "reauth_required"
        before = sandbox.token_calls, sandbox.api_calls
        call = await s.client.get("/api/v4/leads", headers={"X-Broker-Key": s.secret})
        assert call.status == 503
        assert (await call.json())["error"] == "reauth_required"
        assert (sandbox.token_calls, sandbox.api_calls) == before
        assert len(log_events(log_stream, "integration_revoked")) == 1
        pair = s.manager.pair
        assert pair is not None
        assert_no_leak(log_stream.getvalue(), pair.access_token, pair.refresh_token)
        assert_no_leak(log_stream.getvalue(), sandbox.client_secret)


async def test_unsigned_or_missigned_calls_are_refused(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    sandbox_url: str,
    aiohttp_client: ClientMaker,
    tmp_path: Path,
) -> None:
    """No signature, a wrong one, or another amoCRM account's: 403 problem+json, nothing changes."""
    async with served(
        make_config, sandbox, aiohttp_client, tmp_path, BROKER_REVOKE_HOOK="true"
    ) as s:
        forged = _signed(sandbox).replace("signature=", "signature=0")
        for query in ("", f"account_id={ACCOUNT_ID}&client_uuid=x", forged, _signed(sandbox, 1)):
            answer = await s.client.post("/oauth/revoked?" + query)
            assert answer.status == 403
            assert answer.headers["Content-Type"] == "application/problem+json"
            assert (await answer.json())["error"] == "bad_signature"
            assert_no_leak(await answer.text(), sandbox.client_secret)
        assert s.manager.state == "ok"
        assert await s.manager.store.state() is None


async def test_the_hook_is_off_unless_configured(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    sandbox_url: str,
    aiohttp_client: ClientMaker,
    tmp_path: Path,
) -> None:
    """Without [server] revoke_hook the path is not served and caller auth guards it."""
    async with served(make_config, sandbox, aiohttp_client, tmp_path) as s:
        answer = await s.client.get("/oauth/revoked?" + _signed(sandbox))
        assert answer.status == 401
        assert s.manager.state == "ok"


async def test_the_account_path_names_the_account(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    sandbox_url: str,
    aiohttp_client: ClientMaker,
    tmp_path: Path,
) -> None:
    """/a/NAME/oauth/revoked reaches that account; an unknown name is a 404."""
    async with served(
        make_config, sandbox, aiohttp_client, tmp_path, BROKER_REVOKE_HOOK="true"
    ) as s:
        assert (await s.client.get("/a/nope/oauth/revoked?" + _signed(sandbox))).status == 404
        assert (await s.client.get("/a/default/oauth/revoked?" + _signed(sandbox))).status == 200
        assert s.manager.state == "reauth_required"
