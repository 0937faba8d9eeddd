"""Run one library's driver against a real sandbox process and a real `amo-broker serve`.

Everything is a process of its own, as in production: the sandbox amoCRM
(`python -m broker.sandbox`), the broker (`amo-broker serve`, its store filled by the real
`exchange-code` command from a code the sandbox issued) and the driver, run by the
library's own interpreter. The broker keeps its production defaults, 7 calls a second
included, and the sandbox holds the account to amoCRM's own 7 a second (an HTML 429 past
them), so a call the broker sends past its pace shows. Each library gets a fresh stack, so
one library's blocks and tokens never meet another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from broker.config.model import LimitSettings
from broker.store.sealing import new_key
from tests.clients.installs import Library, command
from tests.procs import Processes, Serve

SANDBOX_TIMEOUT = 10.0
AMOCRM_RPS = LimitSettings().rps  # the account's real limit, the broker's default pace
DRIVER_TIMEOUT = 120.0


@dataclass
class Run:
    """What one driver reported, scenario by scenario, and what the sandbox counted."""

    outcomes: dict[str, dict[str, Any]]
    stats: dict[str, Any]
    exit_code: int
    stderr: str
    duplicates: list[str] = field(default_factory=list)

    def failure_context(self) -> str:
        """The driver's stderr tail, for an assertion message."""
        return f"driver exit {self.exit_code}; stderr tail:\n{self.stderr[-2000:]}"


async def run_library(library: Library, workdir: Path) -> Run:
    """Start the stack in `workdir`, run the driver once, stop everything."""
    async with _sandbox(workdir) as (sandbox_url, settings):
        broker_env = {
            "AMOCRM_BASE_URL": sandbox_url,
            "AMOCRM_CLIENT_ID": settings["client_id"],
            "AMOCRM_CLIENT_SECRET": settings["client_secret"],
            "AMOCRM_REDIRECT_URI": settings["redirect_uri"],
            "BROKER_DB": str(workdir / "broker.db"),
            "BROKER_ENCRYPTION_KEY": new_key(),
        }
        procs = Processes(workdir, broker_env)
        try:
            serve = await _serve_with_tokens(procs, sandbox_url)
            run = await _drive(library, serve, sandbox_url, workdir)
            run.stats = await _stats(sandbox_url)
            return run
        finally:
            await procs.close()


@contextlib.asynccontextmanager
async def _sandbox(workdir: Path) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """`python -m broker.sandbox` on a free port; yield its URL and OAuth client settings."""
    with (workdir / "sandbox.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker.sandbox",
            "--port",
            "0",
            "--rate-limit-rps",
            f"{AMOCRM_RPS:g}",
            cwd=workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(SANDBOX_TIMEOUT):
            settings = json.loads(await proc.stdout.readline())
        yield settings["url"], settings
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(SANDBOX_TIMEOUT):
            await proc.wait()


async def _serve_with_tokens(procs: Processes, sandbox_url: str) -> Serve:
    """Trade a sandbox code with the real `exchange-code`, then start `serve`."""
    async with aiohttp.ClientSession() as http, http.post(f"{sandbox_url}/_sandbox/code") as r:
        code = (await r.json())["code"]
    exit_code, _, stderr = await procs.cli("exchange-code", code)
    assert exit_code == 0, f"exchange-code failed:\n{stderr[-2000:]}"
    return await procs.start()


async def _drive(library: Library, serve: Serve, sandbox_url: str, workdir: Path) -> Run:
    argv, env = command(library)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        serve.url,
        sandbox_url,
        env=env,
        cwd=workdir,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DRIVER_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    (workdir / "driver.out").write_text(stdout, encoding="utf-8")
    (workdir / "driver.err").write_text(stderr, encoding="utf-8")
    outcomes: dict[str, dict[str, Any]] = {}
    duplicates = []
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            reported = json.loads(line)
            if isinstance(reported, dict) and "scenario" in reported:
                if reported["scenario"] in outcomes:
                    duplicates.append(reported["scenario"])
                outcomes[reported["scenario"]] = reported
    exit_code = proc.returncode if proc.returncode is not None else -1
    return Run(outcomes, {}, exit_code, stderr, duplicates)


async def _stats(sandbox_url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{sandbox_url}/_sandbox/stats") as response,
    ):
        stats: dict[str, Any] = await response.json()
        return stats
