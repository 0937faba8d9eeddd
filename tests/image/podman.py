"""Build the image and run its containers with podman, the way the operator's docs do.

Rootful podman from Debian's packages, with the flags this machine kind needs (issue 17): the
runc runtime (crun fails on mixed cgroups), explicit ulimits (no CAP_SYS_RESOURCE to raise
them), `build --format docker` (the OCI format drops HEALTHCHECK) and the host's network, so
a container reaches the sandbox amoCRM on the host's loopback. The base image comes from
deploy/image-base.sh (Docker Hub is out of reach) and is built once per machine.

Every call is blocking: the sandbox runs as a process of its own, not in the test's loop.
Error messages carry the podman subcommand and its stderr tail, never the whole command line.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from broker.pair import fingerprint
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/python-base:bookworm"
IMAGE = "localhost/amo-broker:image-test"
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")
COMMAND_TIMEOUT = 120.0
BUILD_TIMEOUT = 300.0
READY_TIMEOUT = 20.0
INSTALL = "apt-get install --no-install-recommends podman runc iptables debootstrap"


class Secret(str):
    """A caller secret or key; its repr is a fingerprint, so a failing assert shows no secret."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Secret({fingerprint(self)})"


def _global_options() -> list[str]:
    # crun 1.8.1 (Debian 12) fails on this machine kind's mixed cgroups; runc does not.
    return ["--runtime", "runc"] if shutil.which("runc") else []


def podman(
    *args: str, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run `podman ARGS`; return the completed process (the caller checks its exit code)."""
    return subprocess.run(
        ["podman", *_global_options(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def checked(*args: str, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run `podman ARGS`, fail with its stderr tail unless it exits 0; return its stdout."""
    done = podman(*args, stdin=stdin, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"podman {args[0]} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stdout


def require_podman() -> None:
    """Skip (fail under CI) where rootful podman cannot run containers."""
    if shutil.which("podman") is None:
        unavailable(f"podman is not installed (Debian: {INSTALL})")
    if os.geteuid() != 0:
        unavailable(
            "the image tests run rootful podman and chown secrets to uid 10001: run as root"
        )
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}")
    if info.returncode != 0:
        unavailable(f"podman cannot run here: {info.stderr.strip()[-500:]}")


def build_base() -> float:
    """Build the local base image unless it exists; return the seconds it took (0: cached)."""
    if podman("image", "exists", BASE_IMAGE).returncode == 0:
        return 0.0
    if shutil.which("debootstrap") is None:
        unavailable(f"no {BASE_IMAGE} and no debootstrap to build it (Debian: {INSTALL})")
    started = time.monotonic()
    done = subprocess.run(
        [str(ROOT / "deploy" / "image-base.sh"), BASE_IMAGE],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"deploy/image-base.sh failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return time.monotonic() - started


def build_image() -> float:
    """Build the Dockerfile on the local base as IMAGE; return the seconds it took."""
    started = time.monotonic()
    checked(
        "build",
        "--format",
        "docker",  # podman's default OCI format drops the HEALTHCHECK
        "--network",
        "host",  # pip reaches the registry as the host does
        *ULIMITS,
        "--build-arg",
        f"PYTHON_IMAGE={BASE_IMAGE}",
        "--tag",
        IMAGE,
        str(ROOT),
        timeout=BUILD_TIMEOUT,
    )
    return time.monotonic() - started


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes


def http_get(url: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    """One GET over a fresh connection; a refused connection raises OSError."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.read())
    finally:
        connection.close()


def http_post(url: str, path: str) -> Reply:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request("POST", path, body=b"")
        response = connection.getresponse()
        return Reply(response.status, response.read())
    finally:
        connection.close()


@dataclass
class Container:
    """A named container of IMAGE, listening on the host's loopback at `url`."""

    name: str
    url: str

    def inspect(self, template: str) -> str:
        return checked("inspect", "--format", template, self.name).strip()

    def exec(self, *command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the container, as the image's user, with its environment."""
        return podman(
            "exec", *(["-i"] if stdin is not None else []), self.name, *command, stdin=stdin
        )

    def logs(self) -> str:
        """What the container wrote (JSON log lines on stderr), all runs of it."""
        done = podman("logs", self.name)
        return done.stdout + done.stderr

    def wait_healthy(self) -> None:
        """Wait until /healthz answers 200; fail with the log tail if it does not or it exits."""
        self._wait_for("/healthz")

    def wait_ready(self) -> None:
        """Wait until /readyz answers 200: a serving broker adopts a pair stored by another
        process (`exchange-code`) at its next poll of the SQLite store, within 5 s."""
        self._wait_for("/readyz")

    def _wait_for(self, path: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if http_get(self.url, path).status == 200:
                    return
            if self.inspect("{{.State.Running}}") != "true":
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no 200 from {path}; log tail:\n{self.logs()[-3000:]}")

    def stop(self, timeout: int = 90) -> tuple[float, int]:
        """`podman stop -t TIMEOUT`, as the docs give it; return (seconds, container exit code)."""
        started = time.monotonic()
        checked("stop", "--time", str(timeout), self.name, timeout=timeout + 30)
        return time.monotonic() - started, int(self.inspect("{{.State.ExitCode}}"))

    def start(self) -> None:
        checked("start", self.name)
        self.wait_healthy()

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name)


def run_detached(name: str, port: int, *options: str) -> Container:
    """Start IMAGE as `name` with the host's network and BROKER_PORT=port, and `options`."""
    podman("rm", "--force", "--time", "0", name)  # a leftover of an interrupted run
    checked(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        *ULIMITS,
        "--env",
        f"BROKER_PORT={port}",
        *options,
        IMAGE,
    )
    return Container(name, f"http://127.0.0.1:{port}")


def run_once(
    options: list[str], command: list[str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`podman run --rm` IMAGE once with `options` and `command` (no health check timer)."""
    return podman(
        "run", "--rm", "--no-healthcheck", *ULIMITS, *options, IMAGE, *command, stdin=stdin
    )
