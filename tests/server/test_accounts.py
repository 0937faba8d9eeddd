"""Many accounts in one broker: routing, isolation of their tokens, and long-lived tokens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from broker.config.load import ConfigError, load_config
from broker.config.model import Config
from broker.pair import TokenPair, fingerprint
from broker.sandbox.server import Sandbox, start_sandbox
from broker.server.routing import ACCOUNTS
from broker.service import build_app, open_runtime
from broker.store.opener import open_store
from broker.tokens.long_lived import WARN_DAYS, expiry_warning
from tests.conftest import Broker, assert_no_leak, pair_from_sandbox, seed_store

AiohttpClient = Callable[..., object]

TWO_ACCOUNTS = """
[[accounts]]
name = "main"
default = true
base_url = "{main}"
client_id = "sandbox-client-id"
client_secret = "sandbox-client-secret"
redirect_uri = "https://example.com/oauth/callback"

[[accounts]]
name = "agency-client"
base_url = "{other}"
client_id = "sandbox-client-id"
client_secret = "sandbox-client-secret"
redirect_uri = "https://example.com/oauth/callback"
[accounts.limits]
rps = 3
burst = 2
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture
def env(db_path: Path, key: str) -> dict[str, str]:
    """The environment without any AMOCRM_* variable (they would be ambiguous here)."""
    return {"BROKER_DB": str(db_path), "BROKER_ENCRYPTION_KEY": key, "BROKER_RPS": "1000"}


@pytest.fixture
async def other_sandbox() -> AsyncIterator[tuple[Sandbox, str]]:
    """A second emulated amoCRM account on its own port."""
    sandbox = Sandbox()
    runner, url = await start_sandbox(sandbox)
    yield sandbox, url
    await runner.cleanup()


@asynccontextmanager
async def serving(config: Config, aiohttp_client: AiohttpClient) -> AsyncIterator[Broker]:
    async with open_runtime(config, every_account=True) as runtime:
        app = build_app(runtime, config, proactive=False)
        client = await aiohttp_client(app)  # type: ignore[operator]
        yield Broker(client, runtime.manager, runtime.store, Sandbox(), config)


async def seed(config: Config, sandbox: Sandbox) -> TokenPair:
    """Store a live sandbox pair for the config's account, on whichever backend it names."""
    pair = pair_from_sandbox(sandbox)
    async with open_store(config) as store:
        await store.store_pair(pair, reason="import", outcome="imported")
    return pair


async def test_calls_reach_the_chosen_account_with_its_own_token(
    tmp_path: Path,
    env: dict[str, str],
    backend: str,
    request: pytest.FixtureRequest,
    sandbox: Sandbox,
    sandbox_url: str,
    other_sandbox: tuple[Sandbox, str],
    aiohttp_client: AiohttpClient,
) -> None:
    """Prefix, header and default route to their accounts; no token ever crosses over.

    On both stores: the accounts share one SQLite file, or one PostgreSQL database.
    """
    other, other_url = other_sandbox
    if backend == "postgres":
        env = {**env, "BROKER_STORE_URL": request.getfixturevalue("pg_url")}
    path = write_config(tmp_path, TWO_ACCOUNTS.format(main=sandbox_url, other=other_url))
    config = load_config(path, environ=env)
    main_pair = await seed(config, sandbox)
    other_pair = await seed(config.for_account("agency-client"), other)
    async with serving(config, aiohttp_client) as broker:
        client = broker.client
        assert (await client.get("/api/v4/leads")).status == 200
        assert (await client.get("/a/agency-client/api/v4/leads")).status == 200
        by_header = await client.get("/api/v4/contacts", headers={"X-Amo-Account": "agency-client"})
        assert by_header.status == 200
        assert (await client.get("/a/main/api/v4/account")).status == 200
        unknown = await client.get("/a/nobody/api/v4/leads")
        conflict = await client.get("/a/main/api/v4/leads", headers={"X-Amo-Account": "x"})
        status = await (await client.get("/status")).json()
        other_status = await (await client.get("/status?account=agency-client")).json()
        metrics = await (await client.get("/metrics")).text()

    assert (unknown.status, (await unknown.json())["error"]) == (404, "unknown_account")
    assert (conflict.status, (await conflict.json())["error"]) == (400, "account_conflict")
    assert [r.raw_path for r in sandbox.requests] == ["/api/v4/leads", "/api/v4/account"]
    assert [r.raw_path for r in other.requests] == ["/api/v4/leads", "/api/v4/contacts"]
    assert all(r.authorized for r in sandbox.requests + other.requests)
    seen_main = " ".join(v for r in sandbox.requests for _, v in r.headers)
    seen_other = " ".join(v for r in other.requests for _, v in r.headers)
    assert_no_leak(seen_main, other_pair.access_token)
    assert_no_leak(seen_other, main_pair.access_token)
    assert "agency-client" not in seen_other  # X-Amo-Account stays at the broker
    assert status["account"] == "main"
    assert [a["account"] for a in status["accounts"]] == ["main", "agency-client"]
    assert other_status["account"] == "agency-client"
    assert other_status["limits"]["rps"] == 3
    assert other_status["access_token_fingerprint"] == fingerprint(other_pair.access_token)
    assert 'amo_broker_requests_total{account="agency-client"' in metrics


