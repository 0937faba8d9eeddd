"""No command loses a pair amoCRM granted, nor puts a dead one over it (issue 22, item 4).

Real `amo-broker serve` / CLI processes on one SQLite store, in front of the sandbox amoCRM.
The store fault is a trigger, created from outside, that makes every write of one account's
`tokens` row fail inside the broker's transaction, exactly as a full disk would for it
(`store_write_failed`, "write failed"); dropping it heals the store.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.pair import fingerprint
from broker.sandbox.server import Sandbox
from tests.processes.test_many_accounts import accounts_env, write_accounts
from tests.procs import Issued, Processes, get

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
