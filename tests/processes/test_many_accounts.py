"""Many accounts in one `serve` process: shared store resources, accounts joining and leaving.

Each test configures `[[accounts]]` in a TOML file, imports their pairs with one
`import --jsonl`, and reads what the process holds from outside: its threads and open files
(/proc), the connections PostgreSQL sees (pg_stat_activity), its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import psycopg
import pytest

from broker.sandbox.server import Sandbox
from tests.conftest import most_in_one_second
from tests.procs import Env, Processes, Serve, get, until

pytestmark = pytest.mark.slow

MANY = 40


def names(count: int) -> list[str]:
    return [f"acct-{i:02d}" for i in range(count)]


def write_accounts(
    path: Path,
    accounts: list[str],
    sandbox: Sandbox,
    sandbox_url: str,
    extra: dict[str, str] | None = None,
) -> None:
    """A TOML file of `[[accounts]]`, the first the default, all in front of `sandbox`;
    `extra` adds lines to an account's table."""
    tables = [
        f'[[accounts]]\nname = "{name}"\nbase_url = "{sandbox_url}"\n'
        f'client_id = "{sandbox.client_id}"\nclient_secret = "{sandbox.client_secret}"\n'
        f'redirect_uri = "{sandbox.redirect_uri}"\n'
        + ("default = true\n" if i == 0 else "")
        + (extra or {}).get(name, "")
        for i, name in enumerate(accounts)
    ]
    path.write_text("\n".join(tables), encoding="utf-8")
    path.chmod(0o600)


def accounts_env(procs: Processes, config: Path, **extra: str) -> Env:
    """The test environment without its AMOCRM_* account (refused beside [[accounts]])."""
    env = {k: v for k, v in procs.env(**extra).items() if not k.startswith("AMOCRM_")}
    return Env({**env, "BROKER_CONFIG": str(config)})


async def import_pairs(procs: Processes, env: Env, sandbox: Sandbox, accounts: list[str]) -> None:
    lines = [json.dumps({"account": name, **sandbox.issue_pair()}) for name in accounts]
    code, out, err = await procs.cli("import", "--jsonl", env=env, stdin="\n".join(lines).encode())
    assert code == 0, err
    assert json.loads(out)["imported"] == len(accounts)


async def serve_many(
    procs: Processes, sandbox: Sandbox, sandbox_url: str, count: int, **extra: str
) -> tuple[Serve, Env, Path]:
    config = procs.tmp_path / "accounts.toml"
    write_accounts(config, names(count), sandbox, sandbox_url)
    env = accounts_env(procs, config, **extra)
    await import_pairs(procs, env, sandbox, names(count))
    return await procs.start(env), env, config


def threads_and_store_files(pid: int, store: str) -> tuple[int, int]:
    """The process's threads, and its open descriptors of the store's files (db, -wal, -shm)."""
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line for line in status.splitlines() if line.startswith("Threads:"))[8:])
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / fd))
        except OSError:
            continue
    return threads, sum(1 for target in targets if target.startswith(store))


async def call_each(http: aiohttp.ClientSession, serve: Serve, accounts: list[str]) -> list[int]:
    replies = await asyncio.gather(
        *(get(http, serve, f"/a/{name}/api/v4/leads") for name in accounts)
    )
    return [reply.status for reply in replies]


async def test_forty_accounts_share_one_sqlite_connection_and_its_thread(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    sandbox_url: str,
    db_path: Path,
) -> None:
    """40 accounts, one process: one store connection (one thread, one set of store files),
    and each account calls amoCRM with its own token.

    The old broker opened a connection, and an aiosqlite thread, per account: 41 threads.
    """
    serve, _, _ = await serve_many(procs, sandbox, sandbox_url, MANY)
    threads, store_files = threads_and_store_files(serve.pid, str(db_path))
    assert threads <= 3, threads  # the loop's, the store connection's, a resolver's at most
    assert store_files <= 3, store_files  # broker.db, its -wal and -shm: once
    assert await call_each(http, serve, names(MANY)) == [200] * MANY
    assert sandbox.unauthorized_api_calls == 0
    threads, store_files = threads_and_store_files(serve.pid, str(db_path))
    assert (threads <= 4, store_files <= 3) == (True, True), (threads, store_files)
    listed = (await get(http, serve, "/status")).json()["accounts"]
    assert [(a["account"], a["state"]) for a in listed] == [(n, "ok") for n in names(MANY)]


async def test_one_accounts_calls_never_wait_uncounted_behind_anothers_connections(
    procs: Processes,
    sandbox: Sandbox,
    sandbox_url: str,
) -> None:
    """Two accounts with 40 slow calls each: all 80 reach amoCRM at once, each account within
    its own 64 connections. The old broker's session capped the process at 64: 16 calls
    waited inside aiohttp, counted by no queue, until others' answers came 2 s later."""
    serve, _, _ = await serve_many(procs, sandbox, sandbox_url, 2)
    sandbox.api_delay = 2.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as crowd:
        statuses = await asyncio.gather(
            *(call_each(crowd, serve, ["acct-00", "acct-01"]) for _ in range(40))
        )
    assert [status for pair in statuses for status in pair] == [200] * 80
    assert most_in_one_second(sandbox.arrivals) == 80


