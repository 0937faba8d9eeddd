"""Run real `amo-broker` processes from a test without blocking its event loop.

The sandbox amoCRM runs in the test's own loop, so everything here waits with asyncio: a
blocking wait would freeze the sandbox while the broker process waits for it. Each process
writes its JSON log lines to its own file, which the tests read back as events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from broker.config.model import Config
from broker.pair import TokenPair, fingerprint
from broker.sandbox.server import Sandbox
from broker.store.opener import open_store
from tests.conftest import assert_no_leak

READY_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0
CLI_TIMEOUT = 20.0
POLL = 0.05
_INHERITED = ("PATH", "HOME", "PYTHONPATH")
LEADS = "/api/v4/leads"
# `amo-broker serve` through the real CLI, with module constants set from argv[1] first (a JSON
# object of "package.module.NAME": value).
_PATCHED = (
    "import importlib, json, sys\n"
    "from broker.cli.main import main\n"
    "for name, value in json.loads(sys.argv[1]).items():\n"
    "    module, _, attr = name.rpartition('.')\n"
    "    setattr(importlib.import_module(module), attr, value)\n"
    "raise SystemExit(main(['serve']))"
)


def free_port() -> int:
    """Pick a free loopback port: bind port 0, read the port, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Env(dict[str, str]):
    """A process environment whose repr names the variables only: some values are tokens."""

    def __repr__(self) -> str:
        return f"Env({sorted(self)})"


def clean_env(broker_env: dict[str, str], **extra: str) -> Env:
    """Build a minimal environment: PATH, HOME, PYTHONPATH if set, the broker's, `extra`.

    Nothing else leaks in from the test runner (no stray AMOCRM_* or BROKER_* of the
    developer's shell), so each process sees exactly what the test wrote.
    """
    env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
    return Env({**env, **broker_env, "BROKER_LOG_FORMAT": "json", **extra})


def tail(path: Path, lines: int = 20) -> str:
    """Return the last lines of a log (already redacted by the broker) for a failure message."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def events(path: Path) -> list[dict[str, Any]]:
    """Parse a process's JSON log lines; lines that are not JSON objects are skipped."""
    parsed = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                parsed.append(doc)
    return parsed


@dataclass
class Serve:
    """One `amo-broker serve` process and where to reach it."""

    proc: asyncio.subprocess.Process
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        return events(self.log_path)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def named(self, event: str) -> list[dict[str, Any]]:
        """The logged events called `event`, oldest first."""
        return [e for e in self.events() if e.get("event") == event]

    async def logged(self, event: str) -> dict[str, Any]:
        """Wait (bounded) until the process logs `event`; return its first occurrence."""
        await until(lambda: bool(self.named(event)), f"serve logs {event!r}")
        return self.named(event)[0]

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the running process."""
        assert self.proc.returncode is None, "the process has exited already"
        self.proc.send_signal(sig)

    async def wait(self) -> int:
        """Wait (bounded) for the process to exit; return its exit code."""
        async with asyncio.timeout(EXIT_TIMEOUT):
            return await self.proc.wait()

    async def terminate(self) -> int:
        """Stop with SIGTERM, the way a service manager does; return the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    async def kill(self) -> int:
        """SIGKILL, then reap: a zombie's pid still answers kill(pid, 0), a reaped one not."""
        if self.proc.returncode is None:
            self.proc.kill()
        return await self.wait()


