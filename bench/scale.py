"""Measure what many accounts cost: one process with a thousand, three replicas on PostgreSQL.

Each scenario writes a configuration with N `[[accounts]]` (all in front of one sandbox
amoCRM, run in this process), imports N pairs in one `import --jsonl`, starts `serve` as
production does and reads, from outside: the start time (spawn to /healthz), RSS, threads
and open files (/proc), the store connections PostgreSQL sees (pg_stat_activity), and how
long /status takes. Then a refresh storm: `--storm` of the accounts were given access tokens
that fall due together, so each must be refreshed exactly once (one token-endpoint call per
account, whatever the number of replicas) and none may wait on another.

    .venv/bin/python -m bench.scale [--accounts 1000] [--storm 100] [--pg-url URL]
                                    [--no-pg] [--out FILE] [--broker-path DIR]

`--broker-path DIR` runs another checkout's broker (its package first on PYTHONPATH), so the
same measurement can be taken of an older version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.admission import child_env, free_port
from broker.sandbox.server import Sandbox, start_sandbox
from broker.store.sealing import new_key

DEFAULT_PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BENCH_DB = "amo_bench_scale"
START_TIMEOUT = 120.0
STORM_TTL = 40  # the storm's access tokens: due at half their life (the margin's cap), 20 s
STATUS_SAMPLES = 20


@dataclass
class Result:
    """One scenario's readings, per process where there are several."""

    name: str
    accounts: int
    processes: int
    start_s: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    pg_connections: int | None = None
    pg_max_connections: int | None = None
    status_ms: float = 0.0
    status_one_ms: float = 0.0
    storm: dict[str, Any] = field(default_factory=dict)
    rss_after_storm_mb: list[float] = field(default_factory=list)


def proc_reading(pid: int) -> tuple[float, int, int]:
    """RSS in MB, threads and open file descriptors of a process, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    rss_kb = int(fields["VmRSS"].split()[0])
    return rss_kb / 1024, int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))


def write_config(path: Path, names: list[str], sandbox: Sandbox, sandbox_url: str) -> None:
    tables = [
        f'[[accounts]]\nname = "{name}"\nbase_url = "{sandbox_url}"\n'
        f'client_id = "{sandbox.client_id}"\nclient_secret = "{sandbox.client_secret}"\n'
        f'redirect_uri = "{sandbox.redirect_uri}"\n' + ("default = true\n" if i == 0 else "")
        for i, name in enumerate(names)
    ]
    path.write_text("\n".join(tables))
    path.chmod(0o600)


async def run(argv: list[str], env: dict[str, str], cwd: Path, stdin: bytes) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), START_TIMEOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[1:])} failed: {err.decode()[-800:]}")
    return out.decode()


@dataclass
class Serve:
    proc: asyncio.subprocess.Process
    url: str
    started_in: float


async def start_serve(env: dict[str, str], cwd: Path, log: Path) -> Serve:
    port = free_port()
    began = time.monotonic()
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "broker", "serve"),
            env={**env, "BROKER_PORT": str(port)},
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while proc.returncode is None and time.monotonic() - began < START_TIMEOUT:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url + "/healthz") as response:
                    if response.status == 200:
                        return Serve(proc, url, time.monotonic() - began)
            await asyncio.sleep(0.02)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])  # noqa: ASYNC240
    raise RuntimeError(f"serve did not start:\n{tail}")


async def stop_serve(serve: Serve) -> None:
    if serve.proc.returncode is None:
        serve.proc.terminate()
    try:
        await asyncio.wait_for(serve.proc.wait(), 30)
    except TimeoutError:
        serve.proc.kill()
        await serve.proc.wait()


async def median_ms(http: aiohttp.ClientSession, url: str) -> float:
    took = []
    for _ in range(STATUS_SAMPLES):
        began = time.perf_counter()
        async with http.get(url) as response:
            await response.read()
            assert response.status == 200, response.status  # noqa: S101 -- a bench check
        took.append((time.perf_counter() - began) * 1000)
    return statistics.median(took)


async def pg_connections(url: str) -> tuple[int, int]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND application_name = 'amo-broker'",
            (BENCH_DB,),
        )
        row = await cursor.fetchone()
        cursor = await conn.execute("SHOW max_connections")
        limit = await cursor.fetchone()
    assert row is not None and limit is not None  # noqa: S101 -- a bench check
    return int(row[0]), int(limit[0])


@contextlib.asynccontextmanager
async def bench_database(admin_url: str) -> AsyncIterator[str]:
    """A database of the bench's own on the server, dropped afterwards."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {BENCH_DB}")
    try:
        yield urlsplit(admin_url)._replace(path="/" + BENCH_DB).geturl()
    finally:
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")


