"""No command loses a pair amoCRM granted, nor puts a dead one over it (issue 22, item 4).

Real `amo-broker serve` / CLI processes on one SQLite store, in front of the sandbox amoCRM.
The store fault is a trigger, created from outside, that makes every write of one account's
`tokens` row fail inside the broker's transaction, exactly as a full disk would for it
(`store_write_failed`, "write failed"); dropping it heals the store.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import stat
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.pair import TokenPair, fingerprint
from broker.sandbox.server import Sandbox
from broker.tokens.landing import SETTLE_SECONDS
from tests.conftest import assert_no_leak
from tests.processes.test_many_accounts import accounts_env, import_pairs, write_accounts
from tests.procs import Env, Issued, Processes, Serve, get, until


def events_of(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a command's stderr."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


pytestmark = pytest.mark.slow


def sql(db: Path, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(db, timeout=30, isolation_level=None)) as conn:
        return conn.execute(statement, params).fetchall()


def refuse_token_writes(db: Path, account: str) -> None:
    """Make the store refuse every write of `account`'s pair (as a full disk would)."""
    sql(
        db,
        "CREATE TRIGGER test_refuse BEFORE INSERT ON tokens "
        f"WHEN NEW.account = '{account}' "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full (test fault)'); END",
    )


def heal(db: Path) -> None:
    sql(db, "DROP TRIGGER IF EXISTS test_refuse")


def stored(db: Path, account: str) -> tuple[int, str]:
    """The generation and refresh token fingerprint of `account`'s row."""
    [(generation, refresh_fp)] = sql(
        db, "SELECT generation, refresh_fp FROM tokens WHERE account = ?", (account,)
    )
    return int(generation), str(refresh_fp)


async def test_an_old_jsonl_file_run_again_is_refused_and_the_live_pair_stays(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    sandbox_url: str,
    db_path: Path,
    issued: Issued,
) -> None:
    """Re-running an `import --jsonl` file after serve rotated one of its accounts is refused,
    naming the account and the spent token's fingerprint; nothing is written, and the
    account keeps working. (The old import wrote the spent token over the live pair, exit 0,
    and the account's next refresh was refused: reauth_required.)"""
    config = procs.tmp_path / "accounts.toml"
    write_accounts(config, ["acct-a", "acct-b"], sandbox, sandbox_url)
    env = accounts_env(procs, config)
    pairs = {name: sandbox.issue_pair() for name in ("acct-a", "acct-b")}
    lines = "\n".join(json.dumps({"account": n, **pair}) for n, pair in pairs.items()).encode()
    code, _, err = await procs.cli("import", "--jsonl", env=env, stdin=lines)
    assert code == 0, err
    serve = await procs.start(env)
    sandbox.expire_access_tokens()
    assert (await get(http, serve, "/a/acct-b/api/v4/leads")).status == 200  # rotated
    live = stored(db_path, "acct-b")
    assert live[0] == 2

    code, out, err = await procs.cli("import", "--jsonl", env=env, stdin=lines)
    spent = fingerprint(pairs["acct-b"]["refresh_token"])
    assert code == 4, out
    [line] = err.strip().splitlines()
    assert line.startswith("amo-broker: error: ") and "acct-b" in line and spent in line
    assert "acct-a" not in line
    assert stored(db_path, "acct-b") == live
    assert stored(db_path, "acct-a")[0] == 1  # nothing imported: not even the good line

    sandbox.expire_access_tokens()
    assert (await get(http, serve, "/a/acct-b/api/v4/leads")).status == 200
    assert sandbox.rejected_refresh_calls == 0
    procs.assert_no_leak(issued)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def gone(path: Path) -> bool:
    return not path.exists()


def rescue_path(line: str) -> Path:
    """The rescue file an error line tells to import."""
    found = re.search(r"`amo-broker import --rescued (\S+)`", line)
    assert found, line
    return Path(found.group(1))


