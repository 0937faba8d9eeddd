"""Measure admission and pacing where they count: arrivals at the emulated amoCRM.

The broker runs as production runs it (`python -m broker serve` in its own process, with its
own runner and default limits); the sandbox amoCRM runs in this process and records when
each call arrived. Three scenarios: a flood of 1000 callers at the defaults, a jittery
upstream that throttles over 7 calls in a second, and callers who hang up while queued
(ghost POSTs). `--broker-path DIR` puts DIR first on the child's PYTHONPATH, so the same
measurement runs against another checkout of the broker (the sandbox stays this one's).

    .venv/bin/python -m bench.admission [--quick] [--out FILE] [--broker-path DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from broker.sandbox.server import Sandbox, start_sandbox
from broker.store.sealing import new_key

LEADS = "/api/v4/leads"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0  # serve drains for up to 10 s after SIGTERM
CALLERS = aiohttp.ClientTimeout(total=120)
SETTINGS = ("rps", "burst", "max_queue", "max_wait_seconds", "jitter_seconds")
Row = tuple[str, str, str]


@dataclass
class Serve:
    """One `serve` child, where it listens, its JSON log, and the sandbox behind it."""

    proc: asyncio.subprocess.Process
    url: str
    log_path: Path
    sandbox: Sandbox
    log: str = ""  # read once serve has exited, before its temp dir goes

    def events(self, name: str) -> list[dict[str, Any]]:
        """Return the logged events called `name`; lines that are not JSON are skipped."""
        found = []
        for line in self.log.splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == name:
                    found.append(doc)
        return found


def free_port() -> int:
    """Pick a free loopback port: bind port 0, read it, close."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(broker_path: str | None, **extra: str) -> dict[str, str]:
    """Build the child's whole environment, so no BROKER_* of the caller's shell leaks in."""
    env = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    paths = [p for p in (broker_path, os.environ.get("PYTHONPATH")) if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return {**env, "BROKER_LOG_FORMAT": "json", **extra}


async def run_child(env: dict[str, str], cwd: Path, *args: str, stdin: bytes = b"") -> str:
    """Run `python ARGS` to completion with `env`; return stdout, fail with stderr's tail."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), READY_TIMEOUT)
    if proc.returncode:
        raise RuntimeError(f"python {' '.join(args)} failed: {err.decode()[-800:]}")
    return out.decode()


@contextlib.asynccontextmanager
async def broker(sandbox: Sandbox, broker_path: str | None, **limits: str) -> AsyncIterator[Serve]:
    """Serve a fresh store holding a live sandbox pair, in front of `sandbox`; stop after.

    The pair goes in through the child's own `import`, so a store written by another
    checkout's schema is never handed to it.
    """
    runner, sandbox_url = await start_sandbox(sandbox)
    with tempfile.TemporaryDirectory(prefix="admission-") as tmp:
        cwd, port = Path(tmp), free_port()
        env = child_env(
            broker_path,
            AMOCRM_BASE_URL=sandbox_url,
            AMOCRM_CLIENT_ID=sandbox.client_id,
            AMOCRM_CLIENT_SECRET=sandbox.client_secret,
            AMOCRM_REDIRECT_URI=sandbox.redirect_uri,
            BROKER_DB=str(cwd / "broker.db"),
            BROKER_ENCRYPTION_KEY=new_key(),
            BROKER_PORT=str(port),
            **limits,
        )
        await run_child(
            env, cwd, "-m", "broker", "import", stdin=json.dumps(sandbox.issue_pair()).encode()
        )
        log_path = cwd / "serve.log"
        with log_path.open("wb") as log:  # the child keeps its own copy of the fd
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "broker", "serve"),
                env=env,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        serve = Serve(proc, f"http://127.0.0.1:{port}", log_path, sandbox)
        try:
            await healthy(serve)
            yield serve
        finally:
            if proc.returncode is None:
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            serve.log = log_path.read_text(errors="replace")
            await runner.cleanup()


async def healthy(serve: Serve) -> None:
    """Poll /healthz until it answers 200; fail with the log's tail if serve exits or stalls."""
    deadline = time.monotonic() + READY_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        while serve.proc.returncode is None and time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(serve.url + "/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    tail = serve.log_path.read_text(errors="replace").splitlines()[-15:]
    raise RuntimeError("serve did not become healthy:\n" + "\n".join(tail))


async def call(
    http: aiohttp.ClientSession, url: str, method: str = "GET", body: bytes | None = None
) -> tuple[str, float]:
    """Call once; return the outcome ("200", "503 queue_full", an exception) and its time."""
    started = time.monotonic()
    try:
        async with http.request(method, url + LEADS, data=body) as response:
            raw, outcome = await response.read(), str(response.status)
            if response.status >= 400:
                with contextlib.suppress(ValueError):
                    doc = json.loads(raw)
                    if isinstance(doc, dict) and "error" in doc:
                        outcome += f" {doc['error']}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome = type(exc).__name__
    return outcome, time.monotonic() - started


async def crowd(serve: Serve, n: int) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    """Send `n` GETs at once, none held back on the client side; return them and /limits."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=CALLERS) as http:
        replies = await asyncio.gather(*(call(http, serve.url) for _ in range(n)))
        async with http.get(serve.url + "/status") as response:
            limits: dict[str, Any] = (await response.json())["limits"]
    return replies, limits


def most_in_one_second(times: list[float]) -> int:
    """Count the most `times` within any window of one second, closed at both ends."""
    ordered = sorted(times)
    return max((sum(1 for t in ordered if s <= t <= s + 1.0) for s in ordered), default=0)


def outcome_rows(name: str, replies: list[tuple[str, float]]) -> list[Row]:
    """Summarise replies per outcome: how many, the median and the slowest caller's time."""
    times: dict[str, list[float]] = defaultdict(list)
    for outcome, took in replies:
        times[outcome].append(took)
    rows = [
        (name, outcome, f"{len(t)} · median {statistics.median(t):.2f} s · slowest {max(t):.2f} s")
        for outcome, t in sorted(times.items())
    ]
    everyone = statistics.median(took for _, took in replies)
    return [*rows, (name, "median caller, all outcomes", f"{everyone:.2f} s")]


def settings_row(name: str, limits: dict[str, Any]) -> Row:
    """Show the limits the broker ran with, as its /status reports them."""
    return (name, "limits (/status)", ", ".join(f"{k} {limits.get(k, '—')}" for k in SETTINGS))


async def flood(broker_path: str | None, n: int) -> list[Row]:
    """Send `n` callers at once at the defaults: who is admitted, who refused, how fast."""
    sandbox = Sandbox()
    async with broker(sandbox, broker_path, BROKER_RPS="7") as serve:
        replies, limits = await crowd(serve, n)
    name = f"1. flood, {n} GETs"
    return [
        settings_row(name, limits),
        *outcome_rows(name, replies),
        (name, "wait_seconds_max (/status)", f"{limits['wait_seconds_max']} s"),
        (name, "rejected_total (/status)", str(limits["rejected_total"])),
        (name, "calls that reached amoCRM", str(len(sandbox.arrivals))),
        (name, "most arrivals in one second", str(most_in_one_second(sandbox.arrivals))),
    ]


async def jittery(broker_path: str | None, n: int) -> list[Row]:
    """Send `n` callers through arrival jitter and fresh connections to an amoCRM that 429s."""
    sandbox = Sandbox(rate_limit_rps=7)
    sandbox.arrival_jitter = 0.1
    sandbox.fresh_connection_every = 3
    async with broker(sandbox, broker_path) as serve:
        replies, limits = await crowd(serve, n)
    arrivals = sorted(sandbox.arrivals)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    rate = f"{len(arrivals) / span:.2f}/s over {span:.1f} s" if span else "—"
    name = f"2. jittery upstream, {n} GETs"
    return [
        settings_row(name, limits),
        *outcome_rows(name, replies),
        (name, "most arrivals in one second", str(most_in_one_second(arrivals))),
        (name, "arrival rate, calls / (last - first)", rate),
        (name, "throttled by amoCRM (429)", str(sandbox.throttled_api_calls)),
    ]


async def ghosts(broker_path: str | None) -> list[Row]:
    """Send one POST that waits and five that hang up after 0.3 s; amoCRM must get only one."""
    sandbox = Sandbox()
    async with broker(sandbox, broker_path, BROKER_RPS="1", BROKER_BURST="1") as serve:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=CALLERS) as http:
            first = asyncio.ensure_future(call(http, serve.url, "POST", b"[{}]"))
            await asyncio.sleep(0.1)
            impatient = aiohttp.ClientTimeout(total=0.3)
            async with aiohttp.ClientSession(timeout=impatient) as hasty:
                await asyncio.gather(*(call(hasty, serve.url, "POST", b"[{}]") for _ in range(5)))
            waited, _ = await first
            await asyncio.sleep(7)  # at 1/s, any queued ghost would be sent in this time
    posts = [r for r in sandbox.requests if r.method == "POST"]
    name = "3. ghost POSTs, rps 1 burst 1"
    return [
        (name, "the waiting POST's answer", waited),
        (name, "POSTs amoCRM received (expected 1)", str(len(posts))),
        (name, "caller_went_away events logged", str(len(serve.events("caller_went_away")))),
    ]


async def measure(args: argparse.Namespace) -> str:
    """Run the three scenarios one after another; return the report as Markdown."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:  # as serve's cwd: no ./broker shadows the path
        probe = "import broker; print(broker.__file__)"
        where = await run_child(child_env(args.broker_path), Path(tmp), "-c", probe)
    rows = [
        *await flood(args.broker_path, 1000),
        *await jittery(args.broker_path, 60 if args.quick else 200),
        *await ghosts(args.broker_path),
    ]
    lines = [
        "## Admission at amoCRM's side (bench/admission.py)",
        "",
        f"broker: `{Path(where.strip()).parent}` run as `python -m broker serve`; "
        f"{'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f} s",
        "",
        "| scenario | figure | value |",
        "|---|---|---|",
        *(f"| {scenario} | {figure} | {value} |" for scenario, figure, value in rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse the options, measure, print the table and write it to --out if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 jittery callers, not 200")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--broker-path", help="prepend DIR to the broker child's PYTHONPATH")
    args = parser.parse_args(argv)
    if args.broker_path:  # the child runs in a temp dir: a relative path would miss
        args.broker_path = str(Path(args.broker_path).resolve())
    report = asyncio.run(measure(args))
    print(report, end="")
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
