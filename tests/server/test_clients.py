"""Caller authentication: the clients file, the middleware, the bind refusal, the unix socket."""

from __future__ import annotations

import asyncio
import io
import json
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from broker.cli.main import main
from broker.errors import ConfigError
from broker.logs import configure_logging
from broker.sandbox.server import Sandbox
from broker.server import clients as clients_module
from broker.server.clients import ClientRegistry, add_client, read_clients, remove_client
from broker.service import build_app, caller_registry, open_runtime
from tests.conftest import ConfigFactory, assert_no_leak, seed_store


def test_add_stores_only_a_hash_in_an_owner_only_file(tmp_path: Path) -> None:
    """`add` returns a secret once; the file (mode 0600) holds its hash, never the secret."""
    path = tmp_path / "clients.json"
    secret = add_client(path, "billing")
    assert secret.startswith("amb_") and len(secret) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert_no_leak(path.read_text(), secret)
    assert [c.name for c in read_clients(path)] == ["billing"]


def test_names_are_unique_and_well_formed(tmp_path: Path) -> None:
    """A second secret for one name, or a name with spaces, is refused."""
    path = tmp_path / "clients.json"
    add_client(path, "billing")
    with pytest.raises(ConfigError, match="exists already"):
        add_client(path, "billing")
    with pytest.raises(ConfigError, match="client name"):
        add_client(path, "two words")


def test_remove_revokes_and_unknown_names_are_an_error(tmp_path: Path) -> None:
    """`remove` drops a caller; removing a name that is not there says so."""
    path = tmp_path / "clients.json"
    add_client(path, "a")
    add_client(path, "b")
    remove_client(path, "a")
    assert [c.name for c in read_clients(path)] == ["b"]
    with pytest.raises(ConfigError, match="no client named"):
        remove_client(path, "a")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot be read"),
        ('{"clients": {}}', "expected"),
        ('{"clients": [{"name": "x"}]}', "lacks"),
        ('{"clients": [{"name": "x", "sha256": "abc", "created_at": ""}]}', "64 hex"),
    ],
)
def test_a_bad_clients_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    """A malformed clients file is refused with a message naming the file and the fault."""
    path = tmp_path / "clients.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        ClientRegistry(path)


def test_registry_follows_changes_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret works once added and stops working once removed, without a restart."""
    monkeypatch.setattr(clients_module, "_RELOAD_EVERY", 0.0)
    path = tmp_path / "clients.json"
    first = add_client(path, "first")
    registry = ClientRegistry(path)
    second = add_client(path, "second")
    assert registry.authenticate(second) is not None
    remove_client(path, "first")
    assert registry.authenticate(first) is None
    assert registry.authenticate(None) is None
    assert registry.authenticate("amb_wrong") is None


@pytest.fixture
async def guarded(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    aiohttp_client: Callable[..., object],
    tmp_path: Path,
) -> AsyncIterator[tuple[TestClient, str, Sandbox]]:
    """A broker with caller authentication on, and one registered caller's secret."""
    path = tmp_path / "clients.json"
    secret = add_client(path, "billing")
    config = make_config(BROKER_CLIENT_TOKENS_FILE=str(path))
    await seed_store(config, sandbox)
    async with open_runtime(config) as runtime:
        app = build_app(runtime, config, proactive=False, clients=ClientRegistry(path))
        client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
        yield client, secret, sandbox