@dataclass
class Processes:
    """Start broker processes for one test and make sure none outlives it."""

    tmp_path: Path
    broker_env: dict[str, str] = field(repr=False)
    started: list[Serve] = field(default_factory=list)
    commands: list[asyncio.subprocess.Process] = field(default_factory=list, repr=False)
    _count: int = 0

    def env(self, **extra: str) -> Env:
        return clean_env(self.broker_env, **extra)

    def _log_path(self, name: str) -> Path:
        self._count += 1
        return self.tmp_path / f"{self._count:02d}-{name}.log"

    async def spawn(
        self,
        env: dict[str, str] | None = None,
        *,
        drain_seconds: float | None = None,
        constants: dict[str, float] | None = None,
    ) -> Serve:
        """Start `serve` on a fresh free port without waiting for it to listen.

        `drain_seconds` replaces lifecycle.DRAIN_SECONDS in the child (a module constant, not a
        setting), so a test can outlast the drain without waiting the production 10 s;
        `constants` replaces any such constants (e.g. the scheduler's POLL_SECONDS).
        """
        port = free_port()
        full = Env({**(env or self.env()), "BROKER_PORT": str(port)})
        log_path = self._log_path("serve")
        command = ["-m", "broker", "serve"]
        patched = dict(constants or {})
        if drain_seconds is not None:
            patched["broker.lifecycle.DRAIN_SECONDS"] = float(drain_seconds)
        if patched:
            command = ["-c", _PATCHED, json.dumps(patched)]
        with log_path.open("wb") as log_file:  # the child keeps its own copy of the fd
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *command,
                env=full,
                cwd=self.tmp_path,  # no ./broker.toml of the developer's is picked up
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file,
            )
        serve = Serve(proc, f"http://127.0.0.1:{port}", log_path)
        self.started.append(serve)
        return serve

    async def start(
        self,
        env: dict[str, str] | None = None,
        *,
        drain_seconds: float | None = None,
        constants: dict[str, float] | None = None,
    ) -> Serve:
        """Start `serve` and return once /healthz answers; fail with the log tail if it exits."""
        serve = await self.spawn(env, drain_seconds=drain_seconds, constants=constants)
        exited = asyncio.ensure_future(serve.proc.wait())
        ready = asyncio.ensure_future(_healthy(serve.url))
        try:
            done, _ = await asyncio.wait(
                {exited, ready}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (exited, ready):
                task.cancel()
            await asyncio.gather(exited, ready, return_exceptions=True)
        if ready in done and not ready.cancelled() and ready.exception() is None:
            return serve
        if serve.proc.returncode is None:
            await serve.kill()
            raise AssertionError(
                f"serve did not answer /healthz within {READY_TIMEOUT}s; log tail:\n"
                + tail(serve.log_path)
            )
        raise AssertionError(
            f"serve exited with {serve.proc.returncode} before answering /healthz; log tail:\n"
            + tail(serve.log_path)
        )

    async def cli(
        self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
    ) -> tuple[int, str, str]:
        """Run one `amo-broker` command (fed `stdin`); return exit code, stdout and stderr."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            *args,
            env=env or self.env(),
            cwd=self.tmp_path,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.commands.append(proc)
        try:
            async with asyncio.timeout(CLI_TIMEOUT):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise
        assert proc.returncode is not None
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        log_path = self._log_path(args[0])
        _write(log_path, stderr)
        _write(log_path.with_suffix(".out"), stdout)
        return proc.returncode, stdout, stderr

    def assert_no_leak(self, tokens: Iterable[str]) -> None:
        """Fail, naming fingerprints only, if a token is in any log or output of these processes.

        The texts are read here, not passed in: pytest prints the arguments of a failing
        assertion's calls, and a log that leaked a token must not be printed whole.
        """
        __tracebackhide__ = True
        paths = sorted([*self.tmp_path.glob("*.log"), *self.tmp_path.glob("*.out")])
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
        assert_no_leak("\n".join(texts), *tokens)

    async def close(self) -> None:
        """Kill whatever is still running (a failed test must not leave processes behind)."""
        for serve in self.started:
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await serve.kill()
        for proc in self.commands:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(EXIT_TIMEOUT):
                        await proc.wait()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until `condition` holds, checking between turns of the event loop."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            # The sandbox's counters are plain ints, with no event to wait on.
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(POLL / 5)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Issued(list[str]):
    """Tokens the sandbox issued; its repr shows fingerprints, so a failure prints none."""

    def __repr__(self) -> str:
        return f"Issued({[fingerprint(token) for token in self]})"


def is_live(sandbox: Sandbox, pair: TokenPair) -> bool:
    """Ask the sandbox about a pair's refresh token; a failed assert then shows no token."""
    return pair.refresh_token is not None and sandbox.is_refresh_token_live(pair.refresh_token)


async def get(http: aiohttp.ClientSession, serve: Serve, path: str = LEADS) -> Reply:
    async with http.get(serve.url + path) as response:
        return Reply(response.status, dict(response.headers), await response.read())


async def status_of(http: aiohttp.ClientSession, serve: Serve) -> dict[str, Any]:
    reply = await get(http, serve, "/status")
    assert reply.status == 200
    doc: dict[str, Any] = reply.json()
    return doc


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


async def _healthy(url: str) -> None:
    """Poll /healthz until it answers 200."""
    timeout = aiohttp.ClientTimeout(total=1)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.get(url + "/healthz") as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(POLL)


async def assert_stored_generation(
    config: Config, generation: int, refresh_token: str, access_token: str
) -> None:
    """The store holds exactly this pair, whole, as `generation`, and no lease."""
    async with open_store(config) as store:
        info = await store.info()
        stored = await store.load()
        leased = await store.lease() is not None
    assert info is not None
    assert stored is not None
    expected = (generation, fingerprint(refresh_token), fingerprint(access_token))
    assert (info.generation, info.refresh_fingerprint, info.access_fingerprint) == expected
    # The ciphertexts open to the same pair the plaintext fingerprints describe.
    assert (
        stored.generation,
        stored.pair.refresh_fingerprint,
        stored.pair.access_fingerprint,
    ) == expected
    assert not leased
