"""Caller auth and key rotation end to end: real CLI commands and real `serve` processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from broker.sandbox.server import Sandbox
from tests.conftest import ConfigFactory, seed_store
from tests.procs import Processes

pytestmark = pytest.mark.slow


async def _status(url: str, headers: dict[str, str] | None = None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/api/v4/leads", headers=headers) as response,
    ):
        await response.read()
        return response.status


def _forget_printed_secret(tmp_path: Path) -> None:
    """Set aside `client add`'s stdout: it prints the secret by design, once, and nowhere else."""
    for printed in tmp_path.glob("*-client.out"):
        printed.unlink()


async def test_client_add_serve_remove(
    procs: Processes, sandbox: Sandbox, make_config: ConfigFactory, tmp_path: Path
) -> None:
    """`client add` lets a caller in, `client remove` shuts it out, with no restart between."""
    env = procs.env(BROKER_CLIENT_TOKENS_FILE=str(tmp_path / "clients.json"))
    code, secret, _ = await procs.cli("client", "add", "billing", env=env)
    assert code == 0
    secret = secret.strip()
    pair = await seed_store(make_config(), sandbox)
    serve = await procs.start(env)

    assert await _status(serve.url) == 401
    assert await _status(serve.url, {"X-Broker-Key": "amb_" + "x" * 43}) == 401
    assert await _status(serve.url, {"Authorization": f"Bearer {secret}"}) == 200
    assert sandbox.api_calls == 1

    code, _, _ = await procs.cli("client", "remove", "billing", env=env)
    assert code == 0
    for _ in range(60):  # the file is re-read within a second; bounded at 3 s
        if await _status(serve.url, {"X-Broker-Key": secret}) == 401:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("a removed caller's secret still works")
    upstream_before = sandbox.api_calls
    assert await _status(serve.url, {"Authorization": f"Bearer {secret}"}) == 401
    assert sandbox.api_calls == upstream_before  # refused here, never sent on
    assert await serve.terminate() == 0
    rejected = [e for e in serve.events() if e.get("event") == "client_rejected"]
    assert [e["reason"] for e in rejected][:2] == ["missing", "invalid"]
    callers = {e["client"] for e in serve.events() if e.get("event") == "request"}
    assert callers == {"billing"}
    _forget_printed_secret(tmp_path)
    procs.assert_no_leak([secret, pair.access_token, pair.refresh_token or ""])


async def test_rotate_key_then_serve_on_the_new_key(
    procs: Processes, sandbox: Sandbox, make_config: ConfigFactory, tmp_path: Path
) -> None:
    """After rotate-key the old key is refused and the new one serves and rotates tokens."""
    pair = await seed_store(make_config(), sandbox)
    new_key = tmp_path / "new.key"
    assert (await procs.cli("keygen", "--out", str(new_key)))[0] == 0

    code, out, _ = await procs.cli("rotate-key", "--new-key-file", str(new_key))
    assert code == 0
    assert json.loads(out)["rekeyed"] == 1

    stale = await procs.spawn()  # still configured with the old key
    assert await asyncio.wait_for(stale.wait(), 20) == 2
    assert "key" in stale.log_text()
    assert sandbox.requests == []  # failed closed: nothing sent anywhere

    on_new_key = procs.env(BROKER_KEY_FILE=str(new_key))
    del on_new_key["BROKER_ENCRYPTION_KEY"]
    serve = await procs.start(on_new_key)
    assert await _status(serve.url) == 200
    sandbox.expire_access_tokens()
    assert await _status(serve.url) == 200  # refreshed and stored under the new key
    assert sandbox.refresh_calls == 1
    assert await serve.terminate() == 0
    code, out, _ = await procs.cli("status", "--json", env=on_new_key)
    assert code == 0
    status = json.loads(out)
    assert (status["generation"], status["key_check"]) == (2, "ok")
    procs.assert_no_leak([pair.access_token, pair.refresh_token or ""])
