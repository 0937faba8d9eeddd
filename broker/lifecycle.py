"""The server's life: listen (TCP or a unix socket), take signals, drain and stop.

How `serve` ends (its signal handlers stay in place until it returns):
- SIGTERM or SIGINT: new connections are refused and idle ones closed; requests in flight get
  DRAIN_SECONDS to finish, then are cut (`requests_cut`); a token refresh in flight is waited
  for (bounded by its lease and token-endpoint timeouts): amoCRM may have spent the old
  refresh token, so its answer must reach the store. A pair the store still refuses is
  written again for SETTLE_SECONDS (broker/tokens/landing.py), then sealed in a rescue file:
  exit 3 (`pair_rescued`). The store is closed; otherwise exit 0, cut or not.
- The same signal again while stopping: cut the requests now. A refresh still finishes.
- SIGHUP: read the configuration again and add or remove the `[[accounts]]` it names
  (service.reload_accounts); every other setting is read at start only (the clients file is
  re-read whenever it changes). Serving goes on undisturbed. A removed account answers 404
  at once and lands its refresh and unsaved pair in the background (or a rescue file).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import stat
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from broker.config.model import Config
from broker.errors import ConfigError
from broker.logs import get_logger

log = get_logger()

# After SIGTERM, how long requests in flight may run before they are cut. A constant, not a
# setting (config.py has no `[server] drain_seconds`). Give the service manager's stop timeout
# (systemd TimeoutStopSec, docker's stop timeout, a pod's terminationGracePeriodSeconds) this
# plus 4 refresh timeouts plus SETTLE_SECONDS, so its SIGKILL never lands on a refresh being
# stored or a refused pair being rescued.
DRAIN_SECONDS = 10.0


def make_runner(app: web.Application) -> web.AppRunner:
    """The one runner the broker serves with (`serve`, and the tests that stand for it).

    Handler cancellation on: when a caller hangs up, its handler is cancelled, so a call
    still waiting for its turn is never sent (aiohttp's default since 3.9 is off, its test
    server's on: a test on the test server proved what `serve` did not do).
    """
    # InFlight cuts handlers at DRAIN_SECONDS; aiohttp's timeout is only the backstop for a
    # response still being written after its handler returned.
    return web.AppRunner(
        app, access_log=None, handler_cancellation=True, shutdown_timeout=DRAIN_SECONDS
    )


async def drain(runner: web.AppRunner, in_flight: InFlight, signals: Signals) -> None:
    """Refuse new connections, let requests in flight finish, cut what outlives the bound."""
    for site in list(runner.sites):
        await site.stop()  # the listening socket is closed: new connections are refused
    log.info(
        "stopping", signal=signals.received, in_flight=len(in_flight), drain_seconds=DRAIN_SECONDS
    )
    cutter = asyncio.create_task(in_flight.cut_after(DRAIN_SECONDS, signals.hurry))
    try:
        # Closes idle keep-alive connections at once, waits for busy ones, runs app cleanup.
        await runner.cleanup()
    finally:
        cutter.cancel()
        await asyncio.gather(cutter, return_exceptions=True)
    if in_flight.cut:
        log.warning(
            "requests_cut",
            count=in_flight.cut,
            drain_seconds=DRAIN_SECONDS,
            message="requests still running when the drain ended were cut: their callers saw "
            "the connection close without an answer",
        )


class InFlight:
    """The requests being handled, so that shutdown can wait for them and cut the rest."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.cut = 0

    def __len__(self) -> int:
        return len(self._tasks)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 -- aiohttp runs each request in a task
        self._tasks.add(task)
        try:
            return await handler(request)
        finally:
            self._tasks.discard(task)

    async def cut_after(self, seconds: float, hurry: asyncio.Event) -> None:
        """After `seconds`, or at once when `hurry` is set, cancel the requests still running.

        A request waiting for a token refresh stops waiting; the refresh itself is shielded
        and goes on (TokenManager.wait_idle waits for it before the store closes).
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await hurry.wait()
        for task in list(self._tasks):
            task.cancel()
            self.cut += 1


class Signals:
    """SIGTERM and SIGINT ask to stop (twice: to hurry); SIGHUP asks to reload. Handled while
    open.

    Python's default for SIGHUP, and for a signal once its handler is gone, ends the process:
    in the middle of storing a rotation, that could lose amoCRM's answer.
    """

    _STOP = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.reload = asyncio.Event()
        self.received: str | None = None

    async def stop_or_reload(self) -> bool:
        """Wait for SIGTERM or SIGINT (True) or SIGHUP (False, once per signal)."""
        waits = [asyncio.ensure_future(event.wait()) for event in (self.stop, self.reload)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self.stop.is_set():
            return True
        self.reload.clear()
        return False

    def __enter__(self) -> Signals:
        loop = asyncio.get_running_loop()
        for sig in self._STOP:
            loop.add_signal_handler(sig, self._stop_requested, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in (*self._STOP, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _stop_requested(self, name: str) -> None:
        if not self.stop.is_set():
            self.received = name
            self.stop.set()
            return
        log.warning(
            "stop_signal_repeated",
            signal=name,
            message="already stopping: requests still in flight are cut now; a token refresh "
            "in flight still finishes (only SIGKILL stops it)",
        )
        self.hurry.set()

    def _hangup(self) -> None:
        log.info("reload_requested", signal="SIGHUP")
        self.reload.set()


def raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one, as Go's runtime does at start.

    Each account may hold up to 64 connections to amoCRM; a thousand accounts with traffic
    can need more than the common soft default of 1024 descriptors, and running out would
    fail calls with EMFILE where the queue's bounds were meant to hold.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def listen(runner: web.AppRunner, config: Config) -> str:
    """Start the one listener the configuration asks for; return its address."""
    if config.unix_socket is not None:
        await _listen_unix(runner, config.unix_socket, config.unix_socket_mode)
        return f"unix:{config.unix_socket}"
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(
            f"cannot listen on {config.host}:{config.port}: {reason} "
            "(choose another with --port / BROKER_PORT)"
        ) from None
    return _listening_url(runner, config)


async def _listen_unix(runner: web.AppRunner, path: Path, mode: int) -> None:
    """Listen on a unix socket whose file mode is the access control."""
    _remove_stale_socket(path)
    # Created owner-only, then opened to `mode`: no moment where others may connect.
    previous = os.umask(0o177)
    try:
        await web.UnixSite(runner, str(path)).start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on unix socket {path} (BROKER_UNIX_SOCKET): {exc}"
        ) from None
    finally:
        os.umask(previous)
    os.chmod(path, mode)


def _remove_stale_socket(path: Path) -> None:
    if not path.exists():
        return
    if not stat.S_ISSOCK(path.stat().st_mode):
        raise ConfigError(f"BROKER_UNIX_SOCKET: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # left by a process that died: nobody listens on it
            return
        except OSError:
            return
    raise ConfigError(f"BROKER_UNIX_SOCKET: another process is serving on {path}")


def _listening_url(runner: web.AppRunner, config: Config) -> str:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return f"http://{config.host}:{address[1]}"
    return f"http://{config.host}:{config.port}"