async def test_each_account_refreshes_on_its_own(
    tmp_path: Path,
    env: dict[str, str],
    sandbox: Sandbox,
    sandbox_url: str,
    other_sandbox: tuple[Sandbox, str],
    aiohttp_client: AiohttpClient,
) -> None:
    """An expiry at one account refreshes that account only, against its own token endpoint."""
    other, other_url = other_sandbox
    path = write_config(tmp_path, TWO_ACCOUNTS.format(main=sandbox_url, other=other_url))
    config = load_config(path, environ=env)
    await seed_store(config, sandbox)
    await seed_store(config.for_account("agency-client"), other)
    async with serving(config, aiohttp_client) as broker:
        other.expire_access_tokens()
        assert (await broker.client.get("/a/agency-client/api/v4/leads")).status == 200
        assert (await broker.client.get("/api/v4/leads")).status == 200
        listed = (await (await broker.client.get("/status")).json())["accounts"]
    assert (other.refresh_calls, sandbox.refresh_calls) == (1, 0)
    assert [(a["account"], a["generation"]) for a in listed] == [
        ("main", 1),
        ("agency-client", 2),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (TWO_ACCOUNTS.replace("default = true\n", ""), "mark one account `default = true`"),
        (TWO_ACCOUNTS.replace('"agency-client"', '"main"'), "names must differ: main"),
        (TWO_ACCOUNTS.replace('name = "main"', 'name = "Main!"'), "name: expected 1-40"),
        (TWO_ACCOUNTS + "\n[amocrm]\nclient_id = 'x'\n", "either in [amocrm]"),
        (TWO_ACCOUNTS.replace("rps = 3", "rps = 0"), "agency-client limits rps"),
        (TWO_ACCOUNTS.replace("burst = 2", "bursts = 2"), "unknown setting(s): bursts"),
        (TWO_ACCOUNTS.replace('base_url = "{other}"', 'base_url = "http://x.example"'), "https"),
    ],
)
def test_bad_accounts_are_refused_by_name(
    tmp_path: Path, env: dict[str, str], text: str, message: str
) -> None:
    """Each mistake in [[accounts]] is one error naming the account and the setting."""
    path = write_config(
        tmp_path, text.format(main="http://127.0.0.1:1", other="http://127.0.0.1:2")
    )
    with pytest.raises(ConfigError) as error:
        load_config(path, environ=env)
    assert message in error.value.message


def test_amocrm_variables_beside_accounts_are_refused(tmp_path: Path, env: dict[str, str]) -> None:
    """AMOCRM_* in the environment cannot say which account they are for: an error names them."""
    text = TWO_ACCOUNTS.format(main="http://127.0.0.1:1", other="http://127.0.0.1:2")
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match="AMOCRM_REFRESH_TOKEN"):
        load_config(path, environ={**env, "AMOCRM_REFRESH_TOKEN": "def50200aaaa"})


def test_unknown_account_on_the_command_line(tmp_path: Path, env: dict[str, str]) -> None:
    """--account with a name not configured lists the names there are."""
    text = TWO_ACCOUNTS.format(main="http://127.0.0.1:1", other="http://127.0.0.1:2")
    config = load_config(write_config(tmp_path, text), environ=env)
    with pytest.raises(ConfigError, match="configured: main, agency-client"):
        config.for_account("nobody")


# -- long-lived tokens -----------------------------------------------------------------