async def pg_connections(pg_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'amo-broker'"
        )
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def test_forty_accounts_on_postgresql_use_a_small_pool_and_one_listen(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    sandbox_url: str,
    pg_url: str,
) -> None:
    """40 accounts on PostgreSQL, all called at once, and each expiring (a refresh each): at
    most pool_size (4) + 1 LISTEN connections. The old broker held two per account: 80."""
    serve, _, _ = await serve_many(procs, sandbox, sandbox_url, MANY, BROKER_STORE_URL=pg_url)
    assert await call_each(http, serve, names(MANY)) == [200] * MANY
    sandbox.expire_access_tokens()
    assert await call_each(http, serve, names(MANY)) == [200] * MANY
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (MANY, 0)
    assert await pg_connections(pg_url) <= 5
    listeners = [e for e in serve.events() if e.get("event") == "store_listen_failed"]
    assert listeners == []


async def test_an_account_joins_and_another_leaves_on_sighup_and_the_rest_go_on(
    procs: Processes,
    sandbox: Sandbox,
    sandbox_url: str,
) -> None:
    """SIGHUP with acct-02 removed and acct-03 added: acct-03 is served (its proactive refresh
    too), acct-02 answers 404, and acct-00's calls on their keep-alive connection never
    notice; a configuration that does not parse changes nothing."""
    serve, env, config = await serve_many(procs, sandbox, sandbox_url, 3)
    await import_pairs(procs, env, sandbox, ["acct-03"])  # imported before it is configured
    opened: list[int] = []
    trace = aiohttp.TraceConfig()

    async def on_create(*_: object) -> None:
        opened.append(1)

    trace.on_connection_create_end.append(on_create)
    statuses: list[int] = []
    stop = asyncio.Event()
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace]
        ) as one,
        aiohttp.ClientSession() as http,
    ):

        async def keep_calling() -> None:
            while not stop.is_set():
                statuses.append((await get(one, serve, "/a/acct-00/api/v4/leads")).status)
                await asyncio.sleep(0.02)

        caller = asyncio.create_task(keep_calling())
        await until(lambda: len(statuses) >= 5, "acct-00 is being called")
        # acct-01's limits change too: that takes a restart, and the log says so.
        changed = {"acct-01": "[accounts.limits]\nrps = 5\n"}
        write_accounts(config, ["acct-00", "acct-01", "acct-03"], sandbox, sandbox_url, changed)
        serve.signal(signal.SIGHUP)
        reloaded = await serve.logged("accounts_reloaded")
        assert (reloaded["added"], reloaded["removed"]) == (["acct-03"], ["acct-02"])
        assert reloaded["restart_needed"] == ["acct-01"]
        assert (await get(http, serve, "/a/acct-03/api/v4/leads")).status == 200
        gone = await get(http, serve, "/a/acct-02/api/v4/leads")
        assert (gone.status, gone.json()["error"]) == (404, "unknown_account")

        config.write_text("[[accounts]\nname = ", encoding="utf-8")  # broken TOML
        serve.signal(signal.SIGHUP)
        failed = await serve.logged("reload_failed")
        assert "nothing changed" in failed["message"]
        assert (await get(http, serve, "/a/acct-03/api/v4/leads")).status == 200
        sandbox.expire_access_tokens()
        assert (await get(http, serve, "/a/acct-03/api/v4/leads")).status == 200
        stop.set()
        await caller
    assert set(statuses) == {200} and len(opened) == 1  # one connection throughout
    assert len(serve.named("accounts_reloaded")) == 1
    assert serve.proc.returncode is None


async def test_the_listen_connection_drops_and_comes_back_for_every_account(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    sandbox_url: str,
    pg_url: str,
) -> None:
    """The server cuts serve's one LISTEN connection: it reconnects, picks up a rotation made
    while it was away, and hears later ones at once (well inside the 5 s poll)."""
    serve, env, _ = await serve_many(procs, sandbox, sandbox_url, 20, BROKER_STORE_URL=pg_url)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
        )
        assert [row[0] for row in await cursor.fetchall()] == [True]  # exactly one listener
    await serve.logged("store_listen_failed")
    code, _, err = await procs.cli("refresh", "--account", "acct-05", env=env)  # while away
    assert code == 0, err
    await serve.logged("store_listen_restored")
    await until(lambda: _adopted(serve, "acct-05"), "acct-05's rotation is adopted")
    code, _, err = await procs.cli("refresh", "--account", "acct-11", env=env)
    assert code == 0, err
    rotated = time.monotonic()
    await until(lambda: _adopted(serve, "acct-11"), "acct-11's rotation is heard")
    assert time.monotonic() - rotated < 2.0
    assert await call_each(http, serve, ["acct-05", "acct-11"]) == [200, 200]
    assert sandbox.unauthorized_api_calls == 0  # adopted before any call met a dead token


def _adopted(serve: Serve, account: str) -> bool:
    return any(e.get("account") == account for e in serve.named("token_adopted"))