def assert_rescue_file(path: Path, account: str, sandbox: Sandbox, procs: Processes) -> str:
    """The file is private, named by account and fingerprint, holds no token; its fingerprint."""
    assert mode(path) == 0o600
    [live] = sandbox.live_refresh_tokens
    assert path.name == f"amo-broker-rescued-{account}-{fingerprint(live)}.rescued.json"
    assert path.parent == procs.tmp_path  # beside the store file
    assert_no_leak(path.read_text(encoding="utf-8"), live)
    return fingerprint(live)


async def test_a_refresh_command_whose_write_the_store_refuses_exits_3_with_a_rescue_file(
    procs: Processes, sandbox: Sandbox, seeded: TokenPair, db_path: Path, issued: Issued
) -> None:
    """`refresh` over a store refusing the new pair retries, then seals it in a rescue file
    and exits 3 saying what to run; `import --rescued` then stores it and deletes the file.
    (The old command printed "refreshed": true, "generation": 2 and exited 0 while the store
    kept generation 1 and its spent token: the next refresh was refused.)"""
    refuse_token_writes(db_path, "default")
    code, out, err = await procs.cli("refresh")
    assert code == 3, err
    assert out == ""  # never "refreshed" over a store that has not got the pair
    line = err.strip().splitlines()[-1]
    assert line.startswith("amo-broker: error: ") and "mode 0600" in line
    path = rescue_path(line)
    new = assert_rescue_file(path, "default", sandbox, procs)
    assert [e["event"] for e in events_of(err) if e.get("level") == "error"].count(
        "pair_rescued"
    ) == 1
    assert stored(db_path, "default") == (1, str(seeded.refresh_fingerprint))
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)

    heal(db_path)
    code, out, err = await procs.cli("import", "--rescued", str(path))
    assert code == 0, err
    assert json.loads(out)["generation"] == 2
    assert stored(db_path, "default") == (2, new)
    assert gone(path)
    code, _, err = await procs.cli("refresh")
    assert code == 0, err
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (2, 0)
    procs.assert_no_leak([*issued, *sandbox.live_refresh_tokens])


async def test_serve_stopping_with_a_pair_the_store_refused_rescues_it_and_exits_3(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    db_path: Path,
    issued: Issued,
) -> None:
    """SIGTERM while the only working pair is in memory: serve retries the write, seals the
    pair in a rescue file, logs an error and exits 3; the file's import brings the account
    back. (The old serve exited 0 and the pair was gone: reauth_required at the restart.)"""
    serve = await procs.start()
    refuse_token_writes(db_path, "default")
    sandbox.expire_access_tokens()
    reply = await get(http, serve)
    assert reply.status == 200 and "store_degraded" in reply.headers["X-Broker-Warning"]

    serve.signal(signal.SIGTERM)
    async with asyncio.timeout(SETTLE_SECONDS + 20):
        code = await serve.proc.wait()
    assert code == 3
    [rescued] = serve.named("pair_rescued")
    assert rescued["level"] == "error" and rescued["account"] == "default"
    path = Path(rescued["path"])
    new = assert_rescue_file(path, "default", sandbox, procs)
    assert rescued["command"] == f"amo-broker import --rescued {path}"
    assert stored(db_path, "default")[0] == 1

    heal(db_path)
    code, _, err = await procs.cli("import", "--rescued", str(path))
    assert code == 0, err
    assert stored(db_path, "default") == (2, new) and gone(path)
    again = await procs.start()
    sandbox.expire_access_tokens()
    assert (await get(http, again)).status == 200
    assert sandbox.rejected_refresh_calls == 0
    assert await again.terminate() == 0
    procs.assert_no_leak([*issued, *sandbox.live_refresh_tokens])