async def test_a_long_lived_token_is_used_never_refreshed_and_a_401_stops_it(
    make_config: Callable[..., Config], sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """AMOCRM_LONG_LIVED_TOKEN is injected; amoCRM's 401 gives reauth_required, no refresh."""
    token = sandbox.issue_pair()["access_token"]
    config = make_config(AMOCRM_LONG_LIVED_TOKEN=token)
    async with serving(config, aiohttp_client) as broker:
        assert (await broker.client.get("/api/v4/leads")).status == 200
        before = await (await broker.client.get("/status")).json()
        sandbox.expire_access_tokens()
        refused = await broker.client.get("/api/v4/leads")
        body = await refused.text()
        after = await (await broker.client.get("/status")).json()
    assert before["long_lived"] is True
    assert before["refresh_token_fingerprint"] is None
    # The sandbox's tokens live a day: well inside the two weeks' warning.
    assert before["warnings"][0].startswith("the long-lived token expires in 1.0 days")
    assert refused.status == 503
    assert json.loads(body)["error"] == "reauth_required"
    assert after["state"] == "reauth_required"
    assert sandbox.token_calls == 0
    assert_no_leak(body, token)


def test_the_long_lived_warning_starts_two_weeks_ahead() -> None:
    """/status warns within WARN_DAYS of the end, and says when it has ended."""
    assert expiry_warning(WARN_DAYS * 86_400 + 60) is None
    assert "expires in 13.0 days" in (expiry_warning(13 * 86_400) or "")
    assert "has expired" in (expiry_warning(-1) or "")


def test_a_long_lived_token_file_open_to_others_is_refused(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """long_lived_token_file is a secret: refused, by name, when its group or others may read it."""
    token_file = tmp_path / "long.token"
    token_file.write_text("eyJhbGciOiJub25lIn0.eyJleHAiOjF9.x\n", encoding="ascii")
    token_file.chmod(0o640)
    path = write_config(tmp_path, '[amocrm]\nlong_lived_token_file = "long.token"\n')
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(path, environ=env)
    token_file.chmod(0o600)
    assert load_config(path, environ=env).long_lived_token is not None


def probes(sandbox: Sandbox) -> int:
    """How many times the broker asked amoCRM's /api/v4/account whether its token works."""
    return sum(r.raw_path == "/api/v4/account" for r in sandbox.requests)


async def test_one_spurious_401_does_not_stop_a_long_lived_token(
    make_config: Callable[..., Config], sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """A 401 that a probe of /api/v4/account does not confirm leaves the state ok."""
    config = make_config(AMOCRM_LONG_LIVED_TOKEN=sandbox.issue_pair()["access_token"])
    async with serving(config, aiohttp_client) as broker:
        sandbox.api_script.append(401)  # one call refused, the token itself still good
        first = await broker.client.get("/api/v4/leads")
        state = (await (await broker.client.get("/status")).json())["state"]
        after = await broker.client.get("/api/v4/leads")
        persisted = await broker.store.state()
    assert (first.status, state, after.status) == (200, "ok", 200)  # the replay went through
    assert probes(sandbox) == 1
    assert persisted is None


async def test_a_401_on_one_path_goes_back_as_is_and_stops_nothing(
    make_config: Callable[..., Config], sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """A path the token may not use answers amoCRM's 401; other paths and the state stay ok."""
    config = make_config(AMOCRM_LONG_LIVED_TOKEN=sandbox.issue_pair()["access_token"])
    sandbox.unauthorized_paths.add("/api/v4/leads")
    async with serving(config, aiohttp_client) as broker:
        refused = [(await broker.client.get("/api/v4/leads")).status for _ in range(3)]
        other = await broker.client.get("/api/v4/contacts")
        state = (await (await broker.client.get("/status")).json())["state"]
    assert refused == [401, 401, 401]
    assert (other.status, state) == (200, "ok")
    assert probes(sandbox) == 1  # a confirmed token is trusted for a while: no probe per call


async def test_a_probe_that_fails_otherwise_declares_nothing(
    make_config: Callable[..., Config], sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """A 401 whose probe meets a 5xx leaves the state ok: the probe asks again, 200 decides."""
    config = make_config(AMOCRM_LONG_LIVED_TOKEN=sandbox.issue_pair()["access_token"])
    async with serving(config, aiohttp_client) as broker:
        sandbox.api_script.extend([401, 502])  # the call, then the probe's first ask
        first = await broker.client.get("/api/v4/leads")
        sandbox.api_script.append(401)
        second = await broker.client.get("/api/v4/leads")
        state = (await (await broker.client.get("/status")).json())["state"]
    assert (first.status, second.status, state) == (200, 200, "ok")
    assert probes(sandbox) == 2  # the 502 and the 200; the second 401 trusts that 200


async def test_a_revoked_long_lived_token_is_declared_after_exactly_one_probe(
    make_config: Callable[..., Config], sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """Concurrent 401s share one probe; its 401 persists reauth_required for every replica."""
    config = make_config(AMOCRM_LONG_LIVED_TOKEN=sandbox.issue_pair()["access_token"])
    async with serving(config, aiohttp_client) as broker:
        sandbox.expire_access_tokens()
        answers = await asyncio.gather(*(broker.client.get("/api/v4/leads") for _ in range(5)))
        errors = [(await a.json())["error"] for a in answers]
        persisted = await broker.store.state()
    assert errors == ["reauth_required"] * 5
    assert probes(sandbox) == 1
    assert persisted is not None and persisted.state == "reauth_required"


async def test_a_restart_with_the_same_working_token_clears_reauth_required(
    make_config: Callable[..., Config], sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """A persisted reauth_required for a token that still works ends when the broker starts."""
    token = sandbox.issue_pair()["access_token"]
    config = make_config(AMOCRM_LONG_LIVED_TOKEN=token)
    async with serving(config, aiohttp_client) as broker:
        generation = broker.manager.generation
        await broker.store.set_state("reauth_required", "amoCRM refused it (401)", generation)
    async with serving(config, aiohttp_client) as broker:
        state = broker.manager.state
        answer = await broker.client.get("/api/v4/leads")
        persisted = await broker.store.state()
    assert (state, answer.status, persisted) == ("ok", 200, None)
    assert probes(sandbox) == 1  # the start checked the token once


async def test_a_restart_with_the_same_revoked_token_keeps_reauth_required(
    make_config: Callable[..., Config], sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """A start whose probe amoCRM also refuses keeps reauth_required: nothing is hidden."""
    config = make_config(AMOCRM_LONG_LIVED_TOKEN=sandbox.issue_pair()["access_token"])
    async with serving(config, aiohttp_client) as broker:
        sandbox.expire_access_tokens()
        assert (await broker.client.get("/api/v4/leads")).status == 503
    async with serving(config, aiohttp_client) as broker:
        state = broker.manager.state
        answer = await broker.client.get("/api/v4/leads")
    assert (state, answer.status) == ("reauth_required", 503)
    assert probes(sandbox) == 2  # one at the 401, one at the start


async def test_an_account_without_its_client_is_named_among_many(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Opening thirty accounts, one lacking its OAuth client: the error names that account."""
    tables = [
        f'[[accounts]]\nname = "a{i}"\nbase_url = "http://127.0.0.1:1"\n'
        + ('client_id = "c"\nclient_secret = "s"\nredirect_uri = "https://e.com/cb"\n' * (i != 17))
        + ("default = true\n" if i == 0 else "")
        for i in range(30)
    ]
    config = load_config(write_config(tmp_path, "\n".join(tables)), environ=env)
    with pytest.raises(ConfigError, match=r"^\[\[accounts\]\] a17: missing setting"):
        async with open_runtime(config, every_account=True):
            pass


async def test_status_and_its_page_list_many_accounts_from_memory(
    tmp_path: Path, env: dict[str, str], aiohttp_client: AiohttpClient, sandbox: Sandbox
) -> None:
    """25 accounts: /status lists each (state, generation) and the page shows each, while the
    store is read for the one account described in full only."""
    tables = [
        f'[[accounts]]\nname = "a{i:02d}"\nbase_url = "http://127.0.0.1:1"\n'
        'client_id = "c"\nclient_secret = "s"\nredirect_uri = "https://e.com/cb"\n'
        + ("default = true\n" if i == 0 else "")
        for i in range(25)
    ]
    config = load_config(write_config(tmp_path, "\n".join(tables)), environ=env)
    for i in range(25):
        await seed(config.for_account(f"a{i:02d}"), sandbox)
    async with serving(config, aiohttp_client) as broker:
        reads: list[str] = []
        for account in broker.client.app[ACCOUNTS].values():  # type: ignore[index]
            store = account.manager.store
            info = store.info

            async def counted(info: Any = info, name: str = account.name) -> Any:
                reads.append(name)
                return await info()

            store.info = counted
        doc = await (await broker.client.get("/status?account=a07")).json()
        assert doc["account"] == "a07" and "recent_rotations" in doc
        assert [(a["account"], a["generation"]) for a in doc["accounts"]] == [
            (f"a{i:02d}", 1) for i in range(25)
        ]
        page = await (await broker.client.get("/", headers={"Accept": "text/html"})).text()
        assert all(f'id="account-a{i:02d}"' in page for i in range(25))
    assert reads == ["a07"]
