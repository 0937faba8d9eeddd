"""Start, pin, watch and stop the benchmark's processes; read their memory from /proc.

Every process is started in its own session and registered, so `stop_all` (run from a
`finally`, atexit and SIGTERM) can end it and its children, whatever went wrong.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

LOAD_CPU = 0  # wrk, the upstream, the sandbox and this driver
PROXY_CPU = 1  # the proxy under test, alone

_started: list[Proc] = []


class BenchError(Exception):
    """A missing tool or a process that would not start: one line for the user."""


class Proc:
    """One pinned child process with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            # taskset execs the command: the pid we hold is the process itself, not a wrapper.
            self.popen = subprocess.Popen(  # noqa: S603 -- argv built by the harness
                ["taskset", "-c", str(cpu), *argv],  # noqa: S607 -- found on PATH by design
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        _started.append(self)
        pids_file = os.environ.get("BENCH_PIDS_FILE")
        if pids_file:  # run.sh's backstop, should this driver be killed outright
            with open(pids_file, "a") as pids:
                pids.write(f"{self.pid}\n")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with {self.popen.returncode}; see {self.log}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after `timeout`."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        if self in _started:
            _started.remove(self)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def stop_all() -> None:
    """Stop every process this run started, newest first."""
    for proc in reversed(list(_started)):
        proc.stop()


atexit.register(stop_all)


def free_port() -> int:
    """Ask the kernel for a free loopback port (nginx needs a number in its config)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: Proc, *, expect: int = 200, timeout: float = 30.0) -> None:
    """Poll `url` until it answers `expect`; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 -- loopback
                if answer.status == expect:
                    return
                last = str(answer.status)
        except urllib.error.HTTPError as exc:
            if exc.code == expect:
                return
            last = str(exc.code)
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise BenchError(f"{proc.name} did not answer {expect} at {url} ({last}); see {proc.log}")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field} for pid {pid}")


def rss_mb(pid: int) -> float:
    """Resident memory now (VmRSS), in MB (10^6 bytes)."""
    return _status_kib(pid, "VmRSS") * 1024 / 1e6


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory since the last `reset_peak` (VmHWM), in MB."""
    return _status_kib(pid, "VmHWM") * 1024 / 1e6


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (`5` to clear_refs), so a peak is one scenario's own."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