async def degraded_and_removed(
    procs: Processes, http: aiohttp.ClientSession, sandbox: Sandbox, sandbox_url: str, db: Path
) -> tuple[Serve, Env, Path]:
    """Serve acct-a and acct-b; acct-b's store refuses the pair a 401 brought (store_degraded);
    then acct-b leaves on SIGHUP and answers 404 at once."""
    config = procs.tmp_path / "accounts.toml"
    write_accounts(config, ["acct-a", "acct-b"], sandbox, sandbox_url)
    # A 2 s token request makes the lease 4 x 2 + 10 = 18 s: how long acct-b keeps writing.
    env = accounts_env(procs, config, BROKER_REFRESH_TIMEOUT="2")
    await import_pairs(procs, env, sandbox, ["acct-a", "acct-b"])
    serve = await procs.start(env)
    refuse_token_writes(db, "acct-b")
    sandbox.expire_access_tokens()
    reply = await get(http, serve, "/a/acct-b/api/v4/leads")
    assert reply.status == 200 and "store_degraded" in reply.headers["X-Broker-Warning"]
    write_accounts(config, ["acct-a"], sandbox, sandbox_url)
    serve.signal(signal.SIGHUP)
    reloaded = await serve.logged("accounts_reloaded")
    assert reloaded["removed"] == ["acct-b"]
    gone = await get(http, serve, "/a/acct-b/api/v4/leads")
    assert (gone.status, gone.json()["error"]) == (404, "unknown_account")
    return serve, env, config


async def readd(serve: Serve, config: Path, sandbox: Sandbox, sandbox_url: str) -> None:
    write_accounts(config, ["acct-a", "acct-b"], sandbox, sandbox_url)
    serve.signal(signal.SIGHUP)
    await until(lambda: len(serve.named("accounts_reloaded")) == 2, "acct-b is back")
    assert serve.named("accounts_reloaded")[-1]["added"] == ["acct-b"]


async def test_an_account_removed_while_degraded_writes_its_pair_once_the_store_heals(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    sandbox_url: str,
    db_path: Path,
) -> None:
    """SIGHUP removing a store_degraded account: it answers 404 at once, and its manager goes
    on writing the granted pair, which lands when the store heals; added back, it works.
    (The old removal dropped the pair with the manager: the store kept the spent token, and
    the account re-added went to reauth_required, its last_error saying the process died.)"""
    serve, _, config = await degraded_and_removed(procs, http, sandbox, sandbox_url, db_path)
    assert stored(db_path, "acct-b")[0] == 1
    heal(db_path)
    [live] = [
        t for t in sandbox.live_refresh_tokens if fingerprint(t) != stored(db_path, "acct-a")[1]
    ]
    await until(lambda: stored(db_path, "acct-b") == (2, fingerprint(live)), "the pair lands")
    left = await serve.logged("account_left")
    assert (left["account"], left["rescued"]) == ("acct-b", None)

    await readd(serve, config, sandbox, sandbox_url)
    sandbox.expire_access_tokens()
    assert (await get(http, serve, "/a/acct-b/api/v4/leads")).status == 200
    assert sandbox.rejected_refresh_calls == 0
    assert await serve.terminate() == 0


async def test_an_account_removed_while_the_store_stays_away_rescues_its_pair(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    sandbox_url: str,
    db_path: Path,
) -> None:
    """The store refusing for longer than the removed account's lease: its pair goes to a
    rescue file (an error, `pair_rescued`) instead of being dropped; imported, and the account
    added back, it works, and serve stops with 0 once the file is imported."""
    serve, env, config = await degraded_and_removed(procs, http, sandbox, sandbox_url, db_path)
    async with asyncio.timeout(40):  # the lease's 18 s, well past `until`'s bound
        while not serve.named("pair_rescued"):  # noqa: ASYNC110 -- a log file, no event
            await asyncio.sleep(0.2)
    [rescued] = serve.named("pair_rescued")
    assert rescued["level"] == "error" and rescued["account"] == "acct-b"
    path = Path(rescued["path"])
    assert mode(path) == 0o600
    assert stored(db_path, "acct-b")[0] == 1

    heal(db_path)
    code, out, err = await procs.cli("import", "--rescued", str(path), env=env)
    assert code == 0, err
    assert json.loads(out)["generation"] == 2 and gone(path)
    await readd(serve, config, sandbox, sandbox_url)
    sandbox.expire_access_tokens()
    assert (await get(http, serve, "/a/acct-b/api/v4/leads")).status == 200
    assert sandbox.rejected_refresh_calls == 0
    assert await serve.terminate() == 0