async def test_missing_or_wrong_secret_is_401_and_nothing_goes_upstream(
    guarded: tuple[TestClient, str, Sandbox],
) -> None:
    """Without a registered secret a call is 401 JSON and amoCRM sees nothing."""
    client, _, sandbox = guarded
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    missing = await client.get("/api/v4/leads")
    wrong = await client.get("/api/v4/leads", headers={"X-Broker-Key": "amb_not-a-caller-secret"})
    status = await client.get("/status")
    for response in (missing, wrong, status):
        assert response.status == 401
        assert (await response.json())["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert sandbox.requests == []
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    rejected = [e for e in events if e["event"] == "client_rejected"]
    assert [e["reason"] for e in rejected] == ["missing", "invalid", "missing"]
    assert all(e["remote"] == "127.0.0.1" for e in rejected)


async def test_registered_caller_passes_and_its_secret_stays_here(
    guarded: tuple[TestClient, str, Sandbox],
) -> None:
    """A registered secret, as Bearer or X-Broker-Key, is accepted and never forwarded."""
    client, secret, sandbox = guarded
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    by_bearer = await client.get("/api/v4/leads", headers={"Authorization": f"Bearer {secret}"})
    by_key = await client.get("/api/v4/contacts", headers={"X-Broker-Key": secret})
    assert (by_bearer.status, by_key.status) == (200, 200)
    assert len(sandbox.requests) == 2
    for recorded in sandbox.requests:
        auth = [v for n, v in recorded.headers if n.lower() == "authorization"]
        assert len(auth) == 1
        assert recorded.authorized  # the sandbox accepted it: it is our amoCRM token
        assert_no_leak(json.dumps(recorded.headers), secret)
    requests = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["client"] for e in requests if e["event"] == "request"] == ["billing", "billing"]
    assert_no_leak(stream.getvalue(), secret)


async def test_probes_stay_open_for_orchestrators(guarded: tuple[TestClient, str, Sandbox]) -> None:
    """/healthz and /readyz need no caller secret; /status does."""
    client, _, _ = guarded
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/status")).status == 401
    assert (await client.get("/healthz/../status")).status == 401


def test_serving_beyond_loopback_needs_caller_auth(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """0.0.0.0 without a clients file refuses to start, unless explicitly told it is fine."""
    with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0"):
        caller_registry(make_config(BROKER_HOST="0.0.0.0"), insecure_no_client_auth=False)
    assert caller_registry(make_config(BROKER_HOST="0.0.0.0"), insecure_no_client_auth=True) is None
    assert caller_registry(make_config(BROKER_HOST="::1"), insecure_no_client_auth=False) is None
    path = tmp_path / "clients.json"
    add_client(path, "svc")
    registry = caller_registry(
        make_config(BROKER_HOST="0.0.0.0", BROKER_CLIENT_TOKENS_FILE=str(path)),
        insecure_no_client_auth=False,
    )
    assert registry is not None


def test_serve_cli_refuses_public_bind_with_one_line(
    broker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve --host 0.0.0.0` without caller credentials exits 2 with one clear line."""
    for name, value in broker_env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amo-broker: error: refusing to listen")


def test_client_commands_manage_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`client add|list|remove` work end to end; list never shows a secret or hash."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BROKER_CLIENT_TOKENS_FILE", str(tmp_path / "clients.json"))
    assert main(["client", "add", "crm-sync"]) == 0
    secret = capsys.readouterr().out.strip()
    assert main(["client", "list"]) == 0
    listing = capsys.readouterr().out
    assert json.loads(listing)[0]["name"] == "crm-sync"
    assert "sha256" not in listing
    assert_no_leak(listing, secret)
    assert main(["client", "remove", "crm-sync"]) == 0
    assert main(["client", "remove", "crm-sync"]) == 2


async def test_unix_socket_listener_with_owner_and_group_mode(
    broker_env: dict[str, str], sandbox: Sandbox, make_config: ConfigFactory, tmp_path: Path
) -> None:
    """With BROKER_UNIX_SOCKET, serve listens there only, mode 0660, and proxies as usual."""
    await seed_store(make_config(), sandbox)
    sock = tmp_path / "broker.sock"
    sock.touch()  # a leftover that is not a socket must be refused, not deleted
    env = {**broker_env, "BROKER_UNIX_SOCKET": str(sock), "PATH": "/usr/bin:/bin"}
    refused = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(refused.communicate(), 20)
    assert refused.returncode == 2 and b"is not a socket" in err
    sock.unlink()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        for _ in range(200):  # bounded: at most 10 s
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(100):
                try:
                    async with session.get("http://broker/api/v4/leads") as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the broker never answered on its unix socket")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        assert sandbox.api_calls == 1
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