async def scenario(
    name: str,
    accounts: int,
    storm: int,
    *,
    processes: int = 1,
    store_url: str | None = None,
    broker_path: str | None,
) -> Result:
    """Start `processes` brokers over `accounts` accounts, measure, storm, measure again."""
    result = Result(name, accounts, processes)
    sandbox = Sandbox()
    runner, sandbox_url = await start_sandbox(sandbox)
    names = [f"acct-{i:04d}" for i in range(accounts)]
    stormed = set(names[:: max(1, accounts // storm)][:storm]) if storm else set()
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        cwd = Path(tmp)
        config = cwd / "broker.toml"
        write_config(config, names, sandbox, sandbox_url)
        env = child_env(
            broker_path,
            BROKER_CONFIG=str(config),
            BROKER_ENCRYPTION_KEY=new_key(),
            BROKER_LOG_LEVEL="info",
            **({"BROKER_STORE_URL": store_url} if store_url else {"BROKER_DB": str(cwd / "b.db")}),
        )
        lines = []
        storm_due = time.monotonic() + STORM_TTL / 2  # issued now: due at half their life
        for account in names:
            sandbox.access_ttl = STORM_TTL if account in stormed else 86_400
            lines.append(json.dumps({"account": account, **sandbox.issue_pair()}))
        sandbox.access_ttl = 86_400
        argv = [sys.executable, "-m", "broker", "import", "--jsonl"]
        await run(argv, env, cwd, "\n".join(lines).encode())
        issued: list[float] = []
        issue = sandbox.issue_pair

        def recording() -> dict[str, Any]:
            issued.append(time.monotonic())
            return issue()

        sandbox.issue_pair = recording  # type: ignore[method-assign]
        serves: list[Serve] = []
        try:
            for i in range(processes):
                serves.append(await start_serve(env, cwd, cwd / f"serve-{i}.log"))
            for serve in serves:
                result.start_s.append(serve.started_in)
                rss, threads, fds = proc_reading(serve.proc.pid)
                result.rss_mb.append(rss)
                result.threads.append(threads)
                result.fds.append(fds)
            if store_url:
                result.pg_connections, result.pg_max_connections = await pg_connections(store_url)
            async with aiohttp.ClientSession() as http:
                result.status_ms = await median_ms(http, serves[0].url + "/status")
                result.status_one_ms = await median_ms(
                    http, serves[0].url + f"/status?account={names[-1]}"
                )
                calls_before = sandbox.token_calls
                # Wait for the storm, then for its refreshes, then a little more: no second.
                await asyncio.sleep(max(0.0, storm_due - time.monotonic()))
                deadline = time.monotonic() + 60
                while sandbox.token_calls - calls_before < storm and time.monotonic() < deadline:  # noqa: ASYNC110 -- a plain counter
                    await asyncio.sleep(0.1)
                await asyncio.sleep(3)
                async with http.get(serves[-1].url + "/status") as response:
                    listed = {a["account"]: a for a in (await response.json())["accounts"]}
            generations = {a: listed[a]["generation"] for a in names}
            result.storm = {
                "accounts_due": storm,
                "token_calls": sandbox.token_calls - calls_before,
                "rejected_refresh_calls": sandbox.rejected_refresh_calls,
                "refreshed_once": sum(generations[a] == 2 for a in stormed),
                "others_untouched": sum(generations[a] == 1 for a in names if a not in stormed),
                "first_to_last_s": round(max(issued) - min(issued), 3) if issued else None,
                "last_after_due_s": round(max(issued) - storm_due, 3) if issued else None,
            }
            for serve in serves:
                result.rss_after_storm_mb.append(proc_reading(serve.proc.pid)[0])
        finally:
            await asyncio.gather(*(stop_serve(s) for s in serves))
            await runner.cleanup()
    return result


def table(results: list[Result]) -> str:
    rows = [
        "| scenario | accounts | processes | start (s) | RSS (MB) | threads | fds "
        "| PostgreSQL connections | /status (ms) | /status?account= (ms) | storm: due / token "
        "calls / refreshed once / others untouched | storm: first→last, last after due (s) "
        "| RSS after storm (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        pg = (
            f"{r.pg_connections} of max {r.pg_max_connections}"
            if r.pg_connections is not None
            else "-"
        )
        s = r.storm
        rows.append(
            f"| {r.name} | {r.accounts} | {r.processes} | {_each(r.start_s, 2)} "
            f"| {_each(r.rss_mb, 0)} | {_each(r.threads, 0)} | {_each(r.fds, 0)} | {pg} "
            f"| {r.status_ms:.1f} | {r.status_one_ms:.1f} "
            f"| {s.get('accounts_due')} / {s.get('token_calls')} / {s.get('refreshed_once')} / "
            f"{s.get('others_untouched')} | {s.get('first_to_last_s')}, "
            f"{s.get('last_after_due_s')} | {_each(r.rss_after_storm_mb, 0)} |"
        )
    return "\n".join(rows)


def _each(values: list[float] | list[int], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


async def main(args: argparse.Namespace) -> int:
    results = []
    small = max(1, args.accounts // 100)
    plan: list[tuple[str, int, int, int, bool]] = [
        (f"SQLite, {small} accounts", small, 0, 1, False),
        (f"SQLite, {args.accounts} accounts", args.accounts, args.storm, 1, False),
    ]
    if not args.no_pg:
        plan += [
            (f"PostgreSQL, {args.accounts} accounts", args.accounts, args.storm, 1, True),
            (f"PostgreSQL, 3 replicas x {args.accounts}", args.accounts, args.storm, 3, True),
        ]
    for name, accounts, storm, processes, pg in plan:
        print(f"scale: {name} …", file=sys.stderr, flush=True)
        if pg:
            async with bench_database(args.pg_url) as url:
                result = await scenario(
                    name,
                    accounts,
                    storm,
                    processes=processes,
                    store_url=url,
                    broker_path=args.broker_path,
                )
        else:
            result = await scenario(name, accounts, storm, broker_path=args.broker_path)
        results.append(result)
    report = (
        f"# Scale: accounts per broker ({time.strftime('%Y-%m-%d')})\n\n"
        f"`python -m bench.scale --accounts {args.accounts} --storm {args.storm}`"
        f"{' --broker-path ' + args.broker_path if args.broker_path else ''}, on "
        f"{os.cpu_count()} cores. Start: spawn to /healthz 200. /status: median of "
        f"{STATUS_SAMPLES}. Storm: accounts whose access tokens fall due at once.\n\n"
        + table(results)
        + "\n"
    )
    print(report)
    if args.out:
        Path(args.out).write_text(report)  # noqa: ASYNC240 -- once, at the end
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--storm", type=int, default=100, help="accounts falling due at once")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL, help="a PostgreSQL server to use")
    p.add_argument("--no-pg", action="store_true", help="SQLite only")
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument("--broker-path", help="run this checkout's broker instead")
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse())))
